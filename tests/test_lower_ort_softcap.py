"""`graphs.ort.scale_fold` and `graphs.ort.softcap`: the LM head's input scale goes into the final norm, the
softcap's division into that weight (or the weight's dequantization scale, or a Mul on the hidden state).

Each rewrite on a small graph built here: the numbers are unchanged (ONNX Runtime before and after), the exact
nodes are gone, and look-alikes (shared constants, a non-constant divisor, an activation straight from a
DequantizeLinear) are left alone.  The built engines: no ``Div`` in front of the final ``Tanh``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs.ort.scale_fold import fold_scales_into_norms
from graphs.ort.softcap import fold_softcap_divisor
from runtime.manifest import read_manifest

H, V, CAP = 16, 40, 30.0


def _head(*, scale: str = "const", weight: str = "plain", shared_norm_weight: bool = False, divisor: str = "const",
          extra_user: bool = False):
    """x -> SimplifiedLayerNormalization(g) [-> CastLike] [-> Mul(k)] -> MatMul(W or DQ(W)) -> Div(c) -> Tanh -> Mul(c)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.random(H) + 0.5).astype(np.float32), "g"),
             numpy_helper.from_array(np.array(CAP, np.float32), "c")]
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["n"], axis=-1, epsilon=1e-6),
             helper.make_node("CastLike", ["n", "x"], ["nc"])]
    a = "nc"
    if scale == "const":
        inits.append(numpy_helper.from_array((rng.random(H) + 0.5).astype(np.float32), "k"))
        nodes.append(helper.make_node("Mul", ["nc", "k"], ["a"]))
        a = "a"
    elif scale == "dq":  # an INT8-style activation fake quantization
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
                  numpy_helper.from_array(np.array(0, np.int8), "xz")]
        nodes += [helper.make_node("QuantizeLinear", ["nc", "xs", "xz"], ["aq"]),
                  helper.make_node("DequantizeLinear", ["aq", "xs", "xz"], ["a"])]
        a = "a"
    w = (rng.standard_normal((H, V)) * 2).astype(np.float32)
    if weight == "plain":
        inits.append(numpy_helper.from_array(w, "W"))
        wname = "W"
    else:  # per-output-channel int8 weight
        ws = (np.abs(w).max(0) / 127).astype(np.float32)
        inits += [numpy_helper.from_array(np.round(w / ws).astype(np.int8), "Wq"),
                  numpy_helper.from_array(ws, "Ws" if weight == "dq" else "g_shared_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["Wq", "Ws" if weight == "dq" else "g_shared_scale"], ["Wd"],
                                      axis=1))
        wname = "Wd"
    nodes.append(helper.make_node("MatMul", [a, wname], ["z"]))
    c_in = "c" if divisor == "const" else "cap"
    nodes += [helper.make_node("Div", ["z", c_in], ["d"]), helper.make_node("Tanh", ["d"], ["t"]),
              helper.make_node("Mul", ["t", "c"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    if shared_norm_weight:  # another norm reads g
        nodes.append(helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["other"], axis=-1, epsilon=1e-6))
        outputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, None))
    if extra_user:  # the LM head's output is also a graph output
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    if weight == "dq_shared":
        nodes.append(helper.make_node("Identity", ["g_shared_scale"], ["scale_copy"]))
        outputs.append(helper.make_tensor_value_info("scale_copy", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, H])]
    if divisor != "const":
        inputs.append(helper.make_tensor_value_info("cap", TensorProto.FLOAT, []))
    g = helper.make_graph(nodes, "head", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _run(proto, feeds):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], feeds)[0]


def _rewrite(proto):
    model = ir.serde.deserialize_model(proto)
    n = fold_scales_into_norms(model)
    report = fold_softcap_divisor(model)
    return ir.serde.serialize_model(model), n, report


FEEDS = {"x": np.random.default_rng(1).standard_normal((2, 3, H)).astype(np.float32) * 3}


@pytest.mark.parametrize("scale,weight,folded,how", [
    ("const", "plain", 1, "norm weight"),   # INT4/AWQ: the input scale into the norm, then 1/c into it
    ("none", "plain", 0, "norm weight"),    # fp32: 1/c into the final norm's weight
    ("dq", "dq", 0, "weight scale"),        # INT8 Q/DQ: the activation quantizer keeps its input; 1/c on W's scale
])
def test_folds_keep_the_logits(scale, weight, folded, how):
    proto = _head(scale=scale, weight=weight)
    want = _run(proto, FEEDS)
    out, n, report = _rewrite(proto)
    assert n == folded and report == {"folded": [how], "refused": []}
    ops = [x.op_type for x in out.graph.node]
    assert "Div" not in ops and ops.count("Mul") == 1  # only the softcap's c * tanh
    got = _run(out, FEEDS)
    err = np.abs(got - want).max()
    assert err <= 1e-5 * np.ptp(want), f"max err {err:.3g} (range {np.ptp(want):.3g})"


def test_a_shared_norm_weight_gets_a_mul_on_the_hidden_state():
    proto = _head(scale="none", shared_norm_weight=True)
    want = _run(proto, FEEDS)
    out, n, report = _rewrite(proto)
    assert report == {"folded": ["hidden-state Mul"], "refused": []}
    g_users = [x for x in out.graph.node if "g" in x.input]
    assert len(g_users) == 2  # both norms still read the original weight
    assert np.abs(_run(out, FEEDS) - want).max() <= 1e-5 * np.ptp(want)


@pytest.mark.parametrize("kwargs,reason", [
    ({"divisor": "input"}, "not a division of a MatMul by a non-zero scalar constant"),
    ({"extra_user": True}, "users besides the softcap"),
    ({"scale": "dq", "weight": "dq_shared"}, "straight from a DequantizeLinear"),
])
def test_look_alikes_are_left_alone(kwargs, reason):
    proto = _head(**{"scale": "none", **kwargs})
    out, _, report = _rewrite(proto)
    assert not report["folded"] and reason in report["refused"][0]
    assert [x.op_type for x in out.graph.node].count("Div") == 1


def test_a_shared_input_scale_is_not_folded():
    proto = _head(scale="const")
    proto.graph.node.append(helper.make_node("Mul", ["x", "k"], ["k_user"]))  # k read elsewhere too
    proto.graph.output.append(helper.make_tensor_value_info("k_user", TensorProto.FLOAT, None))
    want = _run(proto, FEEDS)
    out, n, report = _rewrite(proto)
    assert n == 0 and report["folded"] == ["hidden-state Mul"]  # neither constant is the head's own
    assert np.abs(_run(out, FEEDS) - want).max() <= 1e-5 * np.ptp(want)


def test_engines_have_no_softcap_division(artifact_store):
    art = artifact_store("tiny")
    g = onnx.load(str(art / read_manifest(art)["engines"]["onnxruntime"]["prefill"]), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    tanh = [n for n in g.node if n.op_type == "Tanh"]
    assert len(tanh) == 1 and producer[tanh[0].input[0]].op_type == "MatMul"
