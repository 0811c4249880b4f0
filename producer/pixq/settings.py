"""The settings every entry point builds once, from the environment, and passes down.

Read by hand from a mapping rather than through pydantic-settings (or pydantic validation aliases),
because that would not be shorter once it keeps what callers rely on:

* ``from_env`` takes an explicit mapping (tests and ``pixq up`` pass environments of
  their own; nothing reads ``os.environ`` at import). pydantic-settings' sources read ``os.environ`` or
  dotenv files; an explicit mapping needs a custom source or plain ``model_validate`` with aliases.
* Every bad value is one line that starts with the variable's name and never repeats a secret
  (``PIXQ_REDIS_URL: ...`` with the password masked). pydantic's ``ValidationError`` is several lines,
  names the field (or alias) and echoes ``input_value``, so each rule would still need its own check and
  a translation of the error; a blank value means "unset" (the default), which needs a before-validator
  on every field.
* ``ENV_VARS`` is the deployment contract the deploy-file tests compare compose and Kubernetes against;
  with aliases it would be derived from them, but the per-variable checks below would all remain.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from pixq.checkpoints import DEFAULT_MODEL, KNOWN_MODELS, model_name_problem, model_spec
from pixq.egress import Network, parse_networks
from pixq.errors import ConfigError
from pixq.redisconn import SENTINEL_SCHEMES, RedisEndpoint, mask_url

__all__ = ["ENV_VARS", "Settings", "mask_url"]

DEFAULT_RETENTION_S = 7 * 24 * 3600

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")

# The variables this program reads; deployment files must set the same names.
ENV_VARS = (
    "PIXQ_REDIS_URL",
    "PIXQ_S3_ENDPOINT_URL",
    "PIXQ_S3_BUCKET",
    "PIXQ_S3_PREFIX",
    "PIXQ_MODEL",
    "PIXQ_RETENTION_S",
    "PIXQ_MAX_QUEUE_DEPTH",
    "PIXQ_JOB_TIMEOUT_S",
    "PIXQ_VISIBILITY_TIMEOUT_S",
    "PIXQ_MAX_ATTEMPTS",
    "PIXQ_LEASE_TTL_S",
    "PIXQ_WEBHOOK_ALLOW",
    "PIXQ_REDIS_MIN_REPLICAS",
    "PIXQ_REDIS_WAIT_TIMEOUT_MS",
    "AWS_DEFAULT_REGION",
)


class Settings(BaseModel):
    """Typed settings. Secrets (AWS keys, a Redis password) are never printed by ``describe``."""

    model_config = ConfigDict(frozen=True)

    redis_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = "pixq"
    model: str = DEFAULT_MODEL
    aws_region: str = "us-east-1"
    retention_s: int = DEFAULT_RETENTION_S
    max_queue_depth: int = 0  # 0: no limit
    job_timeout_s: int = 600  # a job still rendering after this fails "timed out"
    visibility_timeout_s: int | None = None  # Redis redelivery of unacked messages; default derived below
    max_attempts: int = 3  # deliveries of one job before it is dead
    lease_ttl_s: int = 15  # a running job whose worker stops renewing this is re-queued
    # Replicas that must have a submit, a claim or an end before the caller hears "done" (Redis WAIT);
    # None: 1 while the primary has a replica, else 0 (durable.Durability).
    redis_min_replicas: int | None = None
    redis_wait_timeout_ms: int = 1000
    # Webhook destinations allowed although private/loopback (and over plain http): PIXQ_WEBHOOK_ALLOW.
    webhook_allow: tuple[str, ...] = ()

    def webhook_allow_networks(self) -> tuple[Network, ...]:
        return parse_networks(",".join(self.webhook_allow))

    @property
    def effective_visibility_timeout_s(self) -> int:
        """Longer than the longest allowed job unless set explicitly (tests set it short)."""
        return self.visibility_timeout_s or 2 * self.job_timeout_s + 600

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read and check every variable; a bad one raises ``ConfigError`` naming it."""

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        values: dict[str, object] = {}
        if (url := get("PIXQ_REDIS_URL")) is not None:
            values["redis_url"] = _check_redis_url(url)
        if (url := get("PIXQ_S3_ENDPOINT_URL")) is not None:
            values["s3_endpoint_url"] = _check_http_url("PIXQ_S3_ENDPOINT_URL", url)
        if (bucket := get("PIXQ_S3_BUCKET")) is not None:
            if not _BUCKET_RE.match(bucket) or ".." in bucket:
                raise ConfigError(f"PIXQ_S3_BUCKET: {bucket!r} is not a valid S3 bucket name")
            values["s3_bucket"] = bucket
        if (prefix := get("PIXQ_S3_PREFIX")) is not None:
            prefix = prefix.strip("/")
            if not _PREFIX_RE.match(prefix):
                raise ConfigError(
                    f"PIXQ_S3_PREFIX: {prefix!r} may hold only letters, digits, '.', '_', '-' and '/'"
                )
            values["s3_prefix"] = prefix
        if (model := get("PIXQ_MODEL")) is not None:
            if (problem := model_name_problem(model)) is not None:
                raise ConfigError(f"PIXQ_MODEL: {problem}")
            if model_spec(model) is None:
                raise ConfigError(
                    f"PIXQ_MODEL: unknown model {model!r}; use one of {', '.join(KNOWN_MODELS)} "
                    "or an absolute path to a local pipeline directory"
                )
            values["model"] = model
        if (allow := get("PIXQ_WEBHOOK_ALLOW")) is not None:
            try:
                values["webhook_allow"] = tuple(str(net) for net in parse_networks(allow))
            except ValueError as exc:
                raise ConfigError(f"PIXQ_WEBHOOK_ALLOW: {exc}") from None
        if (region := get("AWS_DEFAULT_REGION")) is not None:
            values["aws_region"] = region
        for var, field, minimum in (
            ("PIXQ_RETENTION_S", "retention_s", 1),
            ("PIXQ_MAX_QUEUE_DEPTH", "max_queue_depth", 0),
            ("PIXQ_JOB_TIMEOUT_S", "job_timeout_s", 1),
            ("PIXQ_VISIBILITY_TIMEOUT_S", "visibility_timeout_s", 1),
            ("PIXQ_MAX_ATTEMPTS", "max_attempts", 1),
            ("PIXQ_LEASE_TTL_S", "lease_ttl_s", 2),
            ("PIXQ_REDIS_MIN_REPLICAS", "redis_min_replicas", 0),
            ("PIXQ_REDIS_WAIT_TIMEOUT_MS", "redis_wait_timeout_ms", 1),
        ):
            if (raw := get(var)) is not None:
                values[field] = _check_int(var, raw, minimum)
        return cls.model_validate(values)

    def require_redis(self) -> str:
        if not self.redis_url:
            raise ConfigError(
                "PIXQ_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/0); `pixq up` prints the values "
                "for a local stack"
            )
        return self.redis_url

    def redis_endpoint(self) -> RedisEndpoint:
        """The one way to Redis: ``.client()`` for records, ``.celery_settings()`` for Celery."""
        return RedisEndpoint.parse(self.require_redis())

    def require_bucket(self) -> str:
        if not self.s3_bucket:
            raise ConfigError("PIXQ_S3_BUCKET is not set: name the bucket that receives the images")
        return self.s3_bucket

    def describe(self) -> dict[str, object]:
        """The settings for logs, with any password in the Redis URL masked."""
        shown = self.model_dump()
        if self.redis_url:
            shown["redis_url"] = mask_url(self.redis_url)
        return shown


