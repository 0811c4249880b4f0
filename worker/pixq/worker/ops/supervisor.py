"""One worker process per GPU of a host, each pinned to its GPU, restarted when it crashes, drained together.

``pixq worker --gpus all|0,1`` runs this in the parent; the parent never imports torch or
touches CUDA. Each child is an ordinary ``pixq worker`` that sees exactly one GPU
(``CUDA_VISIBLE_DEVICES=<that GPU>``, ``--device cuda:0``): whatever in the child reaches
for "the current device" (a CUDA context, accelerate's offload hooks, a stray
``.cuda()``) can then only land on its own card, never on GPU 0 of every process.

Signals, as a container runtime or an operator sends them to the parent:
first SIGTERM (or SIGINT) -> SIGTERM to every child: Celery's warm shutdown, each finishes
its job; no more restarts; the parent exits once all have. A second one -> SIGTERM again:
each worker gives its running job back to the queue at the next denoising step and exits
(worker/pixq/worker/ops/serve.py's second-stop handler; Celery alone would ignore it). SIGQUIT to the
parent -> SIGQUIT to every child (Celery's cold shutdown: the running job's lease lapses and
another worker's reaper re-queues it).

Storage, as for one worker: the parent refuses to start (exit 8, before any child) unless the bucket takes a
write and a delete (``pixq worker``'s ``check_storage``); a child that finds it refusing at a restart exits 8 and
is restarted with the backoff; a child whose store goes down while it serves stays alive, paused and not ready
(its ready file gone, so the parent's too) until the store answers again.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pixq.errors import ConfigError

log = logging.getLogger("pixq.supervisor")


@dataclass(frozen=True)
class Slot:
    """One GPU's worker: what its process is told."""

    gpu: int  # index among the GPUs this host (or container) lets us use
    device: str  # the child's CUDA_VISIBLE_DEVICES: that index, or our own mask's entry (an index or a UUID)
    name: str  # Celery node name, gpu{i}@host
    ready_file: Path | None  # the child's own ready file


ArgvBuilder = Callable[[Slot], Sequence[str]]


@dataclass(frozen=True)
class Backoff:
    """Exponential restart delay: initial_s, 2x, 4x ... capped at max_s; reset once a child ran reset_after_s."""

    initial_s: float = 1.0
    max_s: float = 60.0
    reset_after_s: float = 300.0

    def delay_s(self, failures: int) -> float:
        """The wait before restart number ``failures`` (1 for the first crash in a row)."""
        return min(self.max_s, self.initial_s * 2.0 ** min(max(failures - 1, 0), 60))


def parse_gpus(spec: str, count: int) -> list[int]:
    """``'all'`` or ``'0,1'`` -> GPU indexes in ``range(count)``; anything else raises ``ConfigError``."""
    text = spec.strip().lower()
    if text == "all":
        if count == 0:
            raise ConfigError(
                "--gpus all: no GPU is visible (nvidia-smi lists none, or CUDA_VISIBLE_DEVICES is empty); "
                "is the NVIDIA driver / container toolkit set up?"
            )
        return list(range(count))
    gpus: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit():
            raise ConfigError(f"--gpus: {item!r} in {spec!r} is not a GPU index; use 'all' or indexes like 0,1")
        gpu = int(item)
        if gpu >= count:
            shown = f"0-{count - 1}" if count else "none"
            raise ConfigError(f"--gpus: GPU {gpu} does not exist; this host shows {count} GPU(s) ({shown})")
        if gpu in gpus:
            raise ConfigError(f"--gpus: GPU {gpu} is named twice in {spec!r}")
        gpus.append(gpu)
    return gpus


def count_gpus_nvidia_smi() -> int:
    """How many GPUs ``nvidia-smi`` lists (0 when it is missing or fails): no CUDA in this process."""
    try:
        done = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if done.returncode != 0:
        return 0
    return sum(1 for line in done.stdout.splitlines() if line.startswith("GPU "))


def visible_gpus(env: Mapping[str, str], count_gpus: Callable[[], int] = count_gpus_nvidia_smi) -> list[str]:
    """The GPUs we may use, as CUDA_VISIBLE_DEVICES entries: our own mask when set, else every listed GPU."""
    mask = env.get("CUDA_VISIBLE_DEVICES")
    if mask is not None:
        return [entry.strip() for entry in mask.split(",") if entry.strip()]
    return [str(i) for i in range(count_gpus())]


def plan_slots(gpus: Sequence[int], visible: Sequence[str], host: str, ready_file: Path | None) -> list[Slot]:
    """One slot per GPU index; child ready files sit beside the aggregate one (``ready.gpu0`` ...)."""
    return [
        Slot(
            gpu=i,
            device=visible[i],
            name=f"gpu{i}@{host}",
            ready_file=ready_file.with_name(f"{ready_file.name}.gpu{i}") if ready_file else None,
        )
        for i in gpus
    ]


