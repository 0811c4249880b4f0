"""Helpers for the API tests: the API and relay through our CLI, keys, a webhook receiver and what a
delivery says, the API's rate limiter.

The ``env_api`` and ``api`` fixtures that start a module's API are in tests/fixtures/api.py.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import redis
from pixq.settings import Settings
from standardwebhooks.webhooks import Webhook

from tests.services import Service, free_port, pixq_argv

PEPPER = "test-pepper-0123456789abcdef"
SMALL = {"width": 128, "height": 128, "num_inference_steps": 4}


def api_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    out = dict(env)
    out.update({"PIXQ_API_KEY_PEPPER": PEPPER, "PIXQ_WEBHOOK_ALLOW": "127.0.0.1/32",
                "PIXQ_WEBHOOK_SCHEDULE_S": "0.2,0.2,0.3,0.5", "PIXQ_WEBHOOK_TIMEOUT_S": "1"})
    out.update(extra)
    return out


def start_api(env: dict[str, str], log_path: Path, *extra: str, port: int | None = None) -> tuple[Service, str]:
    port = port or free_port()
    svc = Service("api", pixq_argv("api", "--host", "127.0.0.1", "--port", str(port), *extra), log_path,
                  env=env).start()
    base = f"http://127.0.0.1:{port}"
    svc.wait_until(lambda: httpx.get(base + "/healthz", timeout=1).status_code == 200, 60)
    return svc, base


def job_keys(conn: redis.Redis) -> set[bytes]:
    return set(conn.scan_iter("pixq:job:*", count=1000))


def start_relay(env: dict[str, str], log_path: Path) -> Service:
    svc = Service("relay", pixq_argv("webhooks"), log_path, env=env).start()
    svc.wait_until(lambda: "running" in svc.log_path.read_text(errors="replace"), 60)
    return svc


def make_key(env: dict[str, str], name: str, *args: str) -> dict[str, str]:
    out = subprocess.run(pixq_argv("keys", "create", name, "--json", *args), env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def auth(key: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['key']}"}


@dataclass
class Hit:
    headers: dict[str, str]
    body: bytes
    at: float
    answered: int


@dataclass
class Receiver:
    """A webhook receiver on loopback. ``plan(n)`` says how to answer the n-th request (0-based):
    a status code, or (status, seconds to sleep first, extra headers)."""

    plan: Callable[[int], Any] = lambda n: 200
    port: int = 0  # 0: any free port
    hits: list[Hit] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.lock:
                    n = len(receiver.hits)
                    answer = receiver.plan(n)
                    status, sleep_s, headers = answer if isinstance(answer, tuple) else (answer, 0.0, {})
                    receiver.hits.append(Hit({k.lower(): v for k, v in self.headers.items()}, body, time.time(),
                                             status))
                if sleep_s:
                    time.sleep(sleep_s)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the relay gave up on us (timeout)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, predicate: Callable[[list[Hit]], bool], timeout_s: float, what: str) -> list[Hit]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                hits = list(self.hits)
            if predicate(hits):
                return hits
            time.sleep(0.05)
        got = [(h.headers.get("webhook-id"), h.answered) for h in self.hits]
        raise AssertionError(f"timed out waiting for {what}; got {got}")


def sse_events(base: str, job_id: str, headers: dict[str, str], timeout_s: float = 120) -> list[tuple[str, str, Any]]:
    """(id, event, data) for every event until the stream ends."""
    events: list[tuple[str, str, Any]] = []
    with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", headers=headers, timeout=timeout_s) as response:
        assert response.status_code == 200, response.read()
        current: dict[str, str] = {}
        for line in response.iter_lines():
            if not line:
                if "event" in current:
                    events.append((current.get("id", ""), current["event"], json.loads(current["data"])))
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                current[name] = value
    return events


# -- webhooks: a job whose one event is `canceled`, and what its delivery says


def canceled_job(api: str, key: dict[str, str], url: str, model: str) -> str:
    r = httpx.post(f"{api}/v1/jobs", json={"prompt": "hook me", "model_name": model, "width": 128, "height": 128,
                                           "webhook": {"url": url, "events": ["canceled"]}}, headers=auth(key))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert httpx.post(f"{api}/v1/jobs/{job_id}/cancel", headers=auth(key)).json()["state"] == "canceled"
    return str(job_id)


def verified(hit: Hit, key: dict[str, str], job_id: str) -> None:
    assert hit.headers["webhook-id"] == f"{job_id}:canceled"
    payload = Webhook(key["webhook_secret"]).verify(hit.body, hit.headers)
    assert payload["type"] == "job.canceled" and payload["data"]["id"] == job_id


def delivery(api: str, key: dict[str, str], job_id: str) -> dict[str, object]:
    (only,) = httpx.get(f"{api}/v1/jobs/{job_id}/deliveries", headers=auth(key)).json()
    return only  # type: ignore[no-any-return]


def api_limiter_hits(redis_url: str, n: int) -> list[bool]:
    """``n`` hits of a 2-a-minute rate on the rate limiter that ``pixq api`` builds for ``redis_url``."""
    from limits import parse as parse_limit
    from pixq.api.app import create_app
    from pixq.api.config import ApiSettings

    state = create_app(Settings.from_env({"PIXQ_REDIS_URL": redis_url}), ApiSettings(key_pepper=PEPPER)).state.pixq
    try:
        return [state.limiter.hit(parse_limit("2/minute"), "pixq-key", "k") for _ in range(n)]
    finally:
        state.client.close()
