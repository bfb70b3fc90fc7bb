"""Streaming exports without a checkpoint in memory: presets' seeded weights, bf16 weight storage, and INT4 made
layer by layer from the weights (`calib.sequential`).  All on the smallest preset (tiny-text)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.config import PRESETS

PRESET = "tiny-text"


def _initializers(path):
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}, m


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    from exporter.export import export_artifact
    from exporter.stream import SeededWeights, fake_model

    cfg = PRESETS[PRESET]
    out = tmp_path_factory.mktemp("stream") / "fp32"
    source = {"preset": PRESET, "seed": 5, "generator": "exporter.stream.SeededWeights"}
    with pytest.MonkeyPatch.context() as mp:  # share every tensor the decode graph has in common with prefill
        mp.setattr("exporter.stream.SHARE_MIN_BYTES", 0)
        export_artifact(fake_model(cfg), out, max_len=64, source=source, weights=SeededWeights(cfg, 5),
                        log=lambda *_: None)
    return out


def test_decode_weights_point_into_the_prefill_data(streamed):
    """The streamed export writes each weight once: decode's entries are prefill's (same file, offset, length)."""
    import onnx

    def entries(graph):
        proto = onnx.load(str(streamed / graph), load_external_data=False)
        return {t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}

    pre, dec = entries("prefill.onnx"), entries("decode.onnx")
    common = set(pre) & set(dec)
    assert len(common) > 20, "the decode graph should share the decoder weights"
    for name in common:
        assert dec[name] == pre[name], f"{name}: decode {dec[name]} vs prefill {pre[name]}"
    assert {e["location"] for e in dec.values()} == {"weights.data"}
    data = [p.name for p in streamed.iterdir() if p.name.endswith(".data")]
    assert data == ["weights.data"], data


def test_seeded_blocks_regenerate_alone(monkeypatch):
    from calib.layerwise import _rows
    from exporter import stream

    monkeypatch.setattr(stream, "_BLOCK_ELEMS", 64)  # many blocks per tensor
    cfg = PRESETS[PRESET]
    src = stream.SeededWeights(cfg, 5)
    name = "model.language_model.embed_tokens.weight"
    whole = stream.seeded_tensor(name, src.shapes[name], 5)
    parts = list(src.blocks(name))
    assert len(parts) > 10
    assert torch.equal(torch.cat(parts), whole)
    ids = np.array([[7, 300, 7, 2]])
    assert torch.equal(_rows(src, name, ids)[0], whole[[7, 300, 7, 2]])
    assert not torch.equal(whole, stream.seeded_tensor(name, src.shapes[name], 6)), "the seed must matter"
    scal = "model.language_model.layers.0.layer_scalar"
    assert torch.equal(src.tensor(scal), torch.ones(1))


def test_streamed_preset_equals_in_memory_model(streamed):
    """The artifact's weights are `preset_model`'s bit for bit, and ONNX Runtime's logits match it."""
    import runtime
    from exporter.stream import preset_model

    model = preset_model(PRESETS[PRESET], seed=5)
    state = model.state_dict()
    inits, _ = _initializers(streamed / "decode.onnx")
    compared = 0
    for name, arr in inits.items():
        ours = name.removeprefix("m.")
        if ours in state:
            assert np.array_equal(arr, state[ours].numpy()), f"{ours} differs from the seeded generator"
            compared += 1
    assert compared >= len([k for k in state if "vision" not in k and "audio" not in k]) - 1
    ids = [2, 105, 9, 17, 33, 80, 12]
    art = runtime.load(streamed)
    got = runtime.generate(art, ids, max_new_tokens=8)
    with torch.no_grad():
        n = len(ids)
        logits, caches = model.prefill(torch.tensor([ids]), torch.tensor([0]), torch.tensor([n]),
                                       model.empty_caches(1, 64))
        want = [int(logits[0].argmax())]
        for step in range(7):
            lg, caches = model.decode(torch.tensor([[want[-1]]]), torch.tensor([n + step]), caches)
            want.append(int(lg[0].argmax()))
    assert got.tokens[: len(want)] == want[: len(got.tokens)] and len(got.tokens) >= 1


