"""Loading one PixArt-Σ pipeline onto one device, the model card's way."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from producer.models import BASE_COMPONENTS, is_local

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class LoadedPipeline:
    pipe: Any  # diffusers.PixArtSigmaPipeline
    model_name: str
    device: str
    dtype: str
    load_s: float


def resolve_dtype(device: str, dtype: str) -> Any:
    import torch

    if dtype == "auto":
        # bf16 on GPUs: T5 overflows in fp16 on real weights; fp32 on the CPU.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_pipeline(model_name: str, device: str = "cpu", dtype: str = "auto", offload: bool = False) -> LoadedPipeline:
    """Load ``model_name`` once onto ``device``.

    A hub checkpoint loads its ``transformer`` subfolder beside the shared T5, tokenizer,
    SDXL VAE and scheduler (``BASE_COMPONENTS``), as the model card does; a local directory
    is one whole pipeline saved with ``save_pretrained``. ``offload`` keeps idle components
    in host memory (``enable_model_cpu_offload``) for cards of 24 GB or less.
    """
    import torch
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    started = time.perf_counter()
    torch_dtype = resolve_dtype(device, dtype)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if is_local(model_name):
        pipe = PixArtSigmaPipeline.from_pretrained(model_name, torch_dtype=torch_dtype)
    else:
        transformer = PixArtTransformer2DModel.from_pretrained(
            model_name, subfolder="transformer", torch_dtype=torch_dtype
        )
        pipe = PixArtSigmaPipeline.from_pretrained(BASE_COMPONENTS, transformer=transformer, torch_dtype=torch_dtype)
    if offload and device.startswith("cuda"):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - started
    log.info("loaded %s on %s as %s in %.1f s", model_name, device, torch_dtype, load_s)
    return LoadedPipeline(pipe, model_name, device, str(torch_dtype).removeprefix("torch."), load_s)
