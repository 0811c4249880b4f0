"""Lossless PNG encoding on several cores.

Pillow deflates a PNG on one core: for a 1024² image that is 130–190 ms of a single job's
latency (noise, the worst case, on an H200 host), after the GPU has finished. Here the rows are
filtered with numpy and deflated in horizontal strips, one thread per strip (``zlib`` releases
the GIL while it compresses); each strip but the last ends on a byte boundary with a sync flush,
so the strips join into one valid zlib stream, as ``pigz`` does. The pixels decoded from the file
are exactly the input's; the file is a standard 8-bit PNG any decoder reads.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE = {"L": 0, "LA": 4, "RGB": 2, "RGBA": 6}
_PAETH = 4
# A strip of at least this many bytes is worth a thread; smaller images are done in one piece.
_MIN_STRIP_BYTES = 128 * 1024

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def default_encode_threads() -> int:
    return min(8, os.cpu_count() or 1)


def threads_for(gpu_busy: bool, configured: int = 0) -> int:
    """Encoding threads for one image: ``configured`` (0: ``default_encode_threads()``) when the GPU
    is idle and the job's caller waits on this encode; one while another job renders, since the
    encode is hidden behind that render anyway and more threads only compete with it for the CPU."""
    return 1 if gpu_busy else configured or default_encode_threads()


def _shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=default_encode_threads(), thread_name_prefix="png")
        return _pool


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def paeth_filter(rows: np.ndarray, above: np.ndarray, bpp: int) -> np.ndarray:
    """PNG filter type 4 (Paeth) of ``rows`` (h × stride, uint8), given the row ``above`` the first.

    Prefixes each row with its filter-type byte, as the PNG data stream wants it.
    """
    x = rows.astype(np.int16)
    b = np.empty_like(x)
    b[0] = above
    b[1:] = x[:-1]
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]
    c = np.zeros_like(x)
    c[:, bpp:] = b[:, :-bpp]
    pa = np.abs(b - c)
    pb = np.abs(a - c)
    pc = np.abs(a + b - 2 * c)
    pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    out = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = _PAETH
    out[:, 1:] = (x - pred).astype(np.uint8)  # modulo 256, as the filter is defined
    return out


def encode_png(image: Any, level: int = 1, threads: int = 0) -> bytes:
    """``image`` (a PIL image in L, LA, RGB or RGBA, or an h × w [× c] uint8 array) as PNG bytes.

    The strips are deflated on a shared pool, ``threads`` at a time (0: ``default_encode_threads()``);
    ``threads=1`` does them one after the other in this thread.
    """
    pixels, mode = _as_array(image)
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    raw = np.ascontiguousarray(pixels).reshape(height, width * channels)
    stride = raw.shape[1]
    n = max(1, min(height, (height * stride) // _MIN_STRIP_BYTES))
    bounds = [round(i * height / n) for i in range(n + 1)]
    jobs = [(bounds[i], bounds[i + 1], i == n - 1) for i in range(n)]

    def work(job: tuple[int, int, bool]) -> tuple[int, int, bytes]:
        start, stop, last = job
        above = raw[start - 1] if start > 0 else np.zeros(stride, dtype=np.uint8)
        data = paeth_filter(raw[start:stop], above, channels).tobytes()
        comp = zlib.compressobj(level, zlib.DEFLATED, -15, 9)
        body = comp.compress(data) + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
        return zlib.adler32(data), len(data), body

    if n == 1 or threads == 1:
        parts = [work(job) for job in jobs]
    else:
        parts = _map_limited(work, jobs, threads or default_encode_threads())
    adler = parts[0][0]
    for part_adler, length, _ in parts[1:]:
        adler = adler32_combine(adler, part_adler, length)
    stream = b"".join([_zlib_header(level)] + [body for _, _, body in parts] + [struct.pack(">I", adler)])
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPE[mode], 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def _map_limited(work: Any, jobs: list[Any], threads: int) -> list[Any]:
    """``work`` over ``jobs`` on the shared pool, at most ``threads`` strips in flight at once."""
    pool = _shared_pool()
    if threads >= len(jobs):
        return list(pool.map(work, jobs))
    # Each of ``threads`` pool tasks takes every threads-th strip, in order.
    groups = [jobs[i::threads] for i in range(threads)]
    done = list(pool.map(lambda group: [work(job) for job in group], groups))
    parts: list[Any] = [None] * len(jobs)
    for i, group_parts in enumerate(done):
        parts[i::threads] = group_parts
    return parts


def adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """Adler-32 of A + B from adler32(A), adler32(B) and len(B): zlib's ``adler32_combine``."""
    base = 65521
    rem = len2 % base
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % base
    sum1 = (sum1 + (adler2 & 0xFFFF) + base - 1) % base
    sum2 = (sum2 + ((adler1 >> 16) & 0xFFFF) + ((adler2 >> 16) & 0xFFFF) + base - rem) % base
    return sum1 | (sum2 << 16)


def _zlib_header(level: int) -> bytes:
    """CMF/FLG bytes of a zlib stream with a 32 KiB window and the level's hint (RFC 1950)."""
    cmf = 0x78
    flevel = 0 if level < 2 else 1 if level < 6 else 2 if level == 6 else 3
    flg = flevel << 6
    flg += 31 - ((cmf << 8) + flg) % 31
    return bytes([cmf, flg])


def _as_array(image: Any) -> tuple[np.ndarray, str]:
    if isinstance(image, np.ndarray):
        channels = image.shape[2] if image.ndim == 3 else 1
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or channels not in (1, 2, 3, 4):
            raise ValueError("encode_png: expected an h×w or h×w×{1,2,3,4} uint8 array")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        mode = "L" if image.ndim == 2 else {2: "LA", 3: "RGB", 4: "RGBA"}[image.shape[2]]
        return image, mode
    if image.mode not in _COLOR_TYPE:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return np.asarray(image), image.mode
