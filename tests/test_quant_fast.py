"""Quantized artifacts on ONNX Runtime's CPU: the build-engine lowering (`graphs.ort.qdq`).

INT8: every quantized Linear runs as an 8-bit MatMulNBits on int8 dot products (graph structure of the optimised graph
and ORT's profiler), within half an activation step of the Q/DQ artifact run unfused; FP8: no FP8 weight is
dequantized at run time, the numbers are the artifact's.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calib.calibrate import calibrate
from calib.data import default_set, prefill_inputs
from exporter.config import PRESETS
from graphs.build import build_engine
from graphs.ort.qdq import auto_int8_kernel, int8_block_size, matmul_nbits, split_shared_activation_qdq
from runtime.manifest import read_manifest
from runtime.ort_backend import engine_feeds, int8_dot_products_exact, prefill_feeds, zero_cache

QUIET = dict(log=lambda *_: None)


def _want_linears(preset: str) -> int:
    text = PRESETS[preset].text
    return 7 * text.num_layers - sum(not text.is_sliding(i) for i in range(text.num_layers))  # full: no v_proj


@pytest.fixture(scope="module")
def built(artifact_store, tmp_path_factory):
    """precision -> calibrated and engine-built artifact of the tiny preset."""
    made = {}

    def get(precision: str):
        if precision not in made:
            out = tmp_path_factory.mktemp("qfast") / f"tiny-{precision}"
            calibrate(artifact_store("tiny"), out, precision, **QUIET)
            build_engine(out, "onnxruntime", **QUIET)
            made[precision] = out
        return made[precision]

    return get


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _session(path, *, unfused: bool = False, profile_dir=None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    if unfused:  # the Q/DQ graph as written: fake quantization in float
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_dir / "prof")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(root, n: int = 3):
    """Prefill feeds of a few held-out prompts (other lengths than the export's) and one decode step after each."""
    m = read_manifest(root)
    ps = default_set("heldout", m["model_config"], has_tokenizer=False)
    out = []
    for p in ps.prompts[:n]:
        inp = prefill_inputs(p, m["model_config"], None, max_soft_tokens=ps.max_soft_tokens, max_len=m["max_len"])
        out.append(prefill_feeds(inp, m) | zero_cache(m, "prefill", 1, m["max_len"]))
    return m, out


def _run_both(root, graph: str, built=None):
    """(optimised ort/ graph logits, unfused Q/DQ graph logits) on the same feeds (prefill, then one decode);
    ``built``: another session to compare with the unfused graph than the ort/ one."""
    m, feeds = _feeds(root)
    built = built or _session(root / m["engines"]["onnxruntime"][graph])
    plain = _session(root / m["graphs"][graph]["file"], unfused=True)
    if graph == "prefill":
        return [(built.run(["logits"], engine_feeds(built, f, m))[0], plain.run(["logits"], f)[0]) for f in feeds]
    pre = _session(root / m["graphs"]["prefill"]["file"], unfused=True)
    names = [o.name for o in pre.get_outputs()]
    pairs = []
    for f in feeds:
        outs = dict(zip(names, pre.run(names, f)))
        d = {"input_ids": outs["logits"].argmax(-1).reshape(1, 1).astype(np.int64), "past_lens": f["seq_lens"]}
        d |= {k.replace("present_", "past_"): v for k, v in outs.items() if k.startswith("present_")}
        db = d
        if "seq_lens" in {i.name for i in built.get_inputs()}:  # one built graph serves both: decode = 1-token prefill
            from runtime.prompt import PrefillInputs

            db = prefill_feeds(PrefillInputs(d["input_ids"], d["past_lens"], np.ones(1, np.int64)), m)
            db |= {k: v for k, v in d.items() if k.startswith("past_") and k != "past_lens"}
        pairs.append((built.run(["logits"], engine_feeds(built, db, m))[0], plain.run(["logits"], d)[0]))
    return pairs


def _assert_close(pairs, rel: float, what: str, mean_rel: float | None = None, top1: bool = True):
    for a, b in pairs:
        err = np.abs(a - b)
        rng = float(b.max() - b.min())
        assert err.max() <= rel * rng, f"{what}: max err {err.max():.3g} (mean {err.mean():.3g}) > {rel} x {rng:.3g}"
        if mean_rel is not None:
            assert err.mean() <= mean_rel * rng, f"{what}: mean err {err.mean():.3g} > {mean_rel} x {rng:.3g}"
        assert not top1 or (a.argmax(-1) == b.argmax(-1)).all(), what


def _against_fp32(q, fp):
    """Prefill logits of held-out prompts, per prompt: (the fp32 artifact's engine, the quantized artifact's Q/DQ
    graph run unfused, the quantized artifact's engine)."""
    m, feeds = _feeds(q, 3)
    sessions = (_session(fp / read_manifest(fp)["engines"]["onnxruntime"]["prefill"]),
                _session(q / m["graphs"]["prefill"]["file"], unfused=True),
                _session(q / m["engines"]["onnxruntime"]["prefill"]))

    def run(sess, f):
        return sess.run(["logits"], engine_feeds(sess, f, m))[0]

    return [tuple(run(s_, f) for s_ in sessions) for f in feeds]


def _lm_head_op(path) -> str:
    """The op type of the node of an optimised graph that reads the LM head's weight (int8 / int4 / fp32 table)."""
    g = onnx.load(str(path), load_external_data=False).graph
    def reads(name: str) -> bool:  # ORT renames what it repacks (MatMulNBits: lm_head.weight_int4_T)
        return "lm_head.weight_int" in name or name.endswith("embed_tokens.weight")

    found = {n.op_type for n in g.node if n.op_type != "Gather" and any(reads(i) for i in n.input)}
    assert len(found) == 1, found
    return found.pop()


def _nbits_linears(nodes) -> int:
    """Linears run by the MatMulNBits of a graph: one each, one per output of the Split of a fused one, or the
    projections of one packed for GroupQueryAttention (`graphs.ort.packed_qkv`): q/k/v, or q/k when the value
    is the key's (its packed input then starts with a Slice of the key columns)."""
    nodes = list(nodes)
    users: dict[str, list] = {}
    for nd in nodes:
        for name in nd.input:
            users.setdefault(name, []).append(nd)

    def linears(nd) -> int:
        out = users.get(nd.output[0], [])
        if len(out) == 1 and out[0].op_type == "Split":
            return len(out[0].output)
        if any(u.name.endswith(".packed_qkv.key") for u in out):
            return 2
        return 3 if any(u.name.endswith(".packed_qkv.reshape") for u in out) else 1

    return sum(linears(nd) for nd in nodes if nd.op_type == "MatMulNBits")


NBITS = int8_dot_products_exact()  # 8-bit MatMulNBits is exact (and built) on this CPU
AUTO = auto_int8_kernel()  # the INT8 form build-engine picks on this CPU (`lower_quantized_for_ort`)


def test_int8_every_linear_is_an_integer_matmul(built, tmp_path):
    """Every INT8 Linear runs on integer dot products, in the form `auto_int8_kernel` picks for this CPU: all as 8-bit
    MatMulNBits (VNNI; Linears sharing an input in one node), the LM head as MatMulNBits and the rest as ORT's
    MatMulIntegerToFloat ("mixed": MatMulNBits exact without VNNI), or all MatMulIntegerToFloat (one per Linear)."""
    q = built("int8")
    n = _want_linears("tiny") + 1  # + the tied LM head (quantized by default)
    groups = 4 * PRESETS["tiny"].text.num_layers + 1  # q/k/v (full: q/k), o, gate/up, down per layer + the LM head
    want = {"MatMulNBits": {"MatMulNBits": groups}, "mixed": {"MatMulNBits": 1, "MatMulIntegerToFloat": n - 1},
            "MatMulIntegerToFloat": {"MatMulIntegerToFloat": n}}[AUTO]
    assert read_manifest(q)["engines"]["onnxruntime"]["int8_kernel"] == AUTO
    kernel = "MatMulIntegerToFloat" if AUTO == "MatMulIntegerToFloat" else "MatMulNBits"  # the LM head's
    for graph in ("prefill", "decode"):
        path = q / read_manifest(q)["engines"]["onnxruntime"][graph]
        g = onnx.load(str(path), load_external_data=False).graph
        ops = _ops(path)
        assert {k: ops[k] for k in ("MatMulNBits", "MatMulIntegerToFloat") if ops[k]} == want and not ops["MatMul"], ops
        assert _lm_head_op(path) == kernel
        if AUTO == "MatMulNBits":
            nbits = [nd for nd in g.node if nd.op_type == "MatMulNBits"]
            assert _nbits_linears(g.node) == n and ops["MatMulIntegerToFloat"] == 0, ops
            assert all({a.name: a.i for a in nd.attribute}["bits"] == 8 and len(nd.input) == 3 for nd in nbits)
        # no weight dequantized at run time: a DequantizeLinear left reads an activation (its fake quantization)
        inits = {t.name for t in g.initializer}
        assert not [nd.name for nd in g.node if nd.op_type == "DequantizeLinear" and nd.input[0] in inits]
    # what ORT actually ran (profiler), one decode step
    m, feeds = _feeds(q, 1)
    pairs = _run_both(q, "decode")  # also checks that the saved graph loads
    sess = _session(q / m["engines"]["onnxruntime"]["decode"], profile_dir=tmp_path)
    pre = _session(q / m["graphs"]["prefill"]["file"], unfused=True)
    names = [o.name for o in pre.get_outputs()]
    outs = dict(zip(names, pre.run(names, feeds[0])))
    d = {"input_ids": np.array([[5]], np.int64), "past_lens": feeds[0]["seq_lens"]}
    d |= {k.replace("present_", "past_"): v for k, v in outs.items() if k.startswith("present_")}
    if "seq_lens" in {i.name for i in sess.get_inputs()}:  # one built graph serves both
        from runtime.prompt import PrefillInputs

        d = prefill_feeds(PrefillInputs(d["input_ids"], d["past_lens"], np.ones(1, np.int64)), m) | {
            k: v for k, v in d.items() if k.startswith("past_") and k != "past_lens"}
    sess.run(["logits"], engine_feeds(sess, d, m))
    events = json.loads(open(sess.end_profiling()).read())
    kernels = collections.Counter(e["args"]["op_name"] for e in events
                                  if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))
    assert {k: kernels[k] for k in ("MatMulNBits", "MatMulIntegerToFloat") if kernels[k]} == want, kernels
    assert not kernels["MatMul"], kernels
    assert kernels["DequantizeLinear"] <= want.get("MatMulNBits", 0), kernels  # activations' fake quantization only
    assert pairs


