"""How every part of the system reaches Redis: one URL, one parser, one place that builds both
the redis-py client (job records) and Celery's broker and result-backend settings.

``PIXQ_REDIS_URL`` takes:

- ``redis://[user:password@]host:6379/0``, ``rediss://…?ssl_cert_reqs=required[&ssl_ca_certs=…]``,
  ``unix:///path/redis.sock`` — one server (or a managed service's failover endpoint, whose
  address moves to the new primary);
- ``redis+sentinel://[user:password@]host1:26379,host2:26379/mymaster/0`` — Redis Sentinel: the
  sentinels' addresses, the monitored master's name, the database. The user and password are the
  data servers' (ACL users as with ``redis://``); ``?sentinel_password=…`` (and
  ``sentinel_username``) if the sentinels ask for one. ``rediss+sentinel://`` speaks TLS to the
  sentinels and the servers, with the same ``ssl_cert_reqs`` / ``ssl_ca_certs`` rule.

Every client built here reconnects by itself (Sentinel: to whichever server the sentinels now
name primary, also inside a command's retries: ``sentinelconn.py``) and retries a command on a
connection error, a timeout or ``READONLY`` (a demoted primary) with exponential backoff
(redis-py ``Retry``). That is safe because every write the records make is a Lua script that may
be re-run after an unknown outcome (``records.py``). A client's ``retries`` is the whole budget:
the connect and its health-check ``PING``, which redis-py retries inside each attempt with the
same ``Retry``, try once there (``_retryable``), so a Redis that does not answer is reported after
``retries`` + 1 attempts.
Celery gets kombu's Sentinel transport (``sentinel://`` URLs and ``master_name``), and for
``unix://`` kombu's and Celery's ``redis+socket://`` form (redis-py's unix connection takes no
TCP keepalive option).
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from pixq.errors import ConfigError

log = logging.getLogger(__name__)

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379
_SSL_PARAMS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
RETRY_ON = [redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError]


# How many ``call_with_retry`` calls of ours are running in this thread (or asyncio task).
_RETRY_DEPTH: ContextVar[int] = ContextVar("pixq_redis_retry_depth", default=0)


def _retryable(error: Exception) -> bool:
    """Whether a retry of ours tries ``error`` again.

    Not a refused login: redis-py's AuthenticationError is a ConnectionError, and a wrong password
    stays wrong, so it is said at once. Not inside another retry: redis-py retries a command, and
    within each attempt retries the connect and the health-check ``PING`` that a new connection
    sends, with the same ``Retry``; nested, 4 retries made 25 attempts and ~16 s against a server
    that accepts and closes (a proxy in front of a dead Redis). The command's retry is the budget.
    """
    return not isinstance(error, redis.AuthenticationError) and _RETRY_DEPTH.get() <= 1


class LoginFinalRetry(Retry):
    """redis-py's ``Retry`` with ``_retryable``'s rule: ``retries`` attempts after the first, in all."""

    def __init__(self, backoff: Any, retries: int):
        super().__init__(backoff, retries, is_retryable=_retryable)

    def call_with_retry(self, do: Any, fail: Any, is_retryable: Any = None, with_failure_count: bool = False) -> Any:
        token = _RETRY_DEPTH.set(_RETRY_DEPTH.get() + 1)
        try:
            return super().call_with_retry(do, fail, is_retryable, with_failure_count)
        finally:
            _RETRY_DEPTH.reset(token)


class AsyncLoginFinalRetry(AsyncRetry):
    """The asyncio twin of ``LoginFinalRetry``."""

    def __init__(self, backoff: Any, retries: int):
        super().__init__(backoff, retries, is_retryable=_retryable)

    async def call_with_retry(self, do: Any, fail: Any, is_retryable: Any = None,
                              with_failure_count: bool = False) -> Any:
        token = _RETRY_DEPTH.set(_RETRY_DEPTH.get() + 1)
        try:
            return await super().call_with_retry(do, fail, is_retryable, with_failure_count)
        finally:
            _RETRY_DEPTH.reset(token)


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (also in a URL too malformed to parse)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", url, count=1)
    if password is None:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()



@dataclass(frozen=True)
class RedisEndpoint:
    """A parsed ``PIXQ_REDIS_URL``."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()  # empty: one server (``url``)
    master_name: str = ""  # set exactly when ``sentinels`` is (parse requires both)
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: dict[str, str] = field(default_factory=dict)  # ssl_* query parameters (rediss+sentinel)
    sentinel_auth: dict[str, str] = field(default_factory=dict)  # username/password for the sentinels

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)

    @property
    def is_unix(self) -> bool:
        return urlsplit(self.url).scheme == "unix"

    @classmethod
    def parse(cls, url: str) -> RedisEndpoint:
        """Check ``url``; a malformed one raises ``ConfigError`` naming ``PIXQ_REDIS_URL``."""
        parts = urlsplit(url)
        scheme = parts.scheme
        shown = mask_url(url)
        if scheme not in ("redis", "rediss", "unix", *SENTINEL_SCHEMES):
            raise ConfigError(f"PIXQ_REDIS_URL: {shown!r} must start with redis://, rediss:// (TLS), unix://, "
                              "redis+sentinel:// or rediss+sentinel://")
        query = dict(parse_qsl(parts.query))
        if scheme.startswith("rediss") and "ssl_cert_reqs" not in query:
            raise ConfigError(
                "PIXQ_REDIS_URL: a rediss:// URL must say how to check the server's certificate, e.g. "
                "rediss://user:password@host:6380/0?ssl_cert_reqs=required (add &ssl_ca_certs=/path/ca.pem "
                "for a private CA)"
            )
        if scheme not in SENTINEL_SCHEMES:
            if scheme == "unix" and not parts.path:
                raise ConfigError(f"PIXQ_REDIS_URL: {shown!r} has no socket path (unix:///path/to/redis.sock)")
            if scheme != "unix" and not parts.hostname:
                raise ConfigError(f"PIXQ_REDIS_URL: {shown!r} has no host")
            try:
                parts.port  # noqa: B018 - raises on a malformed port
            except ValueError:
                raise ConfigError(f"PIXQ_REDIS_URL: {shown!r} has a malformed port") from None
            return cls(url=url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        sentinels = []
        for item in filter(None, hosts.split(",")):
            host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
            if not host or (port and not port.isdigit()):
                raise ConfigError(f"PIXQ_REDIS_URL: {shown!r}: {item!r} is not host:port")
            sentinels.append((host, int(port or DEFAULT_SENTINEL_PORT)))
        path = [p for p in parts.path.split("/") if p]
        if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ConfigError(f"PIXQ_REDIS_URL: {shown!r} must look like "
                              "redis+sentinel://[user:password@]host1:26379,host2:26379/mastername/0")
        username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
        sentinel_auth = {k.removeprefix("sentinel_"): v for k, v in query.items()
                         if k in ("sentinel_username", "sentinel_password")}
        return cls(url=url, sentinels=tuple(sentinels), master_name=unquote(path[0]),
                   db=int(path[1]) if len(path) == 2 else 0, username=unquote(username) or None,
                   password=unquote(password) or None,
                   tls={k: v for k, v in query.items() if k in _SSL_PARAMS} if scheme == "rediss+sentinel" else {},
                   sentinel_auth=sentinel_auth)

    # -- redis-py ---------------------------------------------------------------------------

    def client(self, retries: int = 25, socket_timeout_s: float = 30, connect_timeout_s: float = 5) -> redis.Redis:
        """A client that reconnects and retries by itself (``retries`` backoff steps, ~1 min at 25)."""
        common: dict[str, Any] = dict(
            socket_connect_timeout=connect_timeout_s, socket_timeout=socket_timeout_s, socket_keepalive=True,
            health_check_interval=10, retry=LoginFinalRetry(ExponentialWithJitterBackoff(base=0.2, cap=3.0), retries),
            retry_on_error=RETRY_ON,
        )
        if self.is_unix:
            del common["socket_keepalive"]  # a TCP option: redis-py's UnixDomainSocketConnection refuses it
        if not self.is_sentinel:
            return redis.Redis.from_url(self.url, **common)
        from redis.sentinel import Sentinel

        tls = self._redis_tls()
        sentinel = Sentinel(
            list(self.sentinels),
            sentinel_kwargs={**self.sentinel_auth, **tls, "socket_connect_timeout": connect_timeout_s,
                             "socket_timeout": min(socket_timeout_s, 5)},
            **tls,
        )
        from pixq.sentinelconn import connection_class

        return sentinel.master_for(self.master_name, redis_class=redis.Redis, db=self.db, username=self.username,
                                   password=self.password, connection_class=connection_class(bool(tls)), **common)

    def async_client(self, connect_timeout_s: float = 2, socket_timeout_s: float | None = None) -> Any:
        """The asyncio twin of ``client`` (the API's event streams: no socket timeout, they block on
        XREAD; its request path: ``socket_timeout_s``, as the sync client's)."""
        import redis.asyncio as aioredis

        if not self.is_sentinel:
            # No retry here: redis-py's from_url gives the pool none, a failed command fails at once.
            return aioredis.Redis.from_url(self.url, socket_connect_timeout=connect_timeout_s, health_check_interval=10,
                                          socket_timeout=socket_timeout_s)
        common: dict[str, Any] = dict(socket_connect_timeout=connect_timeout_s, health_check_interval=10,
                                      socket_timeout=socket_timeout_s,
                                      # 7 steps, ≈ 10 s on average: a Sentinel failover (down-after + election, ≈ 2.5 s
                                      # on loopback) is ridden out all but never (P(backoff < 2.5 s) ≈ 0.1 %).
                                      retry=AsyncLoginFinalRetry(ExponentialWithJitterBackoff(base=0.2, cap=3.0), 7),
                                      retry_on_error=RETRY_ON)
        from redis.asyncio.sentinel import Sentinel as AsyncSentinel

        tls = self._redis_tls()
        sentinel = AsyncSentinel(list(self.sentinels), sentinel_kwargs={**self.sentinel_auth, **tls}, **tls)
        from pixq.sentinelconn import connection_class

        return sentinel.master_for(self.master_name, db=self.db, username=self.username, password=self.password,
                                   connection_class=connection_class(bool(tls), asynchronous=True), **common)

    def limits_url(self) -> str:
        """The same Redis in the form the ``limits`` library (the API's rate limiter) takes, with
        ``limits_options()``: ``storage_from_string(url, **options)``."""
        if self.is_unix:
            return "redis+" + self.url  # limits' name for redis-py's unix:// form
        if not self.is_sentinel:
            return self.url
        auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@" if self.password else ""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"redis+sentinel://{auth}{hosts}/{quote(self.master_name, safe='')}"

    def limits_options(self) -> dict[str, Any]:
        """What a ``limits`` Sentinel URL cannot say: the sentinels' own login, TLS (to the sentinels
        and the servers) and the database.

        The limiter's client retries nothing, so redis/redis-py#3874 (``sentinelconn.py``) does not
        reach it: a connection that broke asks the sentinels again when the pool hands it out next.
        """
        if not self.is_sentinel:
            return {}
        tls = self._redis_tls()
        # As ``client`` logs in to the sentinels: with their own login only (limits would send the data servers').
        sentinel_login = {k: self.sentinel_auth.get(k) for k in ("username", "password")}
        return {"db": self.db, **tls, "sentinel_kwargs": {**sentinel_login, **tls}}

    def _socket_url(self) -> str:
        parts = urlsplit(self.url)
        query = dict(parse_qsl(parts.query))
        username = parts.username or query.get("username")
        password = parts.password or query.get("password")
        auth = ""
        if username is not None or password is not None:
            auth = f"{quote(unquote(username or ''), safe='')}:{quote(unquote(password or ''), safe='')}@"
        return f"redis+socket://{auth}{parts.path}?virtual_host={int(query.get('db', 0))}"

    def _redis_tls(self) -> dict[str, Any]:
        if not self.tls:
            return {}
        return {"ssl": True, **self.tls}

    # -- Celery -----------------------------------------------------------------------------

    def celery_settings(self) -> dict[str, Any]:
        """``broker_url``, ``result_backend`` and the Sentinel/TLS options Celery needs for them.

        The caller merges ``broker_transport_options`` / ``result_backend_transport_options``
        into its own. A ``unix://`` URL becomes kombu's and Celery's ``redis+socket://`` form, its
        database the ``virtual_host`` parameter; kombu then drops its TCP-only options.
        """
        if self.is_unix:
            url = self._socket_url()
            return {"broker_url": url, "result_backend": url,
                    "broker_transport_options": {}, "result_backend_transport_options": {}}
        if not self.is_sentinel:
            return {"broker_url": self.url, "result_backend": self.url,
                    "broker_transport_options": {}, "result_backend_transport_options": {}}
        auth = ""
        if self.password is not None or self.username is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        url = ";".join(f"sentinel://{auth}{host}:{port}/{self.db}" for host, port in self.sentinels)
        sentinel_kwargs: dict[str, Any] = {**self.sentinel_auth, **self._redis_tls()}
        transport: dict[str, Any] = {"master_name": self.master_name}
        if sentinel_kwargs:
            transport["sentinel_kwargs"] = sentinel_kwargs
        conf: dict[str, Any] = {"broker_url": url, "result_backend": url, "broker_transport_options": transport,
                                "result_backend_transport_options": dict(transport)}
        if self.tls:
            conf["broker_use_ssl"] = dict(self.tls)
            conf["redis_backend_use_ssl"] = dict(self.tls)
        return conf


def check_memory_policy(conn: redis.Redis) -> None:
    """Refuse a Redis that may evict keys: job records, leases and queued messages must never
    vanish under memory pressure (they expire by their own TTLs). A managed Redis that forbids
    ``CONFIG GET`` gets a warning instead, once per process."""
    try:
        policy = cast(dict[str, Any], conn.config_get("maxmemory-policy")).get("maxmemory-policy")
    except redis.ResponseError as exc:
        log.warning("could not read Redis's maxmemory-policy (%s); it must be noeviction, or job records and "
                    "queued messages may be evicted under memory pressure", " ".join(str(exc).split()))
        return
    if policy is not None and policy != "noeviction":
        raise ConfigError(f"Redis maxmemory-policy is {policy!r}, which evicts keys (job records, queued messages) "
                          "under memory pressure; set it to noeviction (CONFIG SET maxmemory-policy noeviction, "
                          "redis.conf, or your provider's parameter group)")