def test_bf16_weights_stay_bf16(tmp_path):
    """--weight-dtype bf16: every decoder projection is stored bf16 (no fp32 copy), the tied embedding stays fp32."""
    import onnx

    from exporter.export import _export_graph
    from exporter.stream import SeededWeights, cast_rewrite, fake_model

    cfg = PRESETS[PRESET]
    path = tmp_path / "decode.onnx"
    with torch.no_grad():
        _export_graph(fake_model(cfg), "decode", path, SeededWeights(cfg, 5), lambda *_: None, cast_rewrite("bf16"))
    m = onnx.load(str(path))
    types = {t.name: t.data_type for t in m.graph.initializer}
    bf16 = sorted(n for n, t in types.items() if t == onnx.TensorProto.BFLOAT16)
    assert len(bf16) == 5 * 7 + 1 * 6, bf16  # sliding q/k/v/o/gate/up/down; the k_eq_v full layer has no v_proj
    assert types["m.model.language_model.embed_tokens.weight"] == onnx.TensorProto.FLOAT
    assert not [n for n in types if n.endswith("proj.weight")], "an fp32 copy of a projection was kept"
    from onnx import numpy_helper

    w = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    name = "model.language_model.layers.2.mlp.up_proj"
    want = SeededWeights(cfg, 5).tensor(name + ".weight").numpy().T  # (in, out)
    got = w[f"{name}.weight_bf16"].astype(np.float32)
    assert got.shape == want.shape and np.abs(got - want).max() <= np.abs(want).max() * 2**-8


def test_ort_refuses_bf16_artifact(streamed, tmp_path):
    import shutil

    import runtime
    from runtime.manifest import read_manifest, write_manifest

    art = tmp_path / "as-bf16"
    shutil.copytree(streamed, art)
    write_manifest(art, dict(read_manifest(art), precision="bf16"))
    with pytest.raises(ValueError, match="bf16.*TensorRT"):
        runtime.load(art, backend="onnxruntime")


def test_sequential_statistics_equal_a_full_forward():
    """Layer-by-layer statistics (one layer in memory, activations carried) equal hooks on the whole model."""
    from calib.layerwise import _prompt_inputs, collect_sequential
    from calib.stats import EDGES, TensorStats
    from exporter.stream import SeededWeights, preset_model

    cfg = PRESETS[PRESET]
    inputs, _ = _prompt_inputs(cfg, None, None, max_prompts=3, max_soft_tokens=70, max_len=128)
    stats, plan, records = collect_sequential(SeededWeights(cfg, 5), cfg, inputs, block_size=16, log=lambda *_: None)
    assert len(records) == cfg.text.num_layers
    model = preset_model(cfg, seed=5)
    ref: dict[str, TensorStats] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            st = ref.setdefault(name, TensorStats(np.zeros(mod.in_features), np.zeros(len(EDGES) - 1, np.int64)))
            hooks.append(mod.register_forward_pre_hook(lambda m, a, st=st: st.update(a[0].numpy())))
    head = ref.setdefault("lm_head", TensorStats(np.zeros(cfg.text.hidden_size),
                                                 np.zeros(len(EDGES) - 1, np.int64)))
    hooks.append(model.model.language_model.norm.register_forward_hook(lambda m, a, out: head.update(out.numpy())))
    with torch.no_grad():
        for x in inputs:
            n = int(x.seq_lens[0])
            model.prefill(torch.from_numpy(x.input_ids), torch.tensor([0]), torch.tensor([n]),
                          model.empty_caches(1, n + 1), all_logits=True)  # the LM head's input at every position
    assert set(ref) == set(stats.tensors)
    for name, st in ref.items():
        got = stats.tensors[name]
        assert got.rows == st.rows
        np.testing.assert_allclose(got.absmax, st.absmax, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got.sqmean, st.sqmean, rtol=1e-4, atol=1e-9, err_msg=name)
    assert plan.search, "AWQ searched no group"


