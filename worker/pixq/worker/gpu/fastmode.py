"""Fast mode: the same pipeline doing less transformer work per image, by a fixed per-step plan.

``RenderMode.fast`` is opt-in per job. The plain pipeline runs the transformer once per step on a
batch of two rows per image (classifier-free guidance: unconditional + conditional). Fast mode
keeps the pipeline and its scheduler as they are and decides, step by step, what the transformer
call does (:class:`StepController` sits between the pipeline and the transformer's forward):

``full``
    both guidance branches, as the plain pipeline (2 rows per image);
``cond``
    the conditional branch only (1 row per image); the unconditional half it hands back is
    ``cond - delta``, with ``delta = cond - uncond`` from the last ``full`` step, so the
    pipeline's guidance line gives ``cond + (scale - 1) * delta``: guidance from a cached
    difference ("CFG cache", as in FasterCache);
``reuse``
    no transformer call: the previous step's output again (order 0, as FORA / DeepCache reuse
    features across steps) or its first-order extrapolation in the step index (order 1, the
    TaylorSeer idea applied to the whole model's output).

Early steps fix the layout, so they run ``full``; later steps alternate between computing and
reusing, and after ``guidance_until`` the computed steps are ``cond``. With 20 steps the default
plan runs 6 ``full`` + 6 ``cond`` steps: 18 transformer rows per image instead of 40.

Why not diffusers' own cache hooks (FasterCache, PyramidAttentionBroadcast, FirstBlockCache,
TaylorSeer in ``diffusers.hooks``)? ``PixArtTransformer2DModel`` is not a ``CacheMixin``, and
``PixArtSigmaPipeline`` never opens the ``cache_context`` those hooks read their state from; and
they hook modules inside the transformer, which breaks the one full graph that
``torch.compile(fullgraph=True)`` builds of it. Deciding per call, around the compiled forward,
keeps the compiled graph whole (a ``cond`` step is one more static graph: batch 1) and lets one
loaded pipeline switch mode per render.
"""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# What fast mode's default plan changes, as measured (docs/performance.md); each fast job's record says it.
MEASURED_DIFFERENCE = (
    "default plan vs exact mode, fixed prompts and seeds, full-size architecture with random weights on an "
    "H200: 1024² 49.1 dB min PSNR, max 6/255; 2048² 49.2 dB min PSNR, max 6/255 (docs/performance.md)"
)
# Per sampler. Fast mode applies where its difference from exact was measured on a GPU; the request schema
# refuses fast mode with any other sampler (pixq.schema.FAST_SCHEDULERS, the same names). The plan reuses
# and extrapolates the model's output between steps: a multistep solver's smooth trajectory was measured;
# a stochastic sampler's (SA-Solver, Euler ancestral) and the single-step ones' are not yet
# (benchmarks/device/samplers.py measures them: "fast_vs_exact").
MEASURED_DIFFERENCES: dict[str, str] = {"dpm-solver++": MEASURED_DIFFERENCE}


def measured_difference(scheduler: Any) -> str:
    """The measured difference from exact of fast mode with ``scheduler`` (a name or ``pixq.schema.Scheduler``);
    ``KeyError`` for a sampler fast mode was not measured with (the schema refuses those requests)."""
    return MEASURED_DIFFERENCES[getattr(scheduler, "value", scheduler)]


class Action(str, enum.Enum):
    full = "full"
    cond = "cond"
    reuse = "reuse"


@dataclass(frozen=True)
class FastPlan:
    """Which steps run the transformer fully, on the conditional branch only, or not at all.

    ``full_until``: the first ``ceil(full_until * steps)`` steps always run ``full``.
    ``guidance_until``: computed steps before ``guidance_until * steps`` run ``full``, later ``cond``.
    ``reuse_every``: after the ``full_until`` steps, one step in ``reuse_every`` runs the model
    (counted back from the last step, which always runs); the others reuse.
    ``order``: 0 reuses the last output as is; 1 extrapolates from the last two computed outputs.
    """

    full_until: float = 0.2
    guidance_until: float = 0.4
    reuse_every: int = 2
    order: int = 0

    def actions(self, steps: int, guided: bool) -> list[Action]:
        first_reuse = max(1, math.ceil(self.full_until * steps))
        guided_until = math.ceil(self.guidance_until * steps)
        plan: list[Action] = []
        for i in range(steps):
            computed = i < first_reuse or self.reuse_every <= 1 or (steps - 1 - i) % self.reuse_every == 0
            if not computed:
                plan.append(Action.reuse)
            elif guided and i >= guided_until:
                plan.append(Action.cond)
            else:
                plan.append(Action.full)
        return plan

    @staticmethod
    def rows_per_image(plan: list[Action], guided: bool) -> int:
        """Transformer rows one image costs under ``plan`` (the plain pipeline: 2 × steps if guided)."""
        full_rows = 2 if guided else 1
        return sum(full_rows if a is Action.full else 1 if a is Action.cond else 0 for a in plan)


