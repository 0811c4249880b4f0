"""Exact mode stays the plain pipeline: cached prompt embeddings and trimmed text change nothing a user sees.

CPU, the tiny test model (random weights, so images are deterministic noise: any change shows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from producer.schema import JobRequest


@pytest.fixture(scope="session")
def fidelity_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from worker.testmodel import make_test_model

    return str(make_test_model(tmp_path_factory.mktemp("fidelity-model")).resolve())


def _load(model: str, **options: Any) -> Any:
    from worker.accel import AccelOptions
    from worker.pipeline import load_pipeline

    return load_pipeline(model, "cpu", accel=AccelOptions(**options))


@pytest.fixture(scope="module")
def untrimmed(fidelity_model: str) -> Any:
    return _load(fidelity_model, trim_text=False)


@pytest.fixture(scope="module")
def trimmed(fidelity_model: str) -> Any:
    return _load(fidelity_model, trim_text=True)


def _request(model: str, **fields: Any) -> JobRequest:
    base: dict[str, Any] = dict(prompt="A small cactus with a happy face in the Sahara desert.", seed=7,
                                width=256, height=256, num_inference_steps=8, model_name=model)
    base.update(fields)
    return JobRequest(**base)


def _plain(loaded: Any, request: JobRequest) -> np.ndarray:
    """The model card's call on the same pipeline: prompt strings, the pipeline encodes them."""
    import torch

    from worker.render import generators

    image = loaded.pipe(
        prompt=request.prompt, negative_prompt=request.negative_prompt,
        num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
        width=request.width, height=request.height, generator=generators(request)[0],
    ).images[0]
    assert isinstance(image.size, tuple) and torch is not None
    return np.asarray(image)


def _render(loaded: Any, request: JobRequest, on_step: Any = None) -> np.ndarray:
    from worker.render import render

    return np.asarray(render(loaded, request, on_step)[0])


def test_cached_embeddings_are_bit_identical_to_the_plain_call(untrimmed: Any, fidelity_model: str) -> None:
    request = _request(fidelity_model)
    cache = untrimmed.accel.cache
    misses = cache.misses
    first = _render(untrimmed, request)  # encodes prompt and negative
    hits = cache.hits
    second = _render(untrimmed, request)  # both from the cache
    assert cache.misses == misses + 2 and cache.hits == hits + 2
    plain = _plain(untrimmed, request)
    assert np.array_equal(first, plain)
    assert np.array_equal(second, plain)


def test_a_non_empty_negative_prompt_is_honoured(untrimmed: Any, fidelity_model: str) -> None:
    request = _request(fidelity_model, negative_prompt="blurry, low quality")
    assert np.array_equal(_render(untrimmed, request), _plain(untrimmed, request))
    assert not np.array_equal(_render(untrimmed, request), _render(untrimmed, _request(fidelity_model)))


def test_trimmed_text_matches_the_plain_call_and_is_shorter(trimmed: Any, fidelity_model: str) -> None:
    lengths: list[int] = []

    def seen(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        lengths.append(int(kwargs["encoder_hidden_states"].shape[1]))

    handle = trimmed.pipe.transformer.register_forward_pre_hook(seen, with_kwargs=True)
    try:
        request = _request(fidelity_model)
        got = _render(trimmed, request)
    finally:
        handle.remove()
    tokens = trimmed.accel.encode(request.prompt).tokens
    assert lengths and set(lengths) == {32 * -(-tokens // 32)} and lengths[0] < 300
    plain = _plain(trimmed, request)
    # Masked keys weigh exactly 0; only summation order may differ.
    assert np.abs(got.astype(int) - plain.astype(int)).max() <= 1


def test_every_step_reports_progress(untrimmed: Any, fidelity_model: str) -> None:
    steps: list[int] = []
    _render(untrimmed, _request(fidelity_model, num_inference_steps=5), steps.append)
    assert steps == [1, 2, 3, 4, 5]


def test_a_stop_raised_from_on_step_ends_the_render_and_the_next_one_is_clean(
    untrimmed: Any, fidelity_model: str
) -> None:
    class Stop(Exception):
        pass

    def stop_at_3(step: int) -> None:
        if step == 3:
            raise Stop()

    with pytest.raises(Stop):
        _render(untrimmed, _request(fidelity_model, mode="fast"), stop_at_3)
    request = _request(fidelity_model)
    assert np.array_equal(_render(untrimmed, request), _plain(untrimmed, request))


def test_a_bare_pipeline_renders_too(fidelity_model: str) -> None:
    from diffusers import PixArtSigmaPipeline

    from worker.render import render

    pipe = PixArtSigmaPipeline.from_pretrained(Path(fidelity_model))
    pipe.set_progress_bar_config(disable=True)
    request = _request(fidelity_model, num_inference_steps=4)
    image = np.asarray(render(pipe, request)[0])
    assert image.shape == (256, 256, 3)
    assert np.array_equal(np.asarray(render(pipe, request)[0]), image)


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compiled_transformer_matches_eager_and_keeps_one_graph_per_batch(fidelity_model: str, scope: str) -> None:
    """torch.compile (inductor, on the CPU here) of the blocks or of the whole forward: the image stays
    the eager one within compile tolerance, and prompts of other lengths reuse the graph."""
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = _load(fidelity_model, trim_text=True, compile=True, compile_scope=scope)
    accel = compiled.accel
    assert (accel.blocks is not None) == (scope == "blocks")
    short = _request(fidelity_model, prompt="A cactus.", width=128, height=128, num_inference_steps=4)
    longer = _request(fidelity_model, prompt=" ".join(["A small cactus with a happy face in the Sahara."] * 6),
                      width=128, height=128, num_inference_steps=4)
    for request in (short, longer):
        with accel.eager():
            eager = _render(compiled, request)
        image = _render(compiled, request)
        diff = np.abs(image.astype(int) - eager.astype(int))
        assert diff.max() <= 2, f"{scope}: compiled differs from eager by {diff.max()}/255"
    # Both text lengths and (for blocks) every block ran the one CFG-batch graph.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