def test_int4_from_weights_graph_form_and_values(tmp_path):
    """The streamed INT4 export has block-wise int4 DequantizeLinear -> MatMul for every decoder Linear and the LM
    head (the `calib.int4` form), values equal to `calib.int4.int4_values` of the source weights (round to
    nearest: no AWQ factors), the embedding gather on an fp16 table, and runs in ONNX Runtime."""
    import onnx

    import runtime
    from calib.int4 import int4_values
    from calib.sequential import quantize_checkpoint
    from exporter.stream import SeededWeights

    out = tmp_path / "int4"
    manifest = quantize_checkpoint(PRESET, out, block_size=16, method="rtn", seed=5, max_prompts=2, max_len=64,
                                   log=lambda *_: None)
    assert manifest["precision"] == "int4" and manifest["quantization"]["block_size"] == 16
    inits, m = _initializers(out / "decode.onnx")
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    cfg = PRESETS[PRESET]
    assert len(dq) == 5 * 7 + 1 * 6 + 1  # sliding q/k/v/o/gate/up/down, full (k_eq_v) without v, LM head
    for node in dq:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"axis": 0, "block_size": 16}, node.name
        assert [u.op_type for u in m.graph.node if node.output[0] in u.input] == ["MatMul"]
    assert not [n for n in inits if n.endswith("proj.weight")], "fp32 projection weights left behind"
    assert inits["m.model.language_model.embed_tokens.weight_fp16"].dtype == np.float16
    src = SeededWeights(cfg, 5)
    for name, weight in (("model.language_model.layers.0.mlp.down_proj", None),
                         ("model.language_model.layers.5.self_attn.k_proj", None),
                         ("lm_head", "model.language_model.embed_tokens.weight")):  # tied: from the embedding
        want_q, want_s = int4_values(src.tensor(weight or name + ".weight").numpy().T, 16)
        assert np.array_equal(inits[f"{name}.weight_int4"].astype(np.int8), want_q), name
        assert np.array_equal(inits[f"{name}.weight_scale"], want_s), name
    got = runtime.generate(runtime.load(out), [2, 105, 9, 17], max_new_tokens=4)
    assert len(got.tokens) >= 1


