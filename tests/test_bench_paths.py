"""`bench.paths.merge_runs`: the bench scripts' results-file writer keeps other runs and replaces the file whole."""

from __future__ import annotations

import json

from bench.paths import merge_runs


def test_merge_runs_keeps_other_runs_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "r.json"
    merge_runs(out, "what it measures", {"a": {"x": 1}})
    assert json.loads(out.read_text()) == {"what": "what it measures", "runs": {"a": {"x": 1}}}
    out.write_text(json.dumps({"what": "kept", "other": 3, "runs": {"a": {"x": 1}, "b": {"y": 2}}}))
    merge_runs(out, "ignored where the file exists", {"a": {"x": 5}, "c": {}})
    assert json.loads(out.read_text()) == {"what": "kept", "other": 3,
                                           "runs": {"a": {"x": 5}, "b": {"y": 2}, "c": {}}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
