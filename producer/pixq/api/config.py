"""The API's own settings (keys' pepper, public URL, body limit, webhook schedule), from PIXQ_* variables."""

from __future__ import annotations

import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict

from pixq.api.secretbox import parse_secrets_keys
from pixq.errors import ConfigError

# Svix's schedule (immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h): about 27 h in all.
DEFAULT_SCHEDULE_S = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
MIN_PEPPER_CHARS = 16

API_ENV_VARS = (
    "PIXQ_API_KEY_PEPPER",
    "PIXQ_API_PUBLIC_URL",
    "PIXQ_API_MAX_BODY_BYTES",
    "PIXQ_API_REQUEST_TIMEOUT_S",
    "PIXQ_WEBHOOK_TIMEOUT_S",
    "PIXQ_WEBHOOK_SCHEDULE_S",
    "PIXQ_WEBHOOK_CONCURRENCY",
    "PIXQ_WEBHOOK_SECRET",
    "PIXQ_SECRETS_KEY",
)


class ApiSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    key_pepper: str | None = None  # HMAC key for stored API-key hashes: a database leak alone reveals no key
    public_url: str | None = None  # how callers reach the API (image links in webhooks); default: the bind address
    max_body_bytes: int = 64 * 1024
    # A request's head must arrive within this of the connection (or of the previous response), and each
    # piece of its body within this of the last: a client that stops sending is answered 408 and cut off.
    request_timeout_s: float = 10.0
    webhook_timeout_s: float = 15.0
    webhook_schedule_s: tuple[float, ...] = DEFAULT_SCHEDULE_S  # waits between attempts; then it is exhausted
    webhook_concurrency: int = 16
    webhook_secret: str | None = None  # signs webhooks of jobs submitted without an API key (Python clients)
    # Keys that seal the keys' webhook secrets in Redis (pixq/api/secretbox.py): the first seals, any opens;
    # none: a key derived from the pepper.
    secrets_keys: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ApiSettings:
        def get(name: str) -> str | None:
            return env.get(name, "").strip() or None

        values: dict[str, object] = {}
        if (pepper := get("PIXQ_API_KEY_PEPPER")) is not None:
            if len(pepper) < MIN_PEPPER_CHARS:
                raise ConfigError(f"PIXQ_API_KEY_PEPPER: must be at least {MIN_PEPPER_CHARS} characters")
            values["key_pepper"] = pepper
        if (url := get("PIXQ_API_PUBLIC_URL")) is not None:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"PIXQ_API_PUBLIC_URL: {url!r} must be an http:// or https:// URL")
            values["public_url"] = url.rstrip("/")
        if (raw := get("PIXQ_API_MAX_BODY_BYTES")) is not None:
            values["max_body_bytes"] = int(_number("PIXQ_API_MAX_BODY_BYTES", raw, 1024))
        if (raw := get("PIXQ_API_REQUEST_TIMEOUT_S")) is not None:
            values["request_timeout_s"] = _number("PIXQ_API_REQUEST_TIMEOUT_S", raw, 0.1)
        if (raw := get("PIXQ_WEBHOOK_TIMEOUT_S")) is not None:
            values["webhook_timeout_s"] = _number("PIXQ_WEBHOOK_TIMEOUT_S", raw, 0.1)
        if (raw := get("PIXQ_WEBHOOK_CONCURRENCY")) is not None:
            values["webhook_concurrency"] = int(_number("PIXQ_WEBHOOK_CONCURRENCY", raw, 1))
        if (secret := get("PIXQ_WEBHOOK_SECRET")) is not None:
            if not secret.startswith("whsec_"):
                raise ConfigError("PIXQ_WEBHOOK_SECRET: must be a whsec_... secret (pixq keys prints one)")
            values["webhook_secret"] = secret
        if (raw := get("PIXQ_SECRETS_KEY")) is not None:
            values["secrets_keys"] = parse_secrets_keys(raw)
        if (raw := get("PIXQ_WEBHOOK_SCHEDULE_S")) is not None:
            values["webhook_schedule_s"] = tuple(
                _number("PIXQ_WEBHOOK_SCHEDULE_S", part, 0.0) for part in raw.split(",") if part.strip()
            )
        return cls.model_validate(values)

    def require_pepper(self) -> str:
        if not self.key_pepper:
            raise ConfigError(
                "PIXQ_API_KEY_PEPPER is not set: a secret of 16+ characters that API keys are hashed with "
                "(e.g. `openssl rand -hex 32`); every API process and `pixq keys` must share it"
            )
        return self.key_pepper


def _number(var: str, raw: str, minimum: float) -> float:
    """A finite number of at least ``minimum``: ``nan`` and ``inf`` are refused like any other non-number."""
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{var}: {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{var}: {raw!r} is not a finite number")
    if value < minimum:
        raise ConfigError(f"{var}: must be at least {minimum:g} (got {raw})")
    return value
