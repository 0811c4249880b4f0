"""Prometheus metrics of a worker (pixq.worker.jobs.metrics): the class alone, then scraped from a real worker."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pixq.client import Client
from pixq.records import JobState
from pixq.settings import Settings
from pixq.worker.jobs.metrics import OUTCOMES, WindowedRate, WorkerMetrics

from tests.services import S3Endpoint, Service, free_port, start_redis, start_worker
from tests.support import parse, scrape, stack_env, value, wait_for


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def readyz(port: int) -> tuple[int, str]:
    """``/readyz``'s status and body (503 is an answer here, not an error)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return answer.status, answer.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()


# -- the class alone ------------------------------------------------------------------------------


def test_windowed_rate_counts_the_last_window_only() -> None:
    clock = Clock()
    rate = WindowedRate(window_s=10, clock=clock)
    assert rate.rate() == 0
    clock.now += 0.5
    rate.add(3)
    assert rate.rate() == 3.0  # younger than a second: divided by one second, not by the window
    clock.now += 4.5
    rate.add(2)
    assert rate.rate() == pytest.approx(5 / 5)  # five events in the first five seconds
    clock.now += 7
    assert rate.rate() == pytest.approx(2 / 10)  # the first three left the window
    clock.now += 10
    assert rate.rate() == 0


def test_worker_metrics_report_what_the_runner_tells_them() -> None:
    clock = Clock()
    m = WorkerMetrics(model="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", worker="gpu0@host", device="cpu",
                      window_s=60, clock=clock)
    model = m.model
    fresh = parse(m.exposition().decode())
    assert value(fresh, "pixq_worker_info", worker="gpu0@host", model=model, device="cpu") == 1
    for outcome in OUTCOMES:  # every outcome exists at 0 from the start, so rate() works at once
        assert value(fresh, "pixq_jobs_total", model=model, outcome=outcome) == 0
    assert value(fresh, "pixq_rendering_jobs", model=model) == 0
    assert not any(name.startswith("pixq_gpu_") for name, _ in fresh)  # CPU: no GPU memory series

    m.pipeline_loaded(12.5)
    m.job_claimed(queue_wait_s=0.3)
    m.rendering(1)
    clock.now += 2
    for _ in range(20):
        m.step()
    holding = parse(m.exposition().decode())
    assert value(holding, "pixq_current_jobs", model=model) == 1
    assert value(holding, "pixq_rendering_jobs", model=model) == 1
    assert value(holding, "pixq_rendering_step", model=model) == 20
    assert value(holding, "pixq_denoising_steps_per_second", model=model) == pytest.approx(20 / 2)
    # The port has no authentication: no series names a job (issue 23: pixq_current_job_info did).
    assert not any("job_id" in dict(labels) for _, labels in holding)
    m.rendering(0)
    m.job_finished("succeeded", render_s=1.7, width=1024, height=768, images=2)
    m.job_claimed(queue_wait_s=40)
    m.step(3)
    m.job_finished("canceled")

    s = parse(m.exposition().decode())
    assert value(s, "pixq_pipeline_load_seconds", model=model) == 12.5
    assert value(s, "pixq_jobs_total", model=model, outcome="succeeded") == 1
    assert value(s, "pixq_jobs_total", model=model, outcome="canceled") == 1
    assert value(s, "pixq_jobs_total", model=model, outcome="failed") == 0
    assert value(s, "pixq_images_total", model=model) == 2
    assert value(s, "pixq_denoising_steps_total", model=model) == 23
    assert value(s, "pixq_render_seconds_count", model=model, size="1024x768") == 1
    assert value(s, "pixq_render_seconds_sum", model=model, size="1024x768") == 1.7
    assert value(s, "pixq_render_seconds_bucket", model=model, size="1024x768", le="1.0") == 0
    assert value(s, "pixq_render_seconds_bucket", model=model, size="1024x768", le="2.0") == 1
    assert value(s, "pixq_queue_wait_seconds_count", model=model) == 2
    assert value(s, "pixq_queue_wait_seconds_bucket", model=model, le="0.5") == 1
    assert value(s, "pixq_queue_wait_seconds_bucket", model=model, le="60.0") == 2
    assert value(s, "pixq_current_jobs", model=model) == 0
    assert value(s, "pixq_rendering_jobs", model=model) == 0 and value(s, "pixq_rendering_step", model=model) == 0
    assert value(s, "pixq_images_per_second", model=model) == pytest.approx(2 / 2)
    clock.now += 61  # a minute idle: the windowed gauges fall to 0, the counters stay
    s = parse(m.exposition().decode())
    assert value(s, "pixq_images_per_second", model=model) == 0
    assert value(s, "pixq_denoising_steps_per_second", model=model) == 0
    assert value(s, "pixq_images_total", model=model) == 2

    with pytest.raises(ValueError, match="unknown outcome"):
        m.job_finished("exploded")
    with pytest.raises(ValueError, match="width and height"):
        m.job_finished("succeeded", render_s=1.0)


