"""The producer's ``pixq`` commands: submit, status, wait, cancel, dead, retry, download, url, queue, schema.

Plain functions; ``pixq.cli`` registers them (beside the worker's and the API's) on the one ``pixq``
app. Redis, Celery, pydantic models and boto3 are imported when a command runs, not when ``pixq
--help`` lists it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import typer
from rich.console import Console

from pixq.errors import InvalidRequest, NoWorkerWarning, StorageUnavailable

# The choices of --format, --mode and --scheduler, spelled out so that listing the commands need not import the
# schema (pydantic); tests/test_cli.py and tests/unit/test_schema.py check they are the schema's OutputFormat,
# RenderMode and Scheduler.
FormatChoice = Literal["png", "webp", "jpeg"]
ModeChoice = Literal["exact", "fast"]
SchedulerChoice = Literal["dpm-solver++", "sa-solver", "unipc", "euler", "euler-ancestral", "ddim"]

if TYPE_CHECKING:
    from pixq.client import Client
    from pixq.records import JobRecord



def _console(stderr: bool = False) -> Console:
    """On a terminal, rich's layout; piped or redirected, a line is as long as it is (rich would wrap
    text and fold tables at 80 columns), for grep and scripts."""
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, soft_wrap=True, width=None if tty else 100_000)


out = _console()
err = _console(stderr=True)

CLI_CONNECT_TIMEOUT_S = 2  # each connect attempt of a command's Redis client (the library's is 5)


def client_from_env(read_only: bool = False) -> Client:
    """The entry point's one settings object, and a client over it.

    A read-only command fails within about a second when Redis is unreachable (``READ_RETRIES``), a
    write within about two (``CLI_WRITE_RETRIES``), and an address that answers nothing is given up
    after ``CLI_CONNECT_TIMEOUT_S`` an attempt: a person at a prompt is told, and re-runs it. A
    long-lived service keeps the library's defaults, a few seconds that ride out a restart.
    """
    from pixq.client import CLI_WRITE_RETRIES, READ_RETRIES, Client
    from pixq.settings import Settings

    return Client(Settings.from_env(os.environ), retries=READ_RETRIES if read_only else CLI_WRITE_RETRIES,
                  connect_timeout_s=CLI_CONNECT_TIMEOUT_S)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=None, sort_keys=False))


def describe(record: JobRecord) -> None:
    from pixq.records import JobState

    r = record.request
    out.print(f"[bold]{record.id}[/bold]  {record.state.value}")
    out.print(f"  prompt    {r.prompt!r}")
    out.print(f"  model     {r.model_name}   {r.width}x{r.height}   steps {r.num_inference_steps}   "
              f"guidance {r.guidance_scale}   seed {r.seed}   {r.mode.value}   {r.scheduler.value}"
              + ("" if r.use_resolution_binning else "   native size"))
    if record.state is JobState.running:
        out.print(f"  progress  {progress_text(record)} on {record.worker}")
    if record.attempts:
        out.print(f"  attempts  {record.attempts}   worker {record.worker}")
    if record.render is not None:
        info = record.render
        out.print(f"  rendered  {info.width}x{info.height}{' then resized' if info.resized else ''}   "
                  f"{info.render_s:.2f} s   {info.transformer_rows_per_image} transformer rows/image"
                  + ("   VAE tiled" if info.vae_tiled else "")
                  + (f"   in a batch of {info.batch_images} images ({info.batch_jobs} jobs)"
                     if info.batch_jobs > 1 or info.batch_images > 1 else ""))
        if info.difference_from_exact:
            out.print(f"  fast mode {info.difference_from_exact}")
    for image in record.images:
        out.print(f"  image {image.index}   s3://{image.bucket}/{image.key}  seed {image.seed}  "
                  f"{image.size_bytes} bytes")
    if record.error:
        out.print(f"  error     {record.error.type}: {record.error.message}")


@contextmanager
def _bar_or_nothing(progress: Any) -> Iterator[Any]:
    """A rich Progress that disappears when the block fails: the failure is its one error line."""
    with progress:
        try:
            yield progress
        except BaseException:
            progress.live.transient = True
            raise


def progress_text(record: JobRecord) -> str:
    """A running job's progress. The worker claims a job before it takes the GPU and sets ``batch`` (the
    images of the pipeline call it renders in) once its render starts: ``batch`` 0 at step 0 is a job
    waiting for the GPU, never one 0 % through its denoising."""
    if record.step == 0 and record.batch == 0:
        return f"claimed, waiting for the GPU (0/{record.total_steps} steps)"
    text = f"step {record.step}/{record.total_steps}"
    return text + (f" in a batch of {record.batch} images" if record.batch > 1 else "")


def wait_with_progress(client: Client, job_id: str, timeout_s: float | None) -> JobRecord:
    """Wait for the job, drawing the denoising steps as a progress bar on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pixq.records import JobState

    client.status(job_id)  # an unknown job or an unreachable Redis is reported before any bar is drawn
    with _bar_or_nothing(Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=False,
    )) as bar:
        task = bar.add_task("queued", total=None)

        def update(record: JobRecord) -> None:
            bar.update(task, description=record.state.value, total=record.total_steps or None,
                       completed=record.total_steps if record.state is JobState.succeeded else record.step)

        return client.wait(job_id, timeout_s=timeout_s, on_update=update)


