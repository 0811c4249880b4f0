"""Command lines for our own child processes: a Python module, or ``pixq`` itself, with this interpreter.

Used by everything that starts a child (``pixq up``'s services, the ``--gpus`` supervisor, Flower):
a module of its own, below each of them.
"""

from __future__ import annotations

import sys


def python_module_argv(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter, without the current directory on the import path.

    ``python -m`` puts the working directory first on ``sys.path``: started from a folder holding a
    ``worker.py``, ``pixq.py`` or ``celery.py``, the child would import that instead. ``-P`` (3.11+)
    leaves it out; on 3.10 a bootstrap drops it before running the module.
    """
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", module, *args]
    bootstrap = f"import runpy, sys; sys.path.pop(0); runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    return [sys.executable, "-c", bootstrap, *args]


def pixq_argv(*args: str) -> list[str]:
    """Run our own CLI with this interpreter (works from a venv without activating it)."""
    return python_module_argv("pixq", *args)
