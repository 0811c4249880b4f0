"""What every phase shares: the arguments, device and size, the saved model, the results dict (saved to
OUT/results.json), the fixed prompts and the references kept between phases."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMPTS = [
    "A small cactus with a happy face in the Sahara desert.",
    "An astronaut riding a horse on the moon, photorealistic, 8k.",
    "A bowl of ramen with steam rising, studio lighting, top view.",
    "A watercolor painting of a lighthouse on a cliff at sunset, soft pastel colors, paper texture.",
    "Portrait of an old fisherman, dramatic light, film grain.",
    "A red cube on top of a blue sphere on a wooden table.",
    "A city street at night in the rain with neon reflections, cinematic, wide angle, shallow depth of field, "
    "people with umbrellas, taxis, steam from the manholes, reflections in puddles.",
    "A cozy cabin in a snowy forest, warm light in the windows.",
    "A macro photo of a dew drop on a leaf.",
    "An isometric illustration of a tiny island with a windmill, a harbour, boats, sheep and a lighthouse, "
    "clean vector style, bright colors.",
    "A golden retriever puppy playing in autumn leaves.",
    "A futuristic train crossing a desert canyon at dawn.",
    "A still life of lemons and a blue vase, oil painting.",
    "A knight in ornate armor standing in a misty forest.",
    "An aerial view of a coral reef with turquoise water.",
    "A steampunk owl made of brass gears, intricate detail, museum lighting, dark background.",
    "A bowl of fruit in the style of Cezanne.",
    "A robot barista making latte art in a busy cafe.",
    "Mount Fuji behind cherry blossoms, ukiyo-e woodblock print.",
    "A child's crayon drawing of a dragon.",
    "A glass of iced tea on a sunny balcony.",
    "An ancient library with towering shelves and floating candles.",
    "A hummingbird frozen mid flight, high speed photography.",
    "A minimalist poster of a single red balloon against a grey sky.",
]
GPU_MODEL = "/tmp/pixq-bench/model"  # on the device host's local disk
COMPILE_NONE = "none"


@dataclass
class Context:
    args: argparse.Namespace
    out: Path
    device: str
    size: int
    model_dir: Path
    results: dict[str, Any] = field(default_factory=dict)
    ref: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # fidelity index -> (latents, image)
    ref_t5: Any = None  # the card's (fp16) T5 output for prompt 0
    services: list[Any] = field(default_factory=list)
    env: dict[str, str] | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def compile_modes(self) -> list[str]:
        """``--compile-modes``: the phases that take a mode run once per mode."""
        return [m for m in self.args.compile_modes.split(",") if m]

    @property
    def tiny(self) -> bool:
        return bool(self.args.tiny)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=jsonable))

    def request(self, index: int, mode: str = "exact", **extra: Any) -> Any:
        from pixq.schema import JobRequest

        fields: dict[str, Any] = dict(
            prompt=PROMPTS[index % len(PROMPTS)], seed=1000 + index, width=self.size, height=self.size,
            model_name=str(self.model_dir), mode=mode,
        )
        fields.update(extra)
        return JobRequest.model_validate(fields)


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    return str(value)


def environment(ctx: Context) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "argv": sys.argv,
        "device": ctx.device, "size": ctx.size, "images": ctx.args.images,
    }
    with contextlib.suppress(Exception):
        import diffusers
        import transformers

        info.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    if ctx.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info
