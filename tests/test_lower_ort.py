"""The ONNX Runtime lowering (`graphs.ort.lower`): the lowered engines compute what the plugin graphs compute, the
exact number of nodes is rewritten, and look-alikes are left alone with a reason.

build-engine lowers every attention node of the prefill graph and serves decode with it (one session,
tests/test_one_session.py), so the "decode" cases run that graph on one new token.  The built engines are also
checked against PyTorch (images, audio, batches, ring wrap-around) by
tests/test_export_ort.py and against transformers' greedy generation by tests/test_generate.py: build-engine
applies the lowering, so those tests run on the lowered graphs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from exporter.config import PRESETS
from graphs.ort.attention import lower_attention
from graphs.ort.norms import lower_norms
from plugins import fused_attention as fa
from runtime.manifest import read_manifest
from runtime.ort_attention import INPUTS as ATTENTION_INPUTS
from runtime.ort_attention import attention_feeds
from runtime.ort_backend import cache_shape, is_cache

PRESET = "tiny"  # vision + audio, 5 sliding + 1 full layers, window 8


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _assert_close(got, want, what):
    assert got.shape == want.shape, what
    if not want.size:  # a row without new tokens
        return
    err, scale = np.abs(got - want), float(np.ptp(want)) or 1.0
    assert err.max() <= 1e-4 * scale, f"{what}: max err {err.max():.3g} mean {err.mean():.3g} (range {scale:.3g})"


def _feeds(sess, manifest, graph, rng, *, batch, seq, past_lens, seq_lens, max_len, cfg, images=0):
    feeds = {"past_lens": np.asarray(past_lens, np.int64)}
    ids = rng.integers(3, 290, (batch, seq))
    if images:
        ids[0, 1:1 + images] = cfg.tokens.image
    feeds["input_ids"] = ids
    names = {i.name for i in sess.get_inputs()}
    if "seq_lens" in names:
        feeds["seq_lens"] = np.asarray(seq_lens, np.int64)
    if "image_patches" in names:
        feeds["image_patches"] = rng.random((images, 6912), dtype=np.float32)
        feeds["image_positions"] = np.array([[i % 3, i // 3] for i in range(images)], np.int64).reshape(-1, 2)
    if "audio_frames" in names:
        feeds["audio_frames"] = np.zeros((0, 640), np.float32)
    for spec in manifest["graphs"][graph]["inputs"]:
        if is_cache(spec["name"]):
            feeds[spec["name"]] = rng.standard_normal(cache_shape(spec, batch, max_len)).astype(np.float32)
    if "seq_lens" in feeds:  # the lowered engine: the attention geometry the runtime computes (runtime.ort_attention)
        feeds.update(attention_feeds(names, feeds, manifest["engines"]["onnxruntime"], manifest["model_config"]["tokens"]))
    return feeds


CASES = [  # graph, batch, new tokens, past_lens, seq_lens, image tokens
    ("decode", 3, 1, [3, 9, 30], [1, 1, 1], 0),  # 9 and 30 > window 8: the rings have wrapped
    ("decode", 3, 1, [0, 2, 6], [1, 1, 1], 0),  # no ring wrapped: GQA reads each row's first past + 1 slots
    ("prefill", 2, 1, [4, 8], [1, 1], 0),  # one token in all rows: the one-token branch (row 1: ring just wrapped)
    # one-token prefill (the If's one-token mask branch): an empty row, a first token, a wrapped ring
    ("prefill", 3, 1, [0, 5, 12], [1, 0, 1], 0),
    ("prefill", 2, 2, [0, 12], [1, 2], 0),  # two tokens: the general branch, a padded row
    ("prefill", 3, 11, [0, 0, 0], [11, 4, 7], 0),  # a batch of different lengths
    ("prefill", 2, 9, [0, 0], [9, 9], 5),  # image block on the sliding layers
    ("prefill", 1, 6, [13], [6], 0),  # a prompt with past context (GroupQueryAttention)
    ("prefill", 3, 5, [0, 4, 17], [5, 3, 5], 0),  # past context at batch > 1: one sequence per call (backend)
    ("prefill", 2, 7, [3, 20], [7, 6], 4),  # the same with an image in row 0 (its patches go to row 0's call)
]


def _continued_via_backend(art, manifest, feeds, *, batch, past_lens, seq_lens, max_len):
    """What `OrtBackend` computes for a prefill with past context at batch > 1 (GroupQueryAttention takes no such
    call: the backend runs each sequence alone on views of its cache rows): logits and the caches, by output name."""
    from runtime.ort_backend import OrtBackend
    from runtime.prompt import PrefillInputs

    backend = OrtBackend(art, manifest)
    assert backend.per_sequence_continuation
    cache = backend.new_cache(batch, max_len)
    for arr, spec in zip(cache.arrays, backend.cache_specs):
        arr[...] = feeds[spec["name"]]
    n_img = len(feeds["image_patches"])
    logits = backend.prefill(PrefillInputs(
        feeds["input_ids"], np.asarray(past_lens, np.int64), np.asarray(seq_lens, np.int64),
        feeds["image_patches"] if n_img else None, feeds["image_positions"] if n_img else None, None), cache)
    out = {"logits": logits}
    out.update({spec["name"].replace("past_", "present_"): arr for arr, spec in zip(cache.arrays, backend.cache_specs)})
    return out


@pytest.mark.parametrize("graph,batch,seq,past_lens,seq_lens,images", CASES)
def test_lowered_engine_matches_plugin_graph(artifact_store, graph, batch, seq, past_lens, seq_lens, images):
    _check_case(artifact_store(PRESET), graph, batch, seq, past_lens, seq_lens, images)


@pytest.fixture(scope="module")
def copy_decode_artifact(artifact_store, tmp_path_factory):
    """The tiny artifact's engine rebuilt with ``ort_ring_decode="copy"`` (the ring path at one token too)."""
    import shutil

    from graphs.build import build_engine

    out = tmp_path_factory.mktemp("copy") / "artifact"
    shutil.copytree(artifact_store(PRESET), out)
    build_engine(out, "onnxruntime", ort_ring_decode="copy", log=lambda *_: None)
    return out


