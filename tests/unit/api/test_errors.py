"""How errors leave the API (pixq/api/errors.py): one JSON shape, the most specific exception class decides the
status, and an exception no answer covers is left to be a 500 (a bug), never guessed."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from fastapi.responses import JSONResponse
from pixq.api.errors import ANSWERS, ApiError, ErrorBody, RateLimited, answer_for, responses
from pixq.errors import (
    BrokerUnavailable,
    ConfigError,
    InvalidRequest,
    JobNotFound,
    NotDurable,
    PixqError,
    QueueFull,
    QuotaExceeded,
)


def read(response: JSONResponse | None) -> tuple[int, dict[str, Any], dict[str, str]]:
    assert response is not None
    body = json.loads(bytes(response.body))
    ErrorBody.model_validate(body)  # every refusal has the documented shape
    return response.status_code, body, dict(response.headers)


@pytest.mark.parametrize("exc, status, error", [
    (JobNotFound("no job abc"), 404, "not_found"),
    (QueueFull("queue full"), 429, "queue_full"),
    (QuotaExceeded("3 in flight"), 429, "quota_exceeded"),  # a QueueFull, answered as itself
    (BrokerUnavailable("down"), 503, "unavailable"),
    (NotDurable("no replica confirmed"), 503, "unavailable"),  # a subclass takes its base's answer
    (redis.ConnectionError("refused"), 503, "unavailable"),
    (ConfigError("PIXQ_X: bad"), 400, "bad_request"),  # any other PixqError
    (ApiError(403, "forbidden", "the key lacks the scope"), 403, "forbidden"),
])
def test_each_exception_class_has_one_status_and_kind(exc: Exception, status: int, error: str) -> None:
    got_status, body, _ = read(answer_for(exc))
    assert (got_status, body["error"]) == (status, error)
    assert body["message"]  # never empty, never a traceback
    assert "Traceback" not in body["message"]


def test_the_busy_answers_say_when_to_come_back() -> None:
    for exc in (QueueFull("q"), QuotaExceeded("k"), BrokerUnavailable("b"), redis.TimeoutError("t")):
        assert read(answer_for(exc))[2]["retry-after"] == "5", exc
    assert read(answer_for(RateLimited("2/minute", retry_after_s=17)))[2]["retry-after"] == "17"
    assert read(answer_for(RateLimited("2/minute", retry_after_s=0)))[2]["retry-after"] == "1"  # never 0


def test_an_invalid_request_names_each_field_and_rule() -> None:
    status, body, _ = read(answer_for(InvalidRequest([("width", "must be a multiple of 8"), ("seed", "too big")])))
    assert status == 422 and body["error"] == "invalid_request"
    assert body["fields"] == [{"field": "width", "message": "must be a multiple of 8"},
                              {"field": "seed", "message": "too big"}]


def test_an_exception_no_answer_covers_is_left_a_500() -> None:
    assert answer_for(ValueError("a bug")) is None
    assert answer_for(KeyError("a bug")) is None
    assert PixqError in ANSWERS  # ... while every error raised on purpose has an answer


def test_the_openapi_responses_share_the_error_body() -> None:
    documented = responses(400, 401, 403, 404, 413, 415, 422, 429, 503)
    assert all(r["model"] is ErrorBody and r["description"] for r in documented.values())
