"""The routes: each one authenticates, validates with the shared schema and calls the ``Client``.

No business rules live here: validation is ``pixq.schema``, records and quotas are
``pixq.records``, enqueueing is ``pixq.client``.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from pixq.api import body as body_json
from pixq.api import events
from pixq.api.body import BodyRefused
from pixq.api.errors import ApiError, RateLimited, responses
from pixq.api.keys import NAMES_KEY, ApiKey, Scope
from pixq.api.state import ApiState
from pixq.errors import InvalidRequest, JobNotFound
from pixq.listing import decode_cursor, list_every_owners_jobs, list_jobs
from pixq.records import JobRecord, JobState
from pixq.schema import JobRequest, WebhookEvent, parse_request, request_schema

router = APIRouter()
bearer = HTTPBearer(auto_error=False, description="An API key from `pixq keys create`")
MAX_LIST_LIMIT = 100


def state_of(request: Request) -> ApiState:
    return request.app.state.pixq  # type: ignore[no-any-return]


class JobView(JobRecord):
    """The job record, with each image's link through this API (a redirect to a fresh URL)."""

    image_urls: list[str] = []


class JobList(BaseModel):
    jobs: list[JobView]
    next_cursor: str | None = None


def view(state: ApiState, record: JobRecord) -> JobView:
    urls = [f"{state.public_url}/v1/jobs/{record.id}/images/{i.index}" for i in record.images]
    return JobView.model_construct(**dict(record), image_urls=urls)  # the record is valid already


def job_response(state: ApiState, record: JobRecord) -> Response:
    """The view as JSON, without FastAPI validating it a second time against the response model."""
    return Response(view(state, record).model_dump_json(), media_type="application/json")


@functools.cache
def _schema_json() -> bytes:
    return json.dumps(request_schema()).encode()


def authenticated(scope: Scope) -> Any:
    def check(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> ApiKey:
        if creds is None or creds.scheme.lower() != "bearer":
            raise ApiError(401, "unauthorized", "send Authorization: Bearer <API key>",
                           {"WWW-Authenticate": "Bearer"})
        key = state_of(request).keys.authenticate(creds.credentials)
        if key is None:
            raise ApiError(401, "unauthorized", "unknown, wrong or revoked API key", {"WWW-Authenticate": "Bearer"})
        if not key.allows(scope):
            raise ApiError(403, "forbidden", f"this key lacks the {scope.value} scope")
        return key

    return Depends(check)


def owned(state: ApiState, key: ApiKey, job_id: str) -> JobRecord:
    """The job if this key may see it; another key's job reads as not found."""
    record = state.client.status(job_id)
    if record.owner != key.id and not key.allows(Scope.admin):
        raise JobNotFound(f"no job {job_id!r} (never submitted, or expired)")
    return record


# One Server-Sent Event as schemathesis and other readers parse it: its id, its event name, its data (JSON).
SSE_EVENT = {"type": "object", "properties": {"id": {"type": "string"}, "event": {
    "type": "string", "enum": ["queued", "running", "succeeded", "failed", "canceled"]}, "data": {"type": "string"}}}
JOB_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}}}}


@router.post("/v1/jobs", status_code=201, response_model=JobView, openapi_extra=JOB_BODY, tags=["jobs"],
             responses={200: {"model": JobView, "description": "An earlier job with the same idempotency key"},
                        **responses(400, 401, 403, 413, 415, 422, 429, 503)})
