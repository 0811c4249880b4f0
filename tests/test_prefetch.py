"""pixq.worker.gpu.prefetch: the weight files read while the worker imports (no services)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pixq.models import BASE_COMPONENTS
from pixq.worker.gpu.prefetch import model_folders, start_prefetch, weight_files


def _files(root: Path) -> dict[str, int]:
    sizes = {"transformer/diffusion_pytorch_model.safetensors": 3 << 20, "vae/diffusion_pytorch_model.safetensors":
             1 << 20, "text_encoder/model-00001-of-00002.safetensors": (20 << 20) + 7,
             "text_encoder/model-00002-of-00002.safetensors": 5 << 20}
    for name, size in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    (root / "model_index.json").write_text("{}")  # not a weight file: never read
    return sizes


def test_every_weight_file_is_read_once_largest_first(tmp_path: Path) -> None:
    sizes = _files(tmp_path / "model")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "vae").symlink_to(tmp_path / "model" / "vae")  # a 512 checkpoint links the VAE
    files = weight_files([tmp_path / "model", tmp_path / "linked", tmp_path / "missing"])
    assert [f.name for f in files][:1] == ["model-00001-of-00002.safetensors"] and len(files) == 4
    job = start_prefetch([tmp_path / "model", tmp_path / "linked"])
    assert job is not None and job.join(timeout_s=30)
    assert job.read_bytes == job.total_bytes == sum(sizes.values())
    assert job.seconds is not None


def test_files_larger_than_the_memory_share_are_not_prefetched(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                               ) -> None:
    _files(tmp_path)
    with caplog.at_level("INFO", logger="pixq.worker.gpu.prefetch"):
        assert start_prefetch([tmp_path], max_share=1e-9) is None
    assert any("weights not prefetched" in r.getMessage() for r in caplog.records)
    assert start_prefetch([tmp_path / "empty"]) is None


def test_a_hub_model_is_prefetched_from_its_cached_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
    for repo in (model, BASE_COMPONENTS):
        folder = tmp_path / ("models--" + repo.replace("/", "--"))
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("abc123\n")
    snapshot = tmp_path / ("models--" + BASE_COMPONENTS.replace("/", "--")) / "snapshots" / "abc123"
    assert model_folders(model) == [
        tmp_path / ("models--" + model.replace("/", "--")) / "snapshots" / "abc123" / "",
        snapshot / "text_encoder", snapshot / "vae"]
    assert model_folders("/models/local") == [Path("/models/local")]
    assert model_folders("org/not-cached") == [snapshot / "text_encoder", snapshot / "vae"]