# Options each child gets from the supervisor (its GPU's device, name, ready file and metrics port),
# or that start the supervisor itself: never copied from the parent's command line.
SLOT_OPTIONS = frozenset({"gpus", "device", "name", "ready_file", "metrics_port"})


def option_argv(params: Sequence[Any], values: Mapping[str, Any], skip: frozenset[str] = SLOT_OPTIONS) -> list[str]:
    """The command-line words that give a child the same option values as the parsed command.

    ``params`` are the command's click parameters (``ctx.command.params``) and ``values`` its parsed
    values (``ctx.params``): every option is written out from them, so an option added to
    ``pixq worker`` reaches the children without a line here. Flags with an off switch are written
    either way (``--compile`` / ``--no-compile``); repeatable options once per value.
    """
    argv: list[str] = []
    for param in params:
        if param.name in skip:
            continue
        if param.param_type_name != "option":
            raise TypeError(f"option_argv: {param.name!r} is a positional argument; children take options only")
        value = values.get(param.name)
        if value is None:
            continue
        flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if param.is_bool_flag:
            if value:
                argv.append(flag)
            elif param.secondary_opts:
                argv.append(param.secondary_opts[0])
            continue
        for item in value if param.multiple else [value]:
            argv += [flag, str(item.value if isinstance(item, enum.Enum) else item)]
    return argv


def worker_argv(shared_args: Sequence[str], metrics_port: int = 0) -> ArgvBuilder:
    """The real child: ``pixq worker`` on ``cuda:0`` of its masked view, named for its GPU, plus
    ``shared_args`` (every other option of the parent's command, from ``option_argv``).

    With ``metrics_port``, GPU i serves its metrics on ``metrics_port + i`` (on the parent's ``--metrics-host``,
    which ``shared_args`` carries). Secrets stay in the
    environment, never in an argv.
    """
    from pixq.worker.ops.argv import pixq_argv

    def build(slot: Slot) -> list[str]:
        argv = pixq_argv("worker", "--device", "cuda:0", "--name", slot.name)
        if slot.ready_file:
            argv += ["--ready-file", str(slot.ready_file)]
        if metrics_port:
            argv += ["--metrics-port", str(metrics_port + slot.gpu)]
        return argv + list(shared_args)

    return build


def run_gpu_workers(
    spec: str,
    child_args: Sequence[str],
    *,
    loglevel: str = "INFO",
    ready_file: Path | None = None,
    metrics_port: int = 0,
) -> int:
    """``pixq worker --gpus SPEC``: one supervised worker per GPU until stopped; returns the exit code.

    ``child_args`` go to every child unchanged (``option_argv`` of the parent's options: ``--model``,
    ``--compile``, ``--warmup 1024x1024`` ...); ``--device``, ``--name``, ``--ready-file`` and
    ``--metrics-port`` are the supervisor's to set.
    """
    env = dict(os.environ)
    visible = visible_gpus(env)
    slots = plan_slots(parse_gpus(spec, len(visible)), visible, socket.gethostname(), ready_file)
    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/supervisor] %(message)s")
    return Supervisor(slots, worker_argv(child_args, metrics_port), env, ready_file=ready_file).run()


@dataclass
class _Child:
    slot: Slot
    proc: subprocess.Popen[bytes] | None = None
    pump: threading.Thread | None = None
    started_at: float = 0.0
    failures: int = 0  # crashes in a row
    restart_at: float | None = None  # monotonic time of a pending restart
    exit_code: int | None = None  # of the last run


