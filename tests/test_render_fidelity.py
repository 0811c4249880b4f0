"""Exact mode stays the plain pipeline: cached prompt embeddings and trimmed text change nothing a user sees.

CPU, the tiny test model (random weights, so images are deterministic noise: any change shows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pixq.schema import JobRequest


@pytest.fixture(scope="session")
def fidelity_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pixq.worker.gpu.testmodel import make_test_model

    return str(make_test_model(tmp_path_factory.mktemp("fidelity-model")).resolve())


def _load(model: str, **options: Any) -> Any:
    from pixq.worker.gpu.pipeline import PipelineOptions, load_pipeline
    from pixq.worker.gpu.speedups import SpeedupOptions

    return load_pipeline(model, "cpu", PipelineOptions(speedups=SpeedupOptions(**options)))


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


def _plain(loaded: Any, request: JobRequest, **kw: Any) -> np.ndarray:
    """The model card's call on the same pipeline: prompt strings, the pipeline encodes them; ``kw``
    goes to the pipeline as it is (``use_resolution_binning=False``)."""
    from pixq.worker.gpu.pipecall import generators

    return np.asarray(loaded.pipe(
        prompt=request.prompt, negative_prompt=request.negative_prompt,
        num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
        width=request.width, height=request.height, generator=generators(request)[0], **kw,
    ).images[0])


def _render(loaded: Any, request: JobRequest, on_step: Any = None) -> np.ndarray:
    from pixq.worker.gpu.render import render

    return np.asarray(render(loaded, request, on_step)[0])


def test_cached_embeddings_are_bit_identical_to_the_plain(untrimmed: Any, fidelity_model: str) -> None:
    request = _request(fidelity_model)
    cache = untrimmed.speedups.cache
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
    tokens = trimmed.speedups.encode(request.prompt).tokens
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
    from pixq.worker.gpu.render import render

    pipe = PixArtSigmaPipeline.from_pretrained(Path(fidelity_model))
    pipe.set_progress_bar_config(disable=True)
    request = _request(fidelity_model, num_inference_steps=4)
    image = np.asarray(render(pipe, request)[0])
    assert image.shape == (256, 256, 3)
    assert np.array_equal(np.asarray(render(pipe, request)[0]), image)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compiled_transformer_matches_eager_and_keeps_one_graph_per_batch(fidelity_model: str, scope: str) -> None:
    """torch.compile (inductor, on the CPU here) of the blocks or of the whole forward: the image stays
    the eager one within compile tolerance, and prompts of other lengths reuse the graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    # As in a fresh worker process: earlier tests in this pytest process compiled the same forward code
    # (other models, batch sizes, AOT sets); past dynamo's per-code cache limit it would run eager silently.
    torch._dynamo.reset()
    counters.clear()
    compiled = _load(fidelity_model, trim_text=True, compile=True, compile_scope=scope, compile_vae=False)
    speedups = compiled.speedups
    assert (speedups.blocks is not None) == (scope == "blocks")
    short = _request(fidelity_model, prompt="A cactus.", width=128, height=128, num_inference_steps=4)
    longer = _request(fidelity_model, prompt=" ".join(["A small cactus with a happy face in the Sahara."] * 6),
                      width=128, height=128, num_inference_steps=4)
    for request in (short, longer):
        with speedups.eager():
            eager = _render(compiled, request)
        image = _render(compiled, request)
        diff = np.abs(image.astype(int) - eager.astype(int))
        assert diff.max() <= 2, f"{scope}: compiled differs from eager by {diff.max()}/255"
    # Both text lengths and (for blocks) every block ran the one CFG-batch graph.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_native_size_renders_without_binning_like_the_plain(untrimmed: Any, fidelity_model: str) -> None:
    # 400x208 is no 256-pixel bin (its bin is 336x176): binned, it renders small and is resized.
    native = _request(fidelity_model, width=400, height=208, use_resolution_binning=False)
    image = _render(untrimmed, native)
    assert image.shape == (208, 400, 3)
    assert np.array_equal(image, _plain(untrimmed, native, use_resolution_binning=False))
    binned = _render(untrimmed, native.model_copy(update={"use_resolution_binning": True}))
    assert binned.shape == (208, 400, 3)
    assert np.array_equal(binned, _plain(untrimmed, native))
    assert not np.array_equal(image, binned)


def test_only_decodes_above_the_threshold_are_tiled(fidelity_model: str) -> None:
    loaded = _load(fidelity_model, vae_tile_above=100_000)
    tiling, vae = loaded.speedups.vae_decode, loaded.pipe.vae
    small = _request(fidelity_model, width=400, height=208, use_resolution_binning=False)  # 83 200 pixels
    large = _request(fidelity_model, width=416, height=256, use_resolution_binning=False)  # 106 496 pixels
    got_small = _render(loaded, small)
    assert tiling.tiled == 0
    got_large = _render(loaded, large)
    assert tiling.tiled == 1
    # The references: the plain pipeline with diffusers' all-or-nothing switch, our policy out of the way.
    tiling.remove()
    try:
        vae.enable_tiling()
        tiled_small = _plain(loaded, small, use_resolution_binning=False)
        tiled_large = _plain(loaded, large, use_resolution_binning=False)
        vae.disable_tiling()
        plain_small = _plain(loaded, small, use_resolution_binning=False)
    finally:
        tiling.install()
    assert np.array_equal(got_small, plain_small)
    assert np.array_equal(got_large, tiled_large)
    assert not np.array_equal(tiled_small, plain_small)  # tiling does change pixels: the test can tell


@pytest.mark.slow
def test_compiled_vae_decoder_matches_eager_with_one_graph_for_any_image_count(fidelity_model: str) -> None:
    """The worker's compiled VAE decode: close to eager, one graph per image size (images go through one by
    one), and tiled decodes bypass it."""
    import torch
    from pixq.worker.gpu.vae import VaeDecode
    from torch._dynamo.utils import counters

    loaded = _load(fidelity_model)
    vae = loaded.pipe.vae
    loaded.speedups.vae_decode.remove()
    decode = VaeDecode(vae, tile_above=10**9, compile_mode="default")
    counters.clear()
    gen = torch.Generator("cpu").manual_seed(3)
    one, three = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(3, 4, 16, 16, generator=gen)
    with torch.inference_mode():
        got_one = vae.decode(one).sample
        got_three = vae.decode(three).sample
        decode.eager = True
        ref_one, ref_three = vae.decode(one).sample, vae.decode(three).sample
        decode.eager = False
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        decode.tile_above = 0  # every decode tiled: eager tiles, no new graph
        tiled = vae.decode(three).sample
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert decode.tiled == 1 and tiled.shape == ref_three.shape
    for got, ref in ((got_one, ref_one), (got_three, ref_three)):
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() < 1e-3  # fp32 on the CPU: summation order only
    assert not torch.equal(got_three[0], got_three[1])  # images stay apart