@dataclass
class StepStats:
    """What the transformer actually did during one render: calls and rows (batch entries)."""

    calls: int = 0
    rows: int = 0
    actions: list[str] = field(default_factory=list)


class StepController:
    """Wraps a transformer's forward; with no plan set it is a plain pass-through.

    ``forward`` is the function that runs the model (the original bound ``forward``, or its
    ``torch.compile``-d version). Install with :meth:`install`; use :meth:`planned` around one
    pipeline call to apply a plan to it. One render at a time per controller (the worker holds
    the GPU lock around a render); the lock here only guards against misuse.
    """

    def __init__(self, forward: Callable[..., Any], before_call: Callable[[], None] | None = None):
        self.forward = forward
        self.before_call = before_call  # e.g. cudagraph_mark_step_begin for CUDA-graph trees
        self.stats = StepStats()
        self._plan: list[Action] | None = None
        self._step = 0
        self._history: list[tuple[int, Any]] = []  # (step, output) of the last computed steps
        self._delta: Any = None  # cond - uncond of the last full step
        self._order = 0
        self._lock = threading.Lock()

    @classmethod
    def install(cls, module: Any, forward: Callable[..., Any] | None = None, **kwargs: Any) -> StepController:
        """Route ``module``'s calls through a new controller (``module.forward`` is replaced)."""
        controller = cls(forward or module.forward, **kwargs)
        module.forward = controller
        return controller

    @contextmanager
    def planned(self, plan: list[Action] | None, order: int = 0) -> Iterator[StepStats]:
        """Apply ``plan`` to the calls made inside the block (``None``: every call runs as asked)."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("one render at a time per pipeline: StepController is busy")
        self._plan, self._step, self._history, self._delta, self._order = plan, 0, [], None, order
        self.stats = StepStats()
        try:
            yield self.stats
        finally:
            self._plan, self._history, self._delta = None, [], None
            self._lock.release()

    def __call__(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.get("return_dict", True)
        plan = self._plan
        action = Action.full if plan is None or self._step >= len(plan) else plan[self._step]
        step = self._step
        self._step += 1
        if action is Action.reuse and not self._history:
            action = Action.full
        if action is Action.cond and (self._delta is None or hidden_states.shape[0] % 2):
            action = Action.full
        self.stats.actions.append(action.value)
        if action is Action.reuse:
            sample = self._extrapolate(step)
        elif action is Action.cond:
            sample = self._cond_only(hidden_states, args, kwargs)
        else:
            sample = self._run(hidden_states, args, kwargs)
            if plan is not None and sample.shape[0] % 2 == 0 and sample.shape[0] == hidden_states.shape[0]:
                half = sample.shape[0] // 2
                self._delta = (sample[half:] - sample[:half]).clone()
        if plan is not None and action is not Action.reuse:
            # Clone: a CUDA-graph replay overwrites its outputs in place.
            self._history = (self._history + [(step, sample.clone())])[-2:]
        return _output(sample, return_dict)

    def _run(self, hidden_states: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.before_call is not None:
            self.before_call()
        kwargs = {**kwargs, "return_dict": False}
        self.stats.calls += 1
        self.stats.rows += int(hidden_states.shape[0])
        return self.forward(hidden_states, *args, **kwargs)[0]

    def _cond_only(self, hidden_states: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        import torch

        half = hidden_states.shape[0] // 2
        if args:
            raise TypeError("fast mode expects the transformer's arguments after hidden_states by keyword")
        sliced = {k: (v[half:] if _is_batched(v, 2 * half) else v) for k, v in kwargs.items()}
        cond = self._run(hidden_states[half:], (), sliced)
        return torch.cat([cond - self._delta, cond], dim=0)

    def _extrapolate(self, step: int) -> Any:
        last_step, last = self._history[-1]
        if self._order < 1 or len(self._history) < 2:
            return last
        prev_step, prev = self._history[-2]
        slope = (last - prev) / float(last_step - prev_step)
        return last + slope * float(step - last_step)


def _is_batched(value: Any, batch: int) -> bool:
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) > 0 and shape[0] == batch


def _output(sample: Any, return_dict: bool) -> Any:
    if not return_dict:
        return (sample,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)