@pytest.mark.parametrize("graph,batch,seq,past_lens,seq_lens,images", CASES[:5])
def test_copying_ring_decode_matches_plugin_graph(copy_decode_artifact, graph, batch, seq, past_lens, seq_lens,
                                                  images):
    """The ring path at one token (no one-token branch): decode with wrapped and filling rings, one-token prefills,
    a batch of different lengths."""
    engine = read_manifest(copy_decode_artifact)["engines"]["onnxruntime"]
    assert engine["lowering"]["prefill"]["attention"]["ring_decode"] == "copy"
    proto = onnx.load(str(copy_decode_artifact / engine["prefill"]), load_external_data=False)
    assert not {"attn_one_token", "attn_write_first"} & {i.name for i in proto.graph.input}
    assert [n.op_type for n in proto.graph.node].count("Attention") == 5  # at top level, no branch
    _check_case(copy_decode_artifact, graph, batch, seq, past_lens, seq_lens, images)


def test_ring_decode_forms():
    from graphs.ort.attention import ring_decode_in_place

    assert ring_decode_in_place("auto") and ring_decode_in_place("in_place")  # every ring size: the branch
    assert not ring_decode_in_place("copy")
    with pytest.raises(ValueError, match="ring decode form 'inplace'"):
        ring_decode_in_place("inplace")


