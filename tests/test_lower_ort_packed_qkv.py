"""`graphs.ort.packed_qkv`: GroupQueryAttention on one packed q/k/v input with its per-head norms in one kernel.

Three things: the numbers do not change (a window engine built with and without the rewrite, fp32, same logits
within DESIGN's 1e-4 of the range through prefill and decode steps); the exact nodes are rewritten (every layer of
the tiny preset packed: five sliding ones, and its full one whose value is its key); look-alikes are refused with
a reason.  Also pins the ONNX Runtime behaviour the rewrite relies on: SimplifiedLayerNormalization
broadcasting a (heads, head size) weight over the leading axes.
"""

from __future__ import annotations

import collections
import copy
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs.build as build
from exporter.config import PRESETS
from graphs.build import build_engine
from graphs.ort.packed_qkv import pack_qkv
from runtime.manifest import read_manifest
from runtime.ort_backend import OrtBackend
from runtime.prompt import PrefillInputs

PRESET = "tiny"  # 5 sliding layers (q/k/v) + 1 full layer (attention_k_eq_v: value = key projection)


def test_onnxruntime_norm_broadcasts_a_per_head_weight():
    heads, d = 8, 16
    rng = np.random.default_rng(0)
    w = (rng.random((heads, d)) + 0.5).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y"], axis=-1, epsilon=1e-6)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", heads, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    sess = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    for shape in [(1, 1), (2, 3), (3, 17)]:
        x = rng.standard_normal((*shape, heads, d)).astype(np.float32)
        want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
        err = np.abs(sess.run(None, {"x": x})[0] - want).max()
        assert err < 1e-5, f"ONNX Runtime's SimplifiedLayerNormalization with a {w.shape} weight: max err {err:.3g}"


@pytest.fixture(scope="module")
def engines(artifact_store, tmp_path_factory):
    """The tiny artifact with a window engine built with the rewrite, and a copy built without it."""
    root = tmp_path_factory.mktemp("packed")
    packed, plain = root / "packed", root / "plain"
    shutil.copytree(artifact_store(PRESET), packed)
    shutil.copytree(artifact_store(PRESET), plain)
    build_engine(packed, "onnxruntime", ort_sliding="window", log=lambda *_: None)
    original = build._pack_qkv
    build._pack_qkv = lambda model, src, config, log: (model, {"packed": 0, "refused": {}})
    try:
        build_engine(plain, "onnxruntime", ort_sliding="window", log=lambda *_: None)
    finally:
        build._pack_qkv = original
    return packed, plain


def _graph(art):
    engine = read_manifest(art)["engines"]["onnxruntime"]
    return onnx.load(str(art / engine["prefill"]), load_external_data=False).graph


def test_every_sliding_layer_is_packed(engines):
    packed, plain = engines
    cfg = PRESETS[PRESET].text
    g, g0 = _graph(packed), _graph(plain)
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == cfg.num_layers
    assert all(n.input[1] == "" and n.input[2] == "" for n in gqa)  # every layer takes q/k/v packed
    ops, ops0 = collections.Counter(n.op_type for n in g.node), collections.Counter(n.op_type for n in g0.node)
    sliding = sum(cfg.is_sliding(i) for i in range(cfg.num_layers))
    full = cfg.num_layers - sliding  # attention_k_eq_v: the value is the key's projection
    # sliding: Split and 3 x (Reshape, norm, Reshape) -> Reshape, norm, Reshape;
    # full: Split, 2 x Reshape, 3 x (norm, Reshape) -> Slice, Concat, Reshape, norm, Reshape
    assert ops0["SimplifiedLayerNormalization"] - ops["SimplifiedLayerNormalization"] == 2 * sliding + 2 * full
    assert ops0["Reshape"] - ops["Reshape"] == 4 * sliding + 3 * full
    assert ops0["Split"] - ops["Split"] == sliding + full
    assert ops["Slice"] - ops0["Slice"] == full and ops["Concat"] - ops0["Concat"] == full
    inits = {t.name: t for t in g.initializer}
    producer = {o: x for x in g.node for o in x.output}
    for i, node in enumerate(gqa):
        norm = producer[producer[node.input[0]].input[0]]
        assert norm.op_type == "SimplifiedLayerNormalization"
        kv = cfg.num_kv_heads if cfg.is_sliding(i) else cfg.num_global_kv_heads
        d = cfg.head_dim if cfg.is_sliding(i) else cfg.global_head_dim
        assert list(inits[norm.input[1]].dims) == [cfg.num_heads + 2 * kv, d]


def test_packed_engine_computes_the_same_logits(engines):
    packed, plain = engines
    tk = PRESETS[PRESET].tokens
    a, b = (OrtBackend(p, read_manifest(p)) for p in engines)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 290, (2, 12))
    lens = np.array([12, 7])
    ids[1, 7:] = tk.pad
    inputs = PrefillInputs(ids, np.zeros(2, np.int64), lens)
    ca, cb = a.new_cache(2, 64), b.new_cache(2, 64)
    got, want = a.prefill(inputs, ca), b.prefill(inputs, cb)
    past = lens.copy()
    for step in range(20):  # past the window (8): the windowed cache compacts
        err, scale = np.abs(got - want).max(), float(np.ptp(want))
        assert err <= 1e-4 * scale, f"step {step}: max err {err:.3g} (range {scale:.3g})"
        nxt = want.argmax(-1).tolist()
        got = a.decode(nxt, past.tolist(), ca)
        want = b.decode(np.array(nxt)[:, None], past, cb)
        past += 1


def _lowered_proto(engines):
    """The plain engine's graph (already q/k/v unpacked, ORT-optimised): a source for look-alikes."""
    _, plain = engines
    return onnx.load(str(plain / read_manifest(plain)["engines"]["onnxruntime"]["prefill"]),
                     load_external_data=False), plain / "ort"


def test_packs_the_plain_engine_graph(engines):
    proto, base = _lowered_proto(engines)
    cfg = PRESETS[PRESET].text
    report = pack_qkv(proto, base)
    assert report == {"packed": cfg.num_layers, "refused": {}}


def _first_gqa(proto):
    return next(n for n in proto.graph.node if n.op_type == "GroupQueryAttention")


def _norm_of(proto, value):
    producer = {o: n for n in proto.graph.node for o in n.output}
    n = producer[value]
    while n.op_type != "SimplifiedLayerNormalization":
        n = producer[n.input[0]]
    return n


def _swap_key_value(proto):
    gqa = _first_gqa(proto)
    gqa.input[1], gqa.input[2] = gqa.input[2], gqa.input[1]


def _other_key_epsilon(proto):
    norm = _norm_of(proto, _first_gqa(proto).input[1])
    next(a for a in norm.attribute if a.name == "epsilon").f = 1e-3


def _other_head_count(proto):
    next(a for a in _first_gqa(proto).attribute if a.name == "num_heads").i = 3


@pytest.mark.parametrize("mutate,reason", [
    (_swap_key_value, "not the outputs 0, 1, 2 of one Split"),
    (_other_key_epsilon, "the norms differ"),
    (_other_head_count, "not num_heads x head size"),
])
def test_look_alikes_are_refused(engines, mutate, reason):
    proto, base = _lowered_proto(engines)
    proto = copy.deepcopy(proto)
    mutate(proto)
    first = _first_gqa(proto).name
    report = pack_qkv(proto, base)
    assert reason in report["refused"].get(first, ""), report["refused"].get(first)
    assert _first_gqa(proto).input[1] != ""  # left as it was