def test_int8_both_kernels_build_and_agree(built, tmp_path):
    """The INT8 forms other than this CPU's default build too (forced), and give the artifact's numbers within the
    test's tolerance (a form with MatMulNBits only where it is exact: it is refused elsewhere)."""
    import shutil

    from graphs.ort.qdq import INT8_KERNELS
    from runtime.manifest import ArtifactError
    from runtime.ort_backend import OrtBackend

    q = built("int8")
    for kernel in [k for k in INT8_KERNELS if k != AUTO]:
        other = tmp_path / f"int8-{kernel}"
        shutil.copytree(q, other)
        build_engine(other, "onnxruntime", int8_kernel=kernel, **QUIET)
        m = read_manifest(other)
        assert m["engines"]["onnxruntime"]["int8_kernel"] == kernel
        ops = _ops(other / m["engines"]["onnxruntime"]["prefill"])
        assert ops["MatMulIntegerToFloat" if kernel == "MatMulIntegerToFloat" else "MatMulNBits"] >= 1, ops
        if kernel != "MatMulIntegerToFloat" and not NBITS:
            with pytest.raises(ArtifactError, match="saturate on this CPU"):
                OrtBackend(other, m)
            continue
        if kernel != "MatMulIntegerToFloat":  # within the artifact's rounding noise (test_int8_build_equals_the_qdq_artifact)
            _assert_close(_run_both(other, "decode"), 0.1, f"int8 {kernel} decode", mean_rel=0.03, top1=False)
        else:
            _assert_close(_run_both(other, "decode"), 1e-4, "int8 MatMulIntegerToFloat decode")
    with pytest.raises(ValueError, match="int8_kernel"):
        build_engine(other, "onnxruntime", int8_kernel="fast", **QUIET)


