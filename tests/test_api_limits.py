"""Bad input and bad clients against a real `pixq api` (issue 23, items 12-15): every body is a 4xx,
every response is counted, a caller's malformed header or cursor is named, a repeated JSON key is
refused, and a client that sends slowly or too much is cut off (raw sockets on loopback)."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import uuid

import httpx
import pytest
import redis
from pixq.api.body import MAX_DEPTH
from pixq.api.server import MAX_HEAD_BYTES
from pixq.records import KEY_PREFIX

from tests import apitools
from tests.apitools import SMALL, api_env, auth, job_keys, make_key

REQUEST_TIMEOUT_S = 1  # PIXQ_API_REQUEST_TIMEOUT_S of this module's API: slow clients are cut off after it
SOCKET_BOUND_S = 30  # how long a raw client waits for the server's answer before the test fails


@pytest.fixture(scope="module")
def env_api(env: dict[str, str]) -> dict[str, str]:
    return api_env(env, PIXQ_API_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S))


@pytest.fixture(scope="module")
def key(env_api: dict[str, str]) -> dict[str, str]:
    return make_key(env_api, "limits")


def counted(api: str, code: int) -> float:
    """All requests answered ``code``, summed over routes, from /metrics."""
    text = httpx.get(f"{api}/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(
        rf'^pixq_api_requests_total{{[^}}]*code="{code}"[^}}]*}} (\S+)$', text, re.M))


def post_raw(api: str, key: dict[str, str], body: bytes) -> httpx.Response:
    return httpx.post(f"{api}/v1/jobs", content=body, headers={**auth(key), "content-type": "application/json"})


def test_deeply_nested_json_is_a_400_never_a_500(api: str, key: dict[str, str], raw_redis: redis.Redis,
                                                slow_model: str) -> None:
    before = job_keys(raw_redis)
    for body in (b"[" * 1000 + b"]" * 1000,  # 2 KB, far under the body limit
                 b'{"prompt": "x", "extra": ' + b"[" * 1000 + b"]" * 1000 + b"}",
                 b'{"prompt": ' + b'{"a": ' * 900 + b"1" + b"}" * 900 + b"}",
                 b'{"prompt": "x", "w": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}"):
        r = post_raw(api, key, body)
        assert r.status_code == 400 and r.json()["error"] == "malformed_json", (len(body), r.text)
        assert "nested deeper" in r.json()["message"]
    # Brackets inside strings are text: a prompt full of them is an ordinary job.
    r = post_raw(api, key, json.dumps({"prompt": "[" * 100 + "{" * 100, "model_name": slow_model, **SMALL}).encode())
    assert r.status_code == 201, r.text
    assert job_keys(raw_redis) - before == {f"{KEY_PREFIX}{r.json()['id']}".encode()}


def test_repeated_json_keys_are_refused_naming_the_key(api: str, key: dict[str, str],
                                                       raw_redis: redis.Redis) -> None:
    before = job_keys(raw_redis)
    r = post_raw(api, key, b'{"prompt": "", "prompt": "x"}')
    assert r.status_code == 422 and r.json()["error"] == "invalid_request", r.text
    assert [f["field"] for f in r.json()["fields"]] == ["prompt"]
    r = post_raw(api, key, b'{"prompt": "x", "webhook": {"url": "https://a.example/", "url": "https://b.example/"}}')
    assert r.status_code == 422 and [f["field"] for f in r.json()["fields"]] == ["url"], r.text
    assert job_keys(raw_redis) == before


def test_a_500_is_counted_in_metrics(api: str, key: dict[str, str], raw_redis: redis.Redis) -> None:
    """A record that cannot be read (written by hand here) is the server's fault: 500, and counted."""
    job_id = uuid.uuid4().hex
    raw_redis.hset(KEY_PREFIX + job_id, mapping={"id": job_id, "owner": key["id"], "state": "no-such-state",
                                                 "request": "{not json"})
    try:
        before = counted(api, 500)
        r = httpx.get(f"{api}/v1/jobs/{job_id}", headers=auth(key))
        assert r.status_code == 500
        assert counted(api, 500) == before + 1
    finally:
        raw_redis.delete(KEY_PREFIX + job_id)


def test_a_malformed_last_event_id_or_cursor_is_a_422_naming_it(api: str, key: dict[str, str],
                                                                 slow_model: str) -> None:
    job_id = post_raw(api, key, json.dumps({"prompt": "followed", "model_name": slow_model, **SMALL}).encode()
                      ).json()["id"]
    for bad in ("--", "1-2-3", "abc", "18446744073709551616-0", "1-18446744073709551616"):
        r = httpx.get(f"{api}/v1/jobs/{job_id}/events", headers={**auth(key), "Last-Event-ID": bad}, timeout=10)
        assert r.status_code == 422, (bad, r.text)
        assert [f["field"] for f in r.json()["fields"]] == ["Last-Event-ID"], r.text
    for score in ("nan", "inf", "-inf", "1e999"):
        cursor = base64.urlsafe_b64encode(f"{score}|x".encode()).decode().rstrip("=")
        r = httpx.get(f"{api}/v1/jobs", params={"cursor": cursor}, headers=auth(key))
        assert r.status_code == 422 and [f["field"] for f in r.json()["fields"]] == ["cursor"], (score, r.text)
    # A well-formed id still resumes (from the stream's start: the queued event, then the cancel ends it).
    httpx.post(f"{api}/v1/jobs/{job_id}/cancel", headers=auth(key))
    events = apitools.sse_events(api, job_id, {**auth(key), "Last-Event-ID": "0"}, timeout_s=30)
    assert [e[1] for e in events] == ["queued", "canceled"], events


def _connect(api: str) -> socket.socket:
    host, port = api.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=SOCKET_BOUND_S)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout: it never did)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_body_that_stops_coming_is_answered_408_and_closed(api: str, key: dict[str, str]) -> None:
    before = counted(api, 408)
    with _connect(api) as sock:
        sock.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key['key']}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n".encode() + b'{"prompt":')
        answer = _read_all(sock)  # the server closes: this returns
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"request_timeout" in answer
    assert counted(api, 408) >= before + 1


def test_a_head_that_stops_coming_or_never_comes_is_closed(api: str) -> None:
    with _connect(api) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    with _connect(api) as sock:  # connected, and not a byte sent
        assert _read_all(sock).startswith(b"HTTP/1.1 408 ")


def test_a_head_over_the_limit_is_refused_431_without_reading_it_all(api: str) -> None:
    before = counted(api, 431)
    with _connect(api) as sock:
        sock.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ")
        sent, answer = 0, b""
        try:
            while sent < 8 * 1024 * 1024:  # an 8 MB header: the server answers and closes long before
                sock.sendall(b"x" * 65536)
                sent += 65536
        except OSError:  # the server closed while we were still sending
            pass
        with contextlib.suppress(ConnectionResetError):  # the reset lost the answer: the count below tells
            answer = _read_all(sock)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert counted(api, 431) == before + 1
    # A head just under the limit is served.
    r = httpx.get(f"{api}/healthz", headers={"X-Pad": "p" * (MAX_HEAD_BYTES - 200)})
    assert r.status_code == 200