def _check_case(art, graph, batch, seq, past_lens, seq_lens, images):
    manifest = read_manifest(art)
    cfg = PRESETS[PRESET]
    plugin = _session(art / manifest["plugin_graphs"][graph]["file"])
    lowered = _session(art / manifest["engines"]["onnxruntime"][graph])  # decode: the prefill graph, S = 1
    max_len = 47  # not the export's max_len
    feeds = _feeds(lowered, manifest, graph, np.random.default_rng(3), batch=batch, seq=seq, past_lens=past_lens,
                   seq_lens=seq_lens, max_len=max_len, cfg=cfg, images=images)
    names = [o.name for o in plugin.get_outputs()]
    want = dict(zip(names, plugin.run(None, {i.name: feeds[i.name] for i in plugin.get_inputs()})))
    if graph == "prefill" and batch > 1 and seq > 1 and max(past_lens) > 0:
        got = _continued_via_backend(art, manifest, feeds, batch=batch, past_lens=past_lens, seq_lens=seq_lens,
                                     max_len=max_len)
    else:
        got = dict(zip(names, lowered.run(names, feeds)))
    for b in range(batch):
        _assert_close(got["logits"][b, :seq_lens[b]], want["logits"][b, :seq_lens[b]], f"{graph} logits row {b}")
    for name in names[1:]:
        layer = int(name.rsplit("_", 1)[1])
        sliding = cfg.text.is_sliding(layer)
        for b in range(batch):  # full layers: the written slots; sliding rings: the slots of positions >= 0
            end = past_lens[b] + seq_lens[b]
            if sliding:  # slot j holds position L - ((L - j) mod W), L = end - 1; negative: never valid
                w = want[name].shape[2]
                keep = (end - 1) - ((end - 1 - np.arange(w)) % w) >= 0
                _assert_close(got[name][b][:, keep], want[name][b][:, keep], f"{graph} {name} sequence {b}")
            else:
                _assert_close(got[name][b, :, :end], want[name][b, :, :end], f"{graph} {name} sequence {b}")