def test_int8_build_equals_the_qdq_artifact(built, artifact_store):
    q = built("int8")
    if AUTO != "MatMulIntegerToFloat":
        # MatMulNBits re-quantizes its (already int8-grid) input per block of K with a scale of its own: up to half
        # a step of the artifact's grid per value, as large as the artifact's own rounding, so the check is against
        # fp32: the engine is as close to fp32 as the Q/DQ artifact (tiny, 3 held-out prompts, measured: mean error
        # 0.97x the artifact's, max 0.93x, top-1 the same), and within that noise of the artifact (decode below)
        ref, art, eng = (np.concatenate([x.reshape(-1, PRESETS["tiny"].text.vocab_size) for x in xs])
                         for xs in zip(*_against_fp32(q, artifact_store("tiny"))))
        e_art, e_eng = np.abs(art - ref), np.abs(eng - ref)
        assert e_eng.mean() <= 1.25 * e_art.mean() and e_eng.max() <= 1.5 * e_art.max(), (
            f"engine vs fp32 mean {e_eng.mean():.3g} max {e_eng.max():.3g}; artifact {e_art.mean():.3g} {e_art.max():.3g}")
        assert (eng.argmax(-1) == ref.argmax(-1)).mean() >= (art.argmax(-1) == ref.argmax(-1)).mean() - 0.02
        # decode against the artifact: measured max 7.7 %, mean 1.7 % of the logit range
        _assert_close(_run_both(q, "decode"), 0.1, "int8 decode", mean_rel=0.03, top1=False)
        return
    # MatMulIntegerToFloat (u8 x u8): integer vs float accumulation of the same products, summation order only
    _assert_close(_run_both(q, "decode"), 1e-4, "int8 decode")
    # prefill, many rows: the build's fused norms/attention differ from the unfused graph by float rounding, which
    # moves a few activations across an int8 rounding boundary (one step).  With the LM head quantized (the default)
    # a step of its input (the final norm's output: one unsmoothed per-tensor scale) moves every logit directly:
    # measured max 2.2 %, mean 0.57 % of the logit range on tiny (0.8 % / 0.2 % with an fp32 LM head), same top-1
    _assert_close(_run_both(q, "prefill"), 0.03, "int8 prefill", mean_rel=0.008)