def test_metrics_server_serves_its_own_registry_only() -> None:
    a, b = WorkerMetrics("model-a", "w-a"), WorkerMetrics("model-b", "w-b")
    a.job_claimed(1.0)
    a.job_finished("failed")
    port = a.start_server(0, address="127.0.0.1")
    try:
        with pytest.raises(RuntimeError):
            a.start_server(0)
        s = parse(scrape(port))
        assert value(s, "pixq_jobs_total", model="model-a", outcome="failed") == 1
        assert value(s, "pixq_jobs_total", model="model-b", outcome="failed") is None  # b is not global
        assert value(s, "process_resident_memory_bytes") is not None
    finally:
        a.stop_server()
    with pytest.raises(OSError):
        scrape(port)
    assert b.exposition()


def test_the_metrics_port_listens_on_loopback_unless_told() -> None:
    """No authentication there: reachable from this host only, unless the address says otherwise (a pod that
    Prometheus scrapes: 0.0.0.0). 127.0.0.2 is loopback too, but only a socket bound to every address answers it."""
    local, every = WorkerMetrics("model-l", "w-l"), WorkerMetrics("model-e", "w-e")
    port = local.start_server(0)
    try:
        assert value(parse(scrape(port)), "pixq_worker_info", worker="w-l", model="model-l", device="cpu") == 1
        with pytest.raises(urllib.error.URLError):
            scrape(port, host="127.0.0.2")
    finally:
        local.stop_server()
    port = every.start_server(0, address="0.0.0.0")
    try:
        assert value(parse(scrape(port, host="127.0.0.2")), "pixq_worker_info", worker="w-e", model="model-e",
                     device="cpu") == 1
    finally:
        every.stop_server()


