"""Writing an artifact never destroys what is not a previous artifact of ours (`runtime.staging`), and the
export/calibrate/build CLIs turn expected failures into one ``error:`` line and exit status 2.

Most cases drive the writer directly with small fake artifacts (a directory with our manifest); the CLIs are run
in-process where only their status and stderr matter and in a subprocess where the absence of a traceback does.
Every refusal happens before any tracing, so none of these tests exports a model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import runtime.staging as staging
from runtime.manifest import read_manifest, write_manifest
from runtime.staging import DiskFullError, OutputRefused, check_output, clean_stale, staged_artifact, temp_name


def _tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root (what must survive untouched)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _fake_checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "gemma4_unified"}))
    (path / "model.safetensors").write_bytes(os.urandom(4096))
    (path / "my_notes.txt").write_text("the user's own file\n")
    return path


def _manifest(tag: str) -> dict:
    """A manifest that passes the schema, for the tiny-text preset (nothing is traced)."""
    from exporter.config import PRESETS
    from exporter.export import graph_io

    cfg = PRESETS["tiny-text"]
    graphs = {g: {"file": f"{g}.onnx", "inputs": graph_io(cfg, g)[0], "outputs": graph_io(cfg, g)[1]}
              for g in ("prefill", "decode")}
    return {"tag": tag, "model_config": cfg.to_json_dict(), "max_len": 16, "graphs": graphs, "precision": "fp32"}


def _write_graphs(path: Path, tag: str) -> None:
    for g in ("prefill", "decode"):
        (path / f"{g}.onnx").write_text(f"{g} graph {tag}\n")


def _artifact(path: Path, tag: str = "old") -> Path:
    """A small artifact of ours: graph-like files, an ort/ subdirectory and a manifest listing them."""
    path.mkdir(parents=True, exist_ok=True)
    _write_graphs(path, tag)
    (path / "ort").mkdir(exist_ok=True)
    (path / "ort" / "decode.onnx").write_text(f"ort graph {tag}\n")
    write_manifest(path, _manifest(tag))
    return path


def _write_new(stage: Path, tag: str = "new") -> None:
    _write_graphs(stage, tag)
    write_manifest(stage, _manifest(tag))


def _siblings(path: Path) -> list[str]:
    """Hidden temporary entries the writer may have left next to ``path``."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------- the source is safe
def test_export_into_the_checkpoint_is_refused_and_the_checkpoint_intact(tmp_path, capsys):
    from exporter.export import main as export_main

    ckpt = _fake_checkpoint(tmp_path / "models" / "ckpt")
    (tmp_path / "models" / "other").mkdir()
    (tmp_path / "models" / "other" / "keep.bin").write_bytes(b"sibling")
    before = _tree(tmp_path)
    cases = {
        str(ckpt): "is the checkpoint",
        str(ckpt.parent): "contains the checkpoint",
        str(ckpt / "artifact"): "is inside the checkpoint",
    }
    for out, why in cases.items():
        for force in ([], ["--force"]):  # --force never allows it
            assert export_main(["--model", str(ckpt), "--out", out, *force]) == 2
            err = capsys.readouterr().err
            assert err.startswith("export: error: ") and why in err and err.count("\n") == 1, err
    assert _tree(tmp_path) == before, "a file of the checkpoint or a sibling changed"
    assert not (ckpt / "artifact").exists()