class Supervisor:
    """Runs one child per slot until told to stop; see the module docstring for the signals."""

    def __init__(
        self,
        slots: Sequence[Slot],
        build_argv: ArgvBuilder,
        env: Mapping[str, str],
        *,
        ready_file: Path | None = None,
        backoff: Backoff = Backoff(),
        poll_s: float = 0.1,
    ):
        names = [s.name for s in slots]
        if not slots or len(set(names)) != len(names):
            raise ConfigError(f"supervisor: need at least one worker and distinct names, got {names}")
        self.children = [_Child(s) for s in slots]
        self.build_argv = build_argv
        self.env = dict(env)
        self.ready_file = ready_file
        self.backoff = backoff
        self.poll_s = poll_s
        self.stops = 0  # stop requests handled so far
        self._pending: list[int] = []  # signals received, handled in the loop
        self._ready_shown = False

    def child_env(self, slot: Slot) -> dict[str, str]:
        env = {**self.env, "CUDA_VISIBLE_DEVICES": slot.device, "PYTHONUNBUFFERED": "1"}
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's index i is nvidia-smi's GPU i
        return env

    def run(self) -> int:
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            self._set_ready(False)
            for child in self.children:
                self._start(child)
            while any(c.proc or c.restart_at is not None for c in self.children):
                self._handle_signals()
                for child in self.children:
                    self._check(child)
                self._update_ready()
                time.sleep(self.poll_s)
            log.info("all workers stopped")
            return self._exit_code()
        finally:
            self._kill_leftovers()
            self._set_ready(False)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- children ------------------------------------------------------------------------

    def _start(self, child: _Child) -> None:
        slot = child.slot
        if slot.ready_file:
            slot.ready_file.unlink(missing_ok=True)  # a crashed run may have left it behind
        child.proc = subprocess.Popen(
            list(self.build_argv(slot)),
            env=self.child_env(slot),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only, which forwards it
            preexec_fn=_die_with_parent(),
        )
        child.pump = threading.Thread(target=_pump, args=(child.proc.stdout, slot.name), daemon=True)
        child.pump.start()
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("%s started (pid %d, CUDA_VISIBLE_DEVICES=%s)", slot.name, child.proc.pid, slot.device)

    def _check(self, child: _Child) -> None:
        now = time.monotonic()
        if child.proc is None:
            if child.restart_at is not None and now >= child.restart_at:
                self._start(child)
            return
        code = child.proc.poll()
        if code is None:
            return
        if child.pump:
            child.pump.join(timeout=2)
        ran_s = now - child.started_at
        child.proc, child.pump, child.exit_code = None, None, _exit_status(code)
        if child.slot.ready_file:
            child.slot.ready_file.unlink(missing_ok=True)
        if self.stops:
            log.info("%s stopped (%s)", child.slot.name, _describe(code))
        elif code == 0:
            log.warning("%s exited cleanly on its own (a remote shutdown?); not restarting it", child.slot.name)
        else:
            child.failures = 1 if ran_s >= self.backoff.reset_after_s else child.failures + 1
            delay = self.backoff.delay_s(child.failures)
            child.restart_at = now + delay
            log.warning(
                "%s crashed (%s) after %.1f s; restart %d in %.1f s",
                child.slot.name,
                _describe(code),
                ran_s,
                child.failures,
                delay,
            )

    def _send(self, sig: int) -> None:
        for child in self.children:
            child.restart_at = None
            if child.proc and child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(sig)

    def _kill_leftovers(self) -> None:
        """Only reached with live children when the loop itself failed: don't leave orphans."""
        for child in self.children:
            if child.proc and child.proc.poll() is None:
                log.error("%s still running as the supervisor exits; killing it", child.slot.name)
                child.proc.kill()
                child.proc.wait()

    # -- signals -------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._pending.append(signum)

    def _handle_signals(self) -> None:
        while self._pending:
            signum = self._pending.pop(0)
            self.stops += 1
            if signum == signal.SIGQUIT:
                log.warning("SIGQUIT: cold shutdown, SIGQUIT to every worker (leases re-queue their jobs)")
                self._send(signal.SIGQUIT)
            elif self.stops > 1:
                log.warning(
                    "%s again: SIGTERM to every worker again (each gives its running job back to the queue)",
                    signal.Signals(signum).name,
                )
                self._send(signal.SIGTERM)
            else:
                log.info(
                    "%s: draining, SIGTERM to every worker (each finishes its job; again to stop now)",
                    signal.Signals(signum).name,
                )
                self._send(signal.SIGTERM)

    # -- readiness and exit --------------------------------------------------------------

    def _update_ready(self) -> None:
        if self.ready_file:
            ready = not self.stops and all(
                c.proc and c.slot.ready_file and c.slot.ready_file.exists() for c in self.children
            )
            if ready != self._ready_shown:
                self._set_ready(ready)

    def _set_ready(self, ready: bool) -> None:
        if not self.ready_file:
            return
        if ready:
            self.ready_file.write_text("".join(f"{c.slot.name}\n" for c in self.children))
            log.info("every worker is ready")
        else:
            self.ready_file.unlink(missing_ok=True)
        self._ready_shown = ready

    def _exit_code(self) -> int:
        return next((c.exit_code for c in self.children if c.exit_code), 0)


def _exit_status(code: int) -> int:
    """A shell's view of a child's end: 128+N for a signal N."""
    return 128 - code if code < 0 else code


def _describe(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _pump(stream: IO[bytes] | None, name: str) -> None:
    """Copy a child's output to ours, each line tagged with the worker's name."""
    if stream is None:
        return
    tag = f"{name} | ".encode()
    out = getattr(sys.stderr, "buffer", None)
    with stream:
        for line in stream:
            if out is None:  # a text-only stderr (an embedding host)
                sys.stderr.write((tag + line).decode(errors="replace"))
            else:
                out.write(tag + line)
                out.flush()


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook: the child gets SIGTERM (a warm drain) if the supervisor dies without forwarding."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def hook() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return hook
