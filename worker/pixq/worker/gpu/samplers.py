"""The sampler of one pipeline call: a fresh diffusers scheduler built from the checkpoint's own scheduler config.

A scheduler keeps per-call state (its step index, the model outputs of the previous steps, SA-Solver's last
noise), so no two calls share one: each call gets its own instance (``build_scheduler``: ``from_config`` of
the config the checkpoint was loaded with, a few milliseconds) on its own shallow copy of the pipeline
(``with_scheduler``), and the loaded pipeline's ``scheduler`` is never stepped or replaced. ``from_config``
carries the checkpoint's training betas, prediction type and timestep spacing over to every sampler.

The transformer's inputs do not depend on the sampler (``pixq.worker.gpu.routing`` hands it every timestep
as float32), so compiled graphs and AOT artefacts serve every sampler: nothing compiles for a new one.
"""

from __future__ import annotations

import copy
from typing import Any

from pixq.schema import Scheduler


def _sa_solver_tau(t: Any) -> int:
    """SA-Solver's stochasticity: 1 in the middle of sampling (200 <= t <= 800), 0 at its start and end."""
    return 1 if 200 <= t <= 800 else 0


# What each sampler changes on the checkpoint's config. SA-Solver: the values the PixArt-Σ repository's app runs
# it with (github.com/PixArt-alpha/PixArt-sigma, app/app_pixart_sigma.py, commit 318c5a5:
# ``SASolverScheduler.from_config(pipe.scheduler.config, algorithm_type='data_prediction',
# tau_func=lambda t: 1 if 200 <= t <= 800 else 0, predictor_order=2, corrector_order=2)``), which are also
# diffusers' defaults and the orders the SA-Solver authors recommend for text-to-image with guidance
# (PixArt-alpha asset/docs/sasolver.md). DDIM: unclipped (its class default clips the predicted sample to
# [-1, 1], meant for pixel-space models, not latents) and trailing timesteps (with the checkpoint's "linspace"
# spacing its fixed stride of 1000 // steps misses the next timestep; 1 to 3 steps returned noise).
OVERRIDES: dict[Scheduler, dict[str, Any]] = {
    Scheduler.dpm_solver: {"algorithm_type": "dpmsolver++"},
    Scheduler.sa_solver: {"predictor_order": 2, "corrector_order": 2, "tau_func": _sa_solver_tau,
                          "algorithm_type": "data_prediction"},
    Scheduler.unipc: {},
    Scheduler.euler: {},
    Scheduler.euler_ancestral: {},
    Scheduler.ddim: {"clip_sample": False, "timestep_spacing": "trailing"},
}

CLASSES: dict[Scheduler, str] = {
    Scheduler.dpm_solver: "DPMSolverMultistepScheduler",
    Scheduler.sa_solver: "SASolverScheduler",
    Scheduler.unipc: "UniPCMultistepScheduler",
    Scheduler.euler: "EulerDiscreteScheduler",
    Scheduler.euler_ancestral: "EulerAncestralDiscreteScheduler",
    Scheduler.ddim: "DDIMScheduler",
}


def build_scheduler(config: Any, name: Scheduler | str) -> Any:
    """A new scheduler of sampler ``name`` from ``config`` (the checkpoint's scheduler config)."""
    import diffusers

    sampler = Scheduler(name)
    cls = getattr(diffusers, CLASSES[sampler])
    return cls.from_config(config, **OVERRIDES[sampler])


def with_scheduler(pipe: Any, scheduler: Any) -> Any:
    """``pipe`` for one call with its own ``scheduler``: a shallow copy that shares every model (and the
    worker's speed-ups on them) but not the scheduler, so the loaded pipeline's own is never touched."""
    call = copy.copy(pipe)
    # Past DiffusionPipeline.__setattr__, which would rewrite the copy's config to name the new class.
    object.__setattr__(call, "scheduler", scheduler)
    return call


def checkpoint_config(target: Any) -> Any:
    """The scheduler config ``target`` (a ``LoadedPipeline`` or a bare pipeline) was loaded with."""
    config = getattr(target, "scheduler_config", None)
    return config if config is not None else target.scheduler.config
