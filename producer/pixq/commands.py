"""The producer's ``pixq`` commands: submit, status, wait, cancel, dead, retry, download, url, queue, schema.

Plain functions; ``pixq.cli`` registers them (beside the worker's and the API's) on the one ``pixq``
app. Redis, Celery, pydantic models and boto3 are imported when a command runs, not when ``pixq
--help`` lists it.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from rich.markup import escape

from pixq.console import (
    check_output_dir,
    client_from_env,
    describe,
    err,
    finish,
    out,
    print_json,
    save_images,
    wait_with_progress,
)
from pixq.errors import InvalidRequest, NoWorkerWarning

# The choices of --format, --mode and --scheduler, spelled out so that listing the commands need not import the
# schema (pydantic); tests/test_cli.py and tests/unit/test_schema.py check they are the schema's OutputFormat,
# RenderMode and Scheduler.
FormatChoice = Literal["png", "webp", "jpeg"]
ModeChoice = Literal["exact", "fast"]
SchedulerChoice = Literal["dpm-solver++", "sa-solver", "unipc", "euler", "euler-ancestral", "ddim"]


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
    from pixq.records import JobState

    check_output_dir(output)  # before Redis is asked
    client = client_from_env(read_only=True)
    record = client.status(job)
    if record.state is not JobState.succeeded:
        raise InvalidRequest([("job", f"job {job} is {record.state.value}, not succeeded: nothing to download")])
    for path in save_images(client, record, output):
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
        workers = ", ".join(f"{w.name} ({w.device}" + (f", [red]paused: {escape(w.paused)}[/red])" if w.paused else ")")
                            for w in r.workers) or "[red]none[/red]"
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
