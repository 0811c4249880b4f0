"""Fast mode: fewer transformer rows per image, a bounded difference from exact, switchable per job.

CPU, the tiny test model. The PSNR bound is set under what was measured here (docs/performance.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pixq.schema import JobRequest
from pixq.worker.gpu.fastmode import Action, FastPlan, StepController

# Measured on the tiny model, 256², 20 steps, seeds 11-15: 55.7-56.2 dB, max 2/255 (order 0).
MIN_PSNR_DB = 45.0


@pytest.fixture(scope="session")
def fast_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pixq.worker.gpu.testmodel import make_test_model

    return str(make_test_model(tmp_path_factory.mktemp("fast-model")).resolve())


@pytest.fixture(scope="module")
def loaded(fast_model: str) -> Any:
    from pixq.worker.gpu.pipeline import load_pipeline

    return load_pipeline(fast_model, "cpu")


def _request(model: str, **fields: Any) -> JobRequest:
    base: dict[str, Any] = dict(prompt="A watercolor painting of a lighthouse on a cliff at sunset.", seed=11,
                                width=256, height=256, model_name=model)
    base.update(fields)
    return JobRequest(**base)


def _render_counting(loaded: Any, request: JobRequest) -> tuple[np.ndarray, list[int]]:
    """Render, counting the rows (batch entries) that reach the transformer's first block."""
    from pixq.worker.gpu.render import render

    rows: list[int] = []
    block = loaded.pipe.transformer.transformer_blocks[0]
    handle = block.register_forward_pre_hook(lambda _m, args: rows.append(int(args[0].shape[0])))
    try:
        image = render(loaded, request)[0]
    finally:
        handle.remove()
    return np.asarray(image), rows


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# -- the plan ---------------------------------------------------------------------------------------


def test_default_plan_at_20_steps_costs_18_rows_instead_of_40() -> None:
    plan = FastPlan().actions(20, guided=True)
    assert plan[:4] == [Action.full] * 4
    assert plan[-1] is not Action.reuse  # the last step always runs the model
    assert plan.count(Action.full) == 6 and plan.count(Action.cond) == 6 and plan.count(Action.reuse) == 8
    assert FastPlan.rows_per_image(plan, guided=True) == 18


def test_unguided_plans_have_no_cond_steps_and_short_renders_run_fully() -> None:
    assert Action.cond not in FastPlan().actions(20, guided=False)
    assert FastPlan().actions(1, guided=True) == [Action.full]
    assert Action.reuse not in FastPlan().actions(4, guided=True)[:1]


def test_cond_step_returns_cond_minus_cached_difference() -> None:
    import torch

    calls: list[int] = []

    def forward(hidden: Any, **kwargs: Any) -> tuple[Any]:
        calls.append(int(hidden.shape[0]))
        # "uncond" rows answer 1, "cond" rows answer 3 plus their input.
        out = hidden.clone()
        out[: hidden.shape[0] // 2 if hidden.shape[0] > 1 else 0] += 1
        out[hidden.shape[0] // 2 if hidden.shape[0] > 1 else 0:] += 3
        return (out,)

    controller = StepController(forward)
    x = torch.zeros(2, 1)
    with controller.planned([Action.full, Action.cond, Action.reuse]):
        full = controller(x, timestep=torch.zeros(2), return_dict=False)[0]
        cond = controller(x + 10, timestep=torch.zeros(2), return_dict=False)[0]
        reused = controller(x + 20, timestep=torch.zeros(2), return_dict=False)[0]
    assert calls == [2, 1]
    assert full.flatten().tolist() == [1.0, 3.0]
    # cond half computed on one row (10 + 3); uncond half = cond - (3 - 1).
    assert cond.flatten().tolist() == [11.0, 13.0]
    assert torch.equal(reused, cond)
    assert controller.stats.rows == 3 and controller.stats.actions == ["full", "cond", "reuse"]


# -- the pipeline -----------------------------------------------------------------------------------


def test_fast_mode_runs_fewer_transformer_rows(loaded: Any, fast_model: str) -> None:
    _, exact_rows = _render_counting(loaded, _request(fast_model))
    _, fast_rows = _render_counting(loaded, _request(fast_model, mode="fast"))
    assert len(exact_rows) == 20 and sum(exact_rows) == 40
    assert len(fast_rows) == 12 and sum(fast_rows) == 18


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_fast_mode_differs_from_exact_by_a_bounded_amount(loaded: Any, fast_model: str, seed: int) -> None:
    exact, _ = _render_counting(loaded, _request(fast_model, seed=seed))
    fast, _ = _render_counting(loaded, _request(fast_model, seed=seed, mode="fast"))
    assert not np.array_equal(exact, fast)  # it really computed something else
    assert _psnr(exact, fast) > MIN_PSNR_DB


def test_mode_switches_per_render_on_one_pipeline(loaded: Any, fast_model: str) -> None:
    first, _ = _render_counting(loaded, _request(fast_model))
    _render_counting(loaded, _request(fast_model, mode="fast"))
    again, rows = _render_counting(loaded, _request(fast_model))
    assert np.array_equal(first, again) and sum(rows) == 40


def test_fast_mode_with_several_images_and_without_guidance(loaded: Any, fast_model: str) -> None:
    images, rows = _render_counting(loaded, _request(fast_model, mode="fast", num_images_per_prompt=2,
                                                     num_inference_steps=10))
    assert sum(rows) == 2 * FastPlan.rows_per_image(FastPlan().actions(10, guided=True), guided=True)
    _, unguided = _render_counting(loaded, _request(fast_model, mode="fast", guidance_scale=1.0))
    assert set(unguided) == {1} and len(unguided) == 12


def test_prompt_cache_is_a_bounded_lru() -> None:
    from pixq.worker.gpu.textcache import Encoded, PromptCache

    cache = PromptCache(2)
    for text in ("a", "b", "a", "c"):
        cache.put((text, 300, True), Encoded(None, None, 1))
    assert len(cache) == 2
    assert cache.get(("b", 300, True)) is None and cache.get(("a", 300, True)) is not None


def test_fast_mode_runs_with_the_samplers_it_was_measured_with_and_says_so() -> None:
    """The schema lets fast mode through with exactly the samplers whose difference from exact was measured;
    each such job's record states that difference (pixq.worker.gpu.render.render_info)."""
    from pixq.schema import FAST_SCHEDULERS, Scheduler
    from pixq.worker.gpu.fastmode import MEASURED_DIFFERENCES, measured_difference

    assert set(MEASURED_DIFFERENCES) == {s.value for s in FAST_SCHEDULERS}
    assert "H200" in measured_difference(Scheduler.dpm_solver)
    with pytest.raises(KeyError):
        measured_difference(Scheduler.sa_solver)