def test_calibrate_into_the_parent_of_its_source_is_refused_and_the_siblings_intact(tmp_path, capsys):
    from calib.calibrate import calibrate, main as calibrate_main

    src = _artifact(tmp_path / "artifacts" / "demo")
    _artifact(tmp_path / "artifacts" / "tiny", tag="sibling")
    (tmp_path / "artifacts" / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    for force in ([], ["--force"]):
        assert calibrate_main(["--src", str(src), "--out", str(src.parent), "--precision", "int8", *force]) == 2
        err = capsys.readouterr().err
        assert err.startswith("calibrate: error: ") and "contains the source artifact" in err, err
    with pytest.raises(OutputRefused, match="is the source artifact"):
        calibrate(src, src, "int8", force=True, log=lambda *_: None)
    assert _tree(tmp_path) == before


def test_protected_directories_are_refused_even_with_force(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for out, what in [(home, "your home directory"), (".", "the current directory"),
                      (tmp_path / "work", "an ancestor of the current directory"), ("/", "the filesystem root")]:
        with pytest.raises(OutputRefused, match=what):
            check_output(out, force=True)
    assert check_output(work / "art") == (work / "art").resolve()  # below them is fine


# ------------------------------------------------------------------------------------------ what OUT may be
def test_a_directory_that_is_not_an_artifact_needs_force(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(OutputRefused, match=r"photos exists and is not an artifact.*cat\.jpg.*--force") as e:
        with staged_artifact(out) as stage:
            _write_new(stage)
    assert "--force" in str(e.value) and (out / "cat.jpg").read_bytes() == b"meow"
    assert _siblings(out) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputRefused, match="is a file"):
        check_output(tmp_path / "file")
    with staged_artifact(out, force=True) as stage:
        _write_new(stage)
    assert sorted(os.listdir(out)) == ["decode.onnx", "manifest.json", "prefill.onnx"]
    assert read_manifest(out)["tag"] == "new" and _siblings(out) == []


def test_an_empty_directory_and_a_new_path_are_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "a" / "b" / "new"):
        with staged_artifact(out) as stage:
            _write_new(stage)
        assert read_manifest(out)["tag"] == "new"


def test_an_old_artifact_with_files_it_does_not_list_needs_force(tmp_path):
    out = _artifact(tmp_path / "art")
    (out / "ort" / "my_profile.json").write_text("{}")  # the user's, not in the manifest
    with pytest.raises(OutputRefused, match=r"does not list \(ort/my_profile\.json\)"):
        check_output(out)
    before = _tree(out)
    with pytest.raises(OutputRefused):
        with staged_artifact(out) as stage:
            _write_new(stage)
    assert _tree(out) == before
    with staged_artifact(out, force=True) as stage:
        _write_new(stage)
    assert not (out / "ort").exists() and read_manifest(out)["tag"] == "new"


# ---------------------------------------------------------------------------------------- atomic replacement
def test_a_previous_artifact_is_replaced_whole_and_only_at_the_end(tmp_path):
    out = _artifact(tmp_path / "art")
    (out / ".prefill.plugin.onnx.tmp-otherhost-1-ab").write_text("temporary file of ours")  # goes with it
    with staged_artifact(out) as stage:
        assert stage.parent == out.parent and stage.name.startswith(".art.staging-")
        _write_new(stage)
        assert read_manifest(out)["tag"] == "old"  # untouched until the new one is complete
    assert read_manifest(out)["tag"] == "new"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["decode.onnx", "manifest.json",
                                                                             "prefill.onnx"]
    assert _siblings(out) == []


def test_a_failure_keeps_the_previous_artifact(tmp_path, monkeypatch):
    out = _artifact(tmp_path / "art")
    before = _tree(out)
    with pytest.raises(RuntimeError, match="tracing failed"):
        with staged_artifact(out) as stage:
            _write_new(stage)
            raise RuntimeError("tracing failed")
    assert _tree(out) == before and _siblings(out) == []

    real_move = staging._move

    def failing_move(src, dst):
        if ".staging-" in Path(src).name:  # the stage moving in: the old artifact is already aside
            assert not out.exists() and len(_siblings(out)) == 2
            raise OSError(errno.EXDEV, "simulated failure", str(src))
        real_move(src, dst)

    monkeypatch.setattr(staging, "_move", failing_move)
    with pytest.raises(OSError, match="simulated failure"):
        with staged_artifact(out) as stage:
            _write_new(stage)
    assert _tree(out) == before, "the previous artifact was not put back"
    assert _siblings(out) == []
    read_manifest(out)


def test_a_full_disk_says_how_much_and_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*art: 1\.0 MiB were written.*"
                                             r"needs about 2\.00 GiB") as e:
        with staged_artifact(out, expected_bytes=2 << 30) as stage:
            (stage / "weights.data").write_bytes(b"\0" * (1 << 20))
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.errno == errno.ENOSPC
    assert not out.exists() and _siblings(out) == []


