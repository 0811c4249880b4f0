"""The worker's ``pixq`` commands: worker, compile, up, demo, make-test-model, flower.

``pixq.cli`` (the light package's one CLI) registers each by name and imports this module only
when one of them runs; ``app`` here is a plain Typer app holding them (nothing is added to the
producer's app).
"""

from __future__ import annotations

import gc
import inspect
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pixq.console import client_from_env, err, finish, save_images, wait_with_progress
from pixq.errors import ConfigError, PixqError
from pixq.settings import Settings
from pixq.worker.gpu.pipeline import DTYPES, parse_size
from pixq.worker.ops.flower import flower_command
from pixq.worker.ops.options import WorkerOptions, with_option_parameters

app = typer.Typer(name="pixq", add_completion=False, pretty_exceptions_enable=False)


GPUS = inspect.Parameter("gpus", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
    Optional[str], typer.Option(help="all or 0,1: one supervised worker process per GPU")])


def worker(ctx: typer.Context, **values: Any) -> None:
    """Start one worker process: load the pipeline once on DEVICE, then render its jobs, waiting
    compatible ones together in one pipeline call."""
    settings = Settings.from_env(os.environ)
    options = WorkerOptions.from_cli(values, default_model=settings.model)  # every option checked: one line each
    gpus: str | None = values["gpus"]
    from pixq.worker.ops.prefetch import mode_from_env, prefetch_for_worker

    if gpus is None:  # the weights stream from the disk beside the checks and imports below (issue 29)
        prefetch_for_worker(options.model, os.environ)
    else:  # each child prefetches; a bad PIXQ_PREFETCH stops the supervisor, naming it
        mode_from_env(os.environ)
    settings.require_redis()
    check_storage(settings)  # before anything says ready: a worker that cannot store its images takes no job
    if gpus is not None:
        if options.name or options.device != "cpu":
            raise ConfigError("--gpus sets each worker's --device and --name; drop them")
        from pixq.worker.ops.supervisor import option_argv, run_gpu_workers

        # Every other option as parsed, for each child: a new option cannot miss them.
        child_args = option_argv(ctx.command.params, {**ctx.params, "model": options.model})
        raise typer.Exit(run_gpu_workers(gpus, child_args, loglevel=options.loglevel, ready_file=options.ready_file,
                                         metrics_port=options.metrics_port))
    gc.disable()  # the start runs without cyclic GC; serve turns it on, the start's objects frozen, when ready
    from pixq.worker.ops.serve import serve

    serve(settings, options)


# Its parameters are WorkerOptions' fields (pixq.worker.ops.options) and --gpus: a new option is one field there.
app.command()(with_option_parameters(worker, GPUS))


def check_storage(settings: Settings) -> None:
    """Refuse to start (``StorageUnavailable``, one line) unless the bucket takes a write and a delete under the
    prefix: a missing bucket, a wrong secret or an unreachable endpoint would otherwise fail every job it takes."""
    from pixq.errors import StorageUnavailable
    from pixq.worker.jobs.storage import Storage

    try:
        Storage(settings).probe()
    except StorageUnavailable as exc:
        raise StorageUnavailable(f"{exc}; the worker did not start") from None


