"""INT8 SmoothQuant / FP8 calibration: data, statistics, SmoothQuant equivalence, Q/DQ rules, accuracy targets."""

from __future__ import annotations

import json
import wave

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import runtime
from calib.calibrate import calibrate, main as calibrate_main
from calib.check import check_quantized
from calib.data import DEFAULT_DATA, default_set, load_dir, prefill_inputs
from calib.report import TARGETS, accuracy_report
from calib.smoothquant import apply_smoothing, plan_smoothing
from calib.stats import EDGES, Stats, TensorStats, collect_stats
from exporter.config import PRESETS
from exporter.linears import find_linears, group_of
from exporter.weights import load_model
from graphs.build import build_engine
from runtime.manifest import ArtifactError, read_manifest
from runtime.ort_backend import OrtBackend, prefill_feeds, zero_cache
from tests.test_model_reference import assert_close

QUIET = dict(log=lambda *_: None)


def _manifest(root):
    return read_manifest(root)


@pytest.fixture(scope="module")
def quantized(artifact_store, tmp_path_factory):
    """(preset, precision) -> quantized artifact of a tiny preset (built once)."""
    made = {}

    def get(preset: str, precision: str):
        if (preset, precision) not in made:
            out = tmp_path_factory.mktemp("q") / f"{preset}-{precision}"
            calibrate(artifact_store(preset), out, precision, **QUIET)
            made[preset, precision] = out
        return made[preset, precision]

    return get


# ---------------------------------------------------------------------------------------------------------- data
def _wav(path, n=1280):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(n) / 5) * 8000).astype("<i2").tobytes())


def test_data_dir_layout(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (64, 48), (200, 10, 10))
    (tmp_path / "a.txt").write_text("<|turn>user\n<|image|> and <|image|> and <|audio|><turn|>\n")
    img.save(tmp_path / "a.1.png")
    img.save(tmp_path / "a.2.png")
    _wav(tmp_path / "a.wav")
    (tmp_path / "b.ids").write_text("2 17 18\n19")
    img.save(tmp_path / "loose.jpg")
    _wav(tmp_path / "tone.wav")
    (tmp_path / "dataset.json").write_text('{"max_soft_tokens": 70}')
    ps = load_dir(tmp_path)
    by = {p.name.rsplit("/", 1)[-1]: p for p in ps.prompts}
    assert sorted(by) == ["a.txt", "b.ids", "loose.jpg", "tone.wav"]
    assert [x.name for x in by["a.txt"].images] == ["a.1.png", "a.2.png"]
    assert [x.name for x in by["a.txt"].audio] == ["a.wav"]
    assert by["b.ids"].ids == [2, 17, 18, 19] and by["b.ids"].text is None
    assert "<|image|>" in by["loose.jpg"].text and len(by["loose.jpg"].images) == 1
    assert "<|audio|>" in by["tone.wav"].text and len(by["tone.wav"].audio) == 1
    assert ps.max_soft_tokens == 70


def test_data_dir_errors(tmp_path, artifact_store):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dir(tmp_path / "nope")
    with pytest.raises(ValueError, match="no prompts found"):
        load_dir(tmp_path)
    (tmp_path / "x.ids").write_text("1 two 3")
    with pytest.raises(ValueError, match=r"x\.ids: expected whitespace-separated integer"):
        load_dir(tmp_path)
    cfg = _manifest(artifact_store("tiny"))["model_config"]
    (tmp_path / "x.ids").write_text(f"2 {cfg['tokens']['image']} 5")
    prompt = load_dir(tmp_path).prompts[0]
    with pytest.raises(ValueError, match=r"x\.ids: 1 image placeholder"):
        prefill_inputs(prompt, cfg, None, max_soft_tokens=70, max_len=200)


