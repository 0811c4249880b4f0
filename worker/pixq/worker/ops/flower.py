"""``pixq flower``: Celery's dashboard on the queue's Redis, behind a login.

Flower sees what the workers report as events: every job (the task id of a job's first
message is the job id), its arguments as ``producer/pixq/wire.py`` shows them (model, size and a
shortened prompt, never secrets), its step while it renders (``task-progress``, see
``worker/pixq/worker/jobs/tasks.py``), the job's outcome as the task's result, and one node per worker
process (``gpuN@host`` or ``--name``). Flower can also stop workers and revoke tasks, so it
never starts without credentials unless ``--no-auth`` is given on purpose.

Credentials reach Flower through its environment, never its command line (``ps`` shows
every local user the command line). The process is replaced by Flower (``exec``), so a
``--basic-auth`` given to ``pixq`` leaves the process table with it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, NoReturn, Optional

import typer
from pixq.errors import ConfigError
from pixq.settings import Settings, mask_url
from pixq.worker.ops.argv import python_module_argv

AUTH_ENV = "FLOWER_BASIC_AUTH"
CELERY_APP = "pixq.celeryapp:app"  # what Flower's process loads (``celery -A``): the workers' configuration
# The tasks page's columns: Flower's default hides the arguments and the result.
TASKS_COLUMNS = "name,uuid,state,kwargs,result,received,runtime,worker"


@dataclass(frozen=True)
class FlowerOptions:
    port: int = 5555
    address: str = "127.0.0.1"
    basic_auth: str | None = None  # "user:password[,user2:password2]"; None only with no_auth
    no_auth: bool = False


def check_basic_auth(value: str) -> str:
    """``value`` if it is one or more comma-separated ``user:password`` pairs, else ``ConfigError``.

    The message never repeats the value. Flower compares ``user:password`` as one string and
    splits the list on commas, so a user name holds no ``:`` and nothing holds a ``,``.
    """
    pairs = value.split(",")
    for n, pair in enumerate(pairs, 1):
        user, sep, password = pair.partition(":")
        where = f"credential {n} of {len(pairs)}" if len(pairs) > 1 else "the credential"
        if not sep or not user.strip() or not password:
            raise ConfigError(f"{AUTH_ENV} / --basic-auth: {where} is not user:password")
        if user != user.strip() or password != password.strip():
            raise ConfigError(f"{AUTH_ENV} / --basic-auth: {where} has spaces around the user or password")
    return value


def resolve_options(env: Mapping[str, str], port: int, address: str, basic_auth: str | None,
                    no_auth: bool) -> FlowerOptions:
    """Credentials from ``--basic-auth`` or the environment; refuse to run without, unless ``no_auth``."""
    from_env = env.get(AUTH_ENV, "").strip() or None
    credentials = basic_auth if basic_auth is not None else from_env
    if no_auth:
        if credentials is not None:
            source = "--basic-auth" if basic_auth is not None else AUTH_ENV
            raise ConfigError(f"--no-auth contradicts the credentials in {source}; drop one of them")
        return FlowerOptions(port=port, address=address, basic_auth=None, no_auth=True)
    if credentials is None:
        raise ConfigError(f"Flower needs a login: set {AUTH_ENV}=user:password (or --basic-auth user:password); "
                          "--no-auth starts it open to anyone who reaches the port")
    return FlowerOptions(port=port, address=address, basic_auth=check_basic_auth(credentials))


def flower_env(settings: Settings, base_env: Mapping[str, str], options: FlowerOptions) -> dict[str, str]:
    """The child's environment: Celery's broker, Flower's options and the credentials."""
    env = dict(base_env)
    env.pop(AUTH_ENV, None)
    env.update({
        "CELERY_BROKER_URL": str(settings.redis_endpoint().celery_settings()["broker_url"]),
        "FLOWER_ADDRESS": options.address,
        "FLOWER_PORT": str(options.port),
    })
    env.setdefault("FLOWER_TASKS_COLUMNS", TASKS_COLUMNS)
    if options.basic_auth is not None:
        env[AUTH_ENV] = options.basic_auth
    return env


def flower_argv() -> list[str]:
    """Flower through this interpreter's Celery, with the workers' configuration; nothing secret on it.
    The working directory stays off its import path (a ``celery.py`` there would be run instead)."""
    return python_module_argv("celery", "-A", CELERY_APP, "flower")


def exec_flower(settings: Settings, options: FlowerOptions, base_env: Mapping[str, str]) -> NoReturn:
    """Replace this process with Flower (signals then reach Flower directly)."""
    argv = flower_argv()
    env = flower_env(settings, base_env, options)
    users = len(options.basic_auth.split(",")) if options.basic_auth else 0
    login = "no login (--no-auth)" if options.no_auth else f"basic auth ({users} user(s))"
    typer.echo(f"flower: http://{options.address}:{options.port}/  {login}  broker "
               f"{mask_url(settings.require_redis())}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


def flower_command(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface.")] = "127.0.0.1",
    basic_auth: Annotated[Optional[str], typer.Option(
        "--basic-auth", metavar="USER:PASSWORD",
        help=f"The login; by default read from {AUTH_ENV}, the safer way (others may read a command line).",
    )] = None,
    no_auth: Annotated[bool, typer.Option(
        "--no-auth", help="Start without a login, e.g. behind your own authenticating proxy.")] = False,
) -> None:
    """Start Flower (Celery's dashboard) on the queue's Redis, behind basic auth."""
    env = os.environ
    settings = Settings.from_env(env)
    settings.require_redis()
    exec_flower(settings, resolve_options(env, port, address, basic_auth, no_auth), env)
