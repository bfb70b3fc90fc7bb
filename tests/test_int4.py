"""INT4 weight-only (W4A16): packing, round-to-nearest against its definition, AWQ vs RTN, the DequantizeLinear form
TensorRT takes, MatMulNBits on ONNX Runtime, and the demo checkpoint's accuracy."""

from __future__ import annotations

import collections
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import onnx
import pytest

from calib.calibrate import calibrate
from calib.int4 import (
    awq_search, dequantize_int4_blockwise, int4_values, pack_int4, quantize_int4_blockwise, unpack_int4,
    weight_error,
)
from exporter.config import PRESETS
from graphs.build import build_engine
from runtime.manifest import read_manifest
from tests.test_quant_fast import _assert_close, _lm_head_op, _nbits_linears, _run_both, _want_linears

QUIET = dict(log=lambda *_: None)


# ------------------------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("shape", [(64, 24), (33, 5), (1, 1)])
def test_pack_unpack_round_trip_and_onnx_layout(shape):
    q = np.random.default_rng(0).integers(-8, 8, size=shape).astype(np.int8)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.size == (q.size + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed, shape), q)
    # the layout ONNX (and TensorRT) use for INT4 initializers: two per byte, low nibble first
    onnx_raw = onnx.numpy_helper.from_array(q.astype(ml_dtypes.int4)).raw_data
    assert packed.tobytes() == onnx_raw
    with pytest.raises(ValueError, match="int4 range"):
        pack_int4(np.array([8]))


