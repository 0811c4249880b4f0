"""Flower as an operator meets it: ``pixq flower`` behind basic auth, looked at in headless Chromium.

Needs the Debian packages ``chromium`` (and the ``playwright`` Python package as its driver; its
own browser download is never used). Screenshots land in tests/artifacts/.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from pixq.client import Client
from pixq.records import JobState
from pixq.schema import JobRequest
from pixq.settings import Settings
from pixq.wire import send_job
from pixq.worker.jobs.tasks import create_app, progress_reporter
from pixq.worker.ops.flower import flower_argv

from tests.services import Service, free_port, pixq_argv, start_worker
from tests.support import wait_for, write_artifact

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
MAIN_NODE = "cpu-main@test"  # the session worker (conftest), serving the tiny model
SLOW_NODE = "cpu-slow@flower-test"  # a second worker process, serving the slow model
VIEWPORT = {"width": 1920, "height": 1080}  # a common desktop screen
PROMPT = "A watercolor painting of a lighthouse on a cliff at sunset, seen from a small boat"


@dataclass
class Flower:
    url: str
    user: str
    password: str
    svc: Service

    def get(self, path: str, auth: str | None = "ok") -> tuple[int, bytes, Any]:
        headers = {}
        if auth is not None:
            login = f"{self.user}:{self.password}" if auth == "ok" else auth
            headers["Authorization"] = "Basic " + base64.b64encode(login.encode()).decode()
        request = urllib.request.Request(self.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return answer.status, answer.read(), answer.headers
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read(), exc.headers


def pixq(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pixq", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def slow_worker(env: dict[str, str], slow_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    # --max-batch 1: two job threads, so jobs behind a running one stay on the broker (the Broker tab's count).
    svc = start_worker(env, slow_model, tmp_path_factory.mktemp("slow-worker") / "worker.log", name=SLOW_NODE,
                       extra=("--max-batch", "1"))
    yield svc
    svc.signal(signal.SIGKILL)  # nothing of its own to finish; a warm shutdown takes seconds
    svc.stop()


@pytest.fixture(scope="module")
def flower(env: dict[str, str], worker: Service, slow_worker: Service,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    """``pixq flower`` with credentials in its environment, once it sees both workers' events."""
    port = free_port()
    user, password = "operator", secrets.token_urlsafe(16)
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    svc = Service("flower", pixq_argv("flower", "--port", str(port)), log,
                  env={**env, "FLOWER_BASIC_AUTH": f"{user}:{password}"}).start()
    f = Flower(f"http://127.0.0.1:{port}", user, password, svc)
    try:
        svc.wait_until(lambda: f.get("/", auth=None)[0] == 401, 60)

        def sees_workers() -> bool:  # heartbeats arrive every 2 s once Flower listens to events
            status, body, _ = f.get("/workers?json=1")
            names = {w.get("hostname") for w in json.loads(body)["data"]} if status == 200 else set()
            return {MAIN_NODE, SLOW_NODE} <= names

        svc.wait_until(sees_workers, 30)
        yield f
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def browser(flower: Flower) -> Iterator[Any]:
    """Headless Chromium (Debian's), logged in to Flower with basic auth; a fresh profile."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the driver only)")
    if not Path(CHROMIUM).exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium chromium-driver)")
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory(prefix="pixq-chromium-") as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS,
            http_credentials={"username": flower.user, "password": flower.password},
            viewport=VIEWPORT,
        )
        try:
            yield context
        finally:
            context.close()


def secrets_of(env: dict[str, str], flower: Flower) -> list[str]:
    redis_password = re.match(r"redis://:([^@]+)@", env["PIXQ_REDIS_URL"])
    assert redis_password
    return [redis_password.group(1), env["AWS_SECRET_ACCESS_KEY"], flower.password]


# Text of a table cell that is really on screen: Flower cuts long cells with an ellipsis.
VISIBLE_TEXT = """(td) => {
  const node = td.firstChild;
  if (!node || node.nodeType !== Node.TEXT_NODE) return td.innerText;
  const right = td.getBoundingClientRect().right - parseFloat(getComputedStyle(td).paddingRight);
  const range = document.createRange();
  let shown = 0;
  for (let i = 1; i <= node.length; i++) {
    range.setStart(node, 0);
    range.setEnd(node, i);
    if (range.getBoundingClientRect().right > right + 0.5) break;
    shown = i;
  }
  return node.textContent.slice(0, shown);
}"""


class RecordingTask:
    """Stands in for the bound Celery task: keeps what would go to the broker."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.states: list[dict[str, Any]] = []

    def send_event(self, type_: str, **fields: Any) -> None:
        if self.fail:
            raise ConnectionError("broker away")
        self.events.append((type_, fields))

    def update_state(self, state: str, meta: dict[str, Any]) -> None:
        self.states.append({"state": state, **meta})


