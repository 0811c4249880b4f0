"""`pixq compile` artefact sets (pixq.worker.gpu.artefacts, aot, routing) on the tiny model, CPU.

Building a set runs AOTInductor's C++ compiler on the CPU: minutes on a small machine, so the set is
built once per session (``artefact_set``) and every test that needs one is slow.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pixq.schema import JobRequest
from pixq.worker.gpu.artefacts import MANIFEST, ArtefactKey, batch_rows, covered, find_artefacts

from tests.services import pixq_argv, start_worker
from tests.support import env_without_pixq, parse, scrape, stack_env, value, wait_for

SIZE = 256  # the tiny model's trained bin
BATCH = 6  # the set's full batch (``pixq compile --max-batch``): 12 transformer rows exact, 6 fast


def key(**changes: Any) -> ArtefactKey:
    fields: dict[str, Any] = dict(model="/models/tiny", architecture="a" * 64, device_kind="NVIDIA H200",
                                  dtype="bfloat16", torch="2.11.0+cu130", diffusers="0.42.1")
    fields.update(changes)
    return ArtefactKey(**fields)


def test_set_folder_names_what_the_graphs_depend_on() -> None:
    folder = key().folder()
    assert folder.startswith("pixart-nvidia-h200-bfloat16-torch2.11.0-")
    assert key(torch="2.12.0").folder() != folder
    assert key(architecture="b" * 64).folder() != folder
    assert key(cpu_isa="avx2").folder() != key(cpu_isa="avx2 avx512").folder()  # the wrapper's host code
    assert key(device_kind="NVIDIA H100").folder() != folder
    assert key(model="/elsewhere/fine-tune").folder() == folder  # same architecture: the same graphs


def test_find_says_why_no_set_is_used(tmp_path: Path) -> None:
    manifest, why = find_artefacts(tmp_path, key())
    assert manifest is None and why.startswith("no compiled artefacts under")
    stale = key(torch="2.10.0+cu128")
    (tmp_path / stale.folder()).mkdir()
    (tmp_path / stale.folder() / MANIFEST).write_text(json.dumps({"key": stale.__dict__}))
    manifest, why = find_artefacts(tmp_path, key())
    assert manifest is None
    assert "stale" in why and "torch: '2.10.0+cu128' -> '2.11.0+cu130'" in why
    # A set copied into the right folder but built for something else is refused too.
    (tmp_path / key().folder()).mkdir()
    (tmp_path / key().folder() / MANIFEST).write_text(json.dumps({"key": key(dtype="float16").__dict__}))
    manifest, why = find_artefacts(tmp_path, key())
    assert manifest is None and "dtype: 'float16' -> 'bfloat16'" in why


def test_a_set_covers_a_size_only_with_graphs_for_its_full_batch() -> None:
    def graph(component: str, rows: int = 0, max_rows: int = 8) -> dict[str, Any]:
        return {"component": component, "width": 512, "height": 512, "rows": rows, "max_rows": max_rows}

    assert batch_rows(1) == (2, 1) and batch_rows(8) == (2, 1, 16, 8)
    eight = {(512, 512): 8}.get
    # Dynamic rows (the CPU): the range must reach the full batch's guided rows.
    assert covered({"graphs": [graph("transformer"), graph("vae")]}, [(512, 512)], 8)
    assert not covered({"graphs": [graph("transformer"), graph("vae")]}, [(512, 512)], 8, lambda w, h: 8)
    assert covered({"graphs": [graph("transformer", max_rows=16), graph("vae")]}, [(512, 512)], 8,
                   lambda w, h: eight((w, h), 1))
    # Static rows (CUDA): one graph per row count, the full batch's in each mode among them.
    single = [graph("transformer", 2), graph("transformer", 1), graph("vae", 1)]
    assert covered({"graphs": single}, [(512, 512)], 8)
    assert not covered({"graphs": single}, [(512, 512)], 8, lambda w, h: 8)
    full = single + [graph("transformer", 16), graph("transformer", 8)]
    assert covered({"graphs": full}, [(512, 512)], 8, lambda w, h: 8)
    assert not covered({"graphs": full}, [(512, 512), (1024, 1024)], 8)  # a size it has no graph for


@pytest.fixture(scope="session")
def artefact_set(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """``pixq compile`` on the CPU: (root, set folder, seconds it took)."""
    root = tmp_path_factory.mktemp("artefacts")
    t0 = time.perf_counter()
    done = subprocess.run(pixq_argv("compile", "--model", tiny_model, "--out", str(root), "--size", f"{SIZE}x{SIZE}",
                                    "--max-batch", str(BATCH)),
                          capture_output=True, text=True, timeout=1500,
                          env={**env_without_pixq(), "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    return root, Path(done.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def _request(mode: str = "exact", size: int = SIZE, **extra: Any) -> JobRequest:
    return JobRequest.model_validate({"prompt": "a red cube on a blue sphere", "width": size, "height": size,
                                      "seed": 5, "num_inference_steps": 6, "mode": mode, **extra})


def _pixels(loaded: Any, request: JobRequest) -> Any:
    from pixq.worker.gpu.render import render

    return np.asarray(render(loaded, request)[0]).astype(np.int16)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pixq_compile_writes_a_versioned_set_without_the_weights(
    artefact_set: tuple[Path, Path, float], tiny_model: str,
) -> None:
    import diffusers
    import torch

    root, folder, _ = artefact_set
    assert folder.parent == root and folder.name.startswith("pixart-cpu-float32-torch")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["key"]["torch"] == torch.__version__ and manifest["key"]["diffusers"] == diffusers.__version__
    assert manifest["key"]["device_kind"] == "cpu" and manifest["key"]["dtype"] == "float32"
    assert manifest["sizes"] == [[SIZE, SIZE]]
    # Each package was loaded in a fresh process before the set was put in place (loadcheck).
    assert manifest["key"]["format"] == 3 and manifest["load_check_s"] > 0
    assert {(g["component"], g["width"], g["height"]) for g in manifest["graphs"]} == {
        ("transformer", SIZE, SIZE), ("vae", SIZE, SIZE)}
    for graph in manifest["graphs"]:
        # The transformer's rows reach the full batch's guided rows; the decoder's, its images (at least 8).
        assert graph["max_rows"] == (2 * BATCH if graph["component"] == "transformer" else 8) and graph["constants"]
        names = zipfile.ZipFile(folder / graph["file"]).namelist()
        # Code only: no serialized weights inside (they stay in the model's safetensors).
        assert not [n for n in names if "/data/weights/" in n or "/data/constants/" in n], names
    # Once per model: a second run finds the set and builds nothing.
    t0 = time.perf_counter()
    again = subprocess.run(pixq_argv("compile", "--model", tiny_model, "--out", str(root), "--size", f"{SIZE}x{SIZE}",
                                     "--max-batch", str(BATCH)),
                           capture_output=True, text=True, timeout=600, env=env_without_pixq())
    assert again.returncode == 0 and again.stdout.strip() == str(folder), again.stderr[-2000:]
    assert "up to date" in again.stderr
    assert time.perf_counter() - t0 < artefact_set[2]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_matching_set_serves_every_mode_without_compiling(artefact_set: tuple[Path, Path, float],
                                                            tiny_model: str) -> None:
    import torch._dynamo.utils
    from pixq.worker.gpu.pipeline import PipelineOptions, load_pipeline
    from pixq.worker.gpu.speedups import SpeedupOptions

    counters = torch._dynamo.utils.counters
    before = (dict(counters["stats"]), dict(counters["frames"]))
    loaded = load_pipeline(tiny_model, "cpu", PipelineOptions(speedups=SpeedupOptions(compile=True),
                                                               artefacts=str(artefact_set[0])))
    assert loaded.artefacts is not None and loaded.artefacts.folder == artefact_set[1]
    assert loaded.speedups is not None
    assert loaded.warmed == [f"{SIZE}x{SIZE}/exact", f"{SIZE}x{SIZE}/fast"]  # before serving, nothing compiled
    loaded.speedups.gate.serving = True
    for mode in ("exact", "fast"):
        calls = [g.calls for g in loaded.artefacts.graphs()]
        aot = _pixels(loaded, _request(mode))
        assert all(after > b for after, b in zip([g.calls for g in loaded.artefacts.graphs()], calls, strict=True))
        with loaded.speedups.eager():
            eager = _pixels(loaded, _request(mode))
        assert np.abs(aot - eager).max() <= 1, mode
    assert (dict(counters["stats"]), dict(counters["frames"])) == before  # dynamo traced nothing
    assert loaded.speedups.gate.eager_calls == 0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_full_batch_runs_on_the_set_and_is_warmed_before_serving(artefact_set: tuple[Path, Path, float],
                                                                    tiny_model: str) -> None:
    """The set's graphs cover the full batch (``--max-batch``): the warm-up renders one on them, and a served
    batch in either mode runs them (nothing eager), each image as its job alone up to the compile tolerance."""
    import torch._dynamo.utils
    from pixq.worker.gpu.batch import BatchPolicy, render_batch
    from pixq.worker.gpu.pipeline import PipelineOptions, load_pipeline
    from pixq.worker.gpu.speedups import SpeedupOptions

    counters = torch._dynamo.utils.counters
    before = dict(counters["stats"])
    loaded = load_pipeline(tiny_model, "cpu", PipelineOptions(speedups=SpeedupOptions(compile=True),
                                                           artefacts=str(artefact_set[0]),
                                                           batch=BatchPolicy(max_batch=BATCH, by_size=False)))
    assert loaded.artefacts is not None and loaded.artefacts.batch_of(SIZE, SIZE) == BATCH
    assert loaded.speedups is not None
    transformer = next(iter(loaded.artefacts.transformer.values()))
    warm_calls = sum(g.calls for g in transformer)
    assert warm_calls >= 2 * 2 * 2  # 2 steps, exact and fast, one image and the full batch
    loaded.speedups.gate.serving = True
    for mode in ("exact", "fast"):
        requests = [_request(mode, seed=20 + i, prompt=f"a cube number {i}") for i in range(BATCH)]
        calls = sum(g.calls for g in transformer)
        images = render_batch(loaded, requests)
        # Exact: one call a step, all six on the graph; fast: fewer (its plan reuses some steps).
        assert (sum(g.calls for g in transformer) - calls == 6) if mode == "exact" else sum(
            g.calls for g in transformer) > calls
        alone = _pixels(loaded, requests[2])
        assert np.abs(np.asarray(images[2][0]).astype(np.int16) - alone).max() <= 1, mode
    assert loaded.speedups.router.batched_eager_calls == 0 and loaded.speedups.gate.eager_calls == 0
    assert dict(counters["stats"]) == before  # dynamo traced nothing


LOAD_PROBE = """
import json, sys, time
from pixq.worker.gpu.pipeline import PipelineOptions, load_pipeline
import torch._inductor.cpu_vec_isa as isa
loaded = load_pipeline(sys.argv[1], "cpu", PipelineOptions(artefacts=sys.argv[2]))
print(json.dumps({"graphs": len(loaded.artefacts.graphs()) if loaded.artefacts else 0,
                  "package_s": [g.timings["package"] for g in loaded.artefacts.graphs()] if loaded.artefacts else [],
                  "isa_probes": isa.valid_vec_isa_list.cache_info().currsize}))
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_fresh_worker_loads_the_packages_without_probing_the_cpu(artefact_set: tuple[Path, Path, float],
                                                                   tiny_model: str) -> None:
    """A new process loads each package in milliseconds: no ``aoti_load_package`` device check, whose CPU-ISA
    probe (ten child Pythons; on torch 2.11 each imports torch) took 47.8 s of an H200 start."""
    import sys

    done = subprocess.run([sys.executable, "-c", LOAD_PROBE, tiny_model, str(artefact_set[0])], capture_output=True,
                          text=True, timeout=600, env=env_without_pixq())
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["graphs"] == 2 and out["isa_probes"] == 0, out
    assert max(out["package_s"]) < 0.5, out  # 2.2 s for the first with aoti_load_package on this machine


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_shape_without_a_graph_runs_eager_and_matches_the_eager_pipeline(
    artefact_set: tuple[Path, Path, float], tiny_model: str,
) -> None:
    import torch._dynamo.utils
    from pixq.worker.gpu.pipeline import PipelineOptions, load_pipeline
    from pixq.worker.gpu.speedups import SpeedupOptions

    loaded = load_pipeline(tiny_model, "cpu", PipelineOptions(speedups=SpeedupOptions(compile=True),
                                                               artefacts=str(artefact_set[0])))
    assert loaded.speedups is not None
    loaded.speedups.gate.serving = True
    plain = load_pipeline(tiny_model, "cpu")
    unique = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
    odd = _request("exact", size=384, use_resolution_binning=False)  # no graph for 384²
    assert np.array_equal(_pixels(loaded, odd), _pixels(plain, odd))
    assert loaded.speedups.gate.eager_calls > 0
    assert torch._dynamo.utils.counters["stats"].get("unique_graphs", 0) == unique


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_stale_or_damaged_set_is_refused_with_one_line(
    artefact_set: tuple[Path, Path, float], tiny_model: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    from pixq.worker.gpu.pipeline import PipelineOptions, load_pipeline

    root, folder, _ = artefact_set
    stale_root = tmp_path / "stale"
    shutil.copytree(folder, stale_root / folder.name)
    manifest_path = stale_root / folder.name / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["key"]["torch"] = "2.10.0"
    manifest_path.write_text(json.dumps(manifest))
    plain = load_pipeline(tiny_model, "cpu")
    with caplog.at_level(logging.WARNING, logger="pixq.worker.gpu.pipeline"):
        loaded = load_pipeline(tiny_model, "cpu", PipelineOptions(artefacts=str(stale_root)))
    assert loaded.artefacts is None
    (line,) = [r.getMessage() for r in caplog.records if "compiled artefacts not used" in r.getMessage()]
    assert "torch: '2.10.0' ->" in line and "running eager" in line
    assert np.array_equal(_pixels(loaded, _request()), _pixels(plain, _request()))
    # A package that does not match its manifest is never loaded.
    damaged_root = tmp_path / "damaged"
    shutil.copytree(folder, damaged_root / folder.name)
    package = damaged_root / folder.name / "transformer-256x256.pt2"
    package.write_bytes(package.read_bytes()[:-10])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pixq.worker.gpu.pipeline"):
        loaded = load_pipeline(tiny_model, "cpu", PipelineOptions(artefacts=str(damaged_root)))
    assert loaded.artefacts is None
    assert any("does not match its manifest" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_worker_process_is_ready_on_the_set_and_serves_an_unlisted_size(
    artefact_set: tuple[Path, Path, float], tiny_model: str, s3: Any, tmp_path: Path,
) -> None:
    from pixq.client import Client
    from pixq.settings import Settings
    from pixq.wire import WORKER_KEY_PREFIX

    from tests.services import free_port, start_redis

    # Its own Redis: on the session's Redis the session worker (tests/conftest.py) serves the same
    # model queue and may take the 384² job, and this worker's eager count would then stay 0.
    redis_svc, redis_url = start_redis(tmp_path / "redis")
    env = stack_env(redis_url, s3, tiny_model, PIXQ_S3_PREFIX="artefacts")
    port = free_port()
    log = tmp_path / "worker.log"
    svc = start_worker(env, tiny_model, log, name="cpu-aot@test", timeout_s=240,
                       extra=("--compile", "--artefacts", str(artefact_set[0]), "--warmup", f"{SIZE}x{SIZE}",
                              "--metrics-port", str(port)))
    client = Client(Settings.from_env(env))
    try:
        (presence,) = [json.loads(client.conn.get(k) or "{}") for k in client.conn.scan_iter(WORKER_KEY_PREFIX + "*")
                       if json.loads(client.conn.get(k) or "{}").get("pid") == svc.pid]
        assert presence["artefacts"] == artefact_set[1].name
        assert {"import_s", "weights_s", "graphs_s", "warmup_s"} <= set(presence["start_phases_s"])
        text = log.read_text()
        assert "compiled artefacts: 2 graphs" in text and "warm-up 256x256 fast" in text
        jobs = [client.submit("a cube", width=SIZE, height=SIZE, num_inference_steps=4, mode=mode)
                for mode in ("exact", "fast")]
        jobs.append(client.submit("a cube", width=384, height=384, num_inference_steps=4, use_resolution_binning=False))
        records = [client.wait(j.id, timeout_s=240) for j in jobs]
        assert [r.state.value for r in records] == ["succeeded"] * 3
        assert {r.worker for r in records} == {"cpu-aot@test"}  # none went to another worker
        samples = wait_for(lambda: (s := parse(scrape(port))) and s, 10, "metrics")
        assert value(samples, "pixq_worker_aot_graphs", model=tiny_model) == 2
        assert (value(samples, "pixq_worker_uncompiled_calls", model=tiny_model) or 0) > 0  # the 384² job
        assert (value(samples, "pixq_worker_start_seconds", model=tiny_model, phase="ready") or 0) > 0
        assert svc.alive()
    finally:
        svc.stop()
        redis_svc.stop()
