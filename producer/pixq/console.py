"""What a ``pixq`` command shows on the terminal, and the client it talks through.

Shared by the producer's commands (``commands.py``) and the worker's (``pixq demo`` in
``pixq.worker.ops.cli``): the consoles, a job record as text or JSON, a wait drawn as a progress bar,
a finished job's images saved with their checksums, and the command's ``Client`` over the
environment's settings. Heavy imports (Redis, pydantic, boto3) happen when a function runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from pixq.errors import StorageUnavailable

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
def bar_or_nothing(progress: Any) -> Iterator[Any]:
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
    with bar_or_nothing(Progress(
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


def check_output_dir(path: Path) -> None:
    """``-o``/``--output`` names a directory, or nothing yet (``save_images`` makes it)."""
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} is a file, not a directory", param_hint="'-o' / '--output'")


def save_images(client: Client, record: JobRecord, output: Path) -> list[Path]:
    """Save a succeeded job's images as OUTPUT/{job}-{index}.{ext} (OUTPUT made if missing), a progress bar on
    stderr, each checked against its recorded sha256; the paths written."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    check_output_dir(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise typer.BadParameter(f"cannot make the directory {output}: {exc.strerror}",
                                 param_hint="'-o' / '--output'") from None
    saved = []
    with bar_or_nothing(Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), console=err)) as bar:
        for image in record.images:
            task = bar.add_task(f"image {image.index}", total=image.size_bytes)

            def advance(n: int, task: Any = task) -> None:
                bar.update(task, advance=n)

            body = client.read_image(image, on_chunk=advance)
            if hashlib.sha256(body).hexdigest() != image.sha256:
                raise StorageUnavailable(f"s3://{image.bucket}/{image.key} does not match its recorded sha256")
            path = output / f"{record.id}-{image.index}.{image.key.rsplit('.', 1)[-1]}"
            path.write_bytes(body)
            saved.append(path)
    return saved
