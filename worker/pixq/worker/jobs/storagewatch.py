"""Whether this worker's storage takes writes, and pausing the worker while it does not.

A worker whose uploads fail must not go on taking jobs: it would render each and give it back (or, before
issue 23, fail it), and being idle it takes the next one at once. When an upload fails the job's thread asks
``check()``: a probe (``Storage.probe``: write and delete one object under the prefix) that fails marks the
store down. ``on_down(reason)`` then runs once (the worker stops consuming its queue, reports not ready and
says why in its presence record), and a thread probes every ``interval_s`` until a probe passes; then
``on_up()`` runs once and the worker takes jobs again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 5.0


class StorageWatch:
    """The store's state as this worker's probes last saw it. Thread-safe: any job thread may ``check()``."""

    def __init__(
        self,
        probe: Callable[[], None],
        on_down: Callable[[str], None] = lambda _: None,
        on_up: Callable[[], None] = lambda: None,
        interval_s: float = PROBE_INTERVAL_S,
    ):
        self.probe = probe  # raises (one line: why) when the store does not take a write and a delete
        self.on_down = on_down
        self.on_up = on_up
        self.interval_s = interval_s
        self._reason: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def down(self) -> str | None:
        """Why the store is down (``None`` while it takes writes)."""
        return self._reason

    def check(self) -> bool:
        """Probe now: ``True`` if the store takes writes; else it is marked down (see the module docstring)."""
        try:
            self.probe()
        except Exception as exc:
            self._mark_down(str(exc) or type(exc).__name__)
            return False
        self._mark_up()
        return True

    def stop(self) -> None:
        """No more probes (the worker is stopping; a probe under way ends on its own, on a daemon thread)."""
        self._stop.set()

    # The lock is held through the callbacks too: a pause and the resume after it always run in that order.

    def _mark_down(self, reason: str) -> None:
        with self._lock:
            was_up = self._reason is None
            self._reason = reason
            if not was_up:
                return
            log.error("storage unavailable (%s): taking no jobs until a probe passes (every %.0f s)",
                      reason, self.interval_s)
            self.on_down(reason)
            if not self._stop.is_set():
                self._thread = threading.Thread(target=self._probe_until_up, name="pixq-storage-probe", daemon=True)
                self._thread.start()

    def _mark_up(self) -> None:
        with self._lock:
            if self._reason is None:
                return
            self._reason = None
            log.warning("storage answers again: taking jobs")
            self.on_up()

    def _probe_until_up(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.check():
                return
