"""``make build-engine ORT_SLIDING=window``: sliding layers as GroupQueryAttention over ONNX Runtime's windowed cache.

The engine is checked against our PyTorch model evaluated in float64 (as tests/test_export_ort.py checks the default
engine): a batch of right-padded prompts with audio rows, decode steps far past the window and through several
compactions of the windowed cache (a slack of 2 slots: it compacts every 3 tokens), then a continued prefill of a
batch with past context and rows of different lengths (one with no new tokens), which the ring engine must run one
sequence at a time.  Images are refused with the reason; the engine record and the graph say what was built.
"""

from __future__ import annotations

import collections
import shutil

import numpy as np
import onnx
import pytest
import torch

from exporter.config import PRESETS
from exporter.weights import load_model
from graphs.build import build_engine
from runtime.errors import InputError
from runtime.manifest import read_manifest
from runtime.ort_backend import OrtBackend
from runtime.prompt import PrefillInputs
from tests.test_model_reference import assert_close

PRESET = "tiny"  # 5 sliding layers (window 8) + 1 full, vision + audio
SLACK = 2


@pytest.fixture(scope="module")
def window_artifact(artifact_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("window") / "artifact"
    shutil.copytree(artifact_store(PRESET), out)
    build_engine(out, "onnxruntime", ort_sliding="window", ort_sliding_slack=SLACK, log=lambda *_: None)
    return out


def test_engine_record_and_graph(window_artifact):
    cfg = PRESETS[PRESET]
    manifest = read_manifest(window_artifact)
    engine = manifest["engines"]["onnxruntime"]
    w = cfg.text.sliding_window
    assert engine["attention_inputs"] == {"window": w, "sliding": "window", "sliding_slots": w + SLACK}
    assert engine["images"] is False and "prefill_with_past" not in engine and engine["one_graph"]
    g = onnx.load(str(window_artifact / engine["prefill"]), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in g.node)
    assert ops["GroupQueryAttention"] == cfg.text.num_layers
    assert not ops["Attention"] and not ops["TensorScatter"]
    assert not [i.name for i in g.input if i.name.startswith("attn_ring_")]  # no ring geometry
    # no vision path left to gate (images are refused): audio's embedder and soft-token placing keep their Ifs
    assert sorted(n.name for n in g.node if n.op_type == "If") == ["ort_lower_gate_audio_frames",
                                                                   "ort_lower_gate_audio_frames_merge"]
    assert not [n for n in g.node if any("vision" in i for i in n.input)]
    windowed = []
    for n in g.node:
        if n.op_type == "GroupQueryAttention":
            attrs = {a.name: a.i for a in n.attribute if a.type == onnx.AttributeProto.INT}
            windowed.append((attrs.get("sliding_window_cache", 0), attrs.get("local_window_size", -1)))
            assert n.input[16] == "attn_query_seqlens"
    assert sorted(windowed) == sorted((1, w) if cfg.text.is_sliding(i) else (0, -1) for i in range(len(windowed)))
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert dims["past_key_0"][2] == w + SLACK and dims["past_key_5"][2] != w + SLACK  # sliding / full layer


def _t(a):
    x = None if a is None else torch.from_numpy(np.asarray(a))
    return x.double() if x is not None and x.is_floating_point() else x


def test_window_engine_matches_the_float64_model(window_artifact, reference_store):
    """Logits within DESIGN's 1e-4 of the range at every call: padded batched prefill with audio, 3 windows of decode
    steps (compactions), then a batched continued prefill with past context (no per-sequence calls)."""
    cfg = PRESETS[PRESET]
    tk = cfg.tokens
    backend = OrtBackend(window_artifact, read_manifest(window_artifact))
    assert not backend.per_sequence_continuation and backend.sliding_slots == cfg.text.sliding_window + SLACK
    model = load_model(reference_store(PRESET)[1]).double()
    rng = np.random.default_rng(11)
    b, s, max_len = 3, 19, 60
    ids = rng.integers(3, 290, (b, s))
    seq = np.array([19, 6, 14])
    ids[2, 1:4] = tk.audio
    frames = rng.standard_normal((3, 640)).astype(np.float32)
    cache = backend.new_cache(b, max_len)
    logits = backend.prefill(PrefillInputs(ids, np.zeros(b, np.int64), seq, None, None, frames), cache)
    with torch.no_grad():
        tc = model.empty_caches(b, max_len, torch.float64)
        want, tc = model.prefill(_t(ids), _t(np.zeros(b, np.int64)), _t(seq), tc, None, None, _t(frames))
    assert_close(logits, want.numpy(), "window engine prefill")
    lens = seq.copy()
    for step in range(3 * cfg.text.sliding_window):
        nxt = rng.integers(3, 290, (b, 1))
        logits = backend.decode(nxt, lens, cache, copy=step % 2 == 0)
        with torch.no_grad():
            want, tc = model.decode(_t(nxt), _t(lens), tc)
        assert_close(logits, want.numpy(), f"window engine decode step {step}")
        lens = lens + 1
    more = np.array([5, 2, 0])  # a continued prefill at batch 3, right-padded, one row without new tokens
    ids2 = rng.integers(3, 290, (b, 5))
    logits = backend.prefill(PrefillInputs(ids2, lens, more), cache)
    with torch.no_grad():
        want, tc = model.prefill(_t(ids2), _t(lens), _t(more), tc, None, None, None)
    rows = more > 0  # a row without new tokens has no defined logits
    assert_close(logits[rows], want.numpy()[rows], "window engine continued prefill")
    lens = lens + more
    nxt = rng.integers(3, 290, (b, 1))
    logits = backend.decode(nxt, lens, cache)
    with torch.no_grad():
        want, _ = model.decode(_t(nxt), _t(lens), tc)
    assert_close(logits, want.numpy(), "window engine decode after the continued prefill")


def test_window_engine_refuses_images(window_artifact):
    backend = OrtBackend(window_artifact, read_manifest(window_artifact))
    cache = backend.new_cache(1, 40)
    ids = np.full((1, 6), 7)
    ids[0, 1:3] = PRESETS[PRESET].tokens.image
    patches = np.zeros((2, 6912), np.float32)
    with pytest.raises(InputError, match="ort-sliding window.*images"):
        backend.prefill(PrefillInputs(ids, np.zeros(1, np.int64), np.array([6]), patches,
                                      np.array([[0, 0], [1, 0]]), None), cache)
    text = backend.prefill(PrefillInputs(np.full((1, 6), 7), np.zeros(1, np.int64), np.array([6])), cache)
    assert np.isfinite(text).all()  # text still runs


def test_bad_sliding_options_are_refused(artifact_store, tmp_path):
    art = artifact_store(PRESET)
    with pytest.raises(ValueError, match="expected one of ring, window"):
        build_engine(art, "onnxruntime", ort_sliding="windowed", log=lambda *_: None)
    with pytest.raises(ValueError, match="drop --no-plugins"):
        build_engine(art, "onnxruntime", plugins=False, ort_sliding="window", log=lambda *_: None)


def test_sliding_slots_record_is_checked():
    """The runtime sizes the sliding caches from the engine record, and refuses a record it cannot trust."""
    from runtime.manifest import ArtifactError
    from runtime.ort_backend import cache_shape, sliding_slots

    def manifest(record):
        return {"engines": {"onnxruntime": {"attention_inputs": record}}}

    assert sliding_slots(manifest({"window": 8})) is None  # the ring form: the exported shapes
    assert sliding_slots(manifest({"window": 8, "sliding": "window", "sliding_slots": 10})) == 10
    for bad in (7, None, True, "10"):
        with pytest.raises(ArtifactError, match="sliding_slots"):
            sliding_slots(manifest({"window": 8, "sliding": "window", "sliding_slots": bad}))
    ring = {"name": "past_key_0", "shape": ["batch", 2, 8, 16]}
    full = {"name": "past_key_5", "shape": ["batch", 2, "max_len", 16]}
    assert cache_shape(ring, 3, 40, 10) == [3, 2, 10, 16] and cache_shape(ring, 3, 40) == [3, 2, 8, 16]
    assert cache_shape(full, 3, 40, 10) == [3, 2, 40, 16]


def test_an_onnx_runtime_failure_leaves_the_engine_as_it_was(window_artifact, monkeypatch, capsys):
    """ONNX Runtime failing to save the optimised graph (a full disk: ORT raises its own `Fail`, not an OSError)
    becomes one error line from build-engine; the artifact's engine, manifest and files are unchanged and no
    staging directory is left."""
    import hashlib

    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    from graphs.build import main

    def digest():
        return {p.relative_to(window_artifact): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(window_artifact.rglob("*")) if p.is_file()}

    before = digest()
    real = ort.InferenceSession

    def failing(path_or_bytes, opts=None, *a, **k):
        if opts is not None and opts.optimized_model_filepath:  # build-engine's optimise-and-save session
            raise state.Fail("Failed to write external initializers to file: no space left")
        return real(path_or_bytes, opts, *a, **k)

    monkeypatch.setattr(ort, "InferenceSession", failing)
    capsys.readouterr()
    assert main(["--artifact", str(window_artifact), "--backend", "onnxruntime", "--ort-sliding", "window"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("build-engine: error: ") and "could not optimise and save the prefill graph" in err[-1]
    assert "GiB free" in err[-1] and "Traceback" not in "\n".join(err)
    assert digest() == before
    assert not [p for p in window_artifact.iterdir() if p.name.startswith(".")]
