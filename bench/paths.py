"""Paths as result files record them: relative to the repository, never a machine's own directories.

Results under ``bench/results/`` are committed and compared across machines; an absolute path in them says where one
machine keeps its checkout and nothing about the measurement.  `repo_path` turns a path into its repository-relative
POSIX form (or only its name when it lies outside the repository); `repo_paths_in` does the same for every absolute
path inside a free text (a log line, an error message).  `merge_runs` adds named runs to a results file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["ROOT", "merge_runs", "repo_path", "repo_paths_in"]

ROOT = Path(__file__).resolve().parents[1]
_ABSOLUTE = re.compile(r"(?<![\w.~/])/[^\s'\"(),;]+")  # a slash that starts a word: "/a/b", not "tok/s"


def repo_path(path: str | Path) -> str:
    """``path`` relative to the repository (POSIX), or only its name when it lies outside; relative paths as given."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    for candidate in (p, p.resolve()):
        if candidate.is_relative_to(ROOT):
            return candidate.relative_to(ROOT).as_posix()
    return p.name


def repo_paths_in(text: str) -> str:
    """``text`` with every absolute path in it written as `repo_path` writes it."""
    return _ABSOLUTE.sub(lambda m: repo_path(m.group()), text)


def merge_runs(out: str | Path, what: str, runs: dict) -> None:
    """Add ``runs`` (name -> record) under ``runs`` of the JSON file ``out`` (created with ``what`` as its
    description where missing), keeping its other runs; written to a temporary file and renamed over it, so an
    interrupted write leaves the previous file."""
    out = Path(out)
    record = json.loads(out.read_text()) if out.exists() else {"what": what}
    record.setdefault("runs", {}).update(runs)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out)