def test_exact_counts(artifact_store):
    art = artifact_store(PRESET)
    manifest = read_manifest(art)
    t = PRESETS[PRESET].text
    full = sum(not t.is_sliding(i) for i in range(t.num_layers))
    engine = manifest["engines"]["onnxruntime"]
    lowering = engine["lowering"]
    assert set(lowering) == {"prefill"} and engine["decode"] == engine["prefill"]  # one graph serves both
    assert lowering["prefill"]["attention"] == {"GroupQueryAttention": full, "Attention": t.num_layers - full,
                                                "kept": 0, "ring_decode": "in_place"}
    # 4 block norms + q/k/v norms per layer, the final norm; prefill also the vision and audio embedders' norms
    cfg = PRESETS[PRESET]
    assert lowering["prefill"]["norms"] == 7 * t.num_layers + 1 + (cfg.vision is not None) + (cfg.audio is not None)
    proto = onnx.load(str(art / engine["prefill"]), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    sliding = t.num_layers - full
    # full layers: GQA in place, at top level (no branch); sliding layers too, over the ring after its write
    assert ops.count("GroupQueryAttention") == full + sliding
    # branches: the vision and audio embedders, run when their inputs have rows (graphs.ort.embedders), and one per
    # sliding layer on the write-first flag: the ring path's updates and output (or the new tokens and their queries)
    ifs = [n for n in proto.graph.node if n.op_type == "If"]
    one = [n for n in ifs if list(n.input) == ["attn_write_first"]]
    assert len(one) == sliding
    assert ops.count("TensorScatter") == 2 * sliding and "Attention" not in ops  # writes outside
    made = {o: n for n in proto.graph.node for o in n.output}
    outputs = {o.name for o in proto.graph.output}
    written = {}
    for n in proto.graph.node:
        if n.op_type == "TensorScatter":
            assert made[n.input[1]] in one, n.name  # the update comes out of the If
            assert n.output[0].startswith("present_") and n.output[0] in outputs, n.output[0]  # the cache output
            written[n.output[0]] = n
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention" and n.input[3] in written]
    assert len(gqa) == sliding  # each reads the written ring (past) and writes it back (present) to an output of its
    # own, bound to the cache's buffer too (one graph output has one producer)
    assert {n.output[1] for n in gqa} == {f"attn_ring_gqa_{o}" for o in written if "_key_" in o} and all(
        n.output[1] in outputs and n.output[2] in outputs for n in gqa)
    assert all(list(n.input[5:7]) == ["attn_ring_seqlens_k", "attn_ring_total"] for n in gqa)
    ifs = [n for n in ifs if n not in one]
    gates = ["ort_lower_gate_image_patches"] * (cfg.vision is not None) + ["ort_lower_gate_audio_frames"] * (
        cfg.audio is not None)
    # each modality: its embedder, and the nodes placing its soft tokens into the embeddings
    assert sorted(n.name for n in ifs) == sorted(gates + [f"{x}_merge" for x in gates])
    # the attention geometry is an engine input (runtime.ort_attention), not ~50 nodes: no image-block CumSum left,
    # one Expand of the ring-write indices, and the record has the window the runtime needs
    inputs = {i.name for i in proto.graph.input}
    # query_seqlens: --ort-sliding window; one_token: engines built before write_first
    assert set(ATTENTION_INPUTS.values()) - {"attn_query_seqlens", "attn_one_token"} <= inputs
    assert "attn_query_seqlens" not in inputs and "attn_one_token" not in inputs
    assert engine["attention_inputs"] == {"window": t.sliding_window}
    assert ops.count("CumSum") == 0 and ops.count("Range") == 0 and ops.count("Mod") == 0, sorted(set(ops))
    assert engine["prefill_with_past"] == "per_sequence"
    # sliding layers: in a branch, the ring path's Attention; their rings written in place at top level
    def branch_ops(node):
        return [op for a in node.attribute if a.HasField("g") for n in a.g.node for op in [n.op_type, *branch_ops(n)]]

    assert [branch_ops(n).count("Attention") for n in one] == [1] * sliding
    assert "FusedAttention" not in ops, f"a plugin node is left: {sorted(set(ops))}"
    assert "ReduceMean" not in ops and "Pow" not in ops, f"unfused RMSNorm pieces left: {ops}"
    # both residual adds of every layer end in a Skip norm: the attention's, and (but for the last layer, whose sum
    # goes to the final norm through the last-token gather) the layer_scalar-scaled sum feeding the next layer
    # (graphs.ort.norms.scale_into_residual)
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * t.num_layers - 1, ops.count("Add")
    # the TensorRT plugin graphs are not modified
    plugin = onnx.load(str(art / manifest["plugin_graphs"]["decode"]["file"]), load_external_data=False)
    assert [n.op_type for n in plugin.graph.node].count("FusedAttention") == t.num_layers


# ---------------------------------------------------------------------------------------------- look-alikes
def _attention_model(*, scale=1.0, ring=8, window=8, decode=True, heads=(4, 2)):
    h, hkv = heads
    d, s = 16, 1 if decode else "S"
    f = ir.DataType.FLOAT
    val = lambda n, shape, t=f: ir.Value(name=n, type=ir.TensorType(t), shape=ir.Shape(shape))  # noqa: E731
    ins = [val("q", ["B", s, h, d]), val("k", ["B", s, hkv, d]), val("v", ["B", s, hkv, d]),
           val("past_key", ["B", hkv, ring, d]), val("past_value", ["B", hkv, ring, d]),
           val("past_lens", ["B"], ir.DataType.INT64), val("seq_lens", ["B"], ir.DataType.INT64),
           val("image_block", ["B", s], ir.DataType.INT64)]
    attrs = {"mode": int(decode), "sliding": 1, "window": window, "num_heads": h, "num_kv_heads": hkv, "head_dim": d,
             "rotary_dim": d, "rope_theta": 1e4, "scale": scale}
    node = ir.node(fa.OP, ins, attributes=attrs, domain=fa.DOMAIN, num_outputs=3, name="attn")
    graph = ir.Graph(ins, list(node.outputs), nodes=[node], name="g", opset_imports={"": 24, fa.DOMAIN: 1})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("kwargs,reason", [
    ({"scale": 0.125}, "scale"),
    ({"ring": 16}, "window=8"),
    ({"heads": (3, 2)}, "multiple"),
])
def test_attention_look_alikes_are_refused(kwargs, reason):
    model = _attention_model(**kwargs)
    counts = lower_attention(model, decode=True, max_len=32, log=lambda *_: None)
    assert counts["GroupQueryAttention"] == counts["Attention"] == 0
    assert reason in counts["refused"]["attn"], counts["refused"]
    assert [n.op_type for n in model.graph] == [fa.OP]


def test_attention_in_the_wrong_graph_is_refused():
    model = _attention_model(decode=True)
    counts = lower_attention(model, decode=False, max_len=32, log=lambda *_: None)
    assert "mode=1" in counts["refused"]["attn"]


def _norm_model(*, exponent=2.0, axis=-1, rsqrt=-0.5):
    f = ir.DataType.FLOAT
    x = ir.Value(name="x", type=ir.TensorType(f), shape=ir.Shape(["B", 4, 8]))

    def const(name, array):
        t = ir.tensor(np.asarray(array), name=name)
        return ir.Value(name=name, type=ir.TensorType(t.dtype), shape=ir.Shape(t.shape), const_value=t)

    w, two, half, eps, axes = const("w", np.full(8, 1.5, np.float32)), const("two", np.float32(exponent)), \
        const("half", np.float32(rsqrt)), const("eps", np.float32(1e-6)), const("axes", np.array([axis]))
    sq = ir.node("Pow", [x, two])
    mean = ir.node("ReduceMean", [sq.outputs[0], axes], attributes={"keepdims": 1})
    add = ir.node("Add", [mean.outputs[0], eps])
    rs = ir.node("Pow", [add.outputs[0], half])
    mul = ir.node("Mul", [x, rs.outputs[0]])
    out = ir.node("Mul", [mul.outputs[0], w])
    out.outputs[0].name = "y"
    graph = ir.Graph([x], [out.outputs[0]], nodes=[sq, mean, add, rs, mul, out],
                     initializers=[w, two, half, eps, axes], opset_imports={"": 24})
    return ir.Model(graph, ir_version=10)


def test_norm_is_fused_and_exact():
    model = _norm_model()
    counts = lower_norms(model, log=lambda *_: None)
    assert counts["SimplifiedLayerNormalization"] == 1
    assert [n.op_type for n in model.graph] == ["SimplifiedLayerNormalization"]
    assert model.graph.outputs[0].name == "y"
    x = np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float32)
    got = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * 1.5
    _assert_close(got, want, "SimplifiedLayerNormalization vs RMSNorm")


