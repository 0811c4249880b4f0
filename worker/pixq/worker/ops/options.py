"""``pixq worker``'s options: one typed object, built once from the command line and handed to each step.

Each field of ``WorkerOptions`` is one option: its type, its default, its help and the rule its value keeps,
side by side (``option(...)``). ``cli_parameters()`` turns the fields into the Typer command's parameters and
``WorkerOptions.from_cli`` the parsed values back into the object, whose ``__post_init__`` checks every rule
(one ``ConfigError`` line naming the flag). So a new option is one field here: the command, its validation and
the ``--gpus`` children (``supervisor.option_argv`` writes out every parsed option) follow. A field without
``option(...)`` is not on the command line (``concurrency``).

Each step of the start takes its part: ``pipeline_options()`` (``gpu.pipeline.load_pipeline``),
``speedup_options()``, ``batch_policy()``, ``job_threads()``, ``node_name()``.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import typer
from pixq.errors import ConfigError
from pixq.worker.gpu.batch import BatchPolicy
from pixq.worker.gpu.compile import COMPILE_MODES, COMPILE_SCOPES
from pixq.worker.gpu.pipeline import DTYPES, PipelineOptions, parse_size
from pixq.worker.gpu.speedups import SpeedupOptions
from pixq.worker.gpu.vae import VAE_TILE_ABOVE
from pixq.worker.ops.identity import default_name

Check = Callable[[Any], "str | None"]  # the problem with a value, or None


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line."""

    help: str
    decls: tuple[str, ...] = ()  # e.g. ("--compile/--no-compile",); default: --field-name
    check: Check | None = None
    envvar: str | None = None

    def name(self, field_name: str) -> str:
        """The flag as an error names it: ``--gather-window``, ``--metrics-host (PIXQ_METRICS_HOST)``."""
        flag = self.decls[0].split("/")[0] if self.decls else "--" + field_name.replace("_", "-")
        return f"{flag} ({self.envvar})" if self.envvar else flag


def option(default: Any, help: str, *, check: Check | None = None, decls: tuple[str, ...] = (),
           envvar: str | None = None) -> Any:
    """A field that is also a ``pixq worker`` option (``default`` MISSING: required, the command gives None)."""
    flag = {"flag": Flag(help, decls, check, envvar)}
    if default is MISSING:
        return field(metadata=flag)
    return field(default=default, metadata=flag)


def one_of(choices: Collection[str]) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def at_least(low: int, meaning: str) -> Check:
    return lambda value: None if value >= low else f"must be {low} ({meaning}) or more"


def each(check: Check) -> Check:
    return lambda values: next((p for p in (check(v) for v in values) if p is not None), None)