def _check_redis_url(url: str) -> str:
    """A URL redis-py and kombu will take: scheme, host, port, database number and options checked here,
    so that a mistake stops the program naming PIXQ_REDIS_URL instead of failing at the first command."""
    try:
        parts = urlsplit(url)  # raises on a malformed IPv6 literal
        if parts.scheme in SENTINEL_SCHEMES:
            RedisEndpoint.parse(url)  # hosts, master name, database, TLS rule
            return url
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise ConfigError(f"PIXQ_REDIS_URL: {mask_url(url)!r} is malformed ({exc})") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"PIXQ_REDIS_URL: {mask_url(url)!r} must start with redis://, rediss:// (TLS), unix://, "
                          "redis+sentinel:// or rediss+sentinel://")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"PIXQ_REDIS_URL: {mask_url(url)!r} has no host")
    if parts.scheme == "rediss" and "ssl_cert_reqs=" not in parts.query:
        raise ConfigError(
            "PIXQ_REDIS_URL: a rediss:// URL must say how to check the server's certificate, e.g. "
            "rediss://user:password@host:6380/0?ssl_cert_reqs=required (add &ssl_ca_certs=/path/ca.pem "
            "for a private CA)"
        )
    database = parts.path.strip("/")
    if parts.scheme != "unix" and database and not database.isdigit():
        raise ConfigError(f"PIXQ_REDIS_URL: {mask_url(url)!r}: the path is the database number, e.g. /0 "
                          f"(got /{database})")
    import redis  # here: settings are read before any command needs Redis

    try:
        redis.ConnectionPool.from_url(url).make_connection()  # parses every option; connects nowhere
    except (ValueError, TypeError) as exc:
        detail = str(exc).replace("AbstractConnection.__init__() got an ", "")
        raise ConfigError(f"PIXQ_REDIS_URL: {mask_url(url)!r}: {detail}") from None
    return url


def _check_http_url(var: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{var}: {url!r} must be an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018
    except ValueError:
        raise ConfigError(f"{var}: {url!r} has a malformed port") from None
    return url


def _check_int(var: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{var}: {raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{var}: must be at least {minimum} (got {value})")
    return value
