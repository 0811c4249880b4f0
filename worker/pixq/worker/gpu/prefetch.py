"""Reading the model's weight files into the page cache while the worker imports.

A worker scaled from zero onto a node that has not read the model yet pays for its 11 GB of
safetensors from the volume: seconds to tens of seconds, and only after the 5-8 s of imports (the
imports need no weights, the weights need the imports' classes). ``start_prefetch`` reads the files on
a few threads from the moment ``load_pipeline`` starts: the reads leave the GIL, so they run beside the
imports, and the load that follows finds the bytes in memory. Nothing is read twice from the device,
and the pages are the kernel's to drop again.

Only plain reads here (``os.preadv`` into one buffer per thread): ``posix_fadvise(WILLNEED)`` is a
hint the kernel may cut short, and an mmap would count against the worker's memory. A host whose free
memory cannot hold the files skips the prefetch (it would evict what it just read), and says so.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pixq.models import BASE_COMPONENTS, is_local

log = logging.getLogger(__name__)

BUFFER_BYTES = 16 << 20
THREADS = 4  # a network volume gives more with a few reads in flight; a local disk does not mind


@dataclass
class Prefetch:
    """The prefetch in progress: files, bytes read so far, seconds once done."""

    files: list[Path]
    total_bytes: int
    read_bytes: int = 0
    seconds: float | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        with self._lock:
            self.read_bytes += n

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the reads; whether they are all done."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        return not any(t.is_alive() for t in self.threads)


def model_folders(model_name: str) -> list[Path]:
    """Where ``load_pipeline`` will read ``model_name``'s weights: the folder of a local model; for a hub
    model, its snapshot in the Hugging Face cache and the shared components' text encoder and VAE."""
    if is_local(model_name):
        return [Path(model_name)]
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    cache = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    out: list[Path] = []
    for repo, parts in ((model_name, ("",)), (BASE_COMPONENTS, ("text_encoder", "vae"))):
        folder = cache / ("models--" + repo.replace("/", "--"))
        try:
            revision = (folder / "refs" / "main").read_text().strip()
        except OSError:
            continue
        out += [folder / "snapshots" / revision / part for part in parts]
    return out


def weight_files(folders: Iterable[Path]) -> list[Path]:
    """The ``.safetensors`` files under these folders (links followed, each file once), largest first."""
    seen: dict[Path, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for path in folder.rglob("*.safetensors"):
                real = path.resolve()
                if real.is_file():
                    seen.setdefault(real, path)
    return sorted(seen, key=lambda p: p.stat().st_size, reverse=True)


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo, or ``None`` where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def start_prefetch(folders: Iterable[Path], threads: int = THREADS, max_share: float = 0.5) -> Prefetch | None:
    """Read every weight file under ``folders`` on up to ``threads`` threads; ``None`` when there is nothing
    to read or the files exceed ``max_share`` of the memory available (the log says which)."""
    files = weight_files(folders)
    if not files:
        return None
    total = sum(f.stat().st_size for f in files)
    free = available_memory_bytes()
    if free is not None and total > max_share * free:
        log.info("weights not prefetched: %.1f GB of files, %.1f GB of memory available", total / 1e9, free / 1e9)
        return None
    job = Prefetch(files, total)
    queue = list(files)
    lock = threading.Lock()
    started = time.perf_counter()

    def next_file() -> Path | None:
        with lock:
            return queue.pop(0) if queue else None

    def run() -> None:
        buffer = bytearray(BUFFER_BYTES)
        while (path := next_file()) is not None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:  # the load that follows reports it
                log.debug("prefetch %s: %s", path, exc)
                continue
            try:
                offset = 0
                while n := os.preadv(fd, [buffer], offset):
                    offset += n
                    job.add(n)
            except OSError as exc:
                log.debug("prefetch %s: %s", path, exc)
            finally:
                os.close(fd)

    def watch() -> None:
        for thread in job.threads[:-1]:
            thread.join()
        job.seconds = time.perf_counter() - started
        log.info("weights prefetched: %.1f GB in %.1f s (%d files, beside the imports)", job.read_bytes / 1e9,
                 job.seconds, len(files))

    for i in range(max(1, min(threads, len(files)))):
        job.threads.append(threading.Thread(target=run, name=f"pixq-prefetch-{i}", daemon=True))
    job.threads.append(threading.Thread(target=watch, name="pixq-prefetch-watch", daemon=True))
    for thread in job.threads:
        thread.start()
    return job