@pytest.mark.parametrize("kwargs,reason", [
    ({"exponent": 3.0}, "Pow(x, 2)"),
    ({"axis": 1}, "not the last axis"),
    ({"rsqrt": 0.5}, "-0.5"),
])
def test_norm_look_alikes_are_refused(kwargs, reason):
    model = _norm_model(**kwargs)
    counts = lower_norms(model, log=lambda *_: None)
    assert counts["SimplifiedLayerNormalization"] == 0
    assert any(reason in r for r in counts["refused"]), counts["refused"]
    assert "SimplifiedLayerNormalization" not in [n.op_type for n in model.graph]


def _kernels(sess, feeds) -> set[str]:
    """Names of the nodes ONNX Runtime ran (its profiler) for one call."""
    import json

    sess.run(None, feeds)
    events = json.loads(open(sess.end_profiling()).read())
    return {e["name"].removesuffix("_kernel_time") for e in events
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}


def test_embedders_run_only_with_rows(artifact_store, tmp_path):
    """A text call (a decode step) runs no node of the vision embedder; a call with an image runs them, and both give
    the plugin graph's numbers (zero-row values are the constants the embedder computes from zero rows)."""
    art = artifact_store(PRESET)
    manifest = read_manifest(art)
    cfg = PRESETS[PRESET]
    engine = manifest["engines"]["onnxruntime"]
    proto = onnx.load(str(art / engine["prefill"]), load_external_data=False)
    inner = set()
    for name in ("ort_lower_gate_image_patches", "ort_lower_gate_image_patches_merge"):
        gate = next(n for n in proto.graph.node if n.name == name)
        then = next(a.g for a in gate.attribute if a.name == "then_branch")
        assert len(then.node) >= 10  # the patch embedder, its position embedding, the projection; the placing
        inner |= {n.name for n in then.node}
    rng = np.random.default_rng(3)
    plugin = _session(art / manifest["plugin_graphs"]["prefill"]["file"])
    for images in (0, 4):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(tmp_path / f"p{images}")
        sess = ort.InferenceSession(str(art / engine["prefill"]), opts, providers=["CPUExecutionProvider"])
        feeds = _feeds(sess, manifest, "prefill", rng, batch=1, seq=8, past_lens=[0], seq_lens=[8],
                       max_len=manifest["max_len"], cfg=cfg, images=images)
        ran = _kernels(sess, feeds)
        assert bool(ran & inner) == bool(images), (images, sorted(ran & inner)[:5])
        names = [o.name for o in plugin.get_outputs()]
        want = plugin.run(None, {i.name: feeds[i.name] for i in plugin.get_inputs()})[0]
        got = sess.run(names[:1], feeds)[0]
        _assert_close(got, want, f"logits with {images} image tokens")