def test_progress_events_are_throttled_and_never_fail_the_job(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    task = RecordingTask()
    report = progress_reporter(task, "job1", interval_s=0.25, clock=lambda: now[0])
    for step in range(1, 11):  # ten fast steps, 0.1 s apart
        report(step, 10)
        now[0] += 0.1
    sent = [fields["step"] for _, fields in task.events]
    assert sent == [1, 4, 7, 10]  # the first, one per 0.25 s, and the last
    assert task.events[-1] == ("task-progress", {"result": "step 10/10", "step": 10, "total_steps": 10,
                                                 "job_id": "job1", "retry": False})
    assert [s["step"] for s in task.states] == sent and task.states[0]["state"] == "PROGRESS"

    broken = progress_reporter(RecordingTask(fail=True), "job2", interval_s=0)
    for step in (1, 2, 3):
        broken(step, 3)  # no exception reaches the render
    assert [r.message for r in caplog.records].count(
        "job job2: could not report progress to monitors: broker away") == 1


def test_pixq_flower_refuses_to_start_without_credentials(env: dict[str, str]) -> None:
    bare = {k: v for k, v in env.items() if k != "FLOWER_BASIC_AUTH"}
    port = str(free_port())
    missing = pixq("flower", "--port", port, env=bare)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "error: Flower needs a login: set FLOWER_BASIC_AUTH=user:password (or --basic-auth user:password); "
        "--no-auth starts it open to anyone who reaches the port"
    ]
    no_password = pixq("flower", "--port", port, "--basic-auth", "admin", env=bare)
    assert no_password.returncode == 2
    assert no_password.stderr.strip().splitlines() == [
        "error: FLOWER_BASIC_AUTH / --basic-auth: the credential is not user:password"]
    both = pixq("flower", "--port", port, "--no-auth", env={**bare, "FLOWER_BASIC_AUTH": "admin:s3cret-pw"})
    assert both.returncode == 2 and "s3cret-pw" not in both.stderr
    assert both.stderr.strip().splitlines() == [
        "error: --no-auth contradicts the credentials in FLOWER_BASIC_AUTH; drop one of them"]


@pytest.mark.slow
def test_without_credentials_pages_and_api_answer_401(flower: Flower) -> None:
    for path in ("/", "/tasks", "/workers", "/api/tasks", "/api/workers"):
        status, _, headers = flower.get(path, auth=None)
        assert status == 401, path
        if not path.startswith("/api/"):  # a browser asks for the login (the API just refuses)
            assert (headers.get("WWW-Authenticate") or "").startswith("Basic "), path
        assert flower.get(path, auth=f"{flower.user}:wrong-{flower.password}")[0] == 401, path
    status, body, _ = flower.get("/api/tasks")
    assert status == 200 and isinstance(json.loads(body), dict)


@pytest.mark.slow
def test_credentials_stay_off_command_lines(flower: Flower) -> None:
    # `pixq flower` became Flower itself (exec): same process, Flower's own command line.
    proc = psutil.Process(flower.svc.pid)
    group = [proc, *proc.children(recursive=True)]
    assert proc.cmdline() == flower_argv()  # [python, -P, -m, celery, -A, pixq.celeryapp:app, flower]
    assert proc.cmdline()[-5:] == ["-m", "celery", "-A", "pixq.celeryapp:app", "flower"]
    for p in group:
        assert not any(flower.password in arg for arg in p.cmdline()), p.cmdline()
    assert proc.environ()["FLOWER_BASIC_AUTH"] == f"{flower.user}:{flower.password}"


