"""The ``pixq`` command: one Typer app that names every command explicitly, and ``main()``.

- The producer's commands (``pixq.commands``) need only this package and are registered directly.
- The worker's commands (distribution ``pixart-queue-worker``: worker, up, demo, make-test-model,
  flower) and any other component's are registered by name in ``COMPONENT_COMMANDS`` and imported
  only when one of them runs: ``pixq --help`` and ``pixq status`` import neither torch nor the
  worker. Without the component installed, ``--help`` lists them under a panel saying what to
  install, and running one prints that line and exits ``MissingComponent.exit_code``.
- ``main()`` ends every failure as one line on stderr with a defined exit code (``pixq.errors``;
  usage mistakes exit 2, like click's), never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import typer
import typer.core
import typer.main

from pixq import commands
from pixq.errors import MissingComponent, PixqError, service_error

HELP = "pixart-queue: PixArt-Σ text-to-image jobs through Redis, Celery workers and S3."


@dataclass(frozen=True)
class ComponentCommand:
    """A command another distribution provides, registered here by name and loaded when run.

    ``module`` holds a Typer app named ``app`` with a command ``name``; ``help`` is its one-line
    help for ``pixq --help`` (tests/test_cli.py checks it matches the real command's). ``package``
    is the distribution's top package: whether it can be found says whether it is installed
    (without importing it).
    """

    name: str
    module: str
    help: str
    distribution: str
    package: str
    panel: str

    def installed(self) -> bool:
        try:
            return importlib.util.find_spec(self.package) is not None
        except (ImportError, ValueError):  # a parent package is missing or blocked
            return False

    @property
    def install(self) -> str:
        """The shell command that installs it (an extra's brackets quoted: zsh would glob them)."""
        return f"pip install '{self.distribution}'" if "[" in self.distribution else f"pip install {self.distribution}"

    def missing(self) -> MissingComponent:
        return MissingComponent(f"`pixq {self.name}` needs {self.distribution}: {self.install}")

    def load(self) -> Any:
        """The real click command (imports ``module``)."""
        if not self.installed():
            raise self.missing()
        group = typer.main.get_command(importlib.import_module(self.module).app)
        found = group.commands.get(self.name) if isinstance(group, typer.core.TyperGroup) else group
        if found is None:
            raise RuntimeError(f"{self.module}.app has no command {self.name!r}")
        return found


_WORKER = "pixart-queue-worker"
_WORKER_PANEL = "Worker and local stack (pixart-queue-worker)"
COMPONENT_COMMANDS: tuple[ComponentCommand, ...] = (
    ComponentCommand("worker", "pixq.worker.ops.cli", "Start one worker process: load the pipeline once on "
                     "DEVICE, then render its jobs, waiting compatible ones together in one pipeline call.",
                     _WORKER, "pixq.worker", _WORKER_PANEL),
    ComponentCommand("up", "pixq.worker.ops.cli", "Start Redis, SeaweedFS (S3), one worker and Flower on "
                     "loopback; Ctrl-C stops them all.", _WORKER, "pixq.worker", _WORKER_PANEL),
    ComponentCommand("demo", "pixq.worker.ops.cli", "The main job end to end: start the stack, submit, wait, "
                     "print the S3 key and URL, save, stop.", _WORKER, "pixq.worker", _WORKER_PANEL),
    ComponentCommand("compile", "pixq.worker.ops.cli", "Build the worker's compiled artefacts once per (model, "
                     "GPU kind, torch version): one AOT graph per size.", _WORKER, "pixq.worker", _WORKER_PANEL),
    ComponentCommand("make-test-model", "pixq.worker.ops.cli", "Write a tiny random PixArt-Σ pipeline (for "
                     "tests and demos: it draws noise).", _WORKER, "pixq.worker", _WORKER_PANEL),
    ComponentCommand("flower", "pixq.worker.ops.cli", "Start Flower (Celery's dashboard) on the queue's Redis, "
                     "behind basic auth.", _WORKER, "pixq.worker", _WORKER_PANEL),
)
_API = "pixart-queue[api]"
_API_PANEL = "HTTP API and webhooks (the api extra)"
COMPONENT_COMMANDS += (
    ComponentCommand("api", "pixq.api.cli", "Serve the HTTP API (and, unless --no-relay, the webhook relay).",
                     _API, "fastapi", _API_PANEL),
    ComponentCommand("keys", "pixq.api.cli", "API keys: create, list, revoke, rotate the webhook secret.",
                     _API, "fastapi", _API_PANEL),
    ComponentCommand("webhooks", "pixq.api.cli", "The webhook relay, and deliveries that ran out of attempts.",
                     _API, "fastapi", _API_PANEL),
)


def _markup_escape(text: str) -> str:
    """``text`` as rich markup that prints it as written (rich.markup.escape's rule, without importing rich
    for a command that prints no help)."""
    return text.replace("[", "\\[") if typer.core.HAS_RICH else text


class LazyCommand(typer.core.TyperCommand):
    """Stands in for a ``ComponentCommand`` in the group: listed from its registered help, the real
    command is imported only to parse and run it (``make_context``)."""

    def __init__(self, spec: ComponentCommand):
        installed = spec.installed()
        # rich reads help text and panel titles as markup, where "[api]" is a tag that vanishes
        # ("pip install pixart-queue", installed already): escaped, it is printed as written.
        install = _markup_escape(spec.install)
        super().__init__(
            spec.name,
            help=spec.help if installed else f"(not installed: {install}) {spec.help}",
            rich_help_panel=spec.panel if installed else f"Not installed: {install}",
            add_help_option=False,
        )
        self.spec = spec

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        return self.spec.load().make_context(info_name, args, parent=parent, **extra)


app = typer.Typer(
    name="pixq",
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_JOBS = "Jobs"
app.command(rich_help_panel=_JOBS)(commands.submit)
app.command(rich_help_panel=_JOBS)(commands.status)
app.command("wait", rich_help_panel=_JOBS)(commands.wait_cmd)
app.command(rich_help_panel=_JOBS)(commands.cancel)
app.command(rich_help_panel=_JOBS)(commands.download)
app.command(rich_help_panel=_JOBS)(commands.url)
app.command(rich_help_panel=_JOBS)(commands.dead)
app.command(rich_help_panel=_JOBS)(commands.retry)
app.command("queue", rich_help_panel=_JOBS)(commands.queue_cmd)
app.command(rich_help_panel=_JOBS)(commands.schema)


def build_command() -> Any:
    """The ``pixq`` click group: the producer's commands plus every component's, lazily."""
    group = typer.main.get_command(app)
    for spec in COMPONENT_COMMANDS:
        group.add_command(LazyCommand(spec), spec.name)  # type: ignore[attr-defined]
    return group


def _usage_line(exc: typer.TyperException) -> str:
    """click's usage error (four lines and a box with rich) as one line: the problem, then the usage."""
    message = exc.format_message().strip().rstrip(".")
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return f"error: {message}"
    usage = ctx.get_usage().strip().removeprefix("Usage:").strip()
    return f"error: {message}. Usage: {usage} (see {ctx.command_path} --help)"


def run(argv: Sequence[str] | None = None) -> int:
    """Run one ``pixq`` command line; return its exit code. Errors are printed as one line."""
    command = build_command()
    try:
        result = command.main(args=list(argv) if argv is not None else None, prog_name="pixq",
                              standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        return 130
    except typer.TyperException as exc:  # typer's click: usage errors, bad parameters
        name = type(exc).__name__
        if name == "NoArgsIsHelpError":
            typer.echo(exc.format_message())
        else:
            typer.echo(_usage_line(exc) if hasattr(exc, "ctx") else f"error: {exc.format_message()}", err=True)
        return int(getattr(exc, "exit_code", 2))
    except PixqError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (| head): nothing to report, and nothing more to flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        mapped = service_error(exc)
        if mapped is None:
            raise  # a bug: its traceback is what a report needs
        typer.echo(f"error: {mapped}", err=True)
        return mapped.exit_code
    return result if isinstance(result, int) else 0


def main() -> NoReturn:
    """The ``pixq`` console script."""
    sys.exit(run())


if __name__ == "__main__":
    main()
