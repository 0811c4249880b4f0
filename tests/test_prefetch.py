"""pixq.worker.ops.prefetch: the weight files read into the page cache from the worker's first instruction
(issue 29): which files, in which order, when not, and a real worker start with it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from pixq.checkpoints import BASE_COMPONENTS
from pixq.client import Client
from pixq.errors import ConfigError
from pixq.records import JobState
from pixq.settings import Settings
from pixq.worker.ops.prefetch import (
    CHUNK_BYTES,
    mode_from_env,
    prefetch_for_worker,
    start_prefetch,
    weight_files,
)

from tests.services import S3Endpoint, pixq_argv, start_worker
from tests.support import stack_env

ON = {"PIXQ_PREFETCH": "weights"}


def _pipeline(root: Path, index: dict[str, list[str]], files: dict[str, int]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline", **index}))
    for name, size in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))


def test_a_saved_pipeline_is_read_in_its_load_order(tiny_model: str) -> None:
    # diffusers loads model_index.json's components in the order written (text_encoder, transformer, vae: seen
    # with strace on the tiny model's load); the tokenizer and scheduler have no weights
    files = weight_files(tiny_model, {})
    assert [f.relative_to(tiny_model).as_posix() for f in files] == [
        "text_encoder/model.safetensors", "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors"]


def test_shards_in_their_order_links_once_and_the_index_order_kept(tmp_path: Path) -> None:
    model = tmp_path / "model"
    _pipeline(model, {"vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "T5EncoderModel"],
                      "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]},
              {"text_encoder/model-00002-of-00002.safetensors": 10, "text_encoder/model-00001-of-00002.safetensors": 10,
               "text_encoder/model.safetensors.index.json": 5, "vae/diffusion_pytorch_model.safetensors": 10,
               "vae/diffusion_pytorch_model.bin": 10})
    (model / "transformer").mkdir()  # not in the index: not read
    (model / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    files = weight_files(str(model), {})
    assert [f.relative_to(model).as_posix() for f in files] == [
        "vae/diffusion_pytorch_model.safetensors", "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors"]
    # a 512 checkpoint links the 1024 one's components: each file once
    small = tmp_path / "small"
    small.mkdir()
    (small / "model_index.json").symlink_to(model / "model_index.json")
    for part in ("vae", "text_encoder"):
        (small / part).symlink_to(model / part)
    assert weight_files(str(small), {}) == files  # the resolved paths


def test_a_hub_model_is_read_from_its_cached_snapshots(tmp_path: Path) -> None:
    model = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
    for repo, parts in ((model, {"transformer/diffusion_pytorch_model.safetensors": 4}),
                        (BASE_COMPONENTS, {"text_encoder/model.safetensors": 4,
                                           "vae/diffusion_pytorch_model.safetensors": 4,
                                           "transformer/diffusion_pytorch_model.safetensors": 4})):
        folder = tmp_path / ("models--" + repo.replace("/", "--"))
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("abc123\n")
        _pipeline(folder / "snapshots" / "abc123", {"text_encoder": ["transformers", "T5EncoderModel"],
                                                    "transformer": ["diffusers", "PixArtTransformer2DModel"],
                                                    "vae": ["diffusers", "AutoencoderKL"]}, parts)
    files = weight_files(model, {"HF_HUB_CACHE": str(tmp_path)})
    # its own transformer first (loaded before the pipeline), then the shared T5 and VAE, not their transformer
    assert [(f.parts[-5], f.parent.name) for f in files] == [
        ("models--" + model.replace("/", "--"), "transformer"),
        ("models--" + BASE_COMPONENTS.replace("/", "--"), "text_encoder"),
        ("models--" + BASE_COMPONENTS.replace("/", "--"), "vae")]
    assert weight_files("org/not-cached", {"HF_HUB_CACHE": str(tmp_path / "empty")}) == []


def test_the_mode_off_by_default_and_a_bad_value(tiny_model: str) -> None:
    assert mode_from_env({}) == mode_from_env({"PIXQ_PREFETCH": "0"}) == "off"  # off unless asked (run a)
    assert mode_from_env({"PIXQ_PREFETCH": "off"}) == "off"
    assert mode_from_env({"PIXQ_PREFETCH": "1"}) == "weights" and mode_from_env({"PIXQ_PREFETCH": "all"}) == "all"
    assert prefetch_for_worker(tiny_model, {}) is None
    assert prefetch_for_worker(tiny_model, {"PIXQ_PREFETCH": "off"}) is None
    with pytest.raises(ConfigError, match="PIXQ_PREFETCH: must be one of off, weights, all"):
        mode_from_env({"PIXQ_PREFETCH": "maybe"})


def test_every_byte_is_read_and_missing_files_never_fail(tmp_path: Path, tiny_model: str) -> None:
    big = tmp_path / "big.safetensors"
    big.write_bytes(os.urandom(CHUNK_BYTES + 12345))  # two chunks, the second short
    small = tmp_path / "small.safetensors"
    small.write_bytes(os.urandom(100))
    job = start_prefetch([big, tmp_path / "gone.safetensors", small], threads=3, read_bytes=1 << 20)
    assert job is not None and job.join(timeout_s=60)
    assert job.read_bytes == job.total_bytes == CHUNK_BYTES + 12345 + 100 and job.seconds is not None
    assert job.files == [big, small]
    # nothing to read: no prefetch, no error (the load reports a missing model)
    assert prefetch_for_worker(str(tmp_path / "no-model"), ON) is None
    assert start_prefetch([tmp_path / "gone.safetensors"]) is None
    # more than the memory share: skipped, and the log says so
    assert start_prefetch([big], max_share=1e-12) is None
    done = prefetch_for_worker(tiny_model, ON)
    assert done is not None and done.join(timeout_s=60)
    assert done.read_bytes == sum(f.stat().st_size for f in weight_files(tiny_model, {}))


def test_a_bad_mode_stops_the_worker_naming_it(tiny_model: str) -> None:
    env = {**os.environ, "PIXQ_PREFETCH": "sometimes", "PIXQ_REDIS_URL": "redis://127.0.0.1:1/0",
           "PIXQ_S3_BUCKET": "bucket"}
    done = subprocess.run(pixq_argv("worker", "--model", tiny_model), env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert "PIXQ_PREFETCH: must be one of off, weights, all" in done.stderr


@pytest.mark.slow
def test_a_worker_starting_with_the_prefetch_serves_a_job(redis_url: str, s3: S3Endpoint, tiny_model: str,
                                                          tmp_path: Path) -> None:
    env = stack_env(redis_url, s3, tiny_model, PIXQ_PREFETCH="weights")
    log = tmp_path / "worker.log"
    svc = start_worker(env, tiny_model, log, name="cpu-prefetch@test")
    try:
        client = Client(Settings.from_env(env))
        job = client.submit("a cube", width=128, height=128, num_inference_steps=3)
        assert client.wait(job.id, timeout_s=60).state is JobState.succeeded
        text = log.read_text()
        assert "weights prefetched: " in text and "(3 files," in text
    finally:
        svc.stop()
