"""One identity per worker process: the Celery node name, which also names its leases.

Leases (``recordscripts.CLAIM``), reservations and the presence key all name their holder by this
name, so two live processes must never share one. The default adds the process id
(``cpu-4711@host``); a name given with ``--name`` is refused while a live worker holds it. A
holder on this host whose process is gone (a crashed worker restarted by its supervisor, within
the presence TTL) is stale and taken over.

``Presence`` keeps the claimed name's record alive while the worker runs and says whether it serves, and if not
why (a store that refuses writes pauses the worker: ``pixq.worker.jobs.storagewatch``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from typing import cast

import redis
from pixq.errors import WorkerNameTaken
from pixq.wire import WORKER_KEY_PREFIX, WORKER_KEY_TTL_S
from pixq.worker.jobs.reservations import Reservations

log = logging.getLogger(__name__)


def default_name(device: str, pid: int | None = None, host: str | None = None) -> str:
    tag = "cpu" if device == "cpu" else "gpu" + (device.split(":", 1)[1] if ":" in device else "0")
    return f"{tag}-{os.getpid() if pid is None else pid}@{host or socket.gethostname()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(conn: redis.Redis, name: str) -> dict[str, object] | None:
    raw = cast("bytes | None", conn.get(WORKER_KEY_PREFIX + name))
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _is_stale(holder: dict[str, object]) -> bool:
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False  # another host: only its TTL tells
    return pid == os.getpid() or not _pid_alive(pid)


def _refuse(name: str, holder: dict[str, object]) -> WorkerNameTaken:
    where = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    return WorkerNameTaken(f"worker name {name!r} is held by a live worker ({where}); give another --name, "
                           f"or stop that worker (a dead one's name is free after {WORKER_KEY_TTL_S} s)")


def check_name_free(conn: redis.Redis, name: str) -> None:
    """Fail fast, before the pipeline loads, if a live worker holds ``name``."""
    holder = _holder(conn, name)
    if holder is not None and not _is_stale(holder):
        raise _refuse(name, holder)


def claim_name(conn: redis.Redis, name: str, info: dict[str, object]) -> None:
    """Take ``pixq:worker:{name}`` for this process (SET NX), or raise ``WorkerNameTaken``."""
    key = WORKER_KEY_PREFIX + name
    for _ in range(2):
        if conn.set(key, json.dumps(info), nx=True, ex=WORKER_KEY_TTL_S):
            return
        holder = _holder(conn, name)
        if holder is None:
            continue  # lapsed meanwhile
        if not _is_stale(holder):
            raise _refuse(name, holder)
        conn.delete(key)
    raise _refuse(name, _holder(conn, name) or {})


class Presence:
    """Keeps ``pixq:worker:{name}`` alive from the name's claim until the worker stops, so others see it.

    It beats with ``serving: false`` while Celery starts its consumer (the claimed name never lapses in
    a slow start) and with ``serving: true`` from ``serving()`` on; ``paused(why)`` turns it to ``serving: false``
    with ``paused: why`` (the worker takes no jobs) until ``serving()`` again.
    """

    def __init__(self, conn: redis.Redis, name: str, info: dict[str, object],
                 reservations: Reservations | None = None):
        self.conn = conn
        self.key = WORKER_KEY_PREFIX + name
        self._info = dict(info)
        self.info = json.dumps({**info, "serving": False})
        self.reservations = reservations
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="pixq-presence", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def serving(self) -> None:
        """From now on the record says ``serving: true`` (written at once, then with every beat)."""
        self._say({**self._info, "serving": True})

    def paused(self, why: str) -> None:
        """From now on the record says ``serving: false`` and ``paused: why`` until ``serving()`` again."""
        self._say({**self._info, "serving": False, "paused": why})

    def _say(self, info: dict[str, object]) -> None:
        self.info = json.dumps(info)
        with contextlib.suppress(redis.RedisError):
            self.conn.set(self.key, self.info, ex=WORKER_KEY_TTL_S)

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.conn.set(self.key, self.info, ex=WORKER_KEY_TTL_S)
                if self.reservations is not None:
                    self.reservations.refresh()
            except redis.RedisError as exc:
                log.warning("presence: %s", exc)
            self._stop.wait(WORKER_KEY_TTL_S / 3)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            self.conn.delete(self.key)
            if self.reservations is not None:
                self.reservations.clear()
