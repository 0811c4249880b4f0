"""``pixq api``, ``pixq keys ...`` and ``pixq webhooks ...``.

Only Typer and the light modules are imported here; FastAPI, uvicorn and the relay's HTTP client
are imported inside the commands, so ``pixq`` without the ``api`` extra still starts.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pixq.api.config import ApiSettings
from pixq.errors import ConfigError, InvalidRequest
from pixq.settings import Settings

keys_app = typer.Typer(help="API keys: create, list, revoke, rotate the webhook secret.", no_args_is_help=True)
webhooks_app = typer.Typer(help="The webhook relay, and deliveries that ran out of attempts.")
DEFAULT_OPENAPI = Path("docs/openapi.json")


def _settings() -> tuple[Settings, ApiSettings]:
    return Settings.from_env(os.environ), ApiSettings.from_env(os.environ)


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data))


def _need_api_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("the API needs the api extra: pip install 'pixart-queue[api]'") from None


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document, generated from the code (no Redis needed)."""
    from pixq.api.app import create_app

    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"), ApiSettings(key_pepper="x" * 16))
    return app.openapi()


def export_openapi(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n")


def api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    no_relay: Annotated[bool, typer.Option("--no-relay", help="Do not run the webhook relay in this process.")] = False,
    export: Annotated[bool, typer.Option("--export-openapi", help="Write the OpenAPI document and exit.")] = False,
    output: Annotated[Path, typer.Option(help="Where --export-openapi writes.")] = DEFAULT_OPENAPI,
) -> None:
    """Serve the HTTP API (and, unless --no-relay, the webhook relay)."""
    _need_api_extra()
    if export:
        export_openapi(output)
        typer.echo(str(output))
        return
    from pixq.api.app import create_app
    from pixq.api.relay import Relay
    from pixq.api.server import bind, serve

    settings, api_settings = _settings()
    sock = bind(host, port)  # before anything is said: a port in use is one error line
    try:
        _check_redis_safe(settings)
        public_url = f"http://{host}:{port}"
        relay = None
        if not no_relay:
            relay = Relay(settings, api_settings, settings.redis_endpoint().client(socket_timeout_s=10),
                          api_settings.public_url or public_url)
        app = create_app(settings, api_settings, public_url=public_url, relay=relay)
        typer.echo(f"pixq api: serving on {public_url} (docs {public_url}/docs, relay {'off' if no_relay else 'on'})",
                   err=True)
        serve(app, sock, api_settings.request_timeout_s, app.state.pixq.requests.refused)
    finally:
        sock.close()


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="A name for the key (unique).")],
    scope: Annotated[str, typer.Option(help="Comma-separated: submit, read, admin.")] = "submit,read",
    max_in_flight: Annotated[int, typer.Option(help="Most unfinished jobs at once (0: no limit).")] = 0,
    rate: Annotated[Optional[str], typer.Option(help="Most submits per time, e.g. 10/s, 600/min.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"name", "key", "webhook_secret"}.')] = False,
) -> None:
    """Create an API key; the key and its webhook secret are printed once and never stored."""
    from pixq.api.keys import parse_rate, parse_scopes

    with _key_errors():
        key, text = _store().create(name, parse_scopes(scope), max_in_flight, parse_rate(rate) if rate else None)
    if as_json:
        _echo_json({"name": key.name, "key": text, "webhook_secret": key.webhook_secrets[0], "id": key.id})
        return
    typer.echo(f"key {key.name} ({','.join(sorted(s.value for s in key.scopes))}): {text}")
    typer.echo(f"webhook secret: {key.webhook_secrets[0]}")
    typer.echo("shown once: store them now", err=True)


@keys_app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False) -> None:
    """List keys (never the key itself)."""
    keys = _store().list()
    if as_json:
        _echo_json([k.public() for k in keys])
        return
    for k in keys:
        state = "revoked" if k.revoked_at else "active"
        typer.echo(f"{k.name}  {k.id}  {','.join(sorted(s.value for s in k.scopes))}  {state}  "
                   f"max-in-flight {k.max_in_flight or '-'}  rate {k.rate or '-'}")


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke a key: refused from its next request on."""
    with _key_errors():
        key = _store().revoke(name)
    typer.echo(f"{key.name} revoked")


@keys_app.command("rotate-webhook-secret")
def keys_rotate(
    name: Annotated[str, typer.Argument(help="The key's name.")],
    as_json: Annotated[bool, typer.Option("--json", help='Print {"name", "webhook_secret"}.')] = False,
) -> None:
    """A new webhook signing secret; the previous one keeps signing beside it until the next rotation."""
    with _key_errors():
        key, secret = _store().rotate_webhook_secret(name)
    if as_json:
        _echo_json({"name": key.name, "webhook_secret": secret})
    else:
        typer.echo(f"new webhook secret for {key.name}: {secret} (signatures now carry {len(key.webhook_secrets)})")


@contextmanager
def _key_errors() -> Iterator[None]:
    """``keys.KeyCommandError`` (exit 1, which the README keeps for failed jobs) with the README's codes: a bad
    NAME, --scope, --rate or --max-in-flight, or no key of that NAME, is a usage error (2); a NAME that
    is taken already, an operation refused (3)."""
    from pixq.api.keys import KeyCommandError

    try:
        yield
    except KeyCommandError as exc:
        field, _, problem = str(exc).partition(": ")
        if problem.endswith("exists already"):
            raise InvalidRequest([(field, problem)]) from None
        raise ConfigError(str(exc)) from None


@keys_app.command("rotate-encryption")
def keys_rotate_encryption() -> None:
    """Seal every key's webhook secrets with the first PIXQ_SECRETS_KEY (those sealed with an older key, or
    stored in the clear by an earlier version); run once every process has the new key listed first."""
    from pixq.api.secretbox import SecretsKeyError

    done = _store().reseal_all()
    if done.refused:
        name, why = next(iter(done.refused.items()))
        raise SecretsKeyError(f"{len(done.refused)} of {done.total} keys left as they were ({done.resealed} "
                              f"re-sealed); key {name}: {why}")
    typer.echo(f"{done.resealed} of {done.total} keys' webhook secrets re-sealed with encryption key {done.kid} "
               f"({done.plaintext} were in the clear); the others were sealed with it already")


def _check_redis_safe(settings: Settings) -> None:
    """Refuse a Redis that evicts keys before serving (pixq/redisconn.py); Redis down: say so in one line."""
    from pixq.errors import service_errors
    from pixq.redisconn import check_memory_policy

    conn = settings.redis_endpoint().client(retries=6)
    try:
        with service_errors("not serving"):
            check_memory_policy(conn)
    finally:
        conn.close()


def _store() -> Any:

    from pixq.api.keys import KeyStore

    settings, api_settings = _settings()
    conn = settings.redis_endpoint().client(retries=6)
    return KeyStore(conn, api_settings.require_pepper(), api_settings.secrets_keys)


@webhooks_app.callback(invoke_without_command=True)
def webhooks(ctx: typer.Context) -> None:
    """Run a webhook relay (several may run); `pixq webhooks failed` lists exhausted deliveries."""
    if ctx.invoked_subcommand is not None:
        return

    from pixq.api.relay import Relay

    settings, api_settings = _settings()
    _check_redis_safe(settings)
    public_url = api_settings.public_url or "http://127.0.0.1:8000"
    relay = Relay(settings, api_settings, settings.redis_endpoint().client(socket_timeout_s=10),
                  public_url)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    relay.start()
    typer.echo(f"pixq webhooks: relay {relay.name} running", err=True)
    stop.wait()
    relay.stop()


@webhooks_app.command("failed")
def webhooks_failed(as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False) -> None:
    """Deliveries that ran out of attempts, newest first."""

    from pixq.api.deliveries import DeliveryStore

    settings, _ = _settings()
    failed = DeliveryStore(settings.redis_endpoint().client(retries=6)).failed()
    if as_json:
        _echo_json([d.public() for d in failed])
        return
    if not failed:
        typer.echo("no failed deliveries")
    for d in failed:
        typer.echo(f"{d.id}  {d.url}  attempts {d.attempts}  {d.last_error or ''}")


@webhooks_app.command("redeliver")
def webhooks_redeliver(
    job: Annotated[str, typer.Argument(help="Job id.")],
    event: Annotated[str, typer.Argument(help="running, succeeded, failed or canceled.")],
) -> None:
    """Send a failed (or 410-stopped) delivery again with a fresh schedule."""

    from pixq.api.deliveries import DeliveryStore
    from pixq.errors import JobNotFound

    settings, _ = _settings()
    if DeliveryStore(settings.redis_endpoint().client(retries=6)).redeliver(job, event) is None:
        raise JobNotFound(f"job {job} has no failed {event} delivery")
    typer.echo(f"{job}:{event} queued for delivery")


# What pixq.cli loads by name (COMPONENT_COMMANDS) when one of these runs.
app = typer.Typer()
app.command("api")(api)
app.add_typer(keys_app, name="keys")
app.add_typer(webhooks_app, name="webhooks")
