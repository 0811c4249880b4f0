"""The two hot routes' common case, answered before FastAPI's routing (docs/performance.md, "The HTTP API").

``GET /v1/jobs/{id}`` and ``POST /v1/jobs`` through FastAPI cost ~0.3 ms of routing and dependency
solving a request before any work, and the sync handlers hop through the thread pool onto a blocking
Redis connection. This ASGI layer sits inside the body limit and the metrics middleware and answers
the common case on the event loop over ``redis.asyncio``, in **one** round trip a request:

* the key is looked up once per process (``KeyCache``: its scopes and quotas never change), and the
  script that reads or writes for it checks that the key is still live (``recordscripts.KEY_OK``), so a
  revoked key is refused at once, as through FastAPI;
* GET: one script checks the key and reads the record's hash; the answer is decoded and encoded
  again only when the hash's fields differ from the last read of that job (a polled job mostly does
  not change between polls);
* POST: the body is parsed by the route's own code (``routes.parse_job_body``: same 4xx answers),
  the submit is planned as ``Client.submit`` plans it (``pixq.submitplan``: the same record, message
  and script arguments), then the create script checks the key, the quota, writes the record and
  pushes the Celery message, followed by ``WAIT`` on the same connection when replicas must confirm
  (``durable.py``).

Anything else goes to FastAPI unchanged: a missing, unknown or revoked key, a lacking scope, an
unknown or another key's job (FastAPI answers 401/403/404 as documented), an ``Idempotency-Key``
header over 200 characters; and for POST a key with a rate limit runs the route's own code
(``routes.submit_as``) on a thread (the ``limits`` library's limiter is synchronous).
"""

from __future__ import annotations

from typing import Any

import redis
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from pixq.api import routes
from pixq.api.errors import ApiError, answer_for
from pixq.api.keys import KEY_PREFIX, ApiKey
from pixq.api.keys import Scope as KeyScope
from pixq.api.state import ApiState
from pixq.client import check_webhook, outcome_unknown
from pixq.errors import JobNotFound, service_errors
from pixq.jobrecord import JobRecord, decode_record, job_key
from pixq.recordscripts import CREATE, KEY_OK
from pixq.submitplan import KeyRefused, check_depth, plan_submit
from pixq.wire import queue_lists

JOBS = "/v1/jobs"
# KEYS: the API key's hash, the job's hash. ARGV: the key's HMAC. -1: the key is not live; else the
# job's fields (empty: no such job).
_READ_AS_KEY = KEY_OK + """
if not pixq_key_ok(KEYS[1], ARGV[1]) then return -1 end
return redis.call('HGETALL', KEYS[2])
"""
IDEMPOTENCY_HEADER_MAX = 200  # the route's Header(max_length=200)
ANSWERS_KEPT = 4096  # jobs whose last answer is kept (a few MB)
UNAUTHORIZED = ApiError(401, "unauthorized", "unknown, wrong or revoked API key", {"WWW-Authenticate": "Bearer"})


class KeyCache:
    """Key text -> (key, its HMAC), read from Redis on first use. Whether the key is still live is
    not cached: the script of each request checks it."""

    def __init__(self, state: ApiState, size: int = 4096):
        self.state, self.size = state, size
        self._known: dict[str, tuple[ApiKey, str, str]] = {}

    async def lookup(self, text: str) -> tuple[ApiKey, str, str] | None:
        """(key, its hash's Redis key, its HMAC), or ``None`` for a malformed, unknown or wrong key."""
        hit = self._known.get(text)
        if hit is not None:
            return hit
        store = self.state.keys
        key_id = store.key_id(text)
        if key_id is None:
            return None
        raw: dict[bytes, bytes] = await self.state.rconn.hgetall(KEY_PREFIX + key_id)  # type: ignore[assignment]
        key = store.verify(text, raw)
        if key is None:
            return None
        if len(self._known) >= self.size:
            self._known.clear()
        found = self._known[text] = (key, KEY_PREFIX + key_id, store.digest(text))
        return found

    def forget(self, text: str) -> None:
        self._known.pop(text, None)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None
    return None


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return value  # type: ignore[no-any-return]
    return None