def test_metrics_host_is_an_option_and_pixq_metrics_host(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer
    from pixq.worker.ops.cli import app

    command = typer.main.get_command(app).commands["worker"]  # type: ignore[attr-defined]
    monkeypatch.delenv("PIXQ_METRICS_HOST", raising=False)
    assert command.make_context("worker", []).params["metrics_host"] == "127.0.0.1"
    monkeypatch.setenv("PIXQ_METRICS_HOST", "0.0.0.0")
    assert command.make_context("worker", []).params["metrics_host"] == "0.0.0.0"
    assert command.make_context("worker", ["--metrics-host", "10.1.2.3"]).params["metrics_host"] == "10.1.2.3"


def test_a_pod_that_prometheus_scrapes_serves_metrics_on_the_pods_address() -> None:
    """infra/: the worker's default is loopback, so a pod annotated for scraping must say 0.0.0.0 itself, on the
    annotated port."""
    import yaml

    infra = Path(__file__).resolve().parents[1] / "infra"
    pods = [doc["spec"]["template"] for path in sorted(infra.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == "Deployment"]
    scraped = [pod for pod in pods if (pod["metadata"].get("annotations") or {}).get("prometheus.io/scrape") == "true"]
    workers = 0
    for pod in scraped:
        port = pod["metadata"]["annotations"]["prometheus.io/port"]
        args = [a for c in pod["spec"]["containers"] for a in c.get("args", [])]
        if args[:1] != ["worker"]:
            continue  # another component's port (the API serves its own /metrics)
        workers += 1
        assert args[args.index("--metrics-port") + 1] == port
        assert args[args.index("--metrics-host") + 1] == "0.0.0.0"
    assert workers, "no worker Deployment is annotated for Prometheus"


def test_readyz_answers_what_the_worker_says_and_metrics_stay_beside_it() -> None:
    m = WorkerMetrics("model-r", "w-r")
    port = m.start_server(0, address="127.0.0.1")
    try:
        assert readyz(port) == (503, "starting")
        m.set_ready(True)
        assert readyz(port) == (200, "ready")
        assert value(parse(scrape(port)), "pixq_worker_info", worker="w-r", model="model-r", device="cpu") == 1
        m.set_ready(False, "storage unavailable: NoSuchBucket")
        assert readyz(port) == (503, "storage unavailable: NoSuchBucket")
        m.set_ready(False, "draining")
        assert readyz(port) == (503, "draining")
    finally:
        m.stop_server()


# -- a real worker --------------------------------------------------------------------------------


@pytest.fixture()
def metered(tmp_path: Path, s3: S3Endpoint, tiny_model: str) -> Iterator[tuple[Client, Service, int]]:
    """A worker started with --metrics-port, alone on its own Redis (no other worker takes its jobs)."""
    redis_svc, url = start_redis(tmp_path / "redis", password="metrics-pw-7a1f")
    env = stack_env(url, s3, tiny_model)
    port = free_port()
    svc = None
    client = Client(Settings.from_env(env))
    try:
        svc = start_worker(env, tiny_model, tmp_path / "worker.log", name="metrics@test",
                           extra=("--metrics-port", str(port)))
        yield client, svc, port
    finally:
        client.close()
        if svc is not None:
            svc.signal(signal.SIGKILL)
            svc.stop()
        redis_svc.stop()


@pytest.mark.slow
def test_a_real_worker_counts_its_jobs_and_answers_readyz(metered: tuple[Client, Service, int],
                                                          tiny_model: str) -> None:
    client, svc, port = metered
    model = tiny_model
    before = parse(scrape(port))
    assert value(before, "pixq_worker_info", worker="metrics@test", model=model, device="cpu") == 1
    assert (value(before, "pixq_pipeline_load_seconds", model=model) or 0) > 0
    assert all(value(before, "pixq_jobs_total", model=model, outcome=o) == 0 for o in OUTCOMES)
    assert not any(name.startswith("pixq_gpu_") for name, _ in before)

    done = client.wait(client.submit("two small ones", width=128, height=64, num_inference_steps=3,
                                     num_images_per_prompt=2).id, timeout_s=60)
    assert done.state is JobState.succeeded
    long = client.submit("canceled midway", width=256, height=256, num_inference_steps=200)
    wait_for(lambda: client.status(long.id).step >= 3, 30, "the long job to run")
    text = scrape(port)
    during = parse(text)
    assert value(during, "pixq_current_jobs", model=model) == 1
    assert value(during, "pixq_rendering_jobs", model=model) == 1
    assert (value(during, "pixq_rendering_step", model=model) or 0) >= 1
    assert long.id not in text and done.id not in text  # no job id on a port without authentication
    with pytest.raises(urllib.error.URLError):  # pixq worker's default: loopback only
        scrape(port, host="127.0.0.2")
    client.cancel(long.id)
    canceled = client.wait(long.id, timeout_s=30)
    assert canceled.state is JobState.canceled

    # The record is written before the metrics move: wait for the second outcome. The job's own thread counts
    # it at once; the GPU thread lets go of the canceled render at its next step (batcher: the rows are dropped,
    # then after_batch sets pixq_rendering_jobs to 0), so wait for that too.
    after = wait_for(lambda: (s := parse(scrape(port))) and value(
        s, "pixq_jobs_total", model=model, outcome="canceled") == 1 and value(
        s, "pixq_rendering_jobs", model=model) == 0 and s, 10, "the canceled job's outcome and the GPU let go")
    assert value(after, "pixq_jobs_total", model=model, outcome="succeeded") == 1
    assert sum(value(after, "pixq_jobs_total", model=model, outcome=o) or 0 for o in OUTCOMES) == 2
    assert value(after, "pixq_images_total", model=model) == 2
    # Every finished denoising step counts: 3, and the canceled job's steps. The record keeps the step
    # its progress thread saw when the cancel was read; the render stops at its next step callback, so
    # the GPU may have done a few more steps than the record says, and never all 200.
    steps = value(after, "pixq_denoising_steps_total", model=model) or 0
    assert 3 + canceled.step <= steps < 3 + 200
    assert value(after, "pixq_render_seconds_count", model=model, size="128x64") == 1  # a full render only
    assert value(after, "pixq_render_seconds_count", model=model, size="256x256") is None
    assert value(after, "pixq_queue_wait_seconds_count", model=model) == 2
    assert value(after, "pixq_current_jobs", model=model) == 0
    assert value(after, "pixq_rendering_step", model=model) == 0
    assert (value(after, "pixq_images_per_second", model=model) or 0) > 0
    assert (value(after, "pixq_denoising_steps_per_second", model=model) or 0) > 0

    # Ready while serving; told to stop with a job running, /readyz says so while the job finishes
    assert readyz(port) == (200, "ready")
    # (1024², 200 steps: seconds of work for the tiny model, so the drain outlasts the probe; canceled then)
    last = client.submit("runs through the first stop", width=1024, height=1024, num_inference_steps=200)
    wait_for(lambda: client.status(last.id).step >= 3, 30, "the last job to run")
    svc.signal(signal.SIGTERM)
    wait_for(lambda: readyz(port) == (503, "draining"), 10, "/readyz to say draining")
    assert client.status(last.id).state is JobState.running
    client.cancel(last.id)
    assert client.wait(last.id, timeout_s=60).state is JobState.canceled
