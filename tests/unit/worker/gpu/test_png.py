"""The parallel PNG encoder: lossless, standard, and the same pixels as Pillow's."""

from __future__ import annotations

import io
import os
import zlib

import numpy as np
import pytest
from PIL import Image
from pixq.worker.gpu.png import adler32_combine, encode_png, paeth_filter


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # reads every IDAT byte and checks the zlib stream's checksum
    return image


def _smooth(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) % 256)], axis=-1)
    return rgb.astype(np.uint8)


@pytest.mark.parametrize("shape", [(1024, 1024, 3), (1, 1, 3), (3, 700, 3), (517, 333, 3), (640, 480, 4), (300, 200)])
@pytest.mark.parametrize("kind", ["noise", "smooth"])
def test_decodes_to_the_same_pixels(shape: tuple[int, ...], kind: str) -> None:
    rng = np.random.default_rng(sum(shape))
    if kind == "noise":
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        pixels = _smooth(*shape[:2])
        pixels = pixels[:, :, : shape[2]] if len(shape) == 3 else pixels[:, :, 0]
        if len(shape) == 3 and shape[2] == 4:
            alpha = rng.integers(0, 256, size=shape[:2] + (1,), dtype=np.uint8)
            pixels = np.concatenate([_smooth(*shape[:2]), alpha], -1)
    data = encode_png(pixels)
    decoded = _decode(data)
    assert decoded.format == "PNG"
    assert decoded.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(decoded), pixels)


def test_a_pil_image_round_trips_and_matches_pillows_own_png() -> None:
    image = Image.fromarray(_smooth(400, 600))
    ours = _decode(encode_png(image))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    theirs = _decode(buf.getvalue())
    assert ours.mode == theirs.mode == "RGB"
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_the_file_is_several_strips_in_one_checked_zlib_stream() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(1024, 1024, 3), dtype=np.uint8)
    data = encode_png(pixels)
    # One IDAT chunk whose payload zlib itself decompresses, adler-32 included.
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length = int.from_bytes(data[33:37], "big")
    assert data[37:41] == b"IDAT"
    stream = data[41 : 41 + length]
    raw = zlib.decompress(stream)
    assert len(raw) == 1024 * (1 + 1024 * 3)
    assert set(raw[:: 1 + 1024 * 3]) == {4}  # every row carries the Paeth filter byte
    corrupted = stream[:-1] + bytes([stream[-1] ^ 1])
    with pytest.raises(zlib.error):
        zlib.decompress(corrupted)  # so a wrong combined checksum could not pass the test above


def test_other_modes_are_converted_like_pillow_would() -> None:
    image = Image.fromarray(_smooth(64, 64)).convert("P")
    decoded = _decode(encode_png(image))
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(image.convert("RGB")))


def test_bad_arrays_are_refused_with_the_rule() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 5), dtype=np.uint8))


def test_adler32_combine_matches_zlib() -> None:
    for n1, n2 in [(0, 0), (0, 5), (5, 0), (1, 65521), (70000, 131072), (3, 200003)]:
        a, b = os.urandom(n1), os.urandom(n2)
        assert adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)


def test_paeth_filter_is_the_png_definition() -> None:
    rng = np.random.default_rng(2)
    rows = rng.integers(0, 256, size=(5, 12), dtype=np.uint8)
    above = rng.integers(0, 256, size=12, dtype=np.uint8)
    out = paeth_filter(rows, above, bpp=3)
    prev = above.astype(int)
    for r in range(rows.shape[0]):
        cur = rows[r].astype(int)
        for i in range(12):
            a = cur[i - 3] if i >= 3 else 0
            b = prev[i]
            c = prev[i - 3] if i >= 3 else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
            assert out[r, 1 + i] == (cur[i] - pred) % 256
        assert out[r, 0] == 4
        prev = cur


def test_the_bytes_do_not_depend_on_the_thread_count() -> None:
    pixels = np.random.default_rng(3).integers(0, 256, size=(1024, 768, 3), dtype=np.uint8)
    outputs = {encode_png(pixels, threads=threads) for threads in (0, 1, 2, 3, 8, 64)}
    assert len(outputs) == 1