def test_fp32_linears_sharing_an_input_are_one_matmul(tmp_path):
    """`fuse_shared_input_matmuls`: MatMuls of one input (the exporter's ``Transpose(W (out, in))`` form or plain
    (in, out) weights) become one MatMul + Split with the same numbers; a weight with another user (tied) and a
    MatMul of another input are left alone."""
    from graphs.ort.qdq import fuse_shared_input_matmuls

    h, tp = onnx.helper, onnx.TensorProto
    rng = np.random.default_rng(0)
    w = {f"w{i}": rng.standard_normal(s).astype(np.float32) for i, s in
         enumerate([(6, 8), (3, 8), (8, 5), (8, 4), (6, 8)])}
    nodes = [h.make_node("Transpose", ["w0"], ["t0"], perm=[1, 0]), h.make_node("MatMul", ["x", "t0"], ["a"]),
             h.make_node("Transpose", ["w1"], ["t1"], perm=[1, 0]), h.make_node("MatMul", ["x", "t1"], ["b"]),
             h.make_node("MatMul", ["x", "w2"], ["c"]),
             h.make_node("MatMul", ["x", "w3"], ["d"]), h.make_node("Add", ["w3", "w3"], ["w3x2"]),  # w3 tied
             h.make_node("MatMul", ["a", "w4"], ["e"])]  # another input
    outs = ["a", "b", "c", "d", "w3x2", "e"]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", tp.FLOAT, [2, 8])],
                     [h.make_tensor_value_info(o, tp.FLOAT, None) for o in outs],
                     [onnx.numpy_helper.from_array(v, k) for k, v in w.items()])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    x = rng.standard_normal((2, 8)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(outs, {"x": x})
    assert fuse_shared_input_matmuls(model, tmp_path, tmp_path / "fused.data") == {"linears": 3, "nodes": 1}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == 3 and ops.count("Split") == 1 and "Transpose" not in ops, ops
    assert not {"w0", "w1", "w2"} & {t.name for t in model.graph.initializer}
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(tmp_path))
    after = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(outs, {"x": x})
    for name, a, b in zip(outs, after, before):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)


def test_host_image_blocks_equal_the_exported_model():
    """`runtime.ort_attention.image_blocks` numbers image runs as the exported graph did (`exporter.model`)."""
    import torch

    from exporter.model import _image_blocks
    from runtime.ort_attention import image_blocks

    rng = np.random.default_rng(0)
    for shape in ((1, 1), (3, 17), (2, 40)):
        is_image = rng.random(shape) < 0.5
        want = _image_blocks(torch.from_numpy(is_image)).numpy()
        np.testing.assert_array_equal(image_blocks(is_image), want)


def test_decode_fast_path_equals_the_general_geometry():
    """`runtime.ort_attention.decode_inputs` (the decode loop's few-call form) gives exactly what the general
    `attention_inputs` gives for one new token per row: batches of mixed lengths, empty, filling and wrapped rings,
    the step that replaces a ring's oldest slot, windows of 1 to 512."""
    from runtime.ort_attention import attention_inputs, decode_inputs

    rng = np.random.default_rng(0)
    for w in (1, 2, 3, 8, 512):
        for trial in range(200):
            b = int(rng.integers(1, 5))
            past = rng.integers(0, 3 * w + 3, size=b)
            if trial % 4 == 0:
                past[:] = past[0]
            want = attention_inputs(past, np.ones(b, np.int64), 1, window=w)
            got = decode_inputs(past, window=w)
            assert got.keys() == want.keys()
            for key in want:
                assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, (key, w, past)
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} window {w} past {past}")
    subset = decode_inputs([5, 0], window=4, want=["seqlens_k", "total_len"])
    assert set(subset) == {"seqlens_k", "total_len"} and int(subset["total_len"]) == 6
    with pytest.raises(ValueError, match="window"):
        decode_inputs([3], window=None)


