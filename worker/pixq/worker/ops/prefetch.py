"""Reading the model's files into the page cache from the worker's first instruction (issue 29).

A worker scaled from zero onto a node that has not served lately finds its page cache cold: the 11 GB of
safetensors (T5-XXL 9.5 GB of it) come from the disk at that disk's rate, and today only after the 7-10 s
of imports, because the load needs the imports' classes. The imports need no weights, so ``start_prefetch``
reads the files on a few threads from the moment ``pixq worker`` has parsed its options, before torch or
diffusers are imported: the reads leave the GIL, the disk streams while Python imports, and the load that
follows finds its bytes in memory. The order is the load's (a local pipeline: ``model_index.json``'s
components, which diffusers loads in that order; a hub model: its transformer, then the shared
components' T5 and VAE), in chunks that the threads take in turn, so the front of the read moves in the
load's order.

The page cache is the host's: processes started together (``--gpus all``: one child per GPU) read the same
pages, and the kernel fetches each page from the disk once, whoever asks first; the others wait for it.

Only plain reads (``os.preadv`` into one buffer per thread): ``posix_fadvise(WILLNEED)`` is a hint the kernel
may cut short, and an mmap would count against the worker's memory. Bounded: a few threads, one 16 MiB
buffer each, and nothing at all where the files exceed half the memory available (host or cgroup: it would
evict what it just read); the log says so. A missing or unreadable file is skipped: the load that follows
reports it. Imports no torch; nothing here can fail the start.

``PIXQ_PREFETCH``: ``off`` (the default), ``weights``, ``all`` (torch's and the NVIDIA wheels' shared libraries
first, the imports' own reads, then the weights); ``PIXQ_PREFETCH_THREADS`` and ``PIXQ_PREFETCH_READ_MB`` set the
reads in flight. Off by default because it has not paid yet: on one H100 from a cold page cache (run a,
docs/performance.md) 4 threads of 16 MiB reads cut the weights' load from 7.1 to 2.3 s but queued the imports'
small reads behind theirs, and the first image came 1.2 s later than without; a shallower queue is the next run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pixq.checkpoints import BASE_COMPONENTS, is_local
from pixq.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "PIXQ_PREFETCH"
MODES = ("off", "weights", "all")
READ_BYTES = 16 << 20  # one read call's size: with THREADS, the bytes in the disk's queue ahead of an import's read
CHUNK_BYTES = 64 << 20  # the unit the threads take in turn: the read's front moves in the load's order
THREADS = 4  # run a's: the disk's full rate (1.8 GB/s) but a deep queue ahead of the imports' reads
PIPELINE_ORDER = ("text_encoder", "transformer", "vae")  # when model_index.json cannot be read


def mode_from_env(env: Mapping[str, str]) -> str:
    """``PIXQ_PREFETCH``'s mode: ``off`` (also when unset), ``weights`` or ``all``."""
    value = env.get(ENV, "").strip().lower()
    if not value:
        return "off"
    aliases = {"0": "off", "false": "off", "no": "off", "1": "weights", "true": "weights", "yes": "weights"}
    value = aliases.get(value, value)
    if value not in MODES:
        raise ConfigError(f"{ENV}: must be one of {', '.join(MODES)} (got {env[ENV]!r})")
    return value


def _component_order(folder: Path) -> list[str]:
    """The components in the order diffusers loads them: ``model_index.json``'s keys as written."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
        return [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)]
    except (OSError, ValueError, AttributeError):
        return list(PIPELINE_ORDER)


def _safetensors(folder: Path) -> list[Path]:
    """One component's safetensors, shards in their numbered order (the order transformers loads them)."""
    try:
        return sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors") and p.is_file())
    except OSError:
        return []


