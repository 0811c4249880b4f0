"""Small measuring tools for the benchmark: timing summaries, image/latent differences, GPU sampling."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


def summary(times_s: list[float]) -> dict[str, Any]:
    """Per-item seconds -> images/s (over the sum), p50, p95, mean."""
    if not times_s:
        return {}
    ordered = sorted(times_s)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * (len(ordered) - 1))))]
    return {
        "n": len(times_s),
        "images_per_s": len(times_s) / sum(times_s),
        "p50_s": statistics.median(ordered),
        "p95_s": p95,
        "mean_s": statistics.fmean(ordered),
        "times_s": [round(t, 4) for t in times_s],
    }


def psnr(a: Any, b: Any) -> float:
    """PSNR in dB between two uint8 images (inf when identical)."""
    import numpy as np

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


def image_diff(a: Any, b: Any) -> dict[str, float]:
    import numpy as np

    x = np.asarray(a, dtype=np.int16)
    y = np.asarray(b, dtype=np.int16)
    return {"psnr_db": psnr(x, y), "max_abs": int(np.abs(x - y).max()), "mean_abs": float(np.abs(x - y).mean())}


def latent_rel(a: Any, b: Any) -> float:
    """||a - b|| / ||b|| in float64 (the final latents, before the VAE)."""

    x = a.double()
    y = b.double()
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


@contextlib.contextmanager
def capture_vae_input(pipe: Any, sink: list[Any]) -> Iterator[None]:
    """Record the latents each ``pipe.vae.decode`` call gets (on the CPU, float32)."""
    vae = pipe.vae
    original = vae.decode

    def decode(z: Any, *args: Any, **kwargs: Any) -> Any:
        sink.append(z.detach().float().cpu())
        return original(z, *args, **kwargs)

    vae.decode = decode
    try:
        yield
    finally:
        del vae.decode  # the instance attribute goes; the class method shows again


@dataclass
class GpuSample:
    busy: list[float] = field(default_factory=list)
    mem_used_gb: list[float] = field(default_factory=list)

    def result(self) -> dict[str, float]:
        if not self.busy:
            return {}
        return {"gpu_busy": statistics.fmean(self.busy) / 100.0, "gpu_mem_used_max_gib": max(self.mem_used_gb)}


@contextlib.contextmanager
def gpu_sampler(index: int = 0, period_s: float = 0.1) -> Iterator[GpuSample]:
    """NVML utilisation ("a kernel was running" share) and device memory, sampled in a thread."""
    sample = GpuSample()
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no NVML (CPU runs)
        yield sample
        return
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                sample.busy.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
                sample.mem_used_gb.append(pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30)
            except Exception:
                pass
            stop.wait(period_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield sample
    finally:
        stop.set()
        thread.join()


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return None


def free_cuda() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:
        pass