def _qdq_linears(k: int, widths: list[int], rng):
    """A graph: x -> per-tensor int8 Q/DQ -> MatMuls with int8 per-channel weights (K, N_i) sharing that input."""
    h, tp = onnx.helper, onnx.TensorProto
    inits = [onnx.numpy_helper.from_array(np.array(0.02, np.float32), "s"),
             onnx.numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             h.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"])]
    for i, n in enumerate(widths):
        inits += [onnx.numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), f"w{i}"),
                  onnx.numpy_helper.from_array(rng.uniform(0.001, 0.01, n).astype(np.float32), f"ws{i}"),
                  onnx.numpy_helper.from_array(np.zeros(n, np.int8), f"wz{i}")]
        nodes += [h.make_node("DequantizeLinear", [f"w{i}", f"ws{i}", f"wz{i}"], [f"wd{i}"], axis=1),
                  h.make_node("MatMul", ["xd", f"wd{i}"], [f"y{i}"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", tp.FLOAT, [None, k])],
                     [h.make_tensor_value_info(f"y{i}", tp.FLOAT, None) for i in range(len(widths))], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)])


@pytest.mark.skipif(not NBITS, reason="8-bit MatMulNBits is built only on CPUs where it is exact "
                    "(runtime.ort_backend.int8_dot_products_exact); on this one it saturates")
