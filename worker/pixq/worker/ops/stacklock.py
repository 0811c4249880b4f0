"""One stack per ``--dir``: ``pixq up`` and ``pixq demo`` hold ``DIR/up.lock`` while their stack runs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from pixq.errors import ConfigError


class StackBusy(ConfigError):
    """Another ``pixq up`` (or ``demo``) runs in this ``--dir``."""


@contextlib.contextmanager
def stack_dir_lock(root: Path) -> Iterator[None]:
    """Hold ``root/up.lock`` (an flock: the kernel drops it when the process ends, however it ends)
    while a stack runs in ``root``; a second one is refused before it writes anything, since it would
    overwrite the first one's Redis password, S3 credentials and test model."""
    import fcntl

    root.mkdir(mode=0o700, parents=True, exist_ok=True)  # a folder made here is owner-only; a given one is left
    path = root / "up.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "unknown"
            raise StackBusy(f"--dir {root}: a stack is already running there (pid {holder}); use it, stop it "
                            "(Ctrl-C in its shell) or give another --dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)
