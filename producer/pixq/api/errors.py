"""How errors leave the API: one JSON shape, one status per exception class, never a traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from pixq.errors import BrokerUnavailable, InvalidRequest, JobNotFound, PixqError, QueueFull, QuotaExceeded

log = logging.getLogger(__name__)


class FieldError(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    # A short machine-readable kind: invalid_request, malformed_json, not_found, unauthorized, forbidden,
    # queue_full (PIXQ_MAX_QUEUE_DEPTH), quota_exceeded (the key's max-in-flight), rate_limited (its rate), ...
    error: str
    message: str
    fields: list[FieldError] = []


class ApiError(Exception):
    """Raised by routes and dependencies: answered as ``status`` with an ``ErrorBody``."""

    def __init__(self, status: int, error: str, message: str, headers: dict[str, str] | None = None):
        self.status, self.error, self.message, self.headers = status, error, message, headers or {}
        super().__init__(message)


class RateLimited(ApiError):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(429, "rate_limited", message, {"Retry-After": str(max(1, retry_after_s))})


def error_response(status: int, error: str, message: str, fields: list[FieldError] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=error, message=message, fields=fields or [])
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def invalid(errors: list[tuple[str, str]]) -> JSONResponse:
    """422 with the same (field, message) pairs ``InvalidRequest`` carries."""
    return error_response(422, "invalid_request", str(InvalidRequest(errors)),
                          [FieldError(field=f, message=m) for f, m in errors])


# Common responses for the OpenAPI document: every refusal has the same body.
def responses(*codes: int) -> dict[int | str, dict[str, object]]:
    texts = {400: "Malformed JSON", 401: "Missing, wrong or revoked API key", 403: "The key lacks the scope",
             404: "No such job for this key", 413: "Body too large", 415: "Body is not application/json",
             422: "A field broke a rule", 429: "queue_full, quota_exceeded or rate_limited (see Retry-After)",
             503: "Redis unreachable"}
    return {code: {"model": ErrorBody, "description": texts[code]} for code in codes}


def _api_error(exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.error, exc.message, headers=exc.headers)


def _validation(exc: RequestValidationError) -> JSONResponse:
    errors = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "path", "header", "body")]
        errors.append((".".join(loc) or '""', str(err.get("msg", "invalid")).removeprefix("Value error, ")))
    return invalid(errors)


def _http(exc: StarletteHTTPException) -> JSONResponse:
    kinds = {404: "not_found", 405: "method_not_allowed"}
    return error_response(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail),
                          headers=getattr(exc, "headers", None))


# Exception class -> its answer; the most specific class of an exception wins (its MRO order).
ANSWERS: dict[type[Exception], Callable[[Any], JSONResponse]] = {
    ApiError: _api_error,
    InvalidRequest: lambda exc: invalid(exc.errors),
    RequestValidationError: _validation,
    JobNotFound: lambda exc: error_response(404, "not_found", str(exc)),
    QueueFull: lambda exc: error_response(429, "queue_full", str(exc), headers={"Retry-After": "5"}),
    QuotaExceeded: lambda exc: error_response(429, "quota_exceeded", str(exc), headers={"Retry-After": "5"}),
    BrokerUnavailable: lambda exc: error_response(503, "unavailable", str(exc), headers={"Retry-After": "5"}),
    redis.RedisError: lambda exc: error_response(503, "unavailable", f"Redis unreachable: {exc}",
                                                 headers={"Retry-After": "5"}),
    PixqError: lambda exc: error_response(400, "bad_request", str(exc)),
    StarletteHTTPException: _http,
}


def answer_for(exc: BaseException) -> JSONResponse | None:
    """The response FastAPI's handlers below give ``exc`` (for code outside FastAPI's routing:
    pixq/api/fast.py), or ``None`` when none applies (a bug: a 500)."""
    for cls in type(exc).__mro__:
        if cls in ANSWERS:
            return ANSWERS[cls](exc)
    return None


def install(app: FastAPI) -> None:
    for cls, answer in ANSWERS.items():
        async def handler(_: Request, exc: Exception, answer: Callable[[Any], JSONResponse] = answer) -> JSONResponse:
            return answer(exc)

        app.add_exception_handler(cls, handler)
