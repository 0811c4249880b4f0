"""The tests are organised as the code is (docs/style.md, "Tests shaped like the code").

Fixtures live in ``tests/conftest.py`` and the plugins under ``tests/fixtures/``; plain helpers in
``tests/support.py``, ``tests/services.py`` and ``tests/apitools.py``. No test module imports another test module
nor a conftest, so a reader finds a fixture where pytest finds it and moving one test file breaks no other.
``tests/unit/`` mirrors the ``pixq`` package and starts no process.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import SERVICE_FIXTURES

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PACKAGE_ROOTS = (REPO / "producer" / "pixq", REPO / "worker" / "pixq")


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """Every module ``source`` (a module of ``package``) imports, top level or in a function, relative resolved."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # `from tests import test_x` names a module too.
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(REPO).parent.parts)


def is_test_module(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return (name.startswith("tests.") or "." not in name) and (last.startswith("test_") or last == "conftest")


def test_no_test_module_imports_another() -> None:
    offenders = [f"{path.relative_to(REPO)}:{line}: {name}"
                 for path in sorted(TESTS.rglob("*.py"))
                 for line, name in imported_modules(path.read_text(), package_of(path)) if is_test_module(name)]
    assert offenders == [], "import helpers from tests/support.py; share fixtures through conftest/tests/fixtures"


def test_the_check_sees_each_form_of_such_an_import() -> None:
    source = ("from tests.test_reliability import cluster\nfrom ..conftest import wait_for\nimport tests.conftest\n"
              "from . import test_png\nfrom tests.support import wait_for as w\nfrom tests import apitools\n"
              "def f() -> None:\n    from tests import conftest\n")
    seen = [(line, name) for line, name in imported_modules(source, "tests.unit") if is_test_module(name)]
    assert seen == [(1, "tests.test_reliability"), (2, "tests.conftest"), (3, "tests.conftest"),
                    (4, "tests.unit.test_png"), (8, "tests.conftest")]


def test_the_unit_tier_mirrors_the_package() -> None:
    """Each folder under tests/unit/ is a sub-package of pixq (tests/unit/worker/gpu/ is pixq/worker/gpu/)."""
    folders = [d.relative_to(TESTS / "unit") for d in (TESTS / "unit").rglob("*")
               if d.is_dir() and d.name != "__pycache__"]
    assert folders, "tests/unit/ has sub-packages"
    missing = [str(f) for f in folders if not any((root / f / "__init__.py").is_file() for root in PACKAGE_ROOTS)]
    assert missing == []
    # Packages all the way down: pytest names each module by its path, so test_errors.py may be in two folders.
    assert [str(d) for d in folders if not (TESTS / "unit" / d / "__init__.py").is_file()] == []


def test_the_unit_tier_starts_no_process() -> None:
    """No test under tests/unit/ uses a real Redis, SeaweedFS or worker (a fixture conftest marks ``integration``)
    nor starts a process of its own (the launchers, subprocess)."""
    launchers, services = [], []
    for path in sorted((TESTS / "unit").rglob("*.py")):
        where = path.relative_to(REPO)
        source = path.read_text()
        launchers += [f"{where}:{line}: {name}" for line, name in imported_modules(source, package_of(path))
                      if name.split(".")[0] in ("subprocess", "multiprocessing")
                      or name.startswith(("pixq.worker.ops", "tests.services"))]
        # A test or a fixture of the module that takes a service fixture (by its parameter's name).
        services += [f"{where}:{node.lineno}: {node.name}({arg.arg})" for node in ast.walk(ast.parse(source))
                     if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                     for arg in node.args.args + node.args.kwonlyargs if arg.arg in SERVICE_FIXTURES]
    assert launchers == []
    assert services == []