def size_problem(text: str) -> str | None:
    try:
        parse_size(text)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class WorkerOptions:
    model: str = option(MISSING, "Model to serve [default: PIXQ_MODEL]")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    dtype: str = option("auto", f"One of {', '.join(DTYPES)}; auto: bf16 on GPU, fp32 on CPU", check=one_of(DTYPES))
    name: str | None = option(None, "Node and lease name, unique among live workers "
                                    "[default: gpuN-PID@host, cpu-PID@host]")
    offload: bool = option(False, "enable_model_cpu_offload, for cards of 24 GB or less")
    loglevel: str = option("INFO", "Log level.")
    ready_file: Path | None = option(None, "File written once serving (readiness probes)")
    concurrency: int = 2  # job threads at least: one renders while the other encodes and uploads
    # Speed-ups (pixq.worker.gpu.speedups, docs/performance.md)
    compile: bool = option(False, "torch.compile the transformer", decls=("--compile/--no-compile",))
    compile_mode: str = option("default", "default, reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs, "
                               "max-autotune", check=one_of(COMPILE_MODES))
    compile_scope: str = option("model", "model: the whole forward as one graph (fastest renders); blocks: one "
                                "graph shared by the blocks (ready sooner, ~9% slower through the queue)",
                                check=one_of(COMPILE_SCOPES))
    compile_cache: Path | None = option(None, "Inductor cache directory kept across restarts "
                                              "[default: torch's, under /tmp]")
    artefacts: Path | None = option(None, "Root of `pixq compile` artefact sets (read-only is fine): AOT graphs "
                                          "instead of compiling at start; no matching set: one log line, then "
                                          "--compile as asked")
    warmup: tuple[str, ...] = option((), "Render one job at this WIDTHxHEIGHT per mode before serving; repeatable",
                                     check=each(size_problem))
    warmup_modes: tuple[str, ...] = option(("exact", "fast"), "Modes to warm up: exact, fast; repeatable "
                                           "[default: both]", decls=("--warmup-mode",),
                                           check=each(lambda m: None if m in ("exact", "fast") else
                                                      "must be exact or fast"))
    # Warm up only the first mode before serving; the others once serving, one render at a time
    # under the GPU lock (a job waits at most one warm-up render; the first job is not held up).
    defer_warmup: bool = option(True, "Warm up the first mode before serving, the others while serving, between "
                                "jobs", decls=("--defer-warmup/--no-defer-warmup",))
    prompt_cache: int = option(64, "Prompts whose T5 embeddings stay on the device")
    encode_threads: int = option(0, "PNG encoding threads while the GPU is idle [default 0: min(8, cores)]; one "
                                 "while another job renders", check=at_least(0, "automatic"))
    metrics_port: int = option(0, "Serve /metrics and /readyz on this port; 0: off")
    metrics_host: str = option("127.0.0.1", "Address of the metrics port (no authentication: keep it off networks "
                               "you do not trust; 0.0.0.0 where Prometheus scrapes the pod)",
                               envvar="PIXQ_METRICS_HOST",
                               check=lambda v: None if v.strip() else "must be an address, e.g. 127.0.0.1 or 0.0.0.0")
    trim_text: bool = option(True, "Cut T5 padding from cross-attention (exact up to rounding)",
                             decls=("--trim-text/--no-trim-text",))
    vae_tile_above: int = option(VAE_TILE_ABOVE, "Decode images of more than this many pixels in tiles "
                                 "(0: every decode)", check=at_least(0, "always tile"))
    compile_vae: bool = option(True, "With --compile: the VAE decoder too", decls=("--compile-vae/--no-compile-vae",))
    compile_batches: bool = option(True, "With --compile: static graphs for full batches too (compiled at warm-up; "
                                   "other batches run eager)", decls=("--compile-batches/--no-compile-batches",))
    # Images per pipeline call for jobs that can share one (0: per size, pixq.worker.gpu.batch); jobs
    # only batch with what already waits, unless a gather window lets the first one wait that long.
    max_batch: int = option(0, "Images per pipeline call for waiting jobs that can share one (same size, steps, "
                            "guidance, mode, format) [default 0: by size, 8 up to 512² rendered on a GPU, else 1]",
                            check=at_least(0, "by size"))
    gather_window_s: float = option(0.0, "Seconds the first job of a batch may wait for partners [default 0: batch "
                                    "only what already waits]", decls=("--gather-window",),
                                    check=lambda v: None if 0 <= v <= 10 else "must be 0 to 10 seconds")

    def __post_init__(self) -> None:
        for f in fields(self):
            flag: Flag | None = f.metadata.get("flag")
            problem = flag.check(getattr(self, f.name)) if flag is not None and flag.check is not None else None
            if flag is not None and problem is not None:
                raise ConfigError(f"{flag.name(f.name)}: {problem}")

    @classmethod
    def from_cli(cls, values: Mapping[str, Any], default_model: str) -> WorkerOptions:
        """The options from the command's parsed values (``ctx.params``); checked. ``default_model``: PIXQ_MODEL."""
        given: dict[str, Any] = {f.name: values.get(f.name) for f in fields(cls) if "flag" in f.metadata}
        # None: not given (the field's default); a repeatable option not given is empty: its default too.
        given = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in given.items() if v not in (None, (), [])}
        return cls(**{"model": default_model, **given})

    def speedup_options(self) -> SpeedupOptions:
        return SpeedupOptions(compile=self.compile, compile_mode=self.compile_mode, compile_scope=self.compile_scope,
                              prompt_cache=self.prompt_cache, trim_text=self.trim_text,
                              vae_tile_above=self.vae_tile_above, compile_vae=self.compile_vae,
                              compile_batches=self.compile_batches)

    def batch_policy(self) -> BatchPolicy:
        return BatchPolicy(max_batch=self.max_batch, gather_window_s=self.gather_window_s,
                           by_size=self.device.startswith("cuda"))

    def pipeline_options(self, warmup_modes: Sequence[str]) -> PipelineOptions:
        """How ``load_pipeline`` loads, compiles and warms up this worker's pipeline (``warmup_modes``: those
        warmed before serving)."""
        return PipelineOptions(
            dtype=self.dtype, offload=self.offload, speedups=self.speedup_options(),
            compile_cache=str(self.compile_cache) if self.compile_cache else None,
            artefacts=str(self.artefacts) if self.artefacts else None,
            warmup=tuple(parse_size(size) for size in self.warmup), warmup_modes=tuple(warmup_modes),
            batch=self.batch_policy(),
        )

    def job_threads(self, policy: BatchPolicy) -> int:
        """Enough Celery threads (each holds one message) for a batch rendering while the next one
        gathers: twice the largest batch ``policy`` (this model's) gives, at least ``concurrency``."""
        return max(self.concurrency, 2 * policy.largest())

    def node_name(self) -> str:
        """``--name``, else the device, this process's id and the host (``cpu-4711@host``)."""
        return self.name or default_name(self.device)


def cli_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per option field, annotated as Typer reads it: a required field ``T`` is
    ``T | None`` (default None), a ``tuple[str, ...]`` a repeatable ``list[str] | None`` (default None: the
    field's default)."""
    hints = typing.get_type_hints(WorkerOptions)
    params = []
    for f in fields(WorkerOptions):
        flag: Flag | None = f.metadata.get("flag")
        if flag is None:
            continue
        kind: Any = hints[f.name]
        default = None if f.default is MISSING else f.default
        if typing.get_origin(kind) is tuple:  # tuple[str, ...]: repeatable
            kind, default = list[str] | None, None
        elif f.default is MISSING:
            kind = kind | None
        info = typer.Option(*flag.decls, help=flag.help, envvar=flag.envvar)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[kind, info]))
    return params


def with_option_parameters(command: Callable[..., None], *extra: inspect.Parameter) -> Callable[..., None]:
    """``command(ctx, **values)`` made a Typer command taking every ``WorkerOptions`` option and ``extra``
    (options of the command alone, such as ``--gpus``): its signature and annotations say so."""
    ctx = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    params = [ctx, *cli_parameters(), *extra]
    command.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return command