def finish(record: JobRecord, as_json: bool) -> None:
    from pixq.records import JobState

    if as_json:
        print_json(record.to_json_dict())
    else:
        describe(record)
    if record.state is not JobState.succeeded:
        raise typer.Exit(1)


def submit(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    model: Annotated[Optional[str], typer.Option(help="Checkpoint or local directory [default: PIXQ_MODEL]")] = None,
    negative_prompt: Annotated[str, typer.Option(help="What to steer away from.")] = "",
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 20,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 4.5,
    seed: Annotated[int, typer.Option(help="Seed of image 0; -1 draws one and records it.")] = -1,
    width: Annotated[int, typer.Option(help="Width, a multiple of 8.")] = 1024,
    height: Annotated[int, typer.Option(help="Height, a multiple of 8.")] = 1024,
    num_images: Annotated[int, typer.Option(help="Images to render.")] = 1,
    output_format: Annotated[FormatChoice, typer.Option("--format", help="Image format.")] = "png",
    idempotency_key: Annotated[Optional[str], typer.Option(help="Same key, same job.")] = None,
    priority: Annotated[int, typer.Option(help="0 to 9; higher runs first.")] = 0,
    mode: Annotated[ModeChoice, typer.Option(help="exact, or the opt-in fast mode.")] = "exact",
    scheduler: Annotated[SchedulerChoice, typer.Option(
        help="Sampler (the checkpoint's default: dpm-solver++); fast mode runs with dpm-solver++ only.")
    ] = "dpm-solver++",
    native: Annotated[bool, typer.Option(
        "--native", help="Render at exactly width x height (multiples of 16) instead of the checkpoint's nearest "
        "trained size resized (use_resolution_binning=false).")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait, showing the denoising steps.")] = False,
    timeout: Annotated[Optional[float], typer.Option(help="Seconds --wait waits at most.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job record as one JSON object.")] = False,
) -> None:
    """Validate and enqueue one job; print its id (or, with --wait, its final record)."""
    fields: dict[str, Any] = {
        "negative_prompt": negative_prompt, "num_inference_steps": steps, "guidance_scale": guidance_scale,
        "seed": seed, "width": width, "height": height, "num_images_per_prompt": num_images,
        "output_format": output_format, "priority": priority, "mode": mode, "scheduler": scheduler,
        "use_resolution_binning": not native,
    }
    if model is not None:
        fields["model_name"] = model
    if idempotency_key is not None:
        fields["idempotency_key"] = idempotency_key
    client = client_from_env()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoWorkerWarning)  # said below, as one line
        job = client.submit(prompt, **fields)
    if job.warning:
        err.print(f"[yellow]warning: {job.warning}[/yellow]", highlight=False)
    if wait:
        finish(wait_with_progress(client, job.id, timeout), as_json)
    elif as_json:
        print_json(client.status(job.id).to_json_dict())
    else:
        typer.echo(job.id)


def status(
    job: Annotated[str, typer.Argument(help="Job id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the job record as one JSON object.")] = False,
) -> None:
    """Show a job's record."""
    record = client_from_env(read_only=True).status(job)
    if as_json:
        print_json(record.to_json_dict())
    else:
        describe(record)


def wait_cmd(
    job: Annotated[str, typer.Argument(help="Job id.")],
    timeout: Annotated[Optional[float], typer.Option(help="Seconds to wait at most.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final record as JSON.")] = False,
) -> None:
    """Wait for a job to finish, with a progress bar; exit 1 unless it succeeded."""
    finish(wait_with_progress(client_from_env(), job, timeout), as_json)