@app.command("compile")
def compile_command(
    out: Annotated[Path, typer.Option("--out", help="Root of the artefact sets (a volume beside the weights); the "
                                      "set goes into a folder named by what it depends on")],
    model: Annotated[Optional[str], typer.Option(help="Model [default: PIXQ_MODEL]")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N: the GPU kind the workers run on")] = "cpu",
    dtype: Annotated[str, typer.Option(help=f"One of {', '.join(DTYPES)}: as the workers' --dtype")] = "auto",
    size: Annotated[Optional[list[str]], typer.Option(help="WIDTHxHEIGHT served; repeatable [default: 1024x1024]. "
                                                      "Requests are rendered at the model's trained bin for "
                                                      "their size: that bin is compiled (see --native)")] = None,
    native: Annotated[bool, typer.Option("--native/--binned", help="Compile each --size as given too "
                                         "(jobs with use_resolution_binning=false)")] = False,
    max_rows: Annotated[int, typer.Option(help="Transformer rows per call the graphs cover: 2 per image with "
                                          "guidance, times images per prompt (and per batch)")] = 8,
    max_batch: Annotated[int, typer.Option(help="As the workers' --max-batch: jobs per call whose full batch gets "
                                           "graphs (0: the per-size default on a GPU, one on the CPU)")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a matching set covers these sizes")] = False,
) -> None:
    """Build the worker's compiled artefacts once per (model, GPU kind, torch version): one AOT graph per size."""
    from pixq.worker.gpu.artefacts import artefact_key, build_artefacts, covered, find_artefacts, rendered_sizes
    from pixq.worker.gpu.batch import BatchPolicy
    from pixq.worker.gpu.pipeline import PipelineOptions, load_pipeline

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: must be one of {', '.join(DTYPES)}")
    if max_rows < 1:
        raise ConfigError("--max-rows: must be 1 or more")
    if max_batch < 0:
        raise ConfigError("--max-batch: must be 0 (per size) or more")
    try:
        sizes = [parse_size(s) for s in size or ["1024x1024"]]
    except ValueError as exc:
        raise ConfigError(f"--size: {exc}") from None
    if native and any(w % 16 or h % 16 for w, h in sizes):
        raise ConfigError("--size: native sizes must be multiples of 16")
    name = model or Settings.from_env(os.environ).model
    loaded = load_pipeline(name, device, PipelineOptions(dtype=dtype))
    targets = rendered_sizes(loaded.pipe, sizes, native)
    policy = BatchPolicy(max_batch=max_batch, by_size=device.startswith("cuda")).for_model(
        loaded.pipe.transformer.config.sample_size)
    bins = set(rendered_sizes(loaded.pipe, sizes))  # the trained bins jobs of these sizes render at

    def images(width: int, height: int) -> int:  # a full batch, as the worker's policy sizes it
        return policy.limit(width, height, binned=(width, height) in bins)

    key = artefact_key(loaded.pipe, name, device)
    found, _ = find_artefacts(out, key)
    if found is not None and not force and covered(found, targets, max_rows, images):
        err.print(f"up to date: {out / key.folder()} covers {', '.join(f'{w}x{h}' for w, h in targets)}")
        typer.echo(str(out / key.folder()))
        return
    err.print(f"compiling {', '.join(f'{w}x{h}' for w, h in targets)} for {name} on {device} ...")
    try:
        folder = build_artefacts(loaded.pipe, name, device, out, targets, max_rows=max_rows, say=err.print,
                                 images=images)
    except Exception as exc:  # an export or inductor failure: one line, nothing half-written in place
        raise PixqError(f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") \
            from None
    typer.echo(str(folder))


@app.command("make-test-model")
def make_test_model_cmd(
    directory: Annotated[Path, typer.Argument(help="Where to write the pipeline.")],
) -> None:
    """Write a tiny random PixArt-Σ pipeline (for tests and demos: it draws noise)."""
    from pixq.worker.gpu.testmodel import make_test_model

    path = make_test_model(directory)
    typer.echo(str(path.resolve()))


def _pick_model(root: Path, model: Optional[str], device: Optional[str]) -> tuple[str, str]:
    """The configured model on GPU when there is one, else the tiny test model on CPU."""
    import torch

    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if model is None:
        if device.startswith("cuda"):
            model = Settings.from_env(os.environ).model
        else:
            from pixq.worker.gpu.testmodel import make_test_model

            model = str(make_test_model(root / "tiny-model").resolve())
            err.print("[yellow]no GPU: serving the tiny test model on CPU. Its weights are random, "
                      "so it draws noise, not pictures.[/yellow]")
    return model, device


@app.command()
def up(
    state_dir: Annotated[Path, typer.Option("--dir", help="Where services keep data and logs.")] = Path(".pixq"),
    model: Annotated[Optional[str], typer.Option(help="Model [default: PIXQ_MODEL on GPU, tiny on CPU]")] = None,
    device: Annotated[Optional[str], typer.Option(help="[default: cuda:0 if there is a GPU, else cpu]")] = None,
) -> None:
    """Start Redis, SeaweedFS (S3), one worker and Flower on loopback; Ctrl-C stops them all."""
    from pixq.worker.ops.stack import local_stack
    from pixq.worker.ops.stacklock import stack_dir_lock

    root = state_dir.resolve()
    with stack_dir_lock(root):  # refused while another stack runs there: its credentials and model stay
        model, device = _pick_model(root, model, device)
        stopping = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stopping.update(now=True))
        with local_stack(root, model, device, say=err.print) as stack:
            env = stack.env
            typer.echo("\npixart-queue is up. In another shell:\n")
            for var in ("PIXQ_REDIS_URL", "PIXQ_S3_ENDPOINT_URL", "PIXQ_S3_BUCKET", "PIXQ_MODEL",
                        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
                typer.echo(f"  export {var}='{env[var]}'")
            typer.echo("\n  pixq submit 'A small cactus with a happy face' --width 512 --height 512 --wait\n")
            if stack.api_url:
                typer.echo(f"HTTP API: {stack.api_url}/docs  (key {stack.api_key}, docs/api.md)\n")
                body = '{"prompt": "A small cactus with a happy face", "width": 512, "height": 512}'
                typer.echo(f"  curl -sS -H 'Authorization: Bearer {stack.api_key}' -H 'Content-Type: application/json' "
                           f"-d '{body}' {stack.api_url}/v1/jobs\n")
            typer.echo(f"Flower: {stack.flower_url}  (user {stack.flower_user}, password {stack.flower_password})")
            typer.echo(f"Logs:   {root}/*.log\nCtrl-C stops everything.")
            try:
                while not stopping["now"] and all(s.alive() for s in stack.services):
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
            dead = [s.name for s in stack.services if not s.alive()]
            if dead:
                err.print(f"[red]{', '.join(dead)} stopped unexpectedly; stopping the rest[/red]")
            err.print("stopping ...")
        err.print("stopped.")


DEMO_PROMPT = "A small cactus with a happy face in the Sahara desert."


@app.command()
def demo(
    prompt: Annotated[str, typer.Argument(help="What to draw.")] = DEMO_PROMPT,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to save the image.")] = Path("out"),
    state_dir: Annotated[Path, typer.Option("--dir", help="Where services keep data and logs.")] = Path(".pixq"),
    size: Annotated[int, typer.Option(help="Width and height.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed; -1 draws one.")] = 42,
) -> None:
    """The main job end to end: start the stack, submit, wait, print the S3 key and URL, save, stop."""
    from pixq.worker.ops.stack import local_stack
    from pixq.worker.ops.stacklock import stack_dir_lock

    root = state_dir.resolve()
    with stack_dir_lock(root):  # refused while another stack runs there
        model, device = _pick_model(root, None, None)
        with local_stack(root, model, device, with_flower=False, say=err.print) as stack:
            os.environ.update(stack.env)
            client = client_from_env()
            job = client.submit(prompt, seed=seed, width=size, height=size)
            typer.echo(f"job        {job.id}")
            record = wait_with_progress(client, job.id, timeout_s=600)
            finish(record, as_json=False)
            typer.echo(f"s3 key     {record.images[0].key}")
            typer.echo(f"url        {client.presigned_url(job.id, expires_in_s=3600)}")
            for path in save_images(client, record, output):
                typer.echo(str(path))


app.command("flower")(flower_command)