async def submit(
    request: Request, key: ApiKey = authenticated(Scope.submit),
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    """Submit a job: the body is the job request the Python client takes."""
    state = state_of(request)
    job_request = parse_job_body(state, request.headers.get("content-type", ""), await request.body(),
                                 idempotency_key)
    record, created = await run_in_threadpool(submit_as, state, key, job_request)
    return submitted(state, record, created)


def parse_job_body(state: ApiState, content_type: str, body: bytes, idempotency_key: str | None) -> JobRequest:
    """The job request in a POST body; ``ApiError`` or ``InvalidRequest`` says what is wrong with it."""
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the job as Content-Type: application/json")
    try:
        data = body_json.loads(body)
    except BodyRefused as exc:
        if exc.field is not None:
            raise InvalidRequest([(exc.field, "appears more than once in the body's object (send each key once)")]) \
                from None
        raise ApiError(400, "malformed_json", f"body refused: {exc}") from None
    except ValueError as exc:  # UnicodeDecodeError too
        raise ApiError(400, "malformed_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest([('""', "the body must be a JSON object (the job request)")])
    if idempotency_key is not None and data.setdefault("idempotency_key", idempotency_key) != idempotency_key:
        raise InvalidRequest([("idempotency_key", "differs from the Idempotency-Key header")])
    data.setdefault("model_name", state.settings.model)
    return parse_request(data)


def submit_as(state: ApiState, key: ApiKey, job_request: JobRequest) -> tuple[JobRecord, bool]:
    """Rate limit, submit through the Client (idempotency, quota, webhook check), read the record back."""
    if wait_s := state.rate_limited(key):
        raise RateLimited(f"key {key.name} is over its rate of {key.rate}", wait_s)
    job = state.client.submit_request(job_request, owner=key.id, max_in_flight=key.max_in_flight)
    return state.client.status(job.id), job.created


def submitted(state: ApiState, record: JobRecord, created: bool) -> Response:
    return Response(view(state, record).model_dump_json(), status_code=201 if created else 200,
                    media_type="application/json", headers={"Location": f"/v1/jobs/{record.id}"})


@router.get("/v1/jobs", response_model=JobList, tags=["jobs"], responses=responses(401, 403, 422, 503))
def list_own_jobs(
    request: Request, key: ApiKey = authenticated(Scope.read),
    state: Annotated[JobState | None, Query(description="Only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 20,
    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")] = None,
    tenant: Annotated[str | None, Query(max_length=64, description="Admin keys only: just this key's jobs "
                                        "(its name, as `pixq keys list` shows it)")] = None,
) -> JobList:
    """This key's jobs, newest first, a page at a time; an admin key's: every key's (``tenant``: one key's)."""
    st = state_of(request)
    try:
        after = decode_cursor(cursor) if cursor else None
    except ValueError:
        raise InvalidRequest([("cursor", "is not a cursor this API gave out")]) from None
    if tenant is not None and not key.allows(Scope.admin):
        raise ApiError(403, "forbidden", "tenant: listing another key's jobs needs the admin scope")
    if tenant is not None:
        records, next_cursor = list_jobs(st.client.records, tenant_id(st, tenant), state=state, limit=limit,
                                         after=after)
    elif key.allows(Scope.admin):
        records, next_cursor = list_every_owners_jobs(st.client.records, state=state, limit=limit, after=after)
    else:
        records, next_cursor = list_jobs(st.client.records, key.id, state=state, limit=limit, after=after)
    return JobList(jobs=[view(st, r) for r in records], next_cursor=next_cursor)


def tenant_id(state: ApiState, name: str) -> str:
    """The id of the key named ``name`` (revoked ones too: their jobs stay listed)."""
    key_id = state.client.conn.hget(NAMES_KEY, name)
    if not isinstance(key_id, bytes):
        raise InvalidRequest([("tenant", f"no key named {name!r}")])
    return key_id.decode()


@router.get("/v1/jobs/{job_id}", response_model=JobView, tags=["jobs"], responses=responses(401, 403, 404, 503))
def get_job(job_id: str, request: Request, key: ApiKey = authenticated(Scope.read)) -> Response:
    """The job's record."""
    st = state_of(request)
    return job_response(st, owned(st, key, job_id))


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobView, tags=["jobs"],
             responses=responses(401, 403, 404, 503))
def cancel_job(job_id: str, request: Request, key: ApiKey = authenticated(Scope.submit)) -> Response:
    """Cancel: a queued job never starts, a running one stops at its next step."""
    st = state_of(request)
    owned(st, key, job_id)
    return job_response(st, st.client.cancel(job_id))


@router.get("/v1/jobs/{job_id}/images/{index}", status_code=302, response_class=RedirectResponse, tags=["jobs"],
            responses={302: {"description": "To a fresh presigned URL of the image"},
                       **responses(401, 403, 404, 422, 503)})
def get_image(job_id: str, index: int, request: Request, key: ApiKey = authenticated(Scope.read)) -> Response:
    """A redirect to a fresh time-limited URL of the image (links in stored payloads never expire)."""
    st = state_of(request)
    record = owned(st, key, job_id)
    if not 0 <= index < len(record.images):
        raise JobNotFound(f"job {job_id} has no image {index} ({len(record.images)} image(s), {record.state.value})")
    return RedirectResponse(st.client.presigned_url(job_id, index, expires_in_s=900), status_code=302)


@router.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                             "description": "Server-Sent Events: queued, running (every step), then the end"},
                       **responses(401, 403, 404, 422, 503)})