@pytest.mark.slow
def test_flower_shows_jobs_progress_and_each_worker(
    flower: Flower, browser: Any, client: Client, env: dict[str, str], tiny_model: str, slow_model: str,
) -> None:
    page = browser.new_page()
    hidden = secrets_of(env, flower)

    # A running job: its page shows the step it is at (from the task-progress events).
    running = client.submit("a long render to watch", model_name=slow_model, width=256, height=256,
                            num_inference_steps=200)
    wait_for(lambda: client.status(running.id).step >= 3, 60, "the long job to render")

    def shows_progress() -> str | None:  # past the first step: the page follows the render
        page.goto(f"{flower.url}/task/{running.id}")
        text = page.inner_text("#task-page")
        match = re.search(r"step (\d+)/200", text)
        return match.group(0) if "PROGRESS" in text and match and int(match.group(1)) >= 10 else None

    step_shown = wait_for(shows_progress, 20, "Flower to show the running job's step", poll_s=0.3)
    assert SLOW_NODE in page.inner_text("#task-page")
    write_artifact("flower-task-progress.png", page.screenshot(full_page=True))

    # Jobs waiting behind it, on several of the queue's priority lists: the Broker tab counts them all.
    waiting = [client.submit("waits its turn", model_name=slow_model, width=128, height=128,
                             num_inference_steps=2, priority=p) for p in (0, 5, 9, 5)]
    # The worker's second job thread takes one message and waits for the GPU; the other three wait in Redis.
    depth = wait_for(lambda: (d := client.queue_depth(slow_model)) <= len(waiting) - 1 and d, 20,
                     "the worker's second job thread to take a message", poll_s=0.05)
    page.goto(f"{flower.url}/broker")
    queue_row = page.locator("#queue-table tbody tr", has_text=f"pixq.{slow_model}")
    messages = queue_row.locator("td:nth-child(2)").inner_text().strip()
    assert depth >= 2 and client.queue_depth(slow_model) == depth
    assert messages == str(depth), f"Flower's Broker tab counts {messages} of {depth} waiting messages"
    write_artifact("flower-broker.png", page.screenshot(full_page=True))

    later = client.status(running.id)
    assert later.state is JobState.running, "the job ended before Flower showed it running; make it longer"
    assert int(step_shown.split()[1].split("/")[0]) <= later.step
    for job in (*waiting, running):
        client.cancel(job.id)
    assert client.wait(running.id, timeout_s=30).state is JobState.canceled

    # A finished job in the task list: found by its id, its arguments readable, its outcome as result.
    done = client.submit(PROMPT, model_name=tiny_model, width=128, height=128, num_inference_steps=4)
    assert client.wait(done.id, timeout_s=60).state is JobState.succeeded
    row = page.locator("#tasks-table tbody tr", has_text=done.id)

    def listed_as_succeeded() -> bool:
        page.goto(f"{flower.url}/tasks")
        page.wait_for_selector("#tasks-table tbody tr td")
        return row.count() == 1 and "SUCCESS" in row.inner_text()

    wait_for(listed_as_succeeded, 20, "Flower to list the finished job", poll_s=0.3)
    cells = {name: row.locator(f"td:nth-child({i + 1})")
             for i, name in enumerate(page.eval_on_selector_all(
                 "#tasks-table thead th", "ths => ths.map(th => th.dataset.column)"))}
    assert {"name", "uuid", "state", "kwargs", "result", "worker"} <= set(cells)
    assert cells["name"].inner_text() == "pixq.render"
    assert cells["uuid"].inner_text().strip() == done.id
    kwargs = cells["kwargs"].inner_text()
    assert f"'model': '{tiny_model}'" in kwargs and "'size': '128x128'" in kwargs
    assert f"'prompt': '{PROMPT[:57]}...'" in kwargs and PROMPT not in kwargs
    assert cells["result"].inner_text() == "'succeeded: 1 image(s)'"
    assert cells["worker"].locator("a").get_attribute("title") == MAIN_NODE
    # What a person sees without opening the task: Flower cuts the cell at about 400 px.
    shown = cells["kwargs"].evaluate(VISIBLE_TEXT)
    assert "128x128" in shown and PROMPT[:12] in shown, f"the kwargs cell shows only {shown!r}"
    box = cells["worker"].bounding_box()
    assert box is not None and box["x"] + box["width"] <= VIEWPORT["width"], "the worker column is off screen"
    write_artifact("flower-tasks.png", page.screenshot(full_page=True))
    for secret in hidden:
        assert secret not in page.content()

    # Each worker process is its own node.
    page.goto(f"{flower.url}/workers")
    for node in (MAIN_NODE, SLOW_NODE):
        page.locator("#workers-table tbody tr", has_text=node).wait_for(timeout=10_000)
        assert "Online" in page.locator("#workers-table tbody tr", has_text=node).inner_text()
    write_artifact("flower-workers.png", page.screenshot(full_page=True))
    for path in ("/workers", "/broker", f"/task/{done.id}"):
        page.goto(flower.url + path)
        for secret in hidden:
            assert secret not in page.content(), path
    page.close()


def flower_task(flower: Flower, task_id: str) -> dict[str, Any]:
    status, body, _ = flower.get(f"/api/task/info/{task_id}")
    return json.loads(body) if status == 200 else {}


