"""The test environment's lock (requirements/lock-py<X.Y>.txt, scripts/lockfile.py, scripts/setup.sh)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCKFILE = REPO / "scripts" / "lockfile.py"


def lockfile():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("pixq_lockfile", LOCKFILE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_lockfile(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(LOCKFILE), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_the_lock_agrees_with_both_pyprojects() -> None:
    out = run_lockfile("check")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_check_names_each_requirement_the_lock_breaks(tmp_path: Path) -> None:
    """A pin outside its range and a missing requirement each give one line naming it; exit 1."""
    lock = tmp_path / "lock-py3.11.txt"
    lines = (REPO / "requirements" / "lock-py3.11.txt").read_text().splitlines()
    lines = [re.sub(r"^pydantic==.*", "pydantic==1.10.13", line) for line in lines if not line.startswith("boto3==")]
    lock.write_text("\n".join(lines) + "\n")
    out = run_lockfile("check", str(lock))
    assert out.returncode == 1
    problems = out.stderr.splitlines()
    assert any("pydantic<3,>=2.7" in p and "pydantic==1.10.13" in p for p in problems), problems
    assert any("boto3>=1.34 is not in the lock" in p for p in problems), problems
    assert len(problems) == 2, problems


def test_a_malformed_lock_is_one_line_exit_2(tmp_path: Path) -> None:
    lock = tmp_path / "lock-py3.11.txt"
    lock.write_text("celery>=5\n")
    out = run_lockfile("check", str(lock))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.strip() == f"lock: {lock}:1: 'celery>=5' is not name==version"


def test_markers_are_evaluated_for_the_locks_python() -> None:
    module = lockfile()
    from packaging.requirements import Requirement
    from packaging.version import Version

    reqs = [("x", Requirement("tomli>=2; python_version < '3.11'"))]
    assert module.disagreements({}, reqs, (3, 11)) == []
    assert module.disagreements({}, reqs, (3, 10)) == ["x: tomli>=2; python_version < \"3.11\" is not in the lock"]
    assert module.disagreements({"tomli": Version("2.0.1")}, reqs, (3, 10)) == []


@pytest.mark.skipif(os.environ.get("PIXQ_UNLOCKED") == "1", reason="scripts/lock.sh's unlocked venv: newer on purpose")
def test_this_environment_is_the_lock() -> None:
    """setup.sh installed the locked versions: every locked package present here has the locked version."""
    module = lockfile()
    path = module.lock_path()
    if not path.exists():
        pytest.skip(f"no lock for Python {sys.version_info[0]}.{sys.version_info[1]}")
    pins, have = module.read_lock(path), module.installed()
    wrong = {name: (str(pins[name]), str(have[name])) for name in pins if name in have and have[name] != pins[name]}
    assert wrong == {}
    assert {"torch", "diffusers", "celery", "redis", "mypy"} <= pins.keys() & have.keys()


def test_write_freezes_exactly_this_environment(tmp_path: Path) -> None:
    """The lock's last step: what lockfile.py writes is what is installed, and passes the range check."""
    lock = tmp_path / f"lock-py{sys.version_info[0]}.{sys.version_info[1]}.txt"
    assert run_lockfile("write", str(lock)).returncode == 0
    module = lockfile()
    pins, have = module.read_lock(lock), module.installed()
    assert pins == {name: have[name] for name in pins}
    assert "pixart-queue" not in pins and "pixart-queue-worker" not in pins  # the project itself is never locked
    assert run_lockfile("check", str(lock)).returncode == 0


def test_the_readme_names_the_tested_versions() -> None:
    module = lockfile()
    pins = module.read_lock(REPO / "requirements" / "lock-py3.11.txt")
    line = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("Tested with"))
    assert f"Python 3.11, {module.headline(pins)}." in line, (line, module.headline(pins))


def setup_env(**env: str) -> dict[str, str]:
    """The environment of a planning setup.sh: PIXQ_UNLOCKED only where a test sets it (scripts/lock.sh runs the
    suite with it set)."""
    base = {k: v for k, v in os.environ.items() if k not in ("PIXQ_UNLOCKED", "PYTHON", "PIXQ_TORCH_VERSION")}
    return {**base, "PIXQ_SETUP_PLAN": "1", **env}


def plan(profile: str, **env: str) -> dict[str, str]:
    out = subprocess.run(["bash", "scripts/setup.sh", profile], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=setup_env(**env))
    assert out.returncode == 0, out.stderr
    return dict(line.split(": ", 1) for line in out.stdout.splitlines())


def test_the_demo_installs_only_what_the_demo_needs() -> None:
    demo, test = plan("demo"), plan("test")
    assert demo["apt"] == "redis-server" and "chromium" not in demo["apt"]
    assert demo["pip"] == "-e . -e ./worker[stack]"
    assert test["apt"] == "redis-server chromium chromium-driver"
    assert test["pip"] == "-e .[dev,api] -e ./worker[stack]"
    assert demo["lock"] == test["lock"] == "requirements/lock-py3.11.txt"
    assert demo["torch"] == "2.13.0"


def test_setup_without_a_lock_for_its_python_warns_and_goes_unlocked(tmp_path: Path) -> None:
    fake = tmp_path / "python3"  # a Python that says it is 3.99: no lock exists for it
    fake.write_text("#!/bin/sh\necho 3.99\n")
    fake.chmod(0o755)
    out = subprocess.run(["bash", "scripts/setup.sh", "demo"], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=setup_env(PYTHON=str(fake)))
    assert out.returncode == 0, out.stderr
    assert "lock: none" in out.stdout
    assert "no requirements/lock-py3.99.txt" in out.stderr
    assert plan("test", PIXQ_UNLOCKED="1")["lock"] == "none"


def test_setup_refuses_an_unknown_profile() -> None:
    out = subprocess.run(["bash", "scripts/setup.sh", "everything"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stderr.strip()) == (2, "setup.sh: unknown profile 'everything' (test or demo)")
