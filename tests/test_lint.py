"""The code stays ruff- and mypy-clean (docs/style.md): checked like any other test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=240)


def test_ruff_is_clean() -> None:
    out = run("ruff", "check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow  # mypy over the whole code: minutes without its cache
def test_mypy_is_clean() -> None:
    out = run("mypy", "producer/pixq", "worker/pixq")
    assert out.returncode == 0, out.stdout + out.stderr


def test_import_contracts_are_kept() -> None:
    """.importlinter: the light package never imports pixq.worker nor torch; the producer's layers (every module
    of pixq declared: worker | api | commands > console > client > the job record > schema | settings > errors);
    the API's factory > routes > their state; worker layers ops > jobs > gpu; no import cycle anywhere."""
    out = subprocess.run([sys.executable, "scripts/lint_imports.py", "--no-cache"], cwd=REPO, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    # grimp saw both folders of pixq (scripts/lint_imports.py): the layers contract is about real modules.
    assert "Contracts: 7 kept, 0 broken." in out.stdout, out.stdout