def cancel(
    job: Annotated[str, typer.Argument(help="Job id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
) -> None:
    """Cancel a job: a queued one never starts, a running one stops at its next step."""
    record = client_from_env().cancel(job)
    if as_json:
        print_json(record.to_json_dict())
    else:
        typer.echo(f"{job} {record.state.value}{' (cancel requested)' if record.cancel_requested else ''}")


def dead(
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as a JSON list.")] = False,
) -> None:
    """List jobs that ran out of attempts (dead letters), with the reason."""
    records = client_from_env(read_only=True).dead()
    if as_json:
        print_json([r.to_json_dict() for r in records])
        return
    if not records:
        typer.echo("no dead jobs")
    for r in records:
        reason = f"{r.error.type}: {r.error.message}" if r.error else r.state.value
        typer.echo(f"{r.id}  attempts {r.attempts}  {reason}  {r.request.prompt[:50]!r}")


def retry(
    job: Annotated[str, typer.Argument(help="Job id.")],
) -> None:
    """Queue a failed (or dead, or canceled) job again with fresh attempts."""
    record = client_from_env().retry(job)
    typer.echo(f"{job} {record.state.value}")


def download(
    job: Annotated[str, typer.Argument(help="Job id.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory to write the images to.")] = Path("."),
) -> None:
    """Save a finished job's images as DIR/{job}-{index}.{ext}, checking their sha256."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from pixq.records import JobState

    if output.exists() and not output.is_dir():
        raise typer.BadParameter(f"{output} is a file, not a directory", param_hint="'-o' / '--output'")
    client = client_from_env(read_only=True)
    record = client.status(job)
    if record.state is not JobState.succeeded:
        raise InvalidRequest([("job", f"job {job} is {record.state.value}, not succeeded: nothing to download")])
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise typer.BadParameter(f"cannot make the directory {output}: {exc.strerror}",
                                 param_hint="'-o' / '--output'") from None
    saved = []
    with _bar_or_nothing(Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), console=err)) as bar:
        for image in record.images:
            task = bar.add_task(f"image {image.index}", total=image.size_bytes)

            def advance(n: int, task: Any = task) -> None:
                bar.update(task, advance=n)

            body = client.read_image(image, on_chunk=advance)
            if hashlib.sha256(body).hexdigest() != image.sha256:
                raise StorageUnavailable(f"s3://{image.bucket}/{image.key} does not match its recorded sha256")
            path = output / f"{job}-{image.index}.{image.key.rsplit('.', 1)[-1]}"
            path.write_bytes(body)
            saved.append(path)
    for path in saved:
        typer.echo(str(path))


def schema() -> None:
    """Print the job request's JSON schema."""
    from pixq.schema import request_schema

    print_json(request_schema())


def url(
    job: Annotated[str, typer.Argument(help="Job id.")],
    index: Annotated[int, typer.Option(min=0, help="Which image: 0 to the job's count - 1.")] = 0,
    expires_in: Annotated[int, typer.Option(help="Seconds the URL stays valid (at most 7 days).")] = 3600,
) -> None:
    """Print a presigned GET URL for one image of a finished job."""
    try:
        typer.echo(client_from_env(read_only=True).presigned_url(job, index=index, expires_in_s=expires_in))
    except InvalidRequest as exc:
        option = {"index": "'--index'", "expires_in_s": "'--expires-in'"}.get(exc.errors[0][0])
        if len(exc.errors) != 1 or option is None:
            raise
        raise typer.BadParameter(exc.errors[0][1], param_hint=option) from None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def queue_cmd(
    model: Annotated[Optional[list[str]], typer.Option(help="Also show this model's queue when it is "
                                                           "empty; repeatable")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON list, a report per model.")] = False,
) -> None:
    """Show each model's queue (jobs waiting, the oldest one's wait, live workers) and the running jobs."""
    from rich.table import Table

    reports = client_from_env(read_only=True).queues(model)
    if as_json:
        print_json([r.to_json_dict() for r in reports])
        return
    if not reports:
        typer.echo("no queues: nothing waiting, running or serving")
        return
    queues = Table(title="queues", title_justify="left")
    queues.add_column("model", overflow="fold")
    queues.add_column("waiting", justify="right")
    queues.add_column("oldest waits", justify="right")
    queues.add_column("running", justify="right")
    queues.add_column("workers", overflow="fold")
    for r in reports:
        workers = ", ".join(f"{w.name} ({w.device})" for w in r.workers) or "[red]none[/red]"
        queues.add_row(r.model, str(r.depth), _duration(r.oldest_age_s), str(len(r.running)), workers)
    out.print(queues)
    running = [(r.model, j) for r in reports for j in r.running]
    if not running:
        return
    now = time.time()
    jobs = Table(title="running jobs", title_justify="left")
    jobs.add_column("job", no_wrap=True)
    jobs.add_column("model", overflow="fold")
    jobs.add_column("step", justify="right", no_wrap=True)
    jobs.add_column("batch", justify="right")
    jobs.add_column("worker", overflow="fold")
    jobs.add_column("running for", justify="right")
    for name, j in running:
        step = (f"{j.step}/{j.total_steps}" if j.step or j.batch else "waiting for the GPU") + (
            " (canceling)" if j.cancel_requested else "")
        batch = str(j.batch) if j.batch else "-"  # images in the pipeline call it renders in
        jobs.add_row(j.id, name, step, batch, j.worker or "-",
                     _duration(now - j.started_at if j.started_at else None))
    out.print(jobs)
