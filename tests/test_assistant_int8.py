"""The INT8 assistant (`calib.assistant_int8`): the Q/DQ graph `write_int8` makes equals a plain PyTorch W8A8
assistant (each Linear's input fake-quantized with ``amax / 127`` of the statistics, its weight rounded per output
channel) on shapes other than the export's; every Linear's weight is stored as int8 and nothing of them as fp32;
ONNX Runtime's 8-bit MatMulNBits form beside it gives the same drafts; the runner picks that form; bad inputs are
refused, naming what was wrong, and leave the artifact as it was.  The demo pair's acceptance and exactness with
an INT8 assistant: tests/test_speculative_demo_pair.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from calib.stats import EDGES, Stats, TensorStats
from exporter.config import PRESETS
from exporter.export_assistant import export_graph
from runtime.manifest import read_manifest
from tests.assistant_ref import reference_pair
from tests.test_assistant_runtime import _inputs


@pytest.fixture(scope="module")
def tiny(workdir):
    return reference_pair("tiny-assistant", workdir)


def _linear_inputs(model, args) -> dict[str, np.ndarray]:
    """Every nn.Linear's input and the final norm's output (the LM head's input) over one step, by module path."""
    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0].clone())))
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, out: seen.setdefault("lm_head", out.clone())))
    with torch.no_grad():
        model.step(*args)
    for h in hooks:
        h.remove()
    return {k: v.reshape(-1, v.shape[-1]).numpy() for k, v in seen.items()}


def _w8a8_reference(model, amax: dict[str, float]):
    """A copy of ``model`` computing W8A8 in PyTorch: weights rounded to int8 per output row, each Linear input (and
    the LM head's) rounded to the int8 grid of ``amax / 127``."""
    from exporter.assistant import AssistantModel

    ref = AssistantModel(model.cfg)
    ref.load_state_dict(model.state_dict())

    def fake(x, s):
        return torch.clamp(torch.round(x / s), -127, 127) * s

    with torch.no_grad():
        for w in [m.weight for m in ref.modules() if isinstance(m, torch.nn.Linear)] + [ref.model.embed_tokens.weight]:
            s = w.abs().amax(dim=1, keepdim=True) / 127.0
            w.copy_(torch.clamp(torch.round(w / s), -127, 127) * s)
    for name, mod in ref.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(lambda m, a, s=amax[name] / 127.0: (fake(a[0], s),))
    ref.model.norm.register_forward_hook(lambda m, a, out, s=amax["lm_head"] / 127.0: fake(out, s))
    return ref


