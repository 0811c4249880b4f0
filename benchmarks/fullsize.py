"""The full-size PixArt-Σ architecture with random weights, saved like a real checkpoint.

Random weights cost exactly what trained ones cost (same shapes, same kernels), so a GPU host with
no network can time the real thing. Configurations follow the public checkpoints' config files:
PixArt-Σ XL-2 (28 layers, 16 heads × 72, cross-attention 1152, captions 4096, patch 2), T5 v1.1
XXL's encoder, the SDXL VAE and PixArt's DPM-Solver++ scheduler. The tokenizer is the tiny test
model's trained sentencepiece one (ids only differ; T5 pads every prompt to 300 tokens anyway).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

TRANSFORMER_1024: dict[str, Any] = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    norm_num_groups=32, cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2, use_additional_conditions=False,
    caption_channels=4096,
)
# PixArt-Σ-XL-2-512-MS: the same blocks on a 64×64 latent grid (its jobs bin to 512² sizes).
TRANSFORMER_512: dict[str, Any] = {**TRANSFORMER_1024, "sample_size": 64, "interpolation_scale": 1}
# PixArt-Σ-XL-2-2K-MS: the same blocks on a 256×256 latent grid.
TRANSFORMER_2K: dict[str, Any] = {**TRANSFORMER_1024, "sample_size": 256, "interpolation_scale": 4}

T5_XXL: dict[str, Any] = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
)

SDXL_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
    force_upcast=True,
)

SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
    solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
    timestep_spacing="linspace",
)


def build_transformer(config: dict[str, Any], device: str, dtype: Any, seed: int = 0) -> Any:
    """A randomly initialised transformer, built on ``device`` (fast on a GPU)."""
    import torch
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model: Any = PixArtTransformer2DModel(**config)
    return model.to(dtype).eval()


def twice_the_size(transformer_dir: Path) -> dict[str, Any]:
    """The saved transformer's config on a latent grid twice as wide (1024-MS -> 2K-MS: sample size
    128 -> 256, interpolation scale 2 -> 4)."""
    import json

    config = {k: v for k, v in json.loads((transformer_dir / "config.json").read_text()).items()
              if not k.startswith("_")}
    config["sample_size"] *= 2
    if config.get("interpolation_scale"):
        config["interpolation_scale"] *= 2
    return config


def build_pipeline(device: str = "cuda", seed: int = 0) -> Any:
    """The full-size pipeline in bf16 on ``device``, random weights."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from pixq.worker.gpu.testmodel import _train_tokenizer
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    dtype = torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        _train_tokenizer(Path(tmp))
        tokenizer = T5Tokenizer.from_pretrained(Path(tmp) / "tokenizer")
    torch.manual_seed(seed)
    with torch.device(device):
        text_encoder = T5EncoderModel._from_config(T5Config(**T5_XXL), dtype=dtype)
        vae: Any = AutoencoderKL(**SDXL_VAE)
    transformer = build_transformer(TRANSFORMER_1024, device, dtype, seed)
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.to(dtype).eval(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER),
    )


def ensure_model(out_dir: Path, device: str = "cuda", tiny: bool = False) -> tuple[Path, dict[str, float]]:
    """Build and save the pipeline to ``out_dir`` unless it is already there; returns timings."""
    import torch

    out_dir = out_dir.resolve()
    if (out_dir / "model_index.json").exists():
        return out_dir, {"reused": 1.0}
    if tiny:
        from pixq.worker.gpu.testmodel import make_test_model

        started = time.perf_counter()
        make_test_model(out_dir)
        return out_dir, {"build_s": time.perf_counter() - started}
    started = time.perf_counter()
    pipe = build_pipeline(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    built = time.perf_counter()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out_dir)
    saved = time.perf_counter()
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    del pipe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out_dir, {"build_s": built - started, "save_s": saved - built, "size_gb": size / 1e9}


def ensure_model_512(base_dir: Path, out_dir: Path, device: str = "cuda") -> tuple[Path, dict[str, float]]:
    """The 512 checkpoint beside ``base_dir`` (a saved 1024 pipeline): its own transformer (``TRANSFORMER_512``,
    random weights), the T5, tokenizer, VAE and scheduler linked from ``base_dir`` (as the hub's 512-MS
    repository shares them). Without it, a 512² job on the 1024 transformer renders at a 1024² bin."""
    import torch

    out_dir = out_dir.resolve()
    if (out_dir / "model_index.json").exists():
        return out_dir, {"reused": 1.0}
    started = time.perf_counter()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for item in base_dir.resolve().iterdir():
        if item.name != "transformer" and not (tmp / item.name).exists():
            (tmp / item.name).symlink_to(item)
    transformer = build_transformer(TRANSFORMER_512, device, torch.bfloat16)
    transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
    tmp.rename(out_dir)
    del transformer
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out_dir, {"build_512_s": time.perf_counter() - started}


def parameter_counts(pipe: Any) -> dict[str, float]:
    return {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
        for name in ("transformer", "text_encoder", "vae")
    }
