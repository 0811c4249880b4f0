"""`pixq up` and `pixq demo`: what a newcomer runs first."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from PIL import Image

from tests.support import wait_for

pytestmark = pytest.mark.slow  # whole stacks (pixq demo, pixq up) started and stopped


def children_of(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def services_under(root: Path) -> list[psutil.Process]:
    """Processes whose command line mentions the stack's directory (redis, weed, worker, flower)."""
    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            text = " ".join(p.info["cmdline"] or []) + " ".join((p.info["environ"] or {}).values())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if str(root) in text and p.pid != os.getpid():
            found.append(p)
    return found


def test_demo_runs_the_main_job_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pixq", "demo", "A cozy cabin in the snow", "--dir", str(tmp_path / "state"),
         "-o", str(tmp_path / "out"), "--size", "256"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "random" in out.stderr  # says plainly that the tiny model draws noise
    job_id = re.search(r"^job\s+([0-9a-f]{32})$", out.stdout, re.M).group(1)  # type: ignore[union-attr]
    assert re.search(rf"^s3 key\s+pixq/{job_id}/0.png$", out.stdout, re.M)
    url = re.search(r"^url\s+(http://127\.0\.0\.1:\d+/\S+)$", out.stdout, re.M)
    assert url and "Expires=" in url.group(1)
    saved = tmp_path / "out" / f"{job_id}-0.png"
    with Image.open(saved) as png:
        assert png.size == (256, 256)
    assert services_under(tmp_path / "state") == []  # everything stopped


def test_up_starts_everything_and_ctrl_c_stops_it_cleanly(tmp_path: Path) -> None:
    root = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-m", "pixq", "up", "--dir", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 180
        while not any("Ctrl-C stops everything" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines) + proc.stderr.read()
            lines.append(proc.stdout.readline())
        text = "".join(lines)
        exports = dict(re.findall(r"export (\w+)='([^']*)'", text))
        assert set(exports) >= {"PIXQ_REDIS_URL", "PIXQ_S3_ENDPOINT_URL", "PIXQ_S3_BUCKET", "PIXQ_MODEL",
                                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        flower = re.search(r"Flower: (http://127\.0\.0\.1:\d+/)\s+\(user (\S+), password (\S+)\)", text)
        assert flower
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(flower.group(1), timeout=5)
        assert denied.value.code == 401
        denied.value.close()

        env = {**os.environ, **exports}
        sub = subprocess.run([sys.executable, "-m", "pixq", "submit", "hello", "--width", "128",
                              "--height", "128", "--steps", "3", "--wait", "--json"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0 and '"state": "succeeded"' in sub.stdout, sub.stderr

        # The HTTP API, with a ready-to-paste curl line and a key that works.
        api = re.search(r"Bearer (pixq_\S+)' .* -d '(\{.*\})' (http://127\.0\.0\.1:\d+)/v1/jobs", text)
        assert api, text
        req = urllib.request.Request(api.group(3) + "/v1/jobs", data=api.group(2).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {api.group(1)}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as created:
            assert created.status == 201

        # Owner-only on disk: the folder, Redis's AOF (job records), SeaweedFS's data (the images), the
        # logs and the API key pepper (issue 23, item 7).
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        for data in (root / "redis", root / "s3"):
            # weed writes its volumes' .vif (layout, no image data) 0644 whatever the umask: in a 0700 folder.
            assert any(data.rglob("*")) and [
                f"{p} {stat.filemode(p.stat().st_mode)}" for p in [data, *data.rglob("*")]
                if p.stat().st_mode & 0o077 and p.suffix != ".vif"
            ] == []
        assert any((root / "redis").glob("appendonlydir/*.aof"))
        for private in [root / "api-pepper", *root.glob("*.log")]:
            assert stat.S_IMODE(private.stat().st_mode) == 0o600, private

        started = children_of(proc.pid)
        assert len(started) >= 5  # redis, weed, worker, flower, api
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert "stopped." in proc.stderr.read()

        def alive() -> list[int]:
            return [p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]

        wait_for(lambda: not alive(), 10, "every process pixq up started to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