def test_default_sets_are_separate_and_complete():
    cal, held = load_dir(DEFAULT_DATA / "calibration"), load_dir(DEFAULT_DATA / "heldout")
    assert len(cal.prompts) == 32 and len(held.prompts) == 24
    for ps in (cal, held):
        assert ps.max_soft_tokens == 70
        assert any(p.images for p in ps.prompts) and any(p.audio for p in ps.prompts)
        assert any(not p.images and not p.audio for p in ps.prompts)

    def media(ps):
        return {p_.read_bytes() for p in ps.prompts for p_ in p.images + p.audio}

    assert not media(cal) & media(held), "held-out prompts share an image or clip with the calibration set"
    from demo.tasks import examples

    train_images = {ex.images[0].tobytes() for ex in examples("train", 200) if ex.images}
    from PIL import Image

    for p in cal.prompts + held.prompts:
        for im in p.images:
            assert np.asarray(Image.open(im).convert("RGB")).tobytes() not in train_images


def test_synthetic_prompts_for_artifacts_without_tokenizer():
    cfg = PRESETS["tiny-text"].to_json_dict()
    ps = default_set("calibration", cfg, has_tokenizer=False)
    assert len(ps.prompts) == 32
    assert all(p.ids and not p.images and not p.audio for p in ps.prompts)  # no vision/audio in tiny-text
    special = set(cfg["tokens"].values())
    assert all(t not in special for p in ps.prompts for t in p.ids[1:])


# ---------------------------------------------------------------------------------------------------- statistics
def test_percentile_and_max_from_the_histogram():
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, size=(4000, 8)).astype(np.float32)
    st = TensorStats(np.zeros(8, np.float32), np.zeros(len(EDGES) - 1, np.int64))
    st.update(x[:1000])
    st.update(x[1000:])
    assert st.rows == 4000 and st.hist.sum() == x.size
    np.testing.assert_array_equal(st.absmax, np.abs(x).max(axis=0))
    a = np.abs(x)
    bin_ratio = EDGES[1] / EDGES[0]
    for q in (90.0, 99.0, 99.9):
        v = st.percentile(q)  # a q-quantile up to one bin: at least q % at or below v, fewer below v / bin
        assert (a <= v).mean() >= q / 100 and (a < v / bin_ratio).mean() < q / 100, (q, v, np.percentile(a, q))
    assert st.percentile(100.0) == st.amax


def test_statistics_match_the_pytorch_model(artifact_store, reference_store, tmp_path):
    """Per-channel absmax of Linear inputs from the ONNX graph == from forward hooks on our PyTorch model."""
    art = artifact_store("tiny")
    manifest = _manifest(art)
    cfg = manifest["model_config"]
    ps = default_set("calibration", cfg, has_tokenizer=False)
    ps.prompts = ps.prompts[:6]
    stats = collect_stats(art, ps, **QUIET)
    model = load_model(reference_store("tiny")[1])
    seen: dict[str, np.ndarray] = {}

    def hook(name):
        def fn(_, args):
            a = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).numpy()
            seen[name] = np.maximum(seen.get(name, a), a)
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(hook(name))
    for p in ps.prompts:
        inp = prefill_inputs(p, cfg, None, max_soft_tokens=ps.max_soft_tokens, max_len=200)
        t = {k: (None if v is None else torch.from_numpy(v)) for k, v in vars(inp).items()}
        with torch.no_grad():
            model.prefill(t["input_ids"], t["past_lens"], t["seq_lens"], model.empty_caches(1, 200),
                          t["image_patches"], t["image_positions"], t["audio_frames"])
    compared = 0
    for name, want in seen.items():
        got = stats.tensors[name].absmax
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=name)
        compared += 1
    assert compared == len([m for m in stats.tensors if m != "lm_head"]) >= 40
    assert stats.tensors["model.vision_embedder.patch_dense"].rows > 0 and stats.tensors["lm_head"].rows == 6