@pytest.mark.parametrize("k", [640, 80])  # block 128; K = 80: block 16 (the largest power of two dividing it)
def test_int8_matmul_nbits_form_and_numbers(tmp_path, k):
    """8-bit MatMulNBits from Q/DQ Linears: one node + Split for Linears sharing an input, block ``int8_block_size``,
    the dequantized weights unchanged.  Numbers: exact (float summation order) where every K block of the input
    holds a value at the end of the int8 grid (the kernel's block re-quantization is then the identity); otherwise
    within half a grid step per input value."""
    rng = np.random.default_rng(0)
    model = _qdq_linears(k, [48, 32], rng)
    t = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    wd = [t[f"w{i}"].astype(np.float32) * t[f"ws{i}"] for i in range(2)]  # the dequantized weights (K, N_i)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert matmul_nbits(model, tmp_path, tmp_path / "w.data", bits=(8,)) == {"linears": 2, "nodes": 1}
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulNBits"] == 1 and ops["Split"] == 1 and ops["MatMul"] == 0, ops
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1, ops  # the activation's pair stays
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in node.attribute}
    bs = int8_block_size(k)
    assert bs == (128 if k == 640 else 16) and attrs["block_size"] == bs and attrs["bits"] == 8 and attrs["N"] == 80
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(tmp_path))
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    steps = rng.integers(-100, 101, (4, k)).astype(np.float32)
    steps[:, ::bs] = 127 * np.sign(rng.standard_normal((4, k // bs)))  # each block reaches the grid's end
    x = steps * np.float32(0.02)
    for a, b in zip(sess.run(None, {"x": x}), ref.run(None, {"x": x})):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    x = (rng.integers(-60, 61, (4, k)) * np.float32(0.02)).astype(np.float32)  # blocks short of the end
    for w, a, b in zip(wd, sess.run(None, {"x": x}), ref.run(None, {"x": x})):
        bound = 0.5 * 0.02 * np.abs(w).sum(0)  # half a step per input value
        assert (np.abs(a - b) <= bound[None] + 1e-5).all()
        assert np.abs(a - b).max() > 1e-4 * np.abs(b).max()  # the re-quantization is visible: the bound is tested


def test_fp8_weights_are_dequantized_once(built):
    """The default CPU form of FP8: fp32 weights computed once, no activation fake quantization (the fp32 graph on
    the FP8 weights: no Q/DQ kernel left)."""
    q = built("fp8")
    assert read_manifest(q)["engines"]["onnxruntime"]["fp8_activations"] == "fp32"
    for graph in ("prefill", "decode"):
        proto = onnx.load(str(q / read_manifest(q)["engines"]["onnxruntime"][graph]), load_external_data=False)
        inits = {t.name: t for t in proto.graph.initializer}
        assert not any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN and t.dims and len(t.dims) == 2
                       for t in inits.values())
        ops = collections.Counter(n.op_type for n in proto.graph.node)
        assert ops["QuantizeLinear"] == 0 and ops["DequantizeLinear"] == 0, ops
    assert not list((q / "ort").glob("*.tmp"))


@pytest.fixture(scope="module")
def fp8_qdq(built, tmp_path_factory):
    """The FP8 artifact built with its activation fake quantization kept (``fp8_activations="qdq"``)."""
    import shutil

    out = tmp_path_factory.mktemp("fp8qdq") / "tiny-fp8-qdq"
    shutil.copytree(built("fp8"), out)
    build_engine(out, "onnxruntime", fp8_activations="qdq", **QUIET)
    return out


def test_fp8_qdq_form_keeps_activation_quantization(fp8_qdq):
    m = read_manifest(fp8_qdq)
    assert m["engines"]["onnxruntime"]["fp8_activations"] == "qdq"
    proto = onnx.load(str(fp8_qdq / m["engines"]["onnxruntime"]["prefill"]), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["QuantizeLinear"] >= 1, "activation fake quantization is kept"
    assert not [n.name for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


@pytest.mark.parametrize("graph", ["prefill", "decode"])
def test_fp8_build_equals_the_qdq_artifact(fp8_qdq, graph):
    """The built engine (weights folded to fp32, attention and norms lowered) against the plain Q/DQ artifact, at
    DESIGN's tolerance for a rewritten graph (1e-4 of the logit range) and the same argmax.  Not tighter: the
    lowered kernels sum in another order, and where that moves an activation across an FP8 rounding boundary the
    difference grows to a step of E4M3 (an AVX2 host without AVX-512: 3e-5 of the range)."""
    _assert_close(_run_both(fp8_qdq, graph), 1e-4, f"fp8 {graph}")


def test_fp8_weight_only_is_closer_to_fp32(built, artifact_store):
    """Without the activation rounding the CPU engine is no farther from fp32 than the Q/DQ artifact (prefill
    logits of held-out prompts), same top-1."""
    for ref, art, eng in _against_fp32(built("fp8"), artifact_store("tiny")):
        e_art, e_eng = np.abs(art - ref), np.abs(eng - ref)
        assert e_eng.mean() <= e_art.mean() and e_eng.max() <= 1.1 * e_art.max(), (e_eng.mean(), e_art.mean())
        assert e_eng.max() > 0  # the FP8 weights' rounding is there
        assert (eng.argmax(-1) == ref.argmax(-1)).mean() >= (art.argmax(-1) == ref.argmax(-1)).mean()


def test_drop_activation_qdq_leaves_other_types():
    """Only FP8 activation pairs are removed: an int8 pair and a weight DequantizeLinear stay."""
    from graphs.ort.qdq import drop_activation_qdq

    h, tp = onnx.helper, onnx.TensorProto
    inits = [onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             h.make_tensor("z8", tp.FLOAT8E4M3FN, [], [0.0]),
             onnx.numpy_helper.from_array(np.array(0, np.int8), "zi"),
             onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")]
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z8"], ["xq"]),
             h.make_node("DequantizeLinear", ["xq", "s", "z8"], ["xd"]),
             h.make_node("MatMul", ["xd", "w"], ["y"]),
             h.make_node("QuantizeLinear", ["y", "s", "zi"], ["yq"]),
             h.make_node("DequantizeLinear", ["yq", "s", "zi"], ["yd"]),
             h.make_node("MatMul", ["yd", "w"], ["out"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", tp.FLOAT, [1, 4])],
                     [h.make_tensor_value_info("out", tp.FLOAT, [1, 4])], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    assert drop_activation_qdq(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["MatMul", "QuantizeLinear", "DequantizeLinear", "MatMul"] and model.graph.node[0].input[0] == "x"
    assert "z8" not in {t.name for t in model.graph.initializer}
    x = np.array([[0.1, 0.2, 0.3, 0.47]], np.float32)  # x @ w = 1.07: not on the 0.1 grid, so rounding shows
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    w = np.ones((4, 4), np.float32)
    want = (np.round((x @ w) / np.float32(0.1)) * np.float32(0.1)) @ w  # int8 fake quant kept, FP8 pair gone
    np.testing.assert_allclose(y, want, rtol=1e-6)


def test_split_leaves_single_users_and_other_graphs_alone():
    """A shared pair feeding two MatMuls is split; a pair with one user and a bare DequantizeLinear are not."""
    h = onnx.helper
    tp = onnx.TensorProto
    inits = [onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             onnx.numpy_helper.from_array(np.array(0, np.int8), "z"),
             onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w1"),
             onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w2"),
             onnx.numpy_helper.from_array(np.ones((4, 4), np.int8), "wq")]
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             h.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             h.make_node("MatMul", ["xd", "w1"], ["y1"]), h.make_node("MatMul", ["xd", "w2"], ["y2"]),
             h.make_node("QuantizeLinear", ["y1", "s", "z"], ["yq"], name="q2"),
             h.make_node("DequantizeLinear", ["yq", "s", "z"], ["yd"], name="dq2"),
             h.make_node("MatMul", ["yd", "w1"], ["y3"]),
             h.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], name="wdq"),
             h.make_node("MatMul", ["y2", "wd"], ["y4"]), h.make_node("Add", ["y4", "wd"], ["y5"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", tp.FLOAT, [1, 4])],
                     [h.make_tensor_value_info(n, tp.FLOAT, [1, 4]) for n in ("y3", "y5")], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    x = np.linspace(-1, 1, 4, dtype=np.float32)[None]
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert split_shared_activation_qdq(model) == 1
    onnx.checker.check_model(model)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] == 3 and ops["DequantizeLinear"] == 4
    users = collections.Counter(i for n in model.graph.node for i in n.input)
    assert users["xd"] == 1 and users["yd"] == 1 and users["wd"] == 2
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
