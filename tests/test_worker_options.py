"""``pixq worker``'s options are one typed object (worker/pixq/worker/ops/options.py): each field is one flag of the
command, with its default and its rule, and the parsed command line builds the object once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import typer.main
from pixq.errors import ConfigError
from pixq.worker.gpu.batch import BatchPolicy
from pixq.worker.gpu.pipeline import PipelineOptions
from pixq.worker.gpu.speedups import SpeedupOptions
from pixq.worker.ops.cli import app
from pixq.worker.ops.options import WorkerOptions

COMMAND = typer.main.get_command(app).commands["worker"]  # type: ignore[attr-defined]
FLAGGED = [f for f in dataclasses.fields(WorkerOptions) if "flag" in f.metadata]

# A valid value unlike the default, for each option field (a new field needs one here: the test says so).
OTHER: dict[str, Any] = {
    "model": "some/model", "device": "cuda:1", "dtype": "bfloat16", "name": "w@h", "offload": True,
    "loglevel": "DEBUG", "ready_file": Path("/tmp/ready"), "compile": True, "compile_mode": "max-autotune",
    "compile_scope": "blocks", "compile_cache": Path("/tmp/cache"), "artefacts": Path("/tmp/sets"),
    "warmup": ("512x512", "1024x768"), "warmup_modes": ("fast",), "defer_warmup": False, "prompt_cache": 8,
    "encode_threads": 3, "metrics_port": 9100, "metrics_host": "0.0.0.0", "trim_text": False, "vae_tile_above": 0,
    "compile_vae": False, "compile_batches": False, "max_batch": 4, "gather_window_s": 0.5,
}


def argv_for(values: dict[str, Any]) -> list[str]:
    """The command line that gives each option field ``values[name]``."""
    params = {p.name: p for p in COMMAND.params}
    argv: list[str] = []
    for name, value in values.items():
        param = params[name]
        if param.is_bool_flag:
            argv.append(param.opts[0] if value else param.secondary_opts[0])
            continue
        for item in value if param.multiple else [value]:
            argv += [param.opts[0], str(item)]
    return argv


def test_every_option_field_is_a_flag_and_the_command_line_builds_the_object() -> None:
    assert sorted(OTHER) == sorted(f.name for f in FLAGGED), "give a new option field a value in OTHER"
    with COMMAND.make_context("worker", argv_for(OTHER)) as ctx:
        built = WorkerOptions.from_cli(ctx.params, default_model="the/default")
    assert built == WorkerOptions(**OTHER)
    # Nothing given: every field's default, the model from PIXQ_MODEL (the settings); --gpus is the command's own.
    with COMMAND.make_context("worker", []) as ctx:
        assert WorkerOptions.from_cli(ctx.params, default_model="the/default") == WorkerOptions(model="the/default")
        assert ctx.params["gpus"] is None
    assert "concurrency" not in {p.name for p in COMMAND.params}  # a field without option(...) stays off the CLI


@pytest.mark.parametrize(("field", "value", "message"), [
    ("dtype", "float8", "--dtype: must be one of auto, float32, float16, bfloat16"),
    ("compile_mode", "fastest", "--compile-mode: must be one of"),
    ("compile_scope", "layer", "--compile-scope: must be one of blocks, model"),
    ("warmup", ("512x512", "13x13"), "--warmup: size must be positive multiples of 8 (got '13x13')"),
    ("warmup_modes", ("exact", "slow"), "--warmup-mode: must be exact or fast"),
    ("encode_threads", -1, "--encode-threads: must be 0 (automatic) or more"),
    ("vae_tile_above", -1, "--vae-tile-above: must be 0 (always tile) or more"),
    ("max_batch", -2, "--max-batch: must be 0 (by size) or more"),
    ("gather_window_s", 10.5, "--gather-window: must be 0 to 10 seconds"),
    ("metrics_host", " ", "--metrics-host (PIXQ_METRICS_HOST): must be an address"),
])
def test_a_broken_rule_is_one_line_naming_the_flag(field: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        WorkerOptions(model="m", **{field: value})
    assert str(refused.value).startswith(message)
    assert "\n" not in str(refused.value)


def test_each_step_takes_its_part() -> None:
    options = WorkerOptions(**OTHER)
    loading = options.pipeline_options(warmup_modes=("fast",))
    assert loading == PipelineOptions(
        dtype="bfloat16", offload=True, compile_cache="/tmp/cache", artefacts="/tmp/sets",
        warmup=((512, 512), (1024, 768)), warmup_modes=("fast",),
        speedups=SpeedupOptions(compile=True, compile_mode="max-autotune", compile_scope="blocks", prompt_cache=8,
                                trim_text=False, vae_tile_above=0, compile_vae=False, compile_batches=False),
        batch=BatchPolicy(max_batch=4, gather_window_s=0.5, by_size=True),
    )
    assert options.node_name() == "w@h"