def job_events(job_id: str, request: Request, key: ApiKey = authenticated(Scope.read),
               last_event_id: Annotated[str | None, Header(max_length=64)] = None) -> StreamingResponse:
    """Follow the job: ``queued`` (with position), ``running`` (step, total_steps) at every step, then
    ``succeeded`` / ``failed`` / ``canceled`` with the record; resumable with ``Last-Event-ID``. The
    stream ends within ``KEY_RECHECK_S`` (5 s) of its key's revocation."""
    st = state_of(request)
    if last_event_id and not events.is_event_id(last_event_id):
        raise InvalidRequest([("Last-Event-ID", f"{last_event_id!r} is not an event id this API sent "
                               "(e.g. 1796112575885-0)")])
    record = owned(st, key, job_id)
    stream = events.follow(st, record, last_event_id or None, lambda r: view(st, r).model_dump(mode="json"),
                           key_id=key.id)
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/v1/jobs/{job_id}/deliveries", tags=["webhooks"], responses=responses(401, 403, 404, 503))
def job_deliveries(job_id: str, request: Request, key: ApiKey = authenticated(Scope.read)) -> list[dict[str, Any]]:
    """The job's webhook deliveries: state (pending, delivered, failed, gone), attempts, last answer."""
    from pixq.api.deliveries import DeliveryStore

    st = state_of(request)
    owned(st, key, job_id)
    return [d.public() for d in DeliveryStore(st.client.conn).for_job(job_id)]


@router.post("/v1/jobs/{job_id}/deliveries/{event}/redeliver", tags=["webhooks"],
             responses=responses(401, 403, 404, 422, 503))
def redeliver(job_id: str, event: WebhookEvent, request: Request,
              key: ApiKey = authenticated(Scope.submit)) -> dict[str, Any]:
    """Send an exhausted (or stopped by 410) delivery again, with a fresh schedule."""
    from pixq.api.deliveries import DeliveryStore

    st = state_of(request)
    owned(st, key, job_id)
    delivery = DeliveryStore(st.client.conn).redeliver(job_id, event.value)
    if delivery is None:
        raise JobNotFound(f"job {job_id} has no failed {event.value} delivery to send again")
    return delivery.public()


@router.get("/v1/queues", tags=["queues"], responses=responses(401, 403, 503))
def queues(request: Request, key: ApiKey = authenticated(Scope.read)) -> list[dict[str, Any]]:
    """Per model: waiting jobs, the oldest one's age, running jobs, live workers. An admin key sees it
    all; any other key counts, and of the running jobs only its own (never another key's job ids)."""
    reports = state_of(request).client.queues()
    if key.allows(Scope.admin):
        return [q.to_json_dict() for q in reports]
    return [q.tenant_view(key.id) for q in reports if q.public_to(key.id)]


@router.get("/v1/schema", tags=["jobs"], response_model=dict[str, Any], responses=responses(401, 403))
def schema(key: ApiKey = authenticated(Scope.read)) -> Response:
    """The job request's JSON Schema."""
    return Response(_schema_json(), media_type="application/json")


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses={503: {"description": "Redis or S3 unreachable"}})
def readyz(request: Request) -> JSONResponse:
    """Redis and S3 answer."""
    st = state_of(request)
    checks: dict[str, str] = {}
    try:
        st.client.conn.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # any failure is "not ready", said in the body
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    try:
        st.client.s3().head_bucket(Bucket=st.settings.require_bucket())
        checks["s3"] = "ok"
    except Exception as exc:
        checks["s3"] = f"unreachable: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503)


@router.get("/metrics", tags=["health"], response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(request: Request) -> Response:
    """Prometheus metrics: requests, latency, webhook deliveries, outbox lag."""
    st = state_of(request)
    from pixq.api.deliveries import DeliveryStore

    try:
        entries, due = DeliveryStore(st.client.conn).backlog()
        st.outbox_entries.set(entries)
        st.deliveries_due.set(due)
    except Exception:  # Redis down: the last values stay; /readyz says why
        pass
    return Response(generate_latest(st.registry), media_type=CONTENT_TYPE_LATEST)