# ---------------------------------------------------------------------------------------- stale temporaries
def test_stale_temporaries_of_dead_processes_are_cleaned_live_ones_kept(tmp_path):
    host = staging._host()
    dead, live = _dead_pid(), os.getppid()
    out = _artifact(tmp_path / "art")
    names = {
        "dead_stage": f".art.staging-{host}-{dead}-0a1b",
        "dead_old": f".art.old-{host}-{dead}-0a1c",
        "live_stage": f".art.staging-{host}-{live}-0a1d",
        "other_host": f".art.staging-otherhost-{dead}-0a1e",
        "other_name": f".other.staging-{host}-{dead}-0a1f",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.data").write_bytes(b"\0" * 64)
    with staged_artifact(out) as stage:
        _write_new(stage)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert names["dead_stage"] not in left and names["dead_old"] not in left
    for kept in ("live_stage", "other_host", "other_name"):  # alive, unknowable, or another OUT's
        assert names[kept] in left, kept


def test_an_interrupted_swap_is_undone_at_the_next_write(tmp_path):
    """A process killed between moving the old artifact aside and moving the new one in: it is put back."""
    old = _artifact(tmp_path / f".art.old-{staging._host()}-{_dead_pid()}-0a1b")
    before = _tree(old)
    assert clean_stale(tmp_path, "art") == []
    assert _tree(tmp_path / "art") == before and not old.exists()


def test_temporary_names_carry_host_and_pid():
    name = temp_name("art")
    m = staging._TEMP.match(name)
    assert m and m["name"] == "art" and m["kind"] == "staging" and int(m["pid"]) == os.getpid()
    assert temp_name("art") != name


# ---------------------------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_permissions_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        out = tmp_path / "art"
        with staged_artifact(out) as stage:
            (stage / "engines").mkdir(mode=0o700)
            fd = os.open(stage / "engines" / "prefill.engine", os.O_WRONLY | os.O_CREAT, 0o600)  # like mkstemp
            os.close(fd)
            _write_new(stage)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    assert stat.S_IMODE((out / "engines").stat().st_mode) == dir_mode
    for f in ("manifest.json", "prefill.onnx", "engines/prefill.engine"):
        assert stat.S_IMODE((out / f).stat().st_mode) == file_mode, f


# ------------------------------------------------------------------------------------ writing into an artifact
def test_build_engine_writes_only_into_an_artifact_holding_only_its_files(tmp_path, capsys):
    from graphs.build import main as build_main

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("mine")
    notes_before = _tree(notes)
    assert build_main(["--artifact", str(notes), "--backend", "onnxruntime"]) == 2
    assert "build-engine: error: " in capsys.readouterr().err
    art = _artifact(tmp_path / "art")
    (art / "todo.txt").write_text("mine")
    before = _tree(art)
    assert build_main(["--artifact", str(art), "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert "todo.txt" in err and "does not list" in err, err
    assert _tree(art) == before and _tree(notes) == notes_before


def test_stale_build_temporaries_are_cleaned(tmp_path):
    art = _artifact(tmp_path / "art")
    dead, host = _dead_pid(), staging._host()
    (art / f".ort.staging-{host}-{dead}-0a").mkdir()
    (art / "engines").mkdir()
    (art / "engines" / f".cast.staging-{host}-{dead}-0b").mkdir()
    (art / f".prefill.plugin.onnx.tmp-{host}-{dead}-0c").write_text("x")
    staging.check_writable_artifact(art, read_manifest(art))
    assert sorted(p.name for p in art.rglob(".*")) == []


# ------------------------------------------------------------------------------------------- export input checks
def test_max_len_zero_or_negative_is_an_error(tmp_path, capsys):
    from exporter.config import PRESETS
    from exporter.export import export_artifact, main as export_main

    for bad in ("0", "-5", "abc"):
        with pytest.raises(SystemExit) as e:
            export_main(["--model", "tiny-text", "--out", str(tmp_path / "x"), "--max-len", bad])
        assert e.value.code == 2
        assert "error: argument --max-len" in capsys.readouterr().err
    model = SimpleNamespace(cfg=PRESETS["tiny-text"], parameters=lambda: [])
    with pytest.raises(ValueError, match="max_len=0 must be in"):
        export_artifact(model, tmp_path / "x", max_len=0, log=lambda *_: None)
    assert not (tmp_path / "x").exists()


def test_export_without_a_tokenizer_warns(tmp_path, monkeypatch):
    import exporter.export as export
    from exporter.config import PRESETS

    def no_tracing(*_a, **_k):
        raise RuntimeError("stop before tracing")

    monkeypatch.setattr(export, "_export_graph", no_tracing)
    model = SimpleNamespace(cfg=PRESETS["tiny-text"], parameters=lambda: [])
    tok = tmp_path / "tok"
    tok.mkdir()
    for tokenizer_dir, warned in [(None, True), (tmp_path / "empty", True), (tok, False)]:
        if tokenizer_dir is tok:
            (tok / "tokenizer.json").write_text("{}")
        lines: list[str] = []
        with pytest.raises(RuntimeError, match="stop before tracing"):
            export.export_artifact(model, tmp_path / "out", max_len=16, tokenizer_dir=tokenizer_dir, log=lines.append)
        warnings = [ln for ln in lines if "warning" in ln]
        assert bool(warnings) == warned, lines
        if warned:
            assert len(warnings) == 1 and "text prompts will not work" in warnings[0] and "token-id" in warnings[0]
    assert sorted(os.listdir(tmp_path)) == ["tok"], "a staging directory was left behind"


def test_export_cli_reports_a_full_disk(tmp_path, monkeypatch, capsys, reference_store):
    import exporter.export as export

    _, ckpt = reference_store("tiny-text")
    capsys.readouterr()  # the reference checkpoint's own progress output

    def disk_fills(model, graph, path, *_rest, **_kw):
        Path(path).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(export, "_export_graph", disk_fills)
    assert export.main(["--model", str(ckpt), "--out", str(tmp_path / "out"), "--max-len", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "export: error: no space left on device while writing" in err, err
    assert "4.0 KiB were written" in err and "needs about" in err
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------- CLIs: no traceback
@pytest.mark.parametrize("cli", ["export", "calibrate", "build"])
def test_cli_errors_are_one_line_without_a_traceback(tmp_path, cli):
    ckpt = _fake_checkpoint(tmp_path / "ckpt")
    src = _artifact(tmp_path / "artifacts" / "demo")
    args = {
        "export": ["exporter.export", "--model", str(ckpt), "--out", str(ckpt)],
        "calibrate": ["calib.calibrate", "--src", str(src), "--out", str(src.parent), "--precision", "int8"],
        "build": ["graphs.build", "--artifact", str(tmp_path / "missing")],
    }[cli]
    before = _tree(tmp_path)
    done = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert "error: " in done.stderr
    assert _tree(tmp_path) == before


def test_default_data_writer_keeps_a_directory_it_did_not_write(tmp_path, capsys):
    from demo.make_default_data import main as make_data_main

    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "my_prompts.txt").write_text("mine")
    before = _tree(tmp_path)
    assert make_data_main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "make_default_data: error: " in err and "my_prompts.txt" in err, err
    assert _tree(tmp_path) == before


def test_int4_from_a_checkpoint_checks_out_and_max_len_before_any_work(tmp_path, capsys):
    from calib.sequential import main as sequential_main

    ckpt = _fake_checkpoint(tmp_path / "models" / "ckpt")
    before = _tree(tmp_path)
    assert sequential_main(["--model", str(ckpt), "--out", str(ckpt.parent), "--force"]) == 2
    assert "contains the checkpoint" in capsys.readouterr().err
    assert sequential_main(["--model", "tiny-text", "--out", str(tmp_path / "q"), "--max-len", "0"]) == 2
    assert "max_len=0 must be in" in capsys.readouterr().err
    assert _tree(tmp_path) == before and not (tmp_path / "q").exists()