def _hub_snapshot(repo: str, env: Mapping[str, str]) -> Path | None:
    """``repo``'s snapshot folder in the Hugging Face cache (its ``main`` ref), without huggingface_hub."""
    home = Path(env.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    cache = Path(env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or home / "hub")
    folder = cache / ("models--" + repo.replace("/", "--"))
    try:
        revision = (folder / "refs" / "main").read_text().strip()
    except OSError:
        return None
    return folder / "snapshots" / revision


def weight_files(model: str, env: Mapping[str, str]) -> list[Path]:
    """The safetensors ``load_pipeline`` will read for ``model``, in the order it reads them: a local
    pipeline's components in ``model_index.json``'s order; a hub model's transformer from its cached
    snapshot, then the shared components' (``BASE_COMPONENTS``) text encoder and VAE. Files that are not
    there are left out (the load reports them); each file once (links resolved)."""
    parts: list[Path] = []
    if is_local(model):
        root = Path(model)
        parts = [root / name for name in _component_order(root)]
    else:
        if (own := _hub_snapshot(model, env)) is not None:
            parts.append(own / "transformer")
        if (base := _hub_snapshot(BASE_COMPONENTS, env)) is not None:
            parts += [base / name for name in _component_order(base) if name != "transformer"]
    out: dict[Path, Path] = {}
    for folder in parts:
        for path in _safetensors(folder):
            out.setdefault(path.resolve(), path)
    return list(out)


def library_files() -> list[Path]:
    """torch's shared libraries and those of the NVIDIA wheels beside it (cuBLAS, cuDNN, NCCL ...), found
    without importing torch; empty where torch is not installed as a wheel."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    torch_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(torch_dir.glob("lib/*.so*")) + sorted(torch_dir.parent.glob("nvidia/*/lib/*.so*"))
    return [p for p in found if p.is_file()]


def available_memory_bytes() -> int | None:
    """What the page cache may hold without evicting: ``MemAvailable``, or the cgroup's room if smaller."""
    free: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = room if free is None else min(free, room)
    except (OSError, ValueError):
        pass
    return free


@dataclass
class Prefetch:
    """A prefetch in progress: what it reads, bytes read so far, seconds once done."""

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


def _chunks(files: Sequence[tuple[Path, int]]) -> list[tuple[Path, int, int]]:
    return [(path, offset, min(CHUNK_BYTES, size - offset))
            for path, size in files for offset in range(0, size, CHUNK_BYTES)]


def _sizes(files: Sequence[Path]) -> list[tuple[Path, int]]:
    out = []
    for path in files:
        try:
            out.append((path, path.stat().st_size))
        except OSError:
            continue
    return out


def start_prefetch(files: Sequence[Path], threads: int = THREADS, max_share: float = 0.5,
                   what: str = "weights", read_bytes: int = READ_BYTES) -> Prefetch | None:
    """Read ``files`` into the page cache in this order on up to ``threads`` threads (daemons: they never hold
    the process up); ``None`` when there is nothing to read or the files exceed ``max_share`` of the memory
    available (the log says which)."""
    sized = _sizes(files)
    total = sum(size for _, size in sized)
    if not total:
        return None
    free = available_memory_bytes()
    if free is not None and total > max_share * free:
        log.info("%s not prefetched: %.1f GB of files, %.1f GB of memory available", what, total / 1e9, free / 1e9)
        return None
    job = Prefetch([path for path, _ in sized], total)
    queue = _chunks(sized)
    lock = threading.Lock()
    started = time.perf_counter()

    def take() -> tuple[Path, int, int] | None:
        with lock:
            return queue.pop(0) if queue else None

    def run() -> None:
        buffer = bytearray(read_bytes)
        while (chunk := take()) is not None:
            path, offset, length = chunk
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:  # the load that follows reports it
                log.debug("prefetch %s: %s", path, exc)
                continue
            try:
                end = offset + length
                while offset < end and (n := os.preadv(fd, [memoryview(buffer)[: end - offset]], offset)):
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
        deadline = time.monotonic() + 120  # the line waits for the worker's logging, set up after the imports
        while not logging.getLogger().handlers and time.monotonic() < deadline:
            time.sleep(0.1)
        log.info("%s prefetched: %.1f GB in %.1f s (%d files, %.2f GB/s, beside the imports)", what,
                 job.read_bytes / 1e9, job.seconds, len(job.files), job.read_bytes / 1e9 / max(job.seconds, 1e-9))

    for i in range(max(1, min(threads, len(queue)))):
        job.threads.append(threading.Thread(target=run, name=f"pixq-prefetch-{i}", daemon=True))
    job.threads.append(threading.Thread(target=watch, name="pixq-prefetch-watch", daemon=True))
    for thread in job.threads:
        thread.start()
    return job


def prefetch_for_worker(model: str, env: Mapping[str, str]) -> Prefetch | None:
    """The worker's prefetch as ``PIXQ_PREFETCH`` asks (``mode_from_env``; a bad value raises ``ConfigError``):
    ``model``'s weight files, after torch's libraries in mode ``all``. Never raises otherwise."""
    mode = mode_from_env(env)
    if mode == "off":
        return None
    try:
        threads = int(env.get(ENV + "_THREADS") or THREADS)
        read_bytes = int(float(env.get(ENV + "_READ_MB") or READ_BYTES / 2**20) * 2**20)
        files = weight_files(model, env)
        what = "weights"
        if mode == "all":
            files, what = library_files() + files, "libraries and weights"
        return start_prefetch(files, threads=threads, what=what, read_bytes=read_bytes)
    except Exception as exc:  # a prefetch is never worth a failed start
        log.warning("prefetch not started: %s", exc)
        return None
