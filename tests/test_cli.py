"""The `pixq` command line as a person or a script uses it (real subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import typer.main
from PIL import Image
from pixq.cli import COMPONENT_COMMANDS, build_command
from pixq.errors import BrokerUnavailable, InvalidRequest, JobNotFound, MissingComponent

from tests.services import Service


def pixq(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pixq", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_submit_wait_json_download(env: dict[str, str], worker: Service, tmp_path: Path) -> None:
    done = pixq("submit", "A bowl of ramen", "--width", "256", "--height", "128", "--steps", "6",
                "--seed", "11", "--num-images", "2", "--wait", "--json", env=env)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert {"id", "state", "request", "images", "error"} <= set(record)
    assert record["state"] == "succeeded" and record["error"] is None
    assert [(i["seed"], i["width"], i["height"]) for i in record["images"]] == [(11, 256, 128), (12, 256, 128)]
    assert all(i["key"] == f"jobs/{record['id']}/{n}.png" for n, i in enumerate(record["images"]))
    assert "succeeded" in done.stderr and "6/6" in done.stderr  # the progress bar's last state

    status = pixq("status", record["id"], "--json", env=env)
    assert json.loads(status.stdout)["images"] == record["images"]
    human = pixq("status", record["id"], env=env)
    assert "succeeded" in human.stdout and record["id"] in human.stdout

    got = pixq("download", record["id"], "-o", str(tmp_path), env=env)
    assert got.returncode == 0, got.stderr
    assert "image 0" in got.stderr and "image 1" in got.stderr  # the download's progress bars
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == [f"{record['id']}-0.png", f"{record['id']}-1.png"]
    with Image.open(files[0]) as png:
        assert png.size == (256, 128)

    url = pixq("url", record["id"], "--expires-in", "60", env=env)
    assert url.returncode == 0 and url.stdout.startswith("http://127.0.0.1:")


def test_submit_prints_the_id_and_wait_follows_it(env: dict[str, str], worker: Service) -> None:
    sub = pixq("submit", "id only", "--width", "128", "--height", "128", "--steps", "2", env=env)
    assert sub.returncode == 0
    job_id = sub.stdout.strip()
    assert len(job_id) == 32
    waited = pixq("wait", job_id, "--json", env=env)
    assert waited.returncode == 0 and json.loads(waited.stdout)["state"] == "succeeded"


def test_user_mistakes_are_one_line_and_non_zero(env: dict[str, str]) -> None:
    bad = pixq("submit", "x", "--width", "1001", "--steps", "0", env=env)
    assert bad.returncode == InvalidRequest.exit_code
    assert bad.stderr.strip().splitlines() == [
        "error: num_inference_steps: Input should be greater than or equal to 1; "
        "width: must be a multiple of 8 (got 1001)"
    ]
    unknown = pixq("status", "nope", env=env)
    assert unknown.returncode == JobNotFound.exit_code
    assert unknown.stderr.strip() == "error: no job 'nope' (never submitted, or expired)"
    assert "Traceback" not in bad.stderr + unknown.stderr

    config = pixq("status", "x", env={**env, "PIXQ_REDIS_URL": "http://127.0.0.1:1"})
    assert config.returncode == 2
    assert config.stderr.strip().splitlines() == [
        "error: PIXQ_REDIS_URL: 'http://127.0.0.1:1' must start with redis://, rediss:// (TLS), unix://, "
        "redis+sentinel:// or rediss+sentinel://"
    ]
    missing = pixq("status", "x", env={k: v for k, v in env.items() if k != "PIXQ_REDIS_URL"})
    assert missing.returncode == 2 and missing.stderr.startswith("error: PIXQ_REDIS_URL is not set")


def test_redis_down_at_submit_is_a_clear_error(env: dict[str, str]) -> None:
    from tests.services import free_port

    down = pixq("submit", "x", env={**env, "PIXQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert down.returncode == BrokerUnavailable.exit_code
    assert down.stderr.startswith("error: Redis unreachable: ") and down.stderr.strip().endswith("job not submitted")
    assert len(down.stderr.strip().splitlines()) == 1
    assert "Traceback" not in down.stderr


def test_schema_prints_the_request_json_schema(env: dict[str, str]) -> None:
    out = pixq("schema", env=env)
    schema = json.loads(out.stdout)
    assert schema["title"] == "JobRequest" and "prompt" in schema["required"]
    assert schema["properties"]["guidance_scale"]["default"] == 4.5


def test_help_shows_defaults(env: dict[str, str]) -> None:
    out = pixq("submit", "--help", env=env)
    assert out.returncode == 0
    assert "--steps" in out.stdout and "default: 20" in out.stdout


@pytest.mark.slow  # builds and loads a pipeline in a subprocess
def test_make_test_model_writes_a_loadable_pipeline(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pixq", "make-test-model", str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]


def test_producer_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers', 'pixq.worker'):\n"
        "    sys.modules[name] = None  # any import of these now fails\n"
        "import pixq, pixq.cli, pixq.client, pixq.s3\n"
        "from pixq import Client, Settings, JobRequest\n"
        "assert not any((m.split('.')[0] == 'torch' or m.startswith('pixq.worker')) and sys.modules[m]\n"
        "               for m in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# -- the one CLI: composition, lazy loading, usage errors -------------------------------------------

HEAVY = ("torch", "diffusers", "transformers", "pixq.worker", "celery", "boto3")

# Runs one pixq command line in this interpreter and prints, last, the modules it imported.
_IMPORTS_OF = """
import json, sys
sys.argv = ["pixq", *sys.argv[1:]]
from pixq.cli import run
code = run()
print("\\nMODULES " + json.dumps(sorted(sys.modules)))
sys.exit(code)
"""


def imported_by(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    done = subprocess.run([sys.executable, "-c", _IMPORTS_OF, *args], env=env, capture_output=True, text=True,
                          timeout=60)
    modules = json.loads(done.stdout.rsplit("MODULES ", 1)[1])
    return done, {m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)}


def test_help_and_status_import_neither_torch_nor_the_worker(env: dict[str, str], raw_redis: object) -> None:
    listed, heavy = imported_by("--help", env=env)
    assert listed.returncode == 0 and "submit" in listed.stdout and "worker" in listed.stdout
    assert heavy == set(), heavy
    status, heavy = imported_by("status", "no-such-job", env=env)
    assert status.returncode == JobNotFound.exit_code, status.stderr  # it reached Redis and read
    assert heavy == set(), heavy


@pytest.mark.parametrize(("args", "words"), [
    (("status",), "Missing argument"),
    (("submit", "x", "--steps", "abc"), "Invalid value for '--steps'"),
    (("submit", "x", "--bogus"), "No such option: --bogus"),
    (("statsu", "x"), "No such command 'statsu'"),
    (("url", "x", "--index", "-1"), "Invalid value for '--index'"),
    (("worker", "--gpus", "0", "--bogus"), "No such option: --bogus"),
])
def test_usage_mistakes_are_one_line_and_exit_2(args: tuple[str, ...], words: str, env: dict[str, str]) -> None:
    done = pixq(*args, env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], done.stderr
    assert "Usage: pixq" in lines[0] and "Traceback" not in done.stderr


def test_component_commands_list_their_own_help_without_importing_them() -> None:
    """What `pixq --help` says of each worker command is what the command itself says."""
    import importlib

    from pixq.worker.ops.cli import app as worker_app

    for module in {spec.module for spec in COMPONENT_COMMANDS}:
        specs = [spec for spec in COMPONENT_COMMANDS if spec.module == module]
        module_real = typer.main.get_command(importlib.import_module(module).app).commands  # type: ignore[attr-defined]
        assert {spec.name for spec in specs} == set(module_real), module
        for spec in specs:
            first_paragraph = " ".join((module_real[spec.name].help or "").split("\n\n")[0].split())
            assert spec.help == first_paragraph, spec.name
            assert spec.installed()
    real = typer.main.get_command(worker_app).commands  # type: ignore[attr-defined]
    group = build_command()
    with group.make_context("pixq", ["worker", "--help"], resilient_parsing=True) as ctx:
        loaded = group.get_command(ctx, "worker").spec.load()
    assert (loaded.name, loaded.help) == ("worker", real["worker"].help)


# Without pixart-queue-worker: pixq.worker cannot be imported (as after `pip install pixart-queue`).
_WITHOUT_WORKER = """
import sys
sys.modules["pixq.worker"] = None
sys.argv = ["pixq", *sys.argv[1:]]
from pixq.cli import run
sys.exit(run())
"""


def test_without_the_worker_its_commands_say_what_to_install(env: dict[str, str]) -> None:
    def light(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _WITHOUT_WORKER, *args], env=env, capture_output=True,
                              text=True, timeout=60)

    listed = light("--help")
    assert listed.returncode == 0
    assert "Not installed: pip install pixart-queue-worker" in listed.stdout
    assert "Worker and local stack (pixart-queue-worker)" not in listed.stdout  # no panel offers them as usable
    for args in (("worker",), ("up", "--dir", "x"), ("flower", "--help"), ("make-test-model", "d")):
        done = light(*args)
        assert done.returncode == MissingComponent.exit_code, done.stderr
        assert done.stderr.strip() == f"error: `pixq {args[0]}` needs pixart-queue-worker: pip install " \
                                      "pixart-queue-worker"
    assert light("schema").returncode == 0  # the producer's commands work


# Without the api extra: fastapi cannot be imported (as after `pip install pixart-queue`).
_WITHOUT_API = _WITHOUT_WORKER.replace('sys.modules["pixq.worker"] = None', 'sys.modules["fastapi"] = None')


def test_without_the_api_extra_help_says_to_install_the_extra(env: dict[str, str]) -> None:
    """rich read "[api]" as markup and printed "pip install pixart-queue", which is installed already."""
    def light(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _WITHOUT_API, *args], env={**env, "COLUMNS": "200"},
                              capture_output=True, text=True, timeout=60)

    listed = light("--help")
    assert listed.returncode == 0
    assert "Not installed: pip install 'pixart-queue[api]'" in listed.stdout, listed.stdout
    assert "(not installed: pip install 'pixart-queue[api]')" in listed.stdout, listed.stdout
    done = light("keys", "list")
    assert done.returncode == MissingComponent.exit_code
    assert done.stderr.strip() == "error: `pixq keys` needs pixart-queue[api]: pip install 'pixart-queue[api]'"


def test_api_on_a_port_in_use_says_so_in_one_line_and_never_serving(env: dict[str, str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = pixq("api", "--port", str(port), env={**env, "PIXQ_API_KEY_PEPPER": "p" * 16})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: --port: cannot listen on 127.0.0.1:{port}: "
                                                "Address already in use"], done.stderr


def test_format_and_mode_choices_are_the_schemas() -> None:
    from pixq import commands
    from pixq.schema import OutputFormat, RenderMode

    assert typing.get_args(commands.FormatChoice) == tuple(f.value for f in OutputFormat)
    assert typing.get_args(commands.ModeChoice) == tuple(m.value for m in RenderMode)


def test_gpus_children_get_every_option_the_parent_parsed(tmp_path: Path) -> None:
    """Give `pixq worker` a non-default value for every option; the children's argv, parsed by the same
    command, must yield the same values (but the ones each child gets from its slot). An option added
    later is covered without changing this test."""
    from pixq.worker.ops.cli import app as worker_app
    from pixq.worker.ops.cli import worker as worker_function
    from pixq.worker.ops.supervisor import SLOT_OPTIONS, Slot, option_argv, worker_argv

    command = typer.main.get_command(worker_app).commands["worker"]  # type: ignore[attr-defined]
    hints = typing.get_type_hints(worker_function)
    samples = {int: "7", float: "0.25", str: "128x128", Path: str(tmp_path / "p")}
    argv: list[str] = []
    for param in command.params:
        if param.param_type_name != "option" or param.name in SLOT_OPTIONS:
            continue
        if param.is_bool_flag:
            argv.append(param.secondary_opts[0] if param.default else param.opts[0])
            continue
        kind = next((t for t in (hints[param.name], *typing.get_args(hints[param.name])) if t in samples), None)
        if kind is None:  # list[str]
            kind = typing.get_args(typing.get_args(hints[param.name])[0])[0]
        for _ in range(2 if param.multiple else 1):
            argv += [param.opts[0], samples[kind]]
    with command.make_context("worker", [*argv, "--gpus", "all"]) as parent:
        parsed = dict(parent.params)
    slot = Slot(gpu=1, device="1", name="gpu1@h", ready_file=None)
    child_argv = worker_argv(option_argv(command.params, parsed), metrics_port=9100)(slot)
    start = child_argv.index("worker") + 1
    with command.make_context("worker", child_argv[start:]) as child:
        got = dict(child.params)
    assert (got["device"], got["name"], got["metrics_port"], got["gpus"]) == ("cuda:0", "gpu1@h", 9101, None)
    differing = {k for k in parsed if k not in SLOT_OPTIONS and parsed[k] != got[k]}
    assert differing == set(), {k: (parsed[k], got[k]) for k in differing}
    defaults = {p.name: p.default for p in command.params}
    unchanged = {k for k in parsed if k not in SLOT_OPTIONS and parsed[k] == defaults[k]}
    assert unchanged == set(), unchanged  # the test really moved every option off its default


# -- the local stack's children, a second `pixq up`, what status shows --------------------------------


def test_children_start_with_the_cwd_off_their_import_path(tmp_path: Path) -> None:
    """A user's folder with its own pixq.py, worker.py or celery.py must not replace ours in a child."""
    from pixq.worker.ops.flower import flower_argv
    from pixq.worker.ops.supervisor import Slot, worker_argv

    from tests.services import pixq_argv, python_module_argv

    for name in ("pixq.py", "worker.py", "celery.py", "typer.py"):
        (tmp_path / name).write_text("raise SystemExit('the folder\'s own module ran')\n")
    schema = subprocess.run(pixq_argv("schema"), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert schema.returncode == 0 and json.loads(schema.stdout)["title"] == "JobRequest", schema.stderr
    child = worker_argv(["--help"])(Slot(gpu=0, device="0", name="gpu0@h", ready_file=None))
    helped = subprocess.run(child, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--compile" in helped.stdout, helped.stderr
    assert flower_argv()[:len(python_module_argv("celery"))] == python_module_argv("celery")
    celery = subprocess.run(python_module_argv("celery", "--version"), cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert celery.returncode == 0 and celery.stdout.strip()[0].isdigit(), celery.stderr


def test_a_second_up_on_a_running_stacks_dir_is_refused(tmp_path: Path) -> None:
    from tests.services import stack_dir_lock

    state = tmp_path / "state"
    with stack_dir_lock(state):  # as the first `pixq up` holds it
        second = subprocess.run([sys.executable, "-m", "pixq", "up", "--dir", str(state)], capture_output=True,
                                text=True, timeout=60)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"error: --dir {state}: a stack is already running there (pid {os.getpid()}); use it, stop it (Ctrl-C in "
        "its shell) or give another --dir"]
    assert sorted(p.name for p in state.iterdir()) == ["up.lock"]  # no credentials or model written over
    with stack_dir_lock(state):
        pass  # free again once the first one ended


def test_status_says_when_a_job_waits_for_the_gpu_and_never_wraps_when_piped(env: dict[str, str],
                                                                             raw_redis: object) -> None:
    import uuid

    from pixq.records import JobState, RecordStore
    from pixq.schema import parse_request

    records = RecordStore(raw_redis, 600)  # type: ignore[arg-type]
    job_id = uuid.uuid4().hex
    prompt = "a very long prompt " * 12
    records.create(job_id, parse_request({"prompt": prompt, "model_name": env["PIXQ_MODEL"], "seed": 3}))
    try:
        records.transition(job_id, None, state=JobState.running, worker="gpu0@h", step=0, batch=0)  # as claimed
        waiting = pixq("status", job_id, env=env)
        assert "progress  claimed, waiting for the GPU (0/20 steps) on gpu0@h" in waiting.stdout
        assert f"  prompt    {prompt!r}" in waiting.stdout.splitlines()  # one line however long, piped
        records.transition(job_id, None, batch=1)  # its render started
        assert "progress  step 0/20 on gpu0@h" in pixq("status", job_id, env=env).stdout
        records.transition(job_id, None, step=7, batch=3)
        assert "progress  step 7/20 in a batch of 3 images on gpu0@h" in pixq("status", job_id, env=env).stdout
    finally:
        records.delete(job_id)
