"""A Python environment that holds only what the worker image installs, made from a host's packages.

A benchmark host may hold many more packages than ``docker/Dockerfile.worker`` installs, and
transformers and diffusers import what they find: on the H200 host (2026-12-01) a worker's imports
pulled in scipy, pandas, scikit-learn, torchvision, torchaudio, peft and pyarrow, 5,300 modules where
the image's imports are 3,400. That host also sets ``PYTHONDONTWRITEBYTECODE`` and its torch has no
bytecode, so every new process compiled torch from source (``builtins.compile``: 7.5 of 22.9 s).
Neither is true of the image: pip writes bytecode when it installs, and only the worker's dependency
closure is there. To time the image's start on such a host, this builds a venv whose site-packages
links the host's site-packages less what only distributions outside that closure own (the closure of
pixart-queue's and pixart-queue-worker's dependencies, resolved on the host's ``sys.path``), and writes
the bytecode of the modules a worker imports, as pip would have. (A first version linked only the
closure's own entries: AOTInductor's package loader crashed in it, 2026-12-01; unowned files stay now.)

    python3 -m benchmarks.leanenv /tmp/lean      # prints /tmp/lean/bin/python3
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent
IMPORTS = ("import pixq.cli, pixq.worker.ops.cli, pixq.worker.ops.serve, pixq.worker.jobs.tasks, torch; "
           "from diffusers import PixArtSigmaPipeline; import torch._inductor.package.package")


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def requirements(pyproject: Path) -> list[str]:
    return list(tomllib.loads(pyproject.read_text())["project"].get("dependencies", []))


def closure(roots: list[str]) -> dict[str, md.Distribution]:
    """Every installed distribution the requirement strings need (extras off; other markers evaluated)."""
    from packaging.requirements import Requirement

    found: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = _name(req.name)
        if key in found or key == "pixart-queue":  # ours: on PYTHONPATH, from the checkout
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            print(f"leanenv: {req.name} is not installed here; skipped", file=sys.stderr)
            continue
        found[key] = dist
        todo.extend(dist.requires or [])
    return found


def top_level(dist: md.Distribution) -> set[Path]:
    """The site-packages entries a distribution owns: its packages, modules, .libs and .dist-info."""
    site = Path(str(dist.locate_file(""))).resolve()
    entries: set[Path] = set()
    for file in dist.files or []:
        parts = Path(str(file)).parts
        if parts and parts[0] != ".." and not str(file).startswith("/"):
            entries.add(site / parts[0])
    return entries


def owners() -> dict[Path, set[str]]:
    """Each site-packages entry on this host's path -> the distributions that own it."""
    owned: dict[Path, set[str]] = {}
    for dist in md.distributions():
        name = _name(dist.metadata["Name"] or "")
        for entry in top_level(dist):
            owned.setdefault(entry, set()).add(name)
    return owned


def place(entry: Path, link: Path, hardlink: bool) -> None:
    """``link`` as ``entry``: a symbolic link, or with ``hardlink`` a tree of hard links (real folders, the same
    files: no symbolic link on any path; a copy where the two are on different filesystems)."""
    if not hardlink:
        link.symlink_to(entry)
        return

    def link_file(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if entry.is_dir():
        shutil.copytree(entry, link, symlinks=True, copy_function=link_file)
    else:
        link_file(str(entry), str(link))


def build(target: Path, hardlink: bool = False) -> Path:
    """The venv at ``target``: every entry of this host's site-packages (and of ``PYTHONPATH``'s kit folders)
    except those owned only by distributions outside the worker's closure. Entries no distribution owns
    (``.pth`` files, libraries a package placed beside itself) stay, as they would in the image."""
    python = target / "bin" / "python3"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    roots = requirements(REPO / "pyproject.toml") + requirements(REPO / "worker" / "pyproject.toml")
    keep = set(closure(roots)) | {"pixart-queue", "pixart-queue-worker"}
    owned = owners()
    folders = [Path(p).resolve() for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != REPO
               and Path(p).resolve() not in (REPO / "producer", REPO / "worker") and "python3" not in Path(p).name
               and not Path(p).resolve().is_relative_to(Path(sys.base_prefix) / "lib")]
    linked, left = 0, []
    for folder in folders:
        for entry in sorted(folder.iterdir()):
            names = owned.get(entry)
            if names is not None and not names & keep:
                left.append(entry.name)
                continue
            link = site / entry.name
            if not link.exists() and not link.is_symlink():
                place(entry, link, hardlink)
                linked += 1
    # The bytecode pip would have written: import what a worker imports once, allowed to write it.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (REPO, REPO / "producer", REPO / "worker"))
    done = subprocess.run([str(python), "-c", IMPORTS], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"leanenv: the worker's imports fail in {target}: {done.stderr.strip()[-800:]}")
    print(f"leanenv: {len(keep)} distributions kept, {linked} entries linked into {site}; left out "
          f"{len(left)}: {' '.join(e for e in left if not e.endswith('-info'))[:1500]}", file=sys.stderr)
    return python


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", type=Path)
    p.add_argument("--hardlink", action="store_true",
                   help="real folders of hard-linked files instead of symbolic links (AOTInductor's package "
                        "loader crashed in the symbolic-link venv on the H200 host, 2026-12-01)")
    args = p.parse_args(argv)
    print(build(args.target, args.hardlink))
    return 0


if __name__ == "__main__":
    sys.exit(main())
