"""build: the saved model the other phases load (full-size architecture, random weights; or the tiny one)."""

from __future__ import annotations

from benchmarks.context import Context


def phase_build(ctx: Context) -> None:
    from benchmarks.fullsize import ensure_model

    _, info = ensure_model(ctx.model_dir, ctx.device, tiny=ctx.tiny)
    ctx.results["build"] = info


def run(ctx: Context) -> None:
    phase_build(ctx)