def _rtn_reference(w: np.ndarray, bs: int):
    """float64 definition: per (block of bs input rows, output column) scale = max|w| / 7, q = round-half-even(w / s)
    clipped to [-8, 7]; blocks past the end are shorter."""
    k, n = w.shape
    nb = -(-k // bs)
    scales = np.zeros((nb, n))
    q = np.zeros((k, n), np.int64)
    quot = np.zeros((k, n))
    for b in range(nb):
        rows = slice(b * bs, min(k, (b + 1) * bs))
        amax = np.abs(w[rows].astype(np.float64)).max(axis=0)
        s = np.where(amax > 0, amax / 7.0, 1.0)
        scales[b] = s
        quot[rows] = w[rows].astype(np.float64) / s.astype(np.float32).astype(np.float64)
        q[rows] = np.clip(np.round(quot[rows]), -8, 7)
    return q, scales, quot


@pytest.mark.parametrize("k,bs", [(128, 32), (96, 64), (200, 128)])
def test_rtn_matches_its_definition(k, bs):
    rng = np.random.default_rng(k)
    w = (rng.standard_normal((k, 40)) * rng.uniform(0.01, 3, size=(1, 40))).astype(np.float32)
    w[:bs, 3] = 0.0  # a block of zeros: scale 1, values 0
    q, scales = int4_values(w, bs)
    ref_q, ref_s, quot = _rtn_reference(w, bs)
    np.testing.assert_array_equal(scales, ref_s.astype(np.float32))  # IEEE division: exact after rounding
    tie = np.abs(np.abs(quot - np.floor(quot)) - 0.5) < 1e-5  # float32 vs float64 quotient may round a tie apart
    assert tie.mean() < 1e-3
    assert np.array_equal(q[~tie], ref_q[~tie]) and np.abs(q[tie] - ref_q[tie]).max(initial=0) <= 1
    assert q.min() >= -8 and q.max() <= 7 and np.all(q[:bs, 3] == 0) and scales[0, 3] == 1.0
    w_hat = dequantize_int4_blockwise(q, scales, bs)
    assert np.all(np.abs(w_hat - w) <= np.repeat(scales, bs, axis=0)[:k] / 2 + 1e-6)
    packed, s2 = quantize_int4_blockwise(w, bs)
    np.testing.assert_array_equal(unpack_int4(packed, w.shape), q)
    np.testing.assert_array_equal(s2, scales)
    with pytest.raises(ValueError, match="power of two"):
        int4_values(w, 48)


@pytest.mark.parametrize("with_sample", [True, False])
def test_awq_never_worse_than_rtn_and_better_with_outlier_channels(with_sample):
    rng = np.random.default_rng(1)
    k, n, bs = 256, 96, 64
    w = rng.standard_normal((k, n)).astype(np.float32)
    loud = rng.choice(k, 8, replace=False)
    x = rng.standard_normal((512, k)).astype(np.float32)
    x[:, loud] *= 30.0  # activation outliers in a few channels: the case AWQ exists for
    stats = SimpleNamespace(absmean=np.abs(x).mean(0), sqmean=np.square(x).mean(0),
                            sample=x[:128] if with_sample else None)
    res = awq_search(w, stats, bs)
    q, s = int4_values(w, bs)
    rtn = weight_error(w, dequantize_int4_blockwise(q, s, bs), stats)
    assert res.rtn_loss == pytest.approx(rtn, rel=1e-6)
    assert res.loss <= res.rtn_loss
    assert res.alpha > 0 and res.loss < 0.8 * res.rtn_loss, (res.alpha, res.loss, res.rtn_loss)
    # the objective on rows the search did not see agrees
    held = SimpleNamespace(sample=x[256:])
    w_awq = dequantize_int4_blockwise(*int4_values(w * res.factors[:, None], bs), bs) / res.factors[:, None]
    assert weight_error(w, w_awq, held) < weight_error(w, dequantize_int4_blockwise(q, s, bs), held)
    # uniform activations: nothing to gain, and never a loss
    flat = SimpleNamespace(absmean=np.ones(k), sqmean=np.ones(k), sample=None)
    r = awq_search(w, flat, bs)
    assert r.loss <= r.rtn_loss


# ------------------------------------------------------------------------------------------- graphs
@pytest.fixture(scope="module")
def int4_tiny(artifact_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("int4") / "tiny-int4"
    calibrate(artifact_store("tiny"), out, "int4", block_size=32, **QUIET)  # default: decoder + tied LM head
    build_engine(out, "onnxruntime", **QUIET)
    return out


def test_int4_dequantize_form(int4_tiny):
    m = read_manifest(int4_tiny)
    assert m["precision"] == "int4" and m["quantization"]["block_size"] == 32
    assert m["quantization"]["quantized"] == ["decoder", "lm_head"] and m["quantization"]["embedding"] == "fp16"
    n = _want_linears("tiny") + 1  # + LM head
    for graph in ("prefill", "decode"):
        g = onnx.load(str(int4_tiny / f"{graph}.onnx"), load_external_data=True).graph
        inits = {t.name: t for t in g.initializer}
        by_out = {o: nd for nd in g.node for o in nd.output}
        assert not [nd for nd in g.node if nd.op_type == "QuantizeLinear"], "weight-only: activations stay fp32"
        mms = [nd for nd in g.node if nd.op_type == "MatMul" and nd.input[1] in by_out
               and by_out[nd.input[1]].op_type == "DequantizeLinear"]
        assert len(mms) == n, graph
        for mm in mms:
            dq = by_out[mm.input[1]]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
            assert attrs == {"axis": 0, "block_size": 32}, attrs
            w, scale, zp = (inits[i] for i in dq.input)
            assert w.data_type == onnx.TensorProto.INT4 and len(w.dims) == 2
            k, nout = w.dims
            assert list(scale.dims) == [-(-k // 32), nout] and scale.data_type == onnx.TensorProto.FLOAT
            assert zp.data_type == onnx.TensorProto.INT4 and list(zp.dims) == list(scale.dims)
            assert not onnx.numpy_helper.to_array(zp).astype(np.int8).any(), "zero point 0"
            assert np.all(onnx.numpy_helper.to_array(scale) > 0)
            vals = onnx.numpy_helper.to_array(w).astype(np.int8)
            assert vals.min() >= -8 and vals.max() <= 7
        # the Linears' fp32 weights are gone, the fp32 table too: the Gather reads an fp16 copy, cast to fp32
        assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and t.name.endswith("proj.weight")
                       for t in g.initializer)
        assert not any(t.name.endswith("embed_tokens.weight") for t in g.initializer)
        gather = next(nd for nd in g.node
                      if nd.op_type == "Gather" and nd.input[0].endswith("embed_tokens.weight_fp16"))
        assert inits[gather.input[0]].data_type == onnx.TensorProto.FLOAT16
        assert [nd.op_type for nd in g.node if gather.output[0] in nd.input] == ["Cast"]
        lm = by_out[next(nd for nd in g.node if nd.op_type == "MatMul" and nd.input[1] in by_out
                         and by_out[nd.input[1]].input[0].endswith("lm_head.weight_int4")).input[1]]
        assert lm.op_type == "DequantizeLinear"


def test_int4_runs_as_matmulnbits(int4_tiny):
    n = _want_linears("tiny") + 1
    for graph in ("prefill", "decode"):
        nodes = onnx.load(str(int4_tiny / read_manifest(int4_tiny)["engines"]["onnxruntime"][graph]), load_external_data=False).graph.node
        ops = collections.Counter(nd.op_type for nd in nodes)
        assert _nbits_linears(nodes) == n and ops["DequantizeLinear"] == 0, ops
        assert _lm_head_op(int4_tiny / read_manifest(int4_tiny)["engines"]["onnxruntime"][graph]) == "MatMulNBits"
        for nd in nodes:
            if nd.op_type == "MatMulNBits":
                a = {x.name: onnx.helper.get_attribute_value(x) for x in nd.attribute}
                assert a["bits"] == 4 and a["block_size"] == 32


@pytest.mark.parametrize("graph", ["prefill", "decode"])
def test_int4_matmulnbits_equals_the_dequantize_graph(int4_tiny, graph, tmp_path):
    """At accuracy level 0 (fp32 activations) ORT's fused MatMulNBits reads the same int4 values and scales as the
    artifact's DequantizeLinear: same numbers.  The build's level 4 also quantizes activations to int8 inside the
    kernel (measured 2-6 % of the logit range on tiny's random weights): its accuracy is checked on the demo."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    opts.optimized_model_filepath = str(tmp_path / "l0.onnx")
    sess = ort.InferenceSession(str(int4_tiny / f"{graph}.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "l0.onnx"), load_external_data=False).graph.node)
    assert ops["MatMulNBits"] == _want_linears("tiny") + 1 and ops["DequantizeLinear"] == 0, ops
    _assert_close(_run_both(int4_tiny, graph, built=sess), 1e-4, f"int4 level 0 {graph}")


@pytest.mark.parametrize("graph", ["prefill", "decode"])
def test_int4_build_makes_matmulnbits_without_zero_points(int4_tiny, graph):
    """The ORT build writes MatMulNBits itself (`graphs.ort.qdq.matmul_nbits`): no zero-point input (ORT's
    own fusion adds one, and its kernel is slower); at accuracy level 0 the rewritten graph gives the artifact's
    numbers (the dequantized weights are the same)."""
    import onnxruntime as ort

    from graphs.ort.qdq import matmul_nbits

    built = onnx.load(str(int4_tiny / read_manifest(int4_tiny)["engines"]["onnxruntime"][graph]),
                      load_external_data=False).graph.node
    nbits = [nd for nd in built if nd.op_type == "MatMulNBits"]
    assert all(len(nd.input) == 3 for nd in nbits)
    # q/k/v (full layers: q/k, K is V) and gate/up share an input: one MatMulNBits each
    want_nodes = 4 * PRESETS["tiny"].text.num_layers + 1  # qkv, o, gate/up, down per layer + the LM head
    assert _nbits_linears(built) == _want_linears("tiny") + 1 and len(nbits) == want_nodes, len(nbits)
    proto = onnx.load(str(int4_tiny / f"{graph}.onnx"), load_external_data=False)
    data = int4_tiny / "nbits-test.tmp"  # beside the graph: external data locations are relative to it
    try:
        done = matmul_nbits(proto, int4_tiny, data, accuracy_level=0)
        assert done == {"linears": _want_linears("tiny") + 1, "nodes": want_nodes}, done
        assert not [nd for nd in proto.graph.node if nd.op_type == "DequantizeLinear"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(int4_tiny))
        sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    finally:
        data.unlink(missing_ok=True)
    _assert_close(_run_both(int4_tiny, graph, built=sess), 1e-4, f"int4 MatMulNBits level 0 {graph}")


def test_demo_int4_accuracy_and_report(demo_artifact, demo_accuracy, tmp_path):
    from calib.report import accuracy_report
    from demo.evaluate import evaluate

    out = tmp_path / "demo-int4"
    calibrate(demo_artifact, out, "int4", **QUIET)  # the defaults: AWQ, block 128
    q = read_manifest(out)["quantization"]
    assert q["int4_method"] == "awq" and q["linears"] == 42  # 41 decoder Linears + the tied LM head
    assert q["block_size"] == 128, q
    build_engine(out, "onnxruntime", **QUIET)
    rep = accuracy_report(out, steps=4, **QUIET)
    assert rep["precision"] == "int4" and rep["passed"], rep
    assert {"mean_kl", "top1", "perplexity_ratio"} <= set(rep) and len(rep["linear_snr_db"]) == 42
    right, n = evaluate(str(out), n=150, log=lambda *_: None)
    assert abs(right / n - demo_accuracy) <= 0.02, f"int4 {right}/{n} vs fp32 {demo_accuracy:.3f}"


def test_int4_errors(artifact_store, tmp_path):
    src = artifact_store("tiny-text")
    with pytest.raises(ValueError, match="block size"):
        calibrate(src, tmp_path / "a", "int4", block_size=48, **QUIET)
    with pytest.raises(ValueError, match="INT4 method"):
        calibrate(src, tmp_path / "a", "int4", int4_method="gptq", **QUIET)
    with pytest.raises(ValueError, match="SmoothQuant is for W8A8"):
        calibrate(src, tmp_path / "a", "int4", smoothquant=0.5, **QUIET)
    assert not (tmp_path / "a").exists()
    # RTN on a preset whose hidden size (32) is smaller than the block: one short block per column
    calibrate(src, tmp_path / "b", "int4", block_size=64, int4_method="rtn", **QUIET)
    g = onnx.load(str(tmp_path / "b" / "decode.onnx"), load_external_data=False).graph
    assert PRESETS["tiny-text"].text.hidden_size == 32
    scales = [t for t in g.initializer if t.name.endswith("q_proj.weight_scale")]
    assert scales and all(t.dims[0] == 1 for t in scales)