def test_int8_graph_equals_pytorch_w8a8(tiny, tmp_path):
    """The 23 Linears of the tiny assistant (5 per layer, both projections, the LM head) quantized with statistics
    of other inputs than the ones compared; Q/DQ graph run as written vs the PyTorch W8A8 reference; int8 weights of
    exactly the Linears' sizes; MatMulNBits form: the same argmax tokens."""
    import onnx
    import onnxruntime as ort

    from calib.assistant_int8 import ORT_GRAPH, write_int8

    _, _, ours, _ = tiny
    target = PRESETS["tiny"]
    path = tmp_path / "assistant.onnx"
    export_graph(ours, target, path)
    calib_args = _inputs(ours, target, 3, 41, target.text.sliding_window + 2, 7)
    acts = _linear_inputs(ours, calib_args)
    stats = {}
    for name, x in acts.items():
        st = TensorStats(np.zeros(x.shape[1], np.float32), np.zeros(len(EDGES) - 1, np.int64), sample_rows=0)
        st.update(x)
        stats[name] = st
    done = write_int8(path, Stats(stats, {"data": "test"}), log=lambda *_: None)
    n = len(acts)
    pairs = n - len(ours.model.layers) - 1  # gate/up share a Q/DQ pair in each layer, so do lm_head and post_projection
    assert (done["linears"], done["activation_qdq"]) == (n, pairs)
    assert done["record"]["engines"]["onnxruntime"]["file"] == f"assistant/{ORT_GRAPH}"
    proto = onnx.load(str(path))
    int8 = {t.name: t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2}
    sizes = sorted(int(np.prod(t.dims)) for t in int8.values())
    want = sorted(int(m.weight.numel()) for m in ours.modules() if isinstance(m, torch.nn.Linear))
    assert sizes == sorted(want + [ours.model.embed_tokens.weight.numel()])
    big_fp32 = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and
                int(np.prod(t.dims)) >= min(sizes)]
    assert not big_fp32, f"fp32 weights left beside the int8 ones: {big_fp32}"

    amax = {k: float(np.abs(v).max()) for k, v in acts.items()}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    weights = {n: m.weight.detach() for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    weights["lm_head"] = ours.model.embed_tokens.weight.detach()
    for module, w in weights.items():  # per output row: scale max|w| / 127, codes round(w / scale), stored (in, out)
        scale = (w.abs().amax(dim=1) / 127.0).numpy()
        codes = torch.clamp(torch.round(w / torch.from_numpy(scale)[:, None]), -127, 127).numpy().T
        assert np.array_equal(inits[f"{module}.weight_int8"], codes.astype(np.int8)), module
        np.testing.assert_allclose(inits[f"{module}.weight_scale"], scale, rtol=1e-6)
        shared = module.replace("up_proj", "gate_proj").replace("post_projection", "lm_head")  # one pair, first name
        np.testing.assert_allclose(inits[f"{shared}.input.scale"], amax[module] / 127.0, rtol=1e-6)

    # end to end: ONNX Runtime's QuantizeLinear rounds ~0.1 % of values to the other neighbour than round(x / s) does
    # (measured on random data), and a flipped activation step moves every later Linear's input; so the graph is
    # held to a small fraction of the quantization's own effect and to the same tokens
    args = _inputs(ours, target, 2, 37, target.text.sliding_window + 3, 2)
    ref = _w8a8_reference(ours, amax)
    with torch.no_grad():
        want = [t.numpy() for t in ref.step(*args)]
        fp32 = ours.step(*args)[0].numpy()
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feeds = {i.name: a.numpy() for i, a in zip(ort.InferenceSession(str(path), plain).get_inputs(), args)}
    got = ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"]).run(None, feeds)
    err, q_err = np.abs(got[0] - want[0]), np.abs(fp32 - want[0])
    assert err.mean() <= 0.2 * q_err.mean() and err.max() <= 0.2 * q_err.max(), (
        f"Q/DQ graph vs PyTorch W8A8: max err {err.max():.3g}, mean {err.mean():.3g}; fp32 vs W8A8: max "
        f"{q_err.max():.3g}, mean {q_err.mean():.3g}")
    assert np.array_equal(got[2], want[2])
    nbits = ort.InferenceSession(str(tmp_path / ORT_GRAPH), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert np.array_equal(nbits[2], got[2])
    # its kernel re-quantizes the (already int8-grid) input per block of K with a scale of its own: other numbers
    # than the Q/DQ graph's, as far from fp32
    n_err, g_err = np.abs(nbits[0] - fp32), np.abs(got[0] - fp32)
    assert n_err.mean() <= 1.25 * g_err.mean(), f"vs fp32: MatMulNBits mean err {n_err.mean():.3g}, Q/DQ {g_err.mean():.3g}"
    ops = [nd.op_type for nd in onnx.load(str(tmp_path / ORT_GRAPH), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == pairs and ops.count("DequantizeLinear") == pairs  # activations only


def test_runner_takes_the_matmulnbits_form_where_exact():
    from runtime._int8_probe import int8_dot_products_exact
    from runtime.assistant import ort_graph

    plain = {"file": "assistant/assistant.onnx"}
    assert ort_graph(plain) == ("assistant/assistant.onnx", {})
    rec = dict(plain, engines={"onnxruntime": {"file": "assistant/assistant.ort.onnx", "int8_kernel": "MatMulNBits"}})
    want = ("assistant/assistant.ort.onnx", {}) if int8_dot_products_exact() else (
        "assistant/assistant.onnx", {"session.x64quantprecision": "1"})
    assert ort_graph(rec) == want


def test_refusals_leave_the_artifact_unchanged(workdir, artifact_store, tiny, tmp_path, capsys):
    """A target exported without --speculative cannot draft: refused naming it; a bad alpha or an empty data
    directory: refused before any tracing; the manifest and files are as before."""
    from calib.assistant_int8 import main

    _, _, _, ckpt = tiny
    art = tmp_path / "tiny"
    shutil.copytree(artifact_store("tiny"), art)
    before = (art / "manifest.json").read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(["--smoothquant", "1.5"], "alpha"), (["--smoothquant", "x"], "--smoothquant 'x'"),
             (["--max-new-tokens", "0"], "--max-new-tokens"), (["--data", str(empty)], "no prompts found"),
             ([], "--speculative")]
    capsys.readouterr()  # the fixtures' progress
    for extra, words in cases:
        assert main(["--assistant", str(ckpt), "--artifact", str(art), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("assistant-int8: error:") and words in err and err.count("\n") == 1, err
        assert (art / "manifest.json").read_bytes() == before
        assert sorted(p.name for p in art.iterdir()) == sorted(p.name for p in artifact_store("tiny").iterdir())
    read_manifest(art)
    assert json.loads(before).get("assistant") is None