def test_stats_file_roundtrip_and_reuse_check(artifact_store, tmp_path, quantized):
    q = quantized("tiny", "int8")
    stats = Stats.load(q / "calibration" / "stats.npz")
    stats.save(tmp_path / "s.npz")
    again = Stats.load(tmp_path / "s.npz")
    assert again.meta == stats.meta and set(again.tensors) == set(stats.tensors)
    for k in stats.tensors:
        np.testing.assert_array_equal(again.tensors[k].absmax, stats.tensors[k].absmax)
        np.testing.assert_array_equal(again.tensors[k].hist, stats.tensors[k].hist)
    # reuse on the same weights gives the same scales; on other weights it is refused
    out = tmp_path / "reused"
    calibrate(artifact_store("tiny"), out, "int8", stats_path=tmp_path / "s.npz", **QUIET)
    a = json.loads((q / "calibration" / "scales.json").read_text())
    b = json.loads((out / "calibration" / "scales.json").read_text())
    assert a["activation_scale"] == b["activation_scale"]
    with pytest.raises(ValueError, match="collected on other weights"):
        calibrate(artifact_store("tiny-deep"), tmp_path / "x", "int8", stats_path=tmp_path / "s.npz", **QUIET)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------- SmoothQuant
def _run_graphs(root, graphs: dict, ps, cfg, manifest):
    """Prefill logits for each prompt and one decode step after it, from graphs saved in ``root``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = {g: ort.InferenceSession(str(root / f"{g}.onnx"), opts, providers=["CPUExecutionProvider"]) for g in graphs}
    out = []
    for p in ps.prompts:
        inp = prefill_inputs(p, cfg, None, max_soft_tokens=ps.max_soft_tokens, max_len=200)
        feeds = prefill_feeds(inp, manifest) | zero_cache(manifest, "prefill", 1, 200)
        res = sess["prefill"].run(None, feeds)
        out.append(res[0])
        dec = {"input_ids": res[0].argmax(-1).reshape(1, 1), "past_lens": inp.seq_lens}
        names = [o.name for o in sess["prefill"].get_outputs()][1:]
        dec |= {n.replace("present_", "past_"): v for n, v in zip(names, res[1:])}
        out.append(sess["decode"].run(["logits"], dec)[0])
    return np.concatenate(out)


@pytest.mark.parametrize("preset,alpha,power_of_two", [
    ("tiny", 0.5, False), ("tiny", 0.85, False), ("tiny", 0.5, True), ("tiny-deep", 0.5, True),
])
def test_smoothquant_keeps_the_fp32_logits(preset, alpha, power_of_two, artifact_store, tmp_path):
    """Folding is exact algebra: with power-of-two factors (exact in floating point) the logits are bit-identical;
    with the real factors they differ by float rounding only (amplified by random deep models: tiny-deep's 12
    layers turn it into ~2e-4 of the logit range, so that one is checked with power-of-two factors)."""
    art = artifact_store(preset)
    manifest = _manifest(art)
    cfg = manifest["model_config"]
    ps = default_set("calibration", cfg, has_tokenizer=False)
    ps.prompts = ps.prompts[:5]
    stats = collect_stats(art, ps, **QUIET)
    graphs = {g: ir.load(str(art / f"{g}.onnx")) for g in ("prefill", "decode")}
    lins = {g: find_linears(m) for g, m in graphs.items()}
    modules = [m for m in lins["prefill"] if group_of(m) == "decoder"]
    plan = plan_smoothing(lins["prefill"], stats, modules, alpha)
    if power_of_two:
        for g in plan.groups:
            g.factors = (2.0 ** np.round(np.log2(g.factors))).astype(np.float32)
    n_layers = PRESETS[preset].text.num_layers
    assert len(plan.groups) == 3 * n_layers  # attention input, MLP input, down_proj input per layer
    assert set(plan.skipped) == {f"model.language_model.layers.{i}.self_attn.o_proj" for i in range(n_layers)}
    before = {}
    for g in plan.groups:
        before[g.modules[0]] = stats.tensors[g.modules[0]].absmax / g.factors
    for g, model in graphs.items():
        done = apply_smoothing(lins[g], plan)
        assert done == {"groups": 3 * n_layers, "norms": 2 * n_layers,
                        "linears": sum(len(gr.modules) for gr in plan.groups)}
        ir.save(model, tmp_path / f"{g}.onnx", external_data=f"{g}.onnx.data")
    ref = _run_graphs(art, graphs, ps, cfg, manifest)
    smoothed = _run_graphs(tmp_path, graphs, ps, cfg, manifest)
    if power_of_two:
        np.testing.assert_array_equal(smoothed, ref, err_msg=f"{preset}: smoothing changed the logits")
    else:
        assert_close(smoothed, ref, f"{preset} smoothed (alpha {alpha}) vs fp32 logits")
    # the smoothing did something: norm weights changed and the smoothed inputs' channel ranges are flatter
    norm = "m.model.language_model.layers.0.input_layernorm.weight"
    w0 = onnx.numpy_helper.to_array(next(t for t in onnx.load(str(art / "prefill.onnx")).graph.initializer
                                         if t.name == norm))
    w1 = onnx.numpy_helper.to_array(next(t for t in onnx.load(str(tmp_path / "prefill.onnx")).graph.initializer
                                         if t.name == norm))
    assert not np.allclose(w0, w1)
    spread = lambda a: a.max() / np.median(a)  # noqa: E731
    flatter = [spread(before[m]) < spread(stats.tensors[m].absmax) for m in before]
    assert sum(flatter) >= 0.8 * len(flatter)


def test_smoothquant_refuses_a_look_alike(artifact_store):
    """A norm output that also feeds something else cannot absorb the factors: that group is skipped, with why."""
    art = artifact_store("tiny-text")
    model = ir.load(str(art / "prefill.onnx"))
    lins = find_linears(model)
    q = lins["model.language_model.layers.0.self_attn.q_proj"]
    extra = ir.node("Identity", [q.activation])
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    st = Stats({m: TensorStats(np.ones(lin.weight_out_in().shape[1], np.float32), np.zeros(2048, np.int64), 1)
                for m, lin in lins.items()}, {})
    plan = plan_smoothing(lins, st, [m for m in lins if group_of(m) == "decoder"], 0.5)
    assert "has users besides the Linears" in plan.skipped["model.language_model.layers.0.self_attn.q_proj"]
    assert "model.language_model.layers.1.self_attn.q_proj" not in plan.skipped


# ------------------------------------------------------------------------------------------------------- Q/DQ
def _const(graph_proto, name):
    for t in graph_proto.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    raise KeyError(name)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-text"])
def test_qdq_graphs_follow_the_tensorrt_rules(preset, precision, quantized, artifact_store):
    q = quantized(preset, precision)
    manifest = _manifest(q)
    assert manifest["precision"] == precision and manifest["quantization"]["precision"] == precision
    qtype = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}[precision]
    text = PRESETS[preset].text
    n_full = sum(not text.is_sliding(i) for i in range(text.num_layers))
    lm_head = precision == "int8"  # the tied LM head is quantized by default for INT8 (FP8: fp32, `DEFAULT_QUANTIZE`)
    want_linears = 7 * text.num_layers - n_full + lm_head  # full layers: K is V, no v_proj
    assert ("lm_head" in manifest["quantization"]["quantized"]) == lm_head
    assert manifest["quantization"]["embedding"] == ("fp16" if lm_head else "fp32")
    for graph in ("prefill", "decode"):
        proto = onnx.load(str(q / f"{graph}.onnx"), load_external_data=True)
        g = proto.graph
        assert {o.domain or "": o.version for o in proto.opset_import}[""] >= 19
        by_out = {o: n for n in g.node for o in n.output}
        inits = {t.name for t in g.initializer}
        qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
        dqs = [n for n in g.node if n.op_type == "DequantizeLinear"]
        for n in qs + dqs:
            assert len(n.input) == 3, f"{n.name}: zero point must be explicit"
            scale, zp = _const(g, n.input[1]), _const(g, n.input[2])
            assert np.all(np.isfinite(scale)) and np.all(scale > 0), f"{n.name}: scales must be positive"
            assert np.all(zp.astype(np.float32) == 0), f"{n.name}: zero point must be 0"
            zp_type = next(t.data_type for t in g.initializer if t.name == n.input[2])
            assert zp_type == qtype
        weight_dqs = [n for n in dqs if n.input[0] in inits]
        act_dqs = [n for n in dqs if n.input[0] not in inits]
        for n in act_dqs:  # activations: static per-tensor, fed by a Q with the same scale
            assert _const(g, n.input[1]).shape == ()
            assert by_out[n.input[0]].op_type == "QuantizeLinear" and by_out[n.input[0]].input[1] == n.input[1]
        for n in qs:
            assert _const(g, n.input[1]).shape == ()
        matmuls = [n for n in g.node if n.op_type == "MatMul" and n.input[1] in {d.output[0] for d in weight_dqs}]
        assert len(matmuls) == len(weight_dqs) == want_linears, graph
        for mm in matmuls:
            wdq = by_out[mm.input[1]]
            w = next(t for t in g.initializer if t.name == wdq.input[0])
            assert w.data_type == qtype
            axis = next(a.i for a in wdq.attribute if a.name == "axis")
            scale = _const(g, wdq.input[1])
            assert axis == 1 and scale.ndim == 1 and scale.shape[0] == w.dims[1], "per output channel, 1-D"
            assert by_out[mm.input[0]].op_type == "DequantizeLinear", f"{mm.name}: activation not quantized"
        # high precision by default: embedding (Gather; fp16 once the LM head no longer reads it, cast to fp32),
        # vision/audio projections
        gathers = [n for n in g.node if n.op_type == "Gather" and "embed_tokens.weight" in n.input[0]]
        assert len(gathers) == 1
        table = next(t for t in g.initializer if t.name == gathers[0].input[0])
        users = [n for n in g.node if gathers[0].output[0] in n.input]
        if lm_head:
            assert table.data_type == onnx.TensorProto.FLOAT16 and table.name.endswith("embed_tokens.weight_fp16")
            assert [n.op_type for n in users] == ["Cast"] and users[0].attribute[0].i == onnx.TensorProto.FLOAT
            assert not any(t.name.endswith("embed_tokens.weight") for t in g.initializer), "fp32 table dropped"
        else:
            assert table.data_type == onnx.TensorProto.FLOAT
        other = [n for n in g.node if n.op_type in ("MatMul", "Gemm") and n not in matmuls
                 and (n.input[1] in inits or by_out.get(n.input[1]) is not None
                      and by_out[n.input[1]].op_type == "Transpose" and by_out[n.input[1]].input[0] in inits)]
        # LM head (fp8); in prefill also the vision patch_dense + projection and the audio projection
        n_other = (not lm_head) + (graph == "prefill") * (2 * bool(PRESETS[preset].vision)
                                                          + bool(PRESETS[preset].audio))
        assert len(other) == n_other, [n.name for n in other]
    scales = json.loads((q / "calibration" / "scales.json").read_text())
    assert len(scales["activation_scale"]) == want_linears
    assert (scales["smoothquant"] is not None) == (precision == "int8")


def _initializer(root, graph: str, suffix: str) -> np.ndarray:
    g = onnx.load(str(root / f"{graph}.onnx"), load_external_data=True).graph
    return onnx.numpy_helper.to_array(next(t for t in g.initializer if t.name.endswith(suffix)))


def test_int8_default_lm_head_and_fp16_embedding(quantized, artifact_store):
    """The new INT8 default: the tied LM head has its own int8 weights (never smoothed: SmoothQuant would rescale the
    embedding it is tied to), and the Gather reads the fp16-rounded fp32 table, exactly."""
    q, src = quantized("tiny", "int8"), artifact_store("tiny")
    table = _initializer(src, "prefill", "embed_tokens.weight")
    for graph in ("prefill", "decode"):
        half = _initializer(q, graph, "embed_tokens.weight_fp16")
        assert half.dtype == np.float16 and np.array_equal(half, table.astype(np.float16))
        w = _initializer(q, graph, "lm_head.weight_int8")
        assert w.shape == table.T.shape and w.dtype == np.int8  # (in, out): pre-transposed
        # per output channel: the int8 weights times their scales are the fp32 table (no smoothing factor)
        scale = _initializer(q, graph, "lm_head.weight_scale")
        err = np.abs(w.astype(np.float32) * scale[None, :] - table.T).max(axis=0)
        assert np.all(err <= 0.5 * scale + 1e-7), f"max err {(err / scale).max():.3f} scale steps"
    scales = json.loads((q / "calibration" / "scales.json").read_text())
    assert "lm_head" in scales["activation_scale"]
    assert "tied" in scales["smoothquant"]["not_smoothed"]["lm_head"]


def test_decoder_only_on_request(artifact_store, tmp_path):
    """``--quantize decoder``: the old form (fp32 LM head on the fp32 embedding table)."""
    out = tmp_path / "dec"
    assert calibrate_main(["--src", str(artifact_store("tiny")), "--out", str(out), "--precision", "int8",
                           "--quantize", "decoder"]) == 0
    m = _manifest(out)["quantization"]
    assert m["quantized"] == ["decoder"] and m["embedding"] == "fp32"
    lin = find_linears(ir.load(str(out / "prefill.onnx")))
    assert lin["lm_head"].weight.name.endswith("embed_tokens.weight")  # still the fp32 table, not quantized


def test_more_parts_can_be_quantized(artifact_store, tmp_path):
    out = tmp_path / "all"
    calibrate(artifact_store("tiny"), out, "fp8", quantize=("decoder", "lm_head", "vision", "audio"), **QUIET)
    g = onnx.load(str(out / "prefill.onnx"), load_external_data=False).graph
    by_out = {o: n for n in g.node for o in n.output}
    q_mm = [n for n in g.node if n.op_type in ("MatMul", "Gemm") and by_out.get(n.input[1]) is not None
            and by_out[n.input[1]].op_type == "DequantizeLinear"]
    text = PRESETS["tiny"].text
    decoder = 7 * text.num_layers - sum(not text.is_sliding(i) for i in range(text.num_layers))
    assert len(q_mm) == decoder + 1 + 2 + 1  # + LM head, vision patch_dense and projection, audio projection
    assert "lm_head" in _manifest(out)["quantization"]["quantized"]
    qm = runtime.load(out)
    assert runtime.generate(qm, [2, 5, 9, 11], max_new_tokens=4).tokens  # runs in ONNX Runtime


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_tiny_runs_and_stays_close(precision, quantized, artifact_store):
    q = quantized("tiny", precision)
    build_engine(q, "onnxruntime", **QUIET)
    fp, qm = runtime.load(artifact_store("tiny")), runtime.load(q)
    assert qm.manifest["engines"]["onnxruntime"]
    ps = default_set("heldout", fp.config, has_tokenizer=False)
    cos = []
    for p in ps.prompts[:8]:
        inp = prefill_inputs(p, fp.config, None, max_soft_tokens=ps.max_soft_tokens, max_len=fp.max_len)
        a = fp.backend.prefill(inp, fp.backend.new_cache(1, fp.max_len))[0]
        b = qm.backend.prefill(inp, qm.backend.new_cache(1, qm.max_len))[0]
        cos.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    # Random weights on random ids have no trained structure and amplify noise (measured mean 0.992 int8, 0.964
    # fp8): a regression guard; the accuracy targets are checked on the trained demo checkpoint below.
    mean_floor = {"int8": 0.98, "fp8": 0.94}[precision]
    assert np.mean(cos) > mean_floor and min(cos) > 0.85, f"cosine of logits min {min(cos):.4f} mean {np.mean(cos):.4f}"
    res = runtime.generate(qm, [[2, 40, 41, 42], [2, 7]], max_new_tokens=6)
    assert all(len(r.tokens) >= 1 for r in res)


# ------------------------------------------------------------------------------------------ demo checkpoint targets
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_demo_checkpoint_meets_the_accuracy_targets(precision, demo_artifact, demo_accuracy, tmp_path):
    from demo.evaluate import evaluate

    out = tmp_path / f"demo-{precision}"
    calibrate(demo_artifact, out, precision, **QUIET)
    build_engine(out, "onnxruntime", **QUIET)
    # the plugin rewrite applies to Q/DQ graphs too (the Linears stay outside the plugins)
    plug = read_manifest(out)["plugin_graphs"]
    assert plug["prefill"]["nodes"] == {"FusedAttention": 6, "PatchEmbed": 1}
    assert plug["decode"]["nodes"] == {"FusedAttention": 6}
    rep = accuracy_report(out, **QUIET)
    assert rep["mean_kl"] <= TARGETS[precision]["mean_kl"] and rep["top1"] >= TARGETS[precision]["top1"], rep
    assert rep["positions"] >= 40 and len(rep["linear_snr_db"]) == 41 + (precision == "int8")  # + LM head
    assert all(v > 15 for v in rep["linear_snr_db"].values()), rep["worst_linears"]
    for name in ("report.json", "report.md", "report_snr.svg"):
        assert (out / "calibration" / name).is_file()
    read_manifest(out)  # the report's files are in the manifest
    summary = check_quantized(out, **QUIET)
    assert summary["passed"], summary
    right, n = evaluate(str(out), n=150, log=lambda *_: None)
    assert abs(right / n - demo_accuracy) <= 0.02, f"{precision} {right}/{n} vs fp32 {demo_accuracy:.3f}"


def test_polygraphy_check_fails_a_broken_quantization(demo_artifact, tmp_path, monkeypatch):
    """Negative control: activation ranges 30x too small clip most values; the check must say FAIL."""
    import calib.calibrate as cc

    real = cc.activation_scales
    monkeypatch.setattr(cc, "activation_scales", lambda *a, **k: {m: s / 30 for m, s in real(*a, **k).items()})
    out = tmp_path / "broken"
    calibrate(demo_artifact, out, "int8", **QUIET)
    summary = check_quantized(out, **QUIET)
    assert not summary["passed"], summary


# ------------------------------------------------------------------------------------------------------ errors
def test_calibrate_errors_leave_nothing_behind(artifact_store, quantized, tmp_path, capsys):
    src = artifact_store("tiny-text")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="expected one of"):
        calibrate(src, out, "int3", **QUIET)
    with pytest.raises(ValueError, match="is the source artifact"):
        calibrate(src, src, "int8", **QUIET)
    with pytest.raises(ValueError, match="calibrate from an fp32 artifact"):
        calibrate(quantized("tiny-text", "int8"), out, "fp8", **QUIET)
    with pytest.raises(ValueError, match="cannot quantize"):
        calibrate(src, out, "int8", quantize=("decoder", "attention"), **QUIET)
    with pytest.raises(ArtifactError):
        calibrate(tmp_path / "missing", out, "int8", **QUIET)
    assert not out.exists()
    assert calibrate_main(["--src", str(src), "--out", str(out), "--precision", "int8", "--smoothquant", "x"]) == 2
    assert calibrate_main(["--src", str(src), "--out", str(out), "--precision", "int8",
                           "--data", str(tmp_path / "none")]) == 2
    assert "calibration data directory" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*staging*"))
    assert calibrate_main(["--src", str(src), "--out", str(out), "--precision", "fp8", "--smoothquant", "0.6",
                           "--percentile", "99.99"]) == 0
    m = _manifest(out)["quantization"]
    assert m["smoothquant_alpha"] == 0.6 and m["percentile"] == 99.99 and m["seconds"] > 0


def test_manifest_source_and_stats_of_a_quantized_artifact(quantized, artifact_store):
    q = quantized("tiny", "int8")
    m = _manifest(q)
    assert m["source"]["artifact"] == str(artifact_store("tiny"))
    assert {"calibration/scales.json", "calibration/stats.npz", "weights.data"} <= set(m["files"])
    assert not (q / "decode.onnx.data").exists()  # prefill and decode share one weights file
    fp_bytes = (artifact_store("tiny") / "weights.data").stat().st_size
    assert (q / "weights.data").stat().st_size < 0.8 * fp_bytes  # int8 weights are smaller
    assert OrtBackend(q, m).sessions["decode"] is not None
