"""The test environment's lock: ``requirements/lock-py<X.Y>.txt``, one per Python the project tests on.

A lock is a pip *constraints* file (``name==version`` lines): ``scripts/setup.sh`` installs the project with
``-c`` on it, so CI, the demo and a developer's ``.venv`` get the versions the suite last passed with, while the
published libraries keep their open ranges (pyproject.toml, worker/pyproject.toml) for users.

It is written by ``scripts/lock.sh`` from a venv that pip resolved to the newest versions the ranges allow and
that then passed the not-slow tier and mypy: ``pip freeze`` of exactly what was tested, not a second resolver's
guess (uv and pip-tools do not see the CPU build of torch this machine keeps on disk). No hashes: pip's
hash-checking mode refuses editable installs, which the checkout's set-up is.

    python scripts/lockfile.py check [LOCK]      # every pyproject requirement is locked inside its range
    python scripts/lockfile.py versions [LOCK]   # the tested set, one line (setup.sh prints it in CI's log)
    python scripts/lockfile.py write LOCK        # freeze this interpreter's environment into LOCK
    python scripts/lockfile.py installed         # the same line for this interpreter's environment
    python scripts/lockfile.py path              # the lock for this interpreter (may not exist)

Exit codes: 0 fine, 1 a check failed (each problem one line on stderr), 2 usage or an unreadable file.
"""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import cast

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PYPROJECTS = (REPO / "pyproject.toml", REPO / "worker" / "pyproject.toml")
OWN = {"pixart-queue", "pixart-queue-worker"}
# What the README's "Tested with" line and the CI log name (the lock holds everything).
HEADLINE = ("torch", "diffusers", "transformers", "celery", "kombu", "redis", "pydantic", "fastapi", "uvicorn",
            "boto3", "flower", "mypy")


class LockError(Exception):
    """A lock or pyproject that cannot be read; the message is the one line shown."""


def lock_path(version: tuple[int, int] | None = None) -> Path:
    major, minor = version or sys.version_info[:2]
    return REPO / "requirements" / f"lock-py{major}.{minor}.txt"


def read_lock(path: Path) -> dict[str, Version]:
    """``{canonical name: version}`` of a lock; a malformed line raises ``LockError`` naming it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise LockError(f"{path}: {exc.strerror or exc}") from None
    pins: dict[str, Version] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not match:
            raise LockError(f"{path}:{number}: {raw!r} is not name==version")
        pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def requirements(pyprojects: tuple[Path, ...] = PYPROJECTS) -> list[tuple[str, Requirement]]:
    """Every requirement of the projects, their extras included: ``(where, requirement)``."""
    import tomllib  # Python 3.11+: the lock tools run where the locks are made (setup.sh needs none of this)

    found: list[tuple[str, Requirement]] = []
    for path in pyprojects:
        try:
            project = tomllib.loads(path.read_text())["project"]
        except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
            raise LockError(f"{path}: cannot read [project] ({exc})") from None
        groups = {"dependencies": project.get("dependencies", [])}
        groups |= {f"[{name}]": deps for name, deps in project.get("optional-dependencies", {}).items()}
        for group, deps in groups.items():
            for spec in deps:
                try:
                    found.append((f"{path.relative_to(REPO)} {group}", Requirement(spec)))
                except InvalidRequirement as exc:
                    raise LockError(f"{path}: {spec!r}: {exc}") from None
    return found


def disagreements(pins: dict[str, Version], reqs: list[tuple[str, Requirement]],
                  python: tuple[int, int]) -> list[str]:
    """Each requirement (for ``python``) that the lock leaves out or pins outside its range, one line each."""
    env: dict[str, str] = {**cast(dict[str, str], default_environment()), "python_version": f"{python[0]}.{python[1]}",
           "python_full_version": f"{python[0]}.{python[1]}.0"}
    problems = []
    for where, req in reqs:
        name = canonicalize_name(req.name)
        if name in OWN or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        if name not in pins:
            problems.append(f"{where}: {req} is not in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{where}: {req} but the lock has {req.name}=={pins[name]}")
    return problems


def headline(pins: dict[str, Version]) -> str:
    return ", ".join(f"{name} {pins[name]}" for name in HEADLINE if name in pins)


def installed() -> dict[str, Version]:
    """``{canonical name: version}`` of this interpreter's distributions (local build labels dropped)."""
    from importlib.metadata import distributions

    found: dict[str, Version] = {}
    for dist in distributions():  # in sys.path order: the first of a name is the one that imports
        found.setdefault(canonicalize_name(dist.metadata["Name"]), Version(dist.version.split("+", 1)[0]))
    return found


def freeze() -> list[str]:
    """This interpreter's installed distributions (the project's own editable ones left out)."""
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                         capture_output=True, text=True, check=True).stdout
    lines = []
    for line in out.splitlines():
        if "==" not in line or canonicalize_name(line.split("==")[0]) in OWN:
            continue
        name, version = line.split("==", 1)
        # torch's local label (+cpu, +cu128) names the build, not the release: the lock pins the release and
        # setup.sh's index decides the build.
        lines.append(f"{name}=={version.split('+', 1)[0]}")
    return sorted(lines, key=str.lower)


def write(path: Path) -> None:
    python = ".".join(map(str, sys.version_info[:3]))
    header = [f"# The test environment pixart-queue's suite passed with: Python {python}, {date.today().isoformat()}.",
              "# Written by scripts/lock.sh (re-resolve, test, freeze); used by scripts/setup.sh as pip constraints.",
              "# Do not edit by hand: tests/test_lock.py checks it against both pyproject.toml files."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*header, *freeze()]) + "\n")


def main(argv: list[str]) -> int:
    command, *rest = argv or ["?"]
    try:
        if command == "path" and not rest:
            print(lock_path().relative_to(REPO))
            return 0
        if command == "installed" and not rest:
            print(headline(installed()))
            return 0
        if command == "write" and len(rest) == 1:
            write(Path(rest[0]))
            return 0
        if command in ("check", "versions") and len(rest) <= 1:
            path = Path(rest[0]) if rest else lock_path()
            pins = read_lock(path)
            if command == "versions":
                print(headline(pins))
                return 0
            match = re.search(r"py(\d+)\.(\d+)", path.name)
            python = (int(match[1]), int(match[2])) if match else sys.version_info[:2]
            problems = disagreements(pins, requirements(), python)
            for problem in problems:
                print(f"lock: {path.name}: {problem}", file=sys.stderr)
            return 1 if problems else 0
    except LockError as exc:
        print(f"lock: {exc}", file=sys.stderr)
        return 2
    print("usage: lockfile.py check [LOCK] | versions [LOCK] | installed | write LOCK | path", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
