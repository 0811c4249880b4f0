"""The PixArt-Σ checkpoints a job may name, and the largest image each may render."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MODEL = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"

# The shared T5-XXL, tokenizer, SDXL VAE and scheduler that every checkpoint loads beside
# its own transformer (the model card's recipe).
BASE_COMPONENTS = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    max_side: int  # largest width or height accepted, in pixels


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("PixArt-alpha/PixArt-Sigma-XL-2-512-MS", max_side=1024),
        ModelSpec("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", max_side=2048),
        ModelSpec("PixArt-alpha/PixArt-Sigma-XL-2-2K-MS", max_side=4096),
    )
}

# A local directory holding a whole pipeline saved with ``save_pretrained``.
LOCAL_MAX_SIDE = 2048
# A local path becomes part of the model's queue name (``pixq.{model}``, wire.py), whose ``:`` marks a
# priority list: paths are kept to plain characters and a sane length.
LOCAL_PATH_MAX_CHARS = 512
_LOCAL_PATH_RE = re.compile(r"^(/[\w.+@=,-]+)+/?$")


def is_local(name: str) -> bool:
    return name.startswith("/")


def model_name_problem(name: str) -> str | None:
    """What is wrong with a local path given as a model name, or ``None`` (known names pass)."""
    if name in KNOWN_MODELS or not is_local(name):
        return None
    if len(name) > LOCAL_PATH_MAX_CHARS:
        return f"a local path must be at most {LOCAL_PATH_MAX_CHARS} characters (got {len(name)})"
    if not _LOCAL_PATH_RE.match(name):
        return ("a local path may hold only letters, digits and . _ + @ = , - between single slashes "
                f"(got {name[:80]!r})")
    if any(part in (".", "..") for part in name.split("/")):
        return f"a local path must not contain . or .. segments (got {name[:80]!r})"
    return None


def model_spec(name: str) -> ModelSpec | None:
    """The spec for a known checkpoint or an absolute local path; ``None`` if unknown."""
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    if is_local(name):
        return ModelSpec(name, max_side=LOCAL_MAX_SIDE)
    return None