def test_progress_lines(monkeypatch):
    """Not a terminal: one line per interval and a last line at 100 % with an ETA; silenced by GEMMA4_PROGRESS=0."""
    import io

    from runtime.progress import Progress

    monkeypatch.delenv("GEMMA4_PROGRESS", raising=False)
    out = io.StringIO()
    with Progress(4, "work", unit="layers", stream=out, every=0.0) as bar:
        for i in range(4):
            bar.update(1, note=f"layer {i}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in out.getvalue(), lines  # 3 periodic + the final one, no redraws
    assert lines[0].startswith("[work] ") and "25%" in lines[0] and "ETA" in lines[0]
    assert "100%" in lines[-1] and "4 layers/4 layers" in lines[-1]
    monkeypatch.setenv("GEMMA4_PROGRESS", "0")
    quiet = io.StringIO()
    with Progress(2, "work", stream=quiet, every=0.0) as bar:
        bar.update(2)
    assert quiet.getvalue() == ""


def test_awq_folding_leaves_the_fp32_model_unchanged():
    """AWQ factors folded as the weights stream (norms / s, inputs columns * s, up_proj rows / s) plus the o_proj
    Mul give the same fp32 function: only the quantization then differs."""
    from calib.layerwise import _prompt_inputs, collect_sequential
    from calib.stream_rewrites import FoldedWeights
    from exporter.stream import SeededWeights, preset_model

    cfg = PRESETS[PRESET]
    src = SeededWeights(cfg, 5)
    inputs, _ = _prompt_inputs(cfg, None, None, max_prompts=2, max_soft_tokens=70, max_len=128)
    _, plan, _ = collect_sequential(src, cfg, inputs, block_size=16, awq_objective="diag", log=lambda *_: None)
    assert plan.groups, "no AWQ factors to test"
    folds = [t for t, _ in plan.groups.values()]
    assert any(t and t.endswith("up_proj.weight") for t in folds) or any(t and "norm" in t for t in folds)
    folded = FoldedWeights(src, plan)
    model = preset_model(cfg, seed=5)
    ref = preset_model(cfg, seed=5)
    with torch.no_grad():
        model.load_state_dict({n: folded.tensor(n) for n in src.shapes}, strict=False)
        for module, s in plan.input_muls().items():
            lin = model.get_submodule(module)
            lin.weight.mul_(torch.from_numpy(s)[None, :])
            lin.register_forward_pre_hook(lambda m, a, s=torch.from_numpy(s): (a[0] / s,))
        ids = torch.tensor([[2, 105, 9, 17, 33, 80, 12, 5]])
        args = (ids, torch.tensor([0]), torch.tensor([8]))
        got, _ = model.prefill(*args, model.empty_caches(1, 9), all_logits=True)
        want, _ = ref.prefill(*args, ref.empty_caches(1, 9), all_logits=True)
    rng = float(want.max() - want.min())
    err = float((got - want).abs().max())
    assert err <= 1e-4 * rng, f"folded model differs: max err {err:.3g} vs range {rng:.3g}"


SMALL_BLOCKS = 4096  # elements per seeded row block: the tied LM head then streams in many blocks


@pytest.fixture(scope="module")
def streamed_small_blocks(tmp_path_factory):
    """The fp32 artifact of the seeded weights generated in small row blocks (the blocks' seeds depend on where
    the blocks start, so the weights differ from `streamed`'s)."""
    from exporter.export import export_artifact
    from exporter.stream import SeededWeights, fake_model

    cfg = PRESETS[PRESET]
    out = tmp_path_factory.mktemp("stream-small-blocks") / "fp32"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("exporter.stream._BLOCK_ELEMS", SMALL_BLOCKS)
        export_artifact(fake_model(cfg), out, max_len=64, source={"preset": PRESET, "seed": 5},
                        weights=SeededWeights(cfg, 5), log=lambda *_: None)
    return out


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_w8a8_from_weights_equals_calibrate(streamed_small_blocks, tmp_path, monkeypatch, precision):
    """INT8 (SmoothQuant 0.5, LM head quantized) and FP8 straight from the weights, layer by layer, give what
    ``make calibrate`` gives from the fp32 artifact of the same weights: the same activation scales (the LM head's
    over every position, so never smaller than calibrate's last-position range), weight scales and smoothing
    factors, the same Q/DQ graph form, quantized weights equal but for rounding-boundary ties, and the same greedy
    tokens.  Row blocks are made small so the tied LM head is quantized block by block."""
    import json

    import runtime
    from calib.calibrate import calibrate
    from calib.sequential import quantize_checkpoint
    from exporter import stream

    from calib import qdq

    monkeypatch.setattr(stream, "_BLOCK_ELEMS", SMALL_BLOCKS)
    blocks: dict[str, int] = {}
    row_blocks = qdq._row_blocks

    def counted(lin):
        for b in row_blocks(lin):
            blocks[lin.module] = blocks.get(lin.module, 0) + 1
            yield b

    monkeypatch.setattr(qdq, "_row_blocks", counted)
    quiet = lambda *_: None  # noqa: E731
    seq, cal = tmp_path / "seq", tmp_path / "cal"
    quantize_checkpoint(PRESET, seq, precision=precision, seed=5, max_prompts=1000, max_len=64, log=quiet)
    if precision == "int8":
        assert blocks["lm_head"] > 4, "the tied LM head was not read in row blocks"
    monkeypatch.setattr(qdq, "_row_blocks", row_blocks)
    calibrate(streamed_small_blocks, cal, precision, log=quiet)
    a, b = (json.loads((d / "calibration" / "scales.json").read_text()) for d in (seq, cal))
    assert set(a["activation_scale"]) == set(b["activation_scale"])
    assert ("lm_head" in b["activation_scale"]) == (precision == "int8")
    for m, want in b["activation_scale"].items():
        got = a["activation_scale"][m]
        if m == "lm_head":
            assert got >= want * (1 - 1e-6), "the LM head's range covers more positions than calibrate's"
        else:
            assert got == pytest.approx(want, rel=1e-5), m
    for m, want in b["weight_scale"].items():
        np.testing.assert_allclose(a["weight_scale"][m], want, rtol=1e-5, err_msg=m)
    if precision == "int8":
        sa = {tuple(g["modules"]): g for g in a["smoothquant"]["groups"]}
        sb = {tuple(g["modules"]): g for g in b["smoothquant"]["groups"]}
        assert set(sa) == set(sb) and len(sb) == 3 * PRESETS[PRESET].text.num_layers
        for k, g in sb.items():
            assert (sa[k]["fold"], sa[k]["into"]) == (g["fold"], g["into"]), k
            np.testing.assert_allclose(sa[k]["factors"], g["factors"], rtol=1e-4, err_msg=str(k))
    else:
        assert a["smoothquant"] is None and b["smoothquant"] is None
    ia, ma = _initializers(seq / "decode.onnx")
    ib, mb = _initializers(cal / "decode.onnx")
    ops = lambda m: sorted(n.op_type for n in m.graph.node)  # noqa: E731
    assert ops(ma) == ops(mb)
    qnames = [n for n in ib if n.endswith(f".weight_{precision}")]
    assert len(qnames) == len(b["weight_scale"]) and set(qnames) <= set(ia)
    for n in qnames:
        x, y = ia[n].astype(np.float32), ib[n].astype(np.float32)
        assert x.shape == y.shape, n
        differ = x != y
        assert differ.mean() < 1e-3, f"{n}: {differ.mean():.2%} of the values differ"
    ids = [2, 105, 9, 17, 33, 80, 12]
    got = runtime.generate(runtime.load(seq), ids, max_new_tokens=8).tokens
    assert got == runtime.generate(runtime.load(cal), ids, max_new_tokens=8).tokens
    man = runtime.load(seq).manifest
    assert man["precision"] == precision and man["quantization"]["from_checkpoint"] is True


def test_calibrate_cli_takes_a_checkpoint(reference_store, tmp_path, capsys):
    """``make calibrate SRC=<checkpoint dir>`` quantizes layer by layer from the weights (no fp32 artifact), leaves
    the checkpoint as it was, and refuses the artifact-only options with the reason."""
    import hashlib

    import runtime
    from calib.calibrate import main

    _, ckpt = reference_store(PRESET)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.iterdir() if p.is_file()}
    out = tmp_path / "fp8"
    assert main(["--src", str(ckpt), "--out", str(out), "--precision", "fp8"]) == 0
    man = runtime.load(out).manifest
    assert man["precision"] == "fp8" and man["quantization"]["from_checkpoint"] is True
    assert man["source"]["checkpoint"] == str(ckpt.resolve())
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.iterdir() if p.is_file()} == before
    assert main(["--src", str(ckpt), "--out", str(tmp_path / "x"), "--precision", "int8", "--stats", "s.npz"]) == 2
    assert "is a checkpoint: --stats and --embedding are for fp32 artifacts" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_quantized_weight_holds_one_row_block_at_a_time(monkeypatch):
    """A weight streamed in row blocks (the 12B's tied LM head: 4 GB in fp32) is quantized block by block: each
    block is quantized before the next is read (reading them all first held the whole fp32 table: 6.2 GiB peak
    on a 1-layer 12B slice instead of 3.7), and the result equals quantizing the whole weight at once."""
    from types import SimpleNamespace

    from calib import qdq

    rng = np.random.default_rng(0)
    w = rng.normal(size=(40, 8)).astype(np.float32)  # (out, in)
    events = []

    class Blocks:
        def iter_blocks(self):
            for i in range(0, len(w), 10):
                events.append("read")
                yield w[i:i + 10]

    prec = qdq.PRECISIONS["int8"]
    quantize = prec.quantize
    monkeypatch.setattr(type(prec), "quantize", lambda self, x, s: events.append("quantize") or quantize(x, s))
    lin = SimpleNamespace(module="lm_head", weight=SimpleNamespace(const_value=Blocks()), out_in=True,
                          weight_out_in=lambda: w)
    scales = qdq.weight_scales(lin, prec)
    events.clear()
    q = qdq.quantized_weight(lin, scales, prec, out_in=False)
    assert events == ["read", "quantize"] * 4
    np.testing.assert_array_equal(q, quantize(w, scales[:, None]).T)
    np.testing.assert_allclose(scales, np.abs(w).max(axis=1) / 127, rtol=1e-6)
