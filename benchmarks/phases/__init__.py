"""The benchmark's phases, one module each; ``python -m benchmarks.bench --phases a,b`` runs them in that order.

A phase module has ``run(ctx: benchmarks.context.Context) -> None``: it measures, stores its results under
its own key(s) of ``ctx.results`` (the keys of results already committed in benchmarks/results/ stay as
they are) and calls ``ctx.save()`` after each part worth keeping. Phases that take a compile mode run once
per ``--compile-modes`` entry (``ctx.compile_modes``). Adding one: benchmarks/NOTES.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.context import Context

# --phases name -> module under benchmarks.phases. Imported when the phase runs: a phase's own
# dependencies (torch, diffusers, a GPU) are needed only by a run that asks for it.
PHASES: dict[str, str] = {name: f"benchmarks.phases.{name}" for name in (
    "build", "card", "inprocess", "levers", "queue", "multigpu", "coldstart", "coldsplit", "scopes",
    "attention", "encode", "twok", "twokqueue", "vae", "offload",
)}


def phase(name: str) -> Callable[[Context], None]:
    """The ``run`` of the phase called ``name`` (KeyError for an unknown one)."""
    run: Callable[[Context], None] = importlib.import_module(PHASES[name]).run
    return run