def test_computed_shape_arguments_become_constants():
    """`graphs.ort.shapes.constant_shapes`: ``Reshape(x, Concat(Shape(x)[0], Shape(x)[1], 4, 8))`` (allowzero
    1, as exported) gets the constant [0, 0, 4, 8] and allowzero 0, an Expand to (batch, 1, 16) gets [1, 1, 16]; same
    outputs on other batch/sequence sizes; a Reshape whose output dims are not the input's (by name) is left."""
    from graphs.ort.shapes import constant_shapes

    f, i64 = ir.DataType.FLOAT, ir.DataType.INT64
    x = ir.Value(name="x", type=ir.TensorType(f), shape=ir.Shape(["batch", "seq", 32]))
    e = ir.Value(name="e", type=ir.TensorType(f), shape=ir.Shape(["batch", 1, 1]))
    c = lambda n, a: ir.Value(name=n, type=ir.TensorType(i64), shape=ir.Shape([len(a)]),  # noqa: E731
                              const_value=ir.tensor(np.array(a, np.int64), name=n))
    consts = [c("b0", [0]), c("b1", [1]), c("tail", [4, 8]), c("one", [1]), c("hid", [16])]
    shape = ir.node("Shape", [x])
    d0 = ir.node("Gather", [shape.outputs[0], consts[0]], attributes={"axis": 0})
    d1 = ir.node("Gather", [shape.outputs[0], consts[1]], attributes={"axis": 0})
    cat = ir.node("Concat", [d0.outputs[0], d1.outputs[0], consts[2]], attributes={"axis": 0})
    view = ir.node("Reshape", [x, cat.outputs[0]], attributes={"allowzero": 1})
    view.outputs[0].name, view.outputs[0].shape = "y", ir.Shape(["batch", "seq", 4, 8])
    view.outputs[0].type = ir.TensorType(f)
    other = ir.node("Reshape", [x, cat.outputs[0]], attributes={"allowzero": 1})  # output dims named otherwise
    other.outputs[0].name, other.outputs[0].shape = "z", ir.Shape(["rows", "cols", 4, 8])
    other.outputs[0].type = ir.TensorType(f)
    ecat = ir.node("Concat", [d0.outputs[0], consts[3], consts[4]], attributes={"axis": 0})
    exp = ir.node("Expand", [e, ecat.outputs[0]])
    exp.outputs[0].name, exp.outputs[0].shape = "w", ir.Shape(["batch", 1, 16])
    exp.outputs[0].type = ir.TensorType(f)
    nodes = [shape, d0, d1, cat, view, other, ecat, exp]
    graph = ir.Graph([x, e], [view.outputs[0], other.outputs[0], exp.outputs[0]], nodes=nodes,
                     initializers=consts, name="g", opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.random((3, 5, 32), dtype=np.float32), "e": rng.random((3, 1, 1), dtype=np.float32)}
    run = lambda: ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),  # noqa: E731
                                       providers=["CPUExecutionProvider"]).run(None, feeds)
    before = run()
    assert constant_shapes(model) == 2
    assert ir.convenience.get_const_tensor(view.inputs[1]).numpy().tolist() == [0, 0, 4, 8]
    assert view.attributes.get_int("allowzero") == 0
    assert ir.convenience.get_const_tensor(exp.inputs[1]).numpy().tolist() == [1, 1, 16]
    assert other.inputs[1] is cat.outputs[0]  # left as it was
    for a, b in zip(before, run()):
        np.testing.assert_array_equal(a, b)
