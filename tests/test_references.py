"""Every reference in the docs, docstrings and scripts resolves inside the repository.

A file path a page or a docstring names exists; nothing points outside the checkout (a developer's machine path,
the steering repo's ``../shared``); an issue number that a file cites is listed in docs/issues.md, the index that
stands in for the tracker, which the repository does not contain.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PATH = re.compile(r"(?<![\w./-])((?:producer|worker|tests|benchmarks|docs|scripts|infra|docker|requirements)/"
                  r"[A-Za-z0-9_./-]*[A-Za-z0-9_]\.(?:py|md|sh|json|ya?ml|toml|txt|c))\b")
ISSUE = re.compile(r"\b[Ii]ssues? #?(\d+)\b")
OUTSIDE = re.compile(r"\.\./shared|/work/|/home/\w+/")
# Paths that are outputs a run writes (not in git by design) or placeholders in instructions.
NOT_FILES = re.compile(r"^tests/artifacts/|NAME|lock-py3\.99")


def text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    return [REPO / f for f in listed if f.endswith((".md", ".py", ".sh")) and not f.startswith("benchmarks/results/")
            and (REPO / f).is_file()]


def lines() -> list[tuple[str, int, str]]:
    return [(str(p.relative_to(REPO)), n, line) for p in text_files()
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)]


def test_named_files_exist() -> None:
    missing = [f"{where}:{n}: {m[1]}" for where, n, line in lines() for m in PATH.finditer(line)
               if not NOT_FILES.search(m[1]) and not (REPO / m[1]).exists()]
    assert missing == []


def test_nothing_points_outside_the_repository() -> None:
    outside = [f"{where}:{n}: {line.strip()}" for where, n, line in lines()
               if OUTSIDE.search(line) and where != "tests/test_references.py"]
    assert outside == []


def test_every_cited_issue_is_in_the_index() -> None:
    index = (REPO / "docs" / "issues.md").read_text()
    listed = set(re.findall(r"^\| (\d+) \|", index, flags=re.M))
    cited = {(m[1], f"{where}:{n}") for where, n, line in lines() for m in ISSUE.finditer(line)}
    assert {f"{where}: issue {number}" for number, where in cited if number not in listed} == set()


def test_markdown_links_resolve() -> None:
    broken = []
    for page in [p for p in text_files() if p.suffix == ".md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+:", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert broken == []