def listed(flower: Flower, state: str) -> dict[str, Any]:
    """Flower's API for its Tasks page filtered by state (what the Failed filter shows)."""
    status, body, _ = flower.get(f"/api/tasks?state={state}")
    assert status == 200
    tasks: dict[str, Any] = json.loads(body)
    return tasks


def unacked(raw_redis: Any) -> str:
    """Every message Redis has handed out and not had acknowledged (kombu's ``unacked`` hash)."""
    return " ".join(str(m) for m in raw_redis.hvals("unacked"))


@pytest.mark.slow
def test_failed_and_canceled_jobs_end_in_their_celery_state(
    flower: Flower, browser: Any, client: Client, settings: Settings, raw_redis: Any, tiny_model: str,
    slow_model: str,
) -> None:
    # Canceled while running: the task leaves PROGRESS for CANCELED, its message acknowledged.
    long = client.submit("canceled halfway", model_name=slow_model, width=256, height=256, num_inference_steps=200)
    wait_for(lambda: client.status(long.id).step >= 2, 60, "the long job to render")
    assert long.id in unacked(raw_redis)  # a running job's message is out, unacknowledged
    wait_for(lambda: flower_task(flower, long.id).get("state") == "PROGRESS", 20, "Flower to show PROGRESS")
    client.cancel(long.id)
    assert client.wait(long.id, timeout_s=30).state is JobState.canceled
    wait_for(lambda: long.id in listed(flower, "CANCELED"), 20, "Flower to list the canceled job")
    assert flower_task(flower, long.id)["result"] == "canceled"

    # A failed job: the worker serving the tiny model gets a message whose record names another model,
    # a real error of the real worker. The record says failed before the task ends FAILURE with its error.
    app = create_app(settings)
    request = JobRequest.model_validate({"prompt": "recorded for another model", "model_name": slow_model,
                                         "width": 128, "height": 128, "num_inference_steps": 2}).with_seed()
    job = client.records.create(uuid.uuid4().hex, request)
    send_job(app, job.id, request.model_copy(update={"model_name": tiny_model}))  # to the tiny model's queue
    record = client.wait(job.id, timeout_s=60)
    assert record.state is JobState.failed and record.error is not None
    assert record.error.type == "ValueError" and record.attempts == 1
    failures = wait_for(lambda: listed(flower, "FAILURE").get(job.id), 20, "Flower's Failed filter to list it")
    assert failures["exception"] == f"JobFailedError('ValueError: {record.error.message}')"
    assert failures["worker"] == MAIN_NODE and failures["retries"] == 0
    assert job.id not in unacked(raw_redis)  # acknowledged on failure: no redelivery
    assert job.id not in listed(flower, "SUCCESS")

    # What an operator sees: the Tasks page's Failed filter (a search for state:FAILURE) lists the failed job and
    # only failures; All, searched for the canceled job's id, shows it as CANCELED.
    page = browser.new_page()
    page.goto(f"{flower.url}/tasks")
    page.wait_for_selector("#tasks-table tbody tr td")
    page.get_by_text("Failed", exact=True).click()

    def filtered() -> list[str] | None:  # once the table has reloaded with the filter
        rows = page.locator("#tasks-table tbody tr").all_inner_texts()
        return rows if rows and all("FAILURE" in r for r in rows) else None

    rows = wait_for(filtered, 10, "the Failed filter to apply", poll_s=0.2)
    assert any(job.id in r for r in rows) and not any(long.id in r for r in rows), rows
    write_artifact("flower-failed-filter.png", page.screenshot(full_page=True))
    page.get_by_text("All", exact=True).click()
    page.locator("#tasks-table_filter input").fill(long.id)
    canceled_row = page.locator("#tasks-table tbody tr", has_text=long.id)
    canceled_row.wait_for(timeout=10_000)
    assert "CANCELED" in canceled_row.inner_text()
    write_artifact("flower-canceled-job.png", page.screenshot(full_page=True))
    page.close()

    # Re-queued (pixq retry) it keeps its job id as its task id. The retry goes to the queue of the model its
    # record names, whose worker renders it: the same Flower task now reads SUCCESS, on that worker.
    client.retry(job.id)
    assert client.wait(job.id, timeout_s=60).state is JobState.succeeded
    retried = wait_for(lambda: listed(flower, "SUCCESS").get(job.id), 20, "Flower to see the retried job succeed")
    assert retried["worker"] == SLOW_NODE and retried["result"] == "'succeeded: 1 image(s)'"
    assert job.id not in listed(flower, "FAILURE") and job.id not in unacked(raw_redis)
    app.close()