async def _send_json(send: Send, status: int, body: bytes, *extra: tuple[bytes, bytes]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-length", str(len(body)).encode()), (b"content-type", b"application/json"), *extra]})
    await send({"type": "http.response.body", "body": body})


class FastPath:
    def __init__(self, app: ASGIApp, state: ApiState, get_route: Any = None, post_route: Any = None):
        self.app, self.state = app, state
        self.keys = KeyCache(state)
        self.get_route, self.post_route = get_route, post_route  # for the metrics' route label
        self._read = state.rconn.register_script(_READ_AS_KEY)
        self._create = state.rconn.register_script(CREATE)
        self._answers: dict[str, tuple[list[bytes], str | None, bytes]] = {}  # job id -> (hash fields, owner, view)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "GET" and path.startswith(JOBS + "/") and "/" not in path[len(JOBS) + 1:]:
                if len(path) > len(JOBS) + 1 and await self._get(scope, send, path[len(JOBS) + 1:]):
                    return
            elif method == "POST" and path == JOBS and await self._post(scope, receive, send):
                return
        await self.app(scope, receive, send)

    async def _key(self, scope: Scope, needs: KeyScope) -> tuple[str, tuple[ApiKey, str, str]] | None:
        text = _bearer(scope)
        if text is None:
            return None
        try:
            found = await self.keys.lookup(text)
        except Exception:  # Redis trouble: FastAPI's route answers it (503)
            return None
        if found is None or not found[0].allows(needs):
            return None
        return text, found

    async def _get(self, scope: Scope, send: Send, job_id: str) -> bool:
        """Answered here: the job of a live key that may see it. Else ``False``: FastAPI answers."""
        auth = await self._key(scope, KeyScope.read)
        if auth is None:
            return False
        text, (key, key_hash, digest) = auth
        try:
            raw = await self._read(keys=[key_hash, job_key(job_id)], args=[digest])
        except Exception:
            return False
        if raw == -1:
            self.keys.forget(text)
            return False
        if not raw:
            return False
        owner, body = self._answer(job_id, raw)
        if owner != key.id and not key.allows(KeyScope.admin):
            return False
        scope["route"] = self.get_route
        await _send_json(send, 200, body)
        return True

    def _answer(self, job_id: str, raw: list[bytes]) -> tuple[str | None, bytes]:
        """The record's owner and its view as JSON; the same hash fields give the same answer, so a job
        polled while it does not change is decoded once (the hash is still read every time)."""
        kept = self._answers.get(job_id)
        if kept is not None and kept[0] == raw:
            return kept[1], kept[2]
        record = decode_record(dict(zip(raw[::2], raw[1::2], strict=True)))
        body = routes.view(self.state, record).model_dump_json().encode()
        if len(self._answers) >= ANSWERS_KEPT:
            self._answers.clear()
        self._answers[job_id] = (raw, record.owner, body)
        return record.owner, body

    async def _post(self, scope: Scope, receive: Receive, send: Send) -> bool:
        idempotency = _header(scope, b"idempotency-key")
        if idempotency is not None and len(idempotency) > IDEMPOTENCY_HEADER_MAX:
            return False  # FastAPI's header rule answers (422)
        auth = await self._key(scope, KeyScope.submit)
        if auth is None:
            return False
        text, (key, key_hash, digest) = auth
        scope["route"] = self.post_route
        body = bytearray()
        while True:  # read through the body limit's receive: past the limit it raises, and it answers 413
            message = await receive()
            if message["type"] == "http.disconnect":
                return True  # the client left mid-body: nothing to submit, nobody to answer
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            content_type = (_header(scope, b"content-type") or b"").decode("latin-1")
            request = routes.parse_job_body(self.state, content_type, bytes(body),
                                            None if idempotency is None else idempotency.decode("latin-1"))
            if key.rate:
                record, created = await run_in_threadpool(self._submit_through_client, text, request)
            else:
                record, created = await self._submit(key, key_hash, digest, request)
        except KeyRefused:
            self.keys.forget(text)
            await answer_for(UNAUTHORIZED)(scope, receive, send)  # type: ignore[misc]
            return True
        except Exception as exc:
            answer = answer_for(exc)
            if answer is None:
                raise
            await answer(scope, receive, send)
            return True
        await _send_json(send, 201 if created else 200, routes.view(self.state, record).model_dump_json().encode(),
                         (b"location", f"{JOBS}/{record.id}".encode()))
        return True

    def _submit_through_client(self, text: str, request: Any) -> tuple[JobRecord, bool]:
        key = self.state.keys.authenticate(text)  # fresh: this path has no script to check it
        if key is None:
            raise KeyRefused("revoked")
        return routes.submit_as(self.state, key, request)

    async def _submit(self, key: ApiKey, key_hash: str, digest: str, request: Any) -> tuple[JobRecord, bool]:
        """``Client.submit_request``'s plan (``pixq.submitplan``) executed over asyncio, in its order: one
        round trip, two with an idempotency key; a job with a webhook has its destination resolved and
        checked on a thread."""
        state, client, conn = self.state, self.state.client, self.state.rconn
        if request.webhook is not None:
            await run_in_threadpool(check_webhook, request.webhook.url, state.settings.webhook_allow_networks())
        limit = state.settings.max_queue_depth
        if limit:
            async with conn.pipeline(transaction=False) as pipe:
                for name in queue_lists(request.model_name):
                    pipe.llen(name)
                check_depth(request.model_name, sum(await pipe.execute()), limit)
        if not client.messages.has(request):  # the first job of its model and priority: Celery builds it
            await run_in_threadpool(self._prototype, request)
        plan = plan_submit(request, retention_s=state.settings.retention_s, templates=client.messages, owner=key.id,
                           max_in_flight=key.max_in_flight, api_key=(key_hash, digest))
        if plan.idem_key is not None:
            retention_s = state.settings.retention_s
            if not await conn.set(plan.idem_key, plan.job_id, nx=True, ex=retention_s):
                existing = await conn.get(plan.idem_key)
                if existing is None:  # the key expired between the two calls: a new job
                    await conn.set(plan.idem_key, plan.job_id, ex=retention_s)
                earlier = plan.earlier_job(existing)
                if earlier is not None:
                    return await self._existing(key_hash, digest, earlier), False
        try:
            needed = await client.durability.required_async(conn)
            if not needed:
                created = await self._create(keys=plan.keys, args=plan.args)
            else:
                async with conn.pipeline(transaction=False) as pipe:
                    await self._create(keys=plan.keys, args=plan.args, client=pipe)
                    pipe.execute_command("WAIT", needed, client.durability.timeout_ms)
                    created, confirmed = await pipe.execute()
                if created == 1:
                    await client.durability.confirm_async(conn, f"the submit of job {plan.job_id}", needed,
                                                          int(confirmed))
            plan.check_created(created)
        except BaseException as exc:
            # Nothing half-written, as Client._enqueue: no record reported undone, no key without a job;
            # a lost reply that Redis stayed away for the undo too leaves the outcome open (OutcomeUnknown).
            try:
                await conn.delete(*plan.undo_keys)
            except Exception:
                if isinstance(exc, redis.RedisError):
                    raise outcome_unknown(exc, plan.job_id, plan.idem_key) from exc
            raise
        return plan.record(), True

    def _prototype(self, request: Any) -> None:
        client = self.state.client
        with service_errors("job not submitted"):  # kombu's errors too, as Client.submit maps them
            client.conn.ping()  # kombu's channel rides out ~9 s of reconnects to a Redis that is down
            client.messages.prototype(request)

    async def _existing(self, key_hash: str, digest: str, job_id: str) -> JobRecord:
        """The job an idempotency key already named, read by the script that checks the key."""
        raw = await self._read(keys=[key_hash, job_key(job_id)], args=[digest])
        if raw == -1:
            raise KeyRefused("revoked")
        if not raw:
            raise JobNotFound(f"no job {job_id!r} (never submitted, or expired)")
        return decode_record(dict(zip(raw[::2], raw[1::2], strict=True)))
