"""The multi-GPU supervisor with real processes: small stand-in workers, no GPU, real signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from pixq.errors import ConfigError
from pixq.worker.ops.supervisor import Backoff, Slot, option_argv, parse_gpus, plan_slots, visible_gpus, worker_argv

from tests.support import wait_for

REPO = Path(__file__).resolve().parents[1]

# A stand-in for `pixq worker`: logs what it was given and every signal to an events file,
# behaves as its mode says (argv: name, ready file, state dir, mode).
CHILD = r"""
import json, os, signal, sys, time
from pathlib import Path

name, ready, state, mode = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
events = state / (name + ".events")

def note(event, **extra):
    with open(events, "a") as f:
        f.write(json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **extra}) + "\n")

terms = []  # handlers first: the test signals as soon as it sees "start" (a slow, loaded machine showed the race)
signal.signal(signal.SIGTERM, lambda *_: terms.append("TERM"))
signal.signal(signal.SIGQUIT, lambda *_: terms.append("QUIT"))

runs = sum(1 for line in events.read_text().splitlines() if '"start"' in line) if events.exists() else 0
note("start", cvd=os.environ.get("CUDA_VISIBLE_DEVICES"), order=os.environ.get("CUDA_DEVICE_ORDER"),
     secret=os.environ.get("PIXQ_REDIS_URL"), argv=sys.argv)
print(f"hello from run {runs + 1}", flush=True)

if mode == "crash" or (mode == "crash_twice" and runs < 2):
    sys.exit(3)
if mode == "pause" and ready:  # as a worker whose store refuses writes: alive, not ready until told to resume
    Path(ready).write_text("up")
    time.sleep(0.3)
    Path(ready).unlink()
    note("paused")
    resume = state / (name + ".resume")
    while not resume.exists():
        time.sleep(0.01)
    note("resumed")  # ready again just below
if mode == "ready_then_crash_once" and runs == 0:
    Path(ready).write_text("up")
    time.sleep(1.0)
    os._exit(3)  # like a segfault: no clean-up, the ready file stays behind
if ready:
    time.sleep(0.3 if mode == "slow_ready" else 0.0)
    Path(ready).write_text("up")

seen = 0
deadline = time.time() + 30  # never outlive a broken test
while time.time() < deadline:
    time.sleep(0.01)
    while seen < len(terms):
        sig = terms[seen]
        seen += 1
        note(sig)
        if mode == "stubborn" and sig == "TERM" and terms.count("TERM") < 2:
            continue  # a long job: a warm shutdown waits for it; a second TERM gives it back
        if sig == "TERM":
            time.sleep(0.5)  # finishing the current job
        if ready:
            Path(ready).unlink(missing_ok=True)
        note("exit")
        sys.exit(0 if sig == "TERM" else 1)
note("timeout")
"""

# Runs the Supervisor as the real process a container would have as its main process.
DRIVER = r"""
import json, logging, sys
from pathlib import Path
from pixq.worker.ops.supervisor import Backoff, Supervisor, plan_slots

cfg = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
ready = Path(cfg["ready"]) if cfg["ready"] else None
slots = plan_slots(cfg["gpus"], cfg["visible"], "testhost", ready)

def argv(slot):
    mode = cfg["modes"].get(slot.name, "serve")
    return [sys.executable, cfg["child"], slot.name, str(slot.ready_file or ""), cfg["state"], mode]

