"""The README stays short, and what it tells a newcomer to run or read exists.

Checks README.md's length, that every ``make TARGET`` in its fenced code blocks is a Makefile target listed by
``make help``, that every ``python -m MODULE`` there names a module file of this repository (the file is looked
up, never imported), that its relative links point at files, and that every ``docs/*.md`` exists and is linked.
Deliberately not checked: prose outside code blocks (commands named there may be historical), external links.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 320
DOCS = ("design.md", "testing.md", "speed.md", "quantization.md")

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
MAKE = re.compile(r"(?<![\w-])make\s+([A-Za-z][\w-]*)")
PYTHON_M = re.compile(r"(?<![\w-])python\s+-m\s+([A-Za-z_][\w.]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def fenced_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def make_targets_in(blocks: list[str]) -> set[str]:
    """``make X`` in code, where X is not a variable assignment (``make OUT=x`` has no target word)."""
    found = set()
    for block in blocks:
        for m in MAKE.finditer(block):
            if not block[m.end():m.end() + 1] == "=":
                found.add(m.group(1))
    return found


def python_modules_in(blocks: list[str]) -> set[str]:
    return {m.group(1).rstrip(".") for block in blocks for m in PYTHON_M.finditer(block)}


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The file ``python -m module`` would run from the repository root, or None."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def relative_links(text: str) -> set[str]:
    """Link targets that are paths inside the repository: not URLs, not in-page anchors."""
    out = set()
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.add(target.split("#", 1)[0])
    return out


def makefile_targets(root: Path = ROOT) -> set[str]:
    text = (root / "Makefile").read_text()
    targets = set()
    for m in re.finditer(r"^([A-Za-z][\w-]*(?:\s+[A-Za-z][\w-]*)*)\s*:(?!=)", text, re.M):
        targets.update(m.group(1).split())
    return targets


def make_help_targets(root: Path = ROOT) -> set[str]:
    out = subprocess.run(["make", "-s", "help"], cwd=root, capture_output=True, text=True, timeout=60, check=True)
    return {m.group(1) for m in re.finditer(r"^make\s+([A-Za-z][\w-]*)", out.stdout, re.M)}


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text()


def test_readme_is_short(readme):
    n = len(readme.splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines, at most {MAX_LINES}: move detail into docs/"


def test_make_targets_in_code_exist_and_are_in_help(readme):
    used = make_targets_in(fenced_blocks(readme))
    assert used, "no `make TARGET` found in README.md's code blocks (the extraction is broken)"
    missing = sorted(used - makefile_targets())
    assert not missing, f"README.md code blocks run make targets the Makefile lacks: {missing}"
    unlisted = sorted(used - make_help_targets())
    assert not unlisted, f"README.md code blocks run make targets `make help` does not list: {unlisted}"


def test_python_modules_in_code_exist(readme):
    missing = sorted(m for m in python_modules_in(fenced_blocks(readme)) if module_file(m) is None)
    assert not missing, f"README.md code blocks run `python -m` on modules with no file here: {missing}"


def test_relative_links_resolve(readme):
    broken = sorted(t for t in relative_links(readme) if not (ROOT / t).exists())
    assert not broken, f"README.md links to paths that do not exist: {broken}"


@pytest.mark.parametrize("name", DOCS)
def test_each_doc_exists_and_is_linked(readme, name):
    path = ROOT / "docs" / name
    assert path.is_file(), f"docs/{name} is missing"
    assert f"docs/{name}" in relative_links(readme), f"README.md does not link to docs/{name}"


def test_every_doc_is_listed(readme):
    present = {p.name for p in (ROOT / "docs").glob("*.md")}
    unlinked = sorted(n for n in present if f"docs/{n}" not in relative_links(readme))
    assert not unlinked, f"docs/ files the README does not link: {unlinked}"


# The checks must be able to fail: each one on a README that breaks it.
BROKEN = "\n".join([
    "```",
    "make no-such-target OUT=x",
    "make OUT=y",
    "python -m no_such_package.cli --x",
    "python -m runtime",
    "```",
    "[a](docs/missing.md) [b](https://example.com/x) [c](#anchor) [d](Makefile#L3)",
])


def test_the_checks_catch_a_broken_readme():
    blocks = fenced_blocks(BROKEN)
    assert make_targets_in(blocks) == {"no-such-target"}
    assert "no-such-target" not in makefile_targets()
    assert python_modules_in(blocks) == {"no_such_package.cli", "runtime"}
    assert module_file("no_such_package.cli") is None
    assert module_file("runtime") == ROOT / "runtime" / "__main__.py"
    assert relative_links(BROKEN) == {"docs/missing.md", "Makefile"}
    assert not (ROOT / "docs" / "missing.md").exists()
    assert len(("x\n" * (MAX_LINES + 1)).splitlines()) > MAX_LINES


def test_help_lists_targets_without_installing():
    listed = make_help_targets()
    assert {"demo", "test", "bench-runtime"} <= listed
    assert listed <= makefile_targets(), f"`make help` names targets the Makefile lacks: {sorted(listed - makefile_targets())}"


def test_every_help_target_is_in_the_readme(readme):
    """The Make targets section covers what `make help` lists."""
    named = set(re.findall(r"`make ([\w-]+)", readme)) | make_targets_in(fenced_blocks(readme))
    missing = sorted(make_help_targets() - named)
    assert not missing, f"`make help` targets the README never names: {missing}"
