"""The `pixq` command line as a person or a script uses it (real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image
from pixq.worker.ops.stack import Service


def pixq(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pixq", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_submit_wait_json_download(env: dict[str, str], worker: Service, tmp_path: Path) -> None:
    done = pixq("submit", "A bowl of ramen", "--width", "256", "--height", "128", "--steps", "6",
                "--seed", "11", "--num-images", "2", "--wait", "--json", env=env)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert {"id", "state", "request", "images", "error"} <= set(record)
    assert record["state"] == "succeeded" and record["error"] is None
    assert [(i["seed"], i["width"], i["height"]) for i in record["images"]] == [(11, 256, 128), (12, 256, 128)]
    assert all(i["key"] == f"jobs/{record['id']}/{n}.png" for n, i in enumerate(record["images"]))
    assert "succeeded" in done.stderr and "6/6" in done.stderr  # the progress bar's last state

    status = pixq("status", record["id"], "--json", env=env)
    assert json.loads(status.stdout)["images"] == record["images"]
    human = pixq("status", record["id"], env=env)
    assert "succeeded" in human.stdout and record["id"] in human.stdout

    got = pixq("download", record["id"], "-o", str(tmp_path), env=env)
    assert got.returncode == 0, got.stderr
    assert "image 0" in got.stderr and "image 1" in got.stderr  # the download's progress bars
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == [f"{record['id']}-0.png", f"{record['id']}-1.png"]
    with Image.open(files[0]) as png:
        assert png.size == (256, 128)

    url = pixq("url", record["id"], "--expires-in", "60", env=env)
    assert url.returncode == 0 and url.stdout.startswith("http://127.0.0.1:")


def test_submit_prints_the_id_and_wait_follows_it(env: dict[str, str], worker: Service) -> None:
    sub = pixq("submit", "id only", "--width", "128", "--height", "128", "--steps", "2", env=env)
    assert sub.returncode == 0
    job_id = sub.stdout.strip()
    assert len(job_id) == 32
    waited = pixq("wait", job_id, "--json", env=env)
    assert waited.returncode == 0 and json.loads(waited.stdout)["state"] == "succeeded"


def test_user_mistakes_are_one_line_and_non_zero(env: dict[str, str]) -> None:
    bad = pixq("submit", "x", "--width", "1001", "--steps", "0", env=env)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "error: num_inference_steps: Input should be greater than or equal to 1; "
        "width: must be a multiple of 8 (got 1001)"
    ]
    unknown = pixq("status", "nope", env=env)
    assert unknown.returncode == 1 and unknown.stderr.strip() == "error: no job 'nope' (never submitted, or expired)"
    assert "Traceback" not in bad.stderr + unknown.stderr

    config = pixq("status", "x", env={**env, "PIXQ_REDIS_URL": "http://127.0.0.1:1"})
    assert config.returncode == 2
    assert config.stderr.strip().splitlines() == [
        "error: PIXQ_REDIS_URL: 'http://127.0.0.1:1' must start with redis://, rediss:// (TLS) or unix://"
    ]
    missing = pixq("status", "x", env={k: v for k, v in env.items() if k != "PIXQ_REDIS_URL"})
    assert missing.returncode == 2 and missing.stderr.startswith("error: PIXQ_REDIS_URL is not set")


def test_redis_down_at_submit_is_a_clear_error(env: dict[str, str]) -> None:
    from pixq.worker.ops.stack import free_port

    down = pixq("submit", "x", env={**env, "PIXQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert down.returncode == 1
    assert down.stderr.startswith("error: Redis unreachable, job not submitted")
    assert "Traceback" not in down.stderr


def test_schema_prints_the_request_json_schema(env: dict[str, str]) -> None:
    out = pixq("schema", env=env)
    schema = json.loads(out.stdout)
    assert schema["title"] == "JobRequest" and "prompt" in schema["required"]
    assert schema["properties"]["guidance_scale"]["default"] == 4.5


def test_help_shows_defaults(env: dict[str, str]) -> None:
    out = pixq("submit", "--help", env=env)
    assert out.returncode == 0
    assert "--steps" in out.stdout and "default: 20" in out.stdout


def test_make_test_model_writes_a_loadable_pipeline(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pixq", "make-test-model", str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]


def test_producer_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers', 'pixq.worker'):\n"
        "    sys.modules[name] = None  # any import of these now fails\n"
        "import pixq, pixq.cli, pixq.client, pixq.s3\n"
        "from pixq import Client, Settings, JobRequest\n"
        "assert not any((m.split('.')[0] == 'torch' or m.startswith('pixq.worker')) and sys.modules[m]\n"
        "               for m in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
