"""On a CUDA device only (skipped elsewhere): a real worker on cuda:0, scraped for GPU memory.

Run on the lent GPU machine (docs/performance.md says how the kit is carried):
    python3 -m pytest tests/test_gpu.py -q
"""

from __future__ import annotations

import urllib.request
import uuid
from pathlib import Path

import pytest
from pixq.client import Client
from pixq.records import JobState
from pixq.settings import Settings
from prometheus_client.parser import text_string_to_metric_families

from tests.services import S3Endpoint, free_port, start_worker
from tests.support import stack_env

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_worker_on_cuda_renders_and_reports_gpu_memory(
    tmp_path: Path, redis_url: str, s3: S3Endpoint, tiny_model: str
) -> None:
    port = free_port()
    env = stack_env(redis_url, s3, tiny_model, PIXQ_S3_PREFIX=f"gpu-{uuid.uuid4().hex[:6]}")
    worker = start_worker(env, tiny_model, tmp_path / "worker.log", device="cuda:0", name="gpu0@test",
                          extra=("--metrics-port", str(port)))
    client = Client(Settings.from_env(env))
    try:
        record = client.wait(client.submit("on the GPU", width=256, height=256, num_inference_steps=8,
                                                 seed=3).id, timeout_s=120)
        assert record.state is JobState.succeeded and record.worker == "gpu0@test"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples["pixq_gpu_memory_allocated_bytes"] > 0
        assert samples["pixq_gpu_memory_peak_allocated_bytes"] >= samples["pixq_gpu_memory_allocated_bytes"]
        assert samples["pixq_gpu_memory_reserved_bytes"] > 0
        print({k: v for k, v in samples.items() if k.startswith("pixq_gpu")})
    finally:
        client.close()
        worker.stop()