env = {"PATH": "/usr/bin:/bin", "PIXQ_REDIS_URL": "redis://:s3cret@redis:6379/0"}
sys.exit(Supervisor(slots, argv, env, ready_file=ready, backoff=Backoff(**cfg["backoff"]), poll_s=0.02).run())
"""


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    state: Path
    log_path: Path
    ready: Path

    def events(self, name: str) -> list[dict[str, Any]]:
        path = self.state / f"{name}.events"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def count(self, name: str, event: str) -> int:
        return sum(1 for e in self.events(name) if e["event"] == event)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, what: Callable[[], bool], timeout_s: float = 5.0) -> None:
        try:
            wait_for(what, timeout_s, "the supervisor")
        except AssertionError:
            raise AssertionError(f"timed out; supervisor log:\n{self.log()}") from None

    def finish(self, timeout_s: float = 5.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor did not exit; log:\n{self.log()}") from None


@pytest.fixture
def supervise(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(
        gpus: list[int],
        modes: dict[str, str] | None = None,
        *,
        ready: bool = False,
        backoff: Backoff = Backoff(initial_s=0.2, max_s=0.3),
    ) -> Running:
        run_dir = tmp_path / f"run{len(started)}"
        state = run_dir / "state"
        state.mkdir(parents=True)
        (run_dir / "child.py").write_text(CHILD)
        (run_dir / "driver.py").write_text(DRIVER)
        cfg = {
            "gpus": gpus,
            "visible": [str(i) for i in range(4)],
            "modes": modes or {},
            "child": str(run_dir / "child.py"),
            "state": str(state),
            "ready": str(run_dir / "ready") if ready else "",
            "backoff": {"initial_s": backoff.initial_s, "max_s": backoff.max_s, "reset_after_s": backoff.reset_after_s},
        }
        log_path = run_dir / "supervisor.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(run_dir / "driver.py"), json.dumps(cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                start_new_session=True,
            )
        running = Running(proc, state, log_path, run_dir / "ready")
        started.append(running)
        return running

    yield start
    for running in started:  # whatever a failed test left behind: the supervisor, then every child
        with contextlib.suppress(ProcessLookupError):
            os.killpg(running.proc.pid, signal.SIGKILL)
        running.proc.wait(5)
        for events in running.state.glob("*.events"):
            for line in events.read_text().splitlines():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(json.loads(line)["pid"], signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by its parent) counts as gone.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return True


# -- parsing --------------------------------------------------------------------------------


def test_parse_gpus_all_and_lists() -> None:
    assert parse_gpus("all", 3) == [0, 1, 2]
    assert parse_gpus(" ALL ", 1) == [0]
    assert parse_gpus("0,1", 2) == [0, 1]
    assert parse_gpus(" 2, 0 ", 4) == [2, 0]


@pytest.mark.parametrize(
    ("spec", "count", "message"),
    [
        ("all", 0, "no GPU is visible"),
        ("2", 2, "GPU 2 does not exist; this host shows 2 GPU(s) (0-1)"),
        ("0", 0, "this host shows 0 GPU(s) (none)"),
        ("0,0", 2, "GPU 0 is named twice"),
        ("0,,1", 2, "'' in '0,,1' is not a GPU index"),
        ("", 2, "is not a GPU index"),
        ("-1", 2, "'-1' in '-1' is not a GPU index"),
        ("gpu0", 2, "use 'all' or indexes like 0,1"),
    ],
)
def test_parse_gpus_errors_say_what_is_wrong(spec: str, count: int, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_gpus(spec, count)
    assert message in str(caught.value)
    assert str(caught.value).startswith("--gpus")


def test_visible_gpus_keeps_our_own_mask() -> None:
    never = lambda: pytest.fail("nvidia-smi must not be asked when CUDA_VISIBLE_DEVICES is set")  # noqa: E731
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "5, 7"}, never) == ["5", "7"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, never) == []
    assert visible_gpus({}, lambda: 2) == ["0", "1"]


def test_slots_map_indexes_to_our_view_of_the_gpus(tmp_path: Path) -> None:
    slots = plan_slots([1], ["GPU-aaaa", "GPU-bbbb"], "host", tmp_path / "ready")
    assert slots == [Slot(gpu=1, device="GPU-bbbb", name="gpu1@host", ready_file=tmp_path / "ready.gpu1")]


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(initial_s=1.0, max_s=10.0)
    assert [backoff.delay_s(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.delay_s(10_000) == 10.0


def test_worker_argv_is_a_valid_pixq_worker_command_without_secrets(tmp_path: Path) -> None:
    from pixq.worker.ops.cli import app

    slot = Slot(gpu=3, device="3", name="gpu3@h", ready_file=tmp_path / "ready.gpu3")
    shared = ["--model", "PixArt-alpha/PixArt-Sigma-XL-2-512-MS", "--dtype", "bfloat16", "--offload"]
    argv = list(worker_argv(shared)(slot))
    from tests.services import pixq_argv

    start = pixq_argv("worker")  # python -P -m pixq worker: the cwd is not on the child's import path
    assert argv[:len(start)] == start and start[0] == sys.executable
    assert argv[argv.index("--device") + 1] == "cuda:0"  # masked: the child sees only its GPU
    assert argv[argv.index("--name") + 1] == "gpu3@h"
    assert argv[argv.index("--ready-file") + 1] == str(tmp_path / "ready.gpu3")
    assert argv[-len(shared):] == shared  # the parent's other options, as option_argv wrote them
    # Each GPU's worker serves metrics on its own port: base + GPU index.
    with_metrics = list(worker_argv([], metrics_port=9100)(slot))
    assert with_metrics[with_metrics.index("--metrics-port") + 1] == "9103"
    assert "--metrics-port" not in worker_argv([])(slot)
    # Every option the supervisor passes exists on the real `pixq worker` command.
    command = typer.main.get_command(app).commands["worker"]  # type: ignore[attr-defined]
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    assert {a for a in argv[len(start):] + with_metrics[len(start):] if a.startswith("--")} <= known


def test_children_serve_metrics_on_the_parents_metrics_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from pixq.worker.ops.cli import app

    command = typer.main.get_command(app).commands["worker"]  # type: ignore[attr-defined]
    monkeypatch.setenv("PIXQ_METRICS_HOST", "0.0.0.0")  # as a pod's manifest sets it
    parsed = command.make_context("worker", ["--gpus", "all", "--metrics-port", "9100"]).params
    slot = Slot(gpu=1, device="1", name="gpu1@h", ready_file=None)
    argv = list(worker_argv(option_argv(command.params, parsed), metrics_port=9100)(slot))
    assert argv[argv.index("--metrics-port") + 1] == "9101"
    assert argv[argv.index("--metrics-host") + 1] == "0.0.0.0"


# -- real processes -------------------------------------------------------------------------


@pytest.mark.slow
def test_each_gpu_gets_its_own_pinned_worker_with_a_distinct_name(supervise: Callable[..., Running]) -> None:
    run = supervise([0, 2, 3])
    names = ["gpu0@testhost", "gpu2@testhost", "gpu3@testhost"]
    run.wait_for(lambda: all(run.count(n, "start") == 1 for n in names))
    starts = {n: run.events(n)[0] for n in names}
    assert {n: e["cvd"] for n, e in starts.items()} == dict(zip(names, ["0", "2", "3"], strict=True))
    assert all(e["order"] == "PCI_BUS_ID" for e in starts.values())
    assert all(e["secret"] == "redis://:s3cret@redis:6379/0" for e in starts.values())  # by env ...
    assert all("s3cret" not in " ".join(e["argv"]) for e in starts.values())  # ... never by argv
    run.wait_for(lambda: "gpu2@testhost | hello from run 1" in run.log())  # output tagged per worker
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0


@pytest.mark.slow
def test_crashed_worker_is_restarted_with_growing_backoff(supervise: Callable[..., Running]) -> None:
    run = supervise([0, 1], {"gpu0@testhost": "crash_twice"}, backoff=Backoff(initial_s=0.3, max_s=0.5))
    run.wait_for(lambda: run.count("gpu0@testhost", "start") == 3)
    starts = [e["t"] for e in run.events("gpu0@testhost") if e["event"] == "start"]
    assert starts[1] - starts[0] >= 0.3
    assert starts[2] - starts[1] >= 0.5  # 0.6 capped at 0.5
    log = run.log()
    assert "gpu0@testhost crashed (exit code 3)" in log
    assert "restart 1 in 0.3 s" in log and "restart 2 in 0.5 s" in log
    time.sleep(0.3)  # a check that nothing happens (no fourth start): no condition to wait for
    assert run.count("gpu0@testhost", "start") == 3  # up for good now
    assert run.count("gpu1@testhost", "start") == 1  # its neighbour was never touched
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0


@pytest.mark.slow
def test_sigterm_drains_every_worker_before_the_supervisor_exits(supervise: Callable[..., Running]) -> None:
    run = supervise([0, 1])
    names = ["gpu0@testhost", "gpu1@testhost"]
    run.wait_for(lambda: all(run.count(n, "start") for n in names))
    pids = [int(run.events(n)[0]["pid"]) for n in names]
    run.proc.send_signal(signal.SIGTERM)
    time.sleep(0.25)
    assert run.proc.poll() is None  # still waiting: each worker takes 0.5 s to finish its job
    assert run.finish() == 0
    for name in names:
        assert [e["event"] for e in run.events(name)] == ["start", "TERM", "exit"]  # one warm drain, no restart
    assert not any(_alive(pid) for pid in pids)
    assert "draining" in run.log()


@pytest.mark.slow
def test_second_sigterm_is_forwarded_so_workers_give_jobs_back(supervise: Callable[..., Running]) -> None:
    run = supervise([0, 1], {"gpu0@testhost": "stubborn", "gpu1@testhost": "stubborn"})
    names = ["gpu0@testhost", "gpu1@testhost"]
    run.wait_for(lambda: all(run.count(n, "start") for n in names))
    run.proc.send_signal(signal.SIGTERM)
    run.wait_for(lambda: all(run.count(n, "TERM") for n in names))
    time.sleep(0.1)
    assert run.proc.poll() is None  # the jobs are still "running"
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0
    for name in names:
        assert [e["event"] for e in run.events(name)] == ["start", "TERM", "TERM", "exit"]
    assert "gives its running job back" in run.log()


@pytest.mark.slow
def test_sigquit_is_a_cold_shutdown_of_every_worker(supervise: Callable[..., Running]) -> None:
    run = supervise([0, 1], {"gpu0@testhost": "stubborn", "gpu1@testhost": "stubborn"})
    names = ["gpu0@testhost", "gpu1@testhost"]
    run.wait_for(lambda: all(run.count(n, "start") for n in names))
    run.proc.send_signal(signal.SIGQUIT)
    assert run.finish() == 1  # the workers' cold exit code is passed on
    for name in names:
        assert [e["event"] for e in run.events(name)] == ["start", "QUIT", "exit"]
    assert "cold shutdown" in run.log()


@pytest.mark.slow
def test_stop_during_backoff_cancels_the_restart(supervise: Callable[..., Running]) -> None:
    run = supervise([0], {"gpu0@testhost": "crash"}, backoff=Backoff(initial_s=30, max_s=30))
    run.wait_for(lambda: "restart 1 in 30.0 s" in run.log())
    started = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 3  # the worker's last exit code
    assert time.monotonic() - started < 2
    assert run.count("gpu0@testhost", "start") == 1


@pytest.mark.slow
def test_ready_file_only_while_every_worker_is_ready(supervise: Callable[..., Running]) -> None:
    run = supervise(
        [0, 1],
        {"gpu0@testhost": "ready_then_crash_once", "gpu1@testhost": "slow_ready"},
        ready=True,
        backoff=Backoff(initial_s=0.5, max_s=0.5),
    )
    child0 = run.ready.with_name("ready.gpu0")
    run.wait_for(child0.exists)
    assert not run.ready.exists()  # gpu1 is still loading
    run.wait_for(run.ready.exists)
    assert run.ready.read_text().split() == ["gpu0@testhost", "gpu1@testhost"]
    run.wait_for(lambda: not run.ready.exists())  # gpu0 crashed: not ready while it comes back
    assert run.count("gpu0@testhost", "start") == 1
    run.wait_for(lambda: run.count("gpu0@testhost", "start") == 2)
    run.wait_for(run.ready.exists)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0
    assert not run.ready.exists()
    assert not list(run.ready.parent.glob("ready.gpu*"))


@pytest.mark.slow
def test_a_paused_worker_makes_the_whole_not_ready_until_it_resumes(supervise: Callable[..., Running]) -> None:
    """A worker whose store refuses writes stays alive and removes its ready file (serve.Readiness): the
    supervisor's ready file goes with it, without a restart, and comes back when the worker resumes."""
    run = supervise([0, 1], {"gpu0@testhost": "pause"}, ready=True)
    run.wait_for(lambda: run.count("gpu0@testhost", "paused") == 1)
    run.wait_for(lambda: not run.ready.exists())
    (run.state / "gpu0@testhost.resume").touch()
    run.wait_for(lambda: run.count("gpu0@testhost", "resumed") == 1)
    run.wait_for(run.ready.exists)
    assert run.count("gpu0@testhost", "start") == 1  # paused, not crashed: never restarted
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0


@pytest.mark.slow
def test_supervisor_killed_outright_still_drains_its_workers(supervise: Callable[..., Running]) -> None:
    run = supervise([0])
    run.wait_for(lambda: run.count("gpu0@testhost", "start") == 1)
    run.proc.kill()  # no chance to forward anything
    run.proc.wait(5)
    run.wait_for(lambda: run.count("gpu0@testhost", "exit") == 1)
    assert [e["event"] for e in run.events("gpu0@testhost")] == ["start", "TERM", "exit"]


def test_supervisor_refuses_duplicate_names() -> None:
    from pixq.worker.ops.supervisor import Supervisor

    slot = Slot(gpu=0, device="0", name="gpu0@h", ready_file=None)
    with pytest.raises(ConfigError, match="distinct names"):
        Supervisor([slot, slot], lambda s: ["true"], {})
    with pytest.raises(ConfigError):
        Supervisor([], lambda s: ["true"], {})
