"""A new user's service installs the light distribution from its wheel and submits a job.

The service has its own ``producer.py`` and ``worker.py`` (the names the package had before ``pixq``):
nothing of ours may shadow them, and ``pip install pixart-queue`` must bring neither torch nor worker code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment

SERVICE = r'''
import json, os, sys
import producer, worker                    # the service's own modules
from pixq import Client, Settings

assert producer.KIND == "kafka" and worker.KIND == "cron", (producer.__file__, worker.__file__)
client = Client(Settings.from_env(os.environ))
job = client.submit("a new user's first job", width=128, height=128, num_inference_steps=2, seed=5)
record = job.wait(timeout_s=120)
client.close()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers")
                or m.startswith("pixq.worker"))
print(json.dumps({"state": record.state.value, "images": len(record.images), "heavy": loaded}))
'''


def run(*argv: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload]
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out


def test_a_service_with_its_own_producer_and_worker_modules_installs_the_wheel_and_submits(
    tmp_path: Path, env: dict[str, str], worker: object
) -> None:
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, REPO)
    (wheel,) = wheels.glob("pixart_queue-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        meta = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "pixq/client.py" in names
    assert not [n for n in names if n.startswith(("pixq/worker", "producer/", "worker/"))], names
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert requires and not [r for r in requires if "torch" in r or "diffusers" in r], requires

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel)
    installed = {p["name"].lower() for p in json.loads(run(venv / "bin" / "python", "-m", "pip", "list",
                                                            "--format", "json").stdout)}
    assert "pixart-queue" in installed
    assert not installed & {"torch", "diffusers", "transformers", "pixart-queue-worker"}, installed

    service = tmp_path / "service"
    service.mkdir()
    (service / "producer.py").write_text('KIND = "kafka"\n')
    (service / "worker.py").write_text('KIND = "cron"\n')
    (service / "main.py").write_text(SERVICE)
    child_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    child_env["PATH"] = f"{venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    out = run(venv / "bin" / "python", "main.py", cwd=service, env=child_env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"state": "succeeded", "images": 1, "heavy": []}, result

    # Without the api extra, --help names the extra to install (rich once read "[api]" as markup and
    # printed "pip install pixart-queue", installed already), and its commands say the same.
    listed = run(venv / "bin" / "pixq", "--help", env={**child_env, "COLUMNS": "200"})
    assert "Not installed: pip install 'pixart-queue[api]'" in listed.stdout, listed.stdout
    keys = subprocess.run([venv / "bin" / "pixq", "keys", "list"], env=child_env, capture_output=True, text=True,
                          timeout=60)
    assert keys.returncode == 9 and "pip install 'pixart-queue[api]'" in keys.stderr, keys.stderr
