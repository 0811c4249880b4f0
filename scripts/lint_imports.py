"""``lint-imports`` (import-linter, contracts in .importlinter) over both folders of the package pixq.

pixq is one package in two folders: producer/pixq (the light library, a regular package whose
``__init__`` calls ``pkgutil.extend_path``) and worker/pixq/worker (distribution pixart-queue-worker).
grimp asks ``importlib.util.find_spec("pixq")`` for the package's folders and so sees producer/pixq
only: in an editable install ``pixq.worker`` is found by setuptools' editable finder, and
``pixq.worker`` cannot be a root of its own (grimp refuses a sub-package of a regular package).
Installed non-editable, both halves share one ``site-packages/pixq`` and plain ``lint-imports``
sees everything. This script gives grimp the same view of this checkout without running any of
pixq (a broken import must fail the contracts, not this script): ``pixq``'s spec, unexecuted,
lists both folders, and import-linter's own CLI runs with it.

    python scripts/lint_imports.py [lint-imports options]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = (REPO / "producer" / "pixq", REPO / "worker" / "pixq")


def show_both_folders() -> None:
    spec = importlib.util.find_spec("pixq")  # a top-level name: found, not imported
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != FOLDERS[0]:
        found = spec.origin if spec is not None else "nothing"
        raise SystemExit(f"lint_imports: pixq resolves to {found}, not {FOLDERS[0]} (run with this checkout's venv)")
    spec.submodule_search_locations = [str(f) for f in FOLDERS]
    # grimp's importlib.util.find_spec("pixq") answers from sys.modules: the module is never executed.
    sys.modules["pixq"] = importlib.util.module_from_spec(spec)


def main() -> int:
    show_both_folders()
    from importlinter.cli import lint_imports_command

    return int(lint_imports_command.main(args=sys.argv[1:], standalone_mode=False) or 0)


if __name__ == "__main__":
    sys.exit(main())
