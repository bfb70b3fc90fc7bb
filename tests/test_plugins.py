"""Plugin contracts and graph rewrites: numpy references vs our PyTorch core, exact rewrite counts, unchanged
numbers, look-alikes left alone, and plugin graphs executed with the references alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from exporter.compare import feeds_for
from exporter.config import PRESETS, TEST_PRESETS, ModelConfig
from exporter.model import AttentionCore, Projection, Rope, VisionEmbedder
from graphs.check_plugins import PluginGraphError, check_plugin_graph
from graphs.fuse_attention import fuse_attention
from graphs.plugin_graphs import rewrite_graph
from plugins import REFERENCES, fused_attention as fa, patch_embed as pe
from plugins.runner import PluginRefRunner, run_with_references
from runtime.manifest import read_manifest
from tests.test_model_reference import assert_close

QUIET = dict(log=lambda *_: None)

# window 8; layer 0 sliding (GQA 4:2, head_dim 16); layer 1 full with one KV head of head_dim 512
TEXT = dataclasses.replace(
    PRESETS["tiny"].text, num_layers=2, layer_types=("sliding_attention", "full_attention"), sliding_window=8,
    num_heads=4, num_kv_heads=2, head_dim=16, global_head_dim=512, num_global_kv_heads=1,
)


def _case(layer: int, decode: bool, seed: int):
    rng = np.random.default_rng(seed)
    h, hkv, d = TEXT.num_heads, TEXT.layer_kv_heads(layer), TEXT.layer_head_dim(layer)
    b, s = 3, (1 if decode else 11)
    t = TEXT.sliding_window if TEXT.is_sliding(layer) else 40
    past_lens = np.array([0, 5, 13] if not decode else [3, 8, 20]) if TEXT.is_sliding(layer) else np.array([0, 9, 20])
    seq_lens = np.array([s, 3, 7]) if not decode else np.ones(3, np.int64)
    block = np.full((b, s), -1)
    if not decode:
        block[0, 2:9] = 0  # an image run longer than the window in row 0
        block[2, 1:3], block[2, 5:7] = 0, 1  # two images in row 2
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in
              [(b, s, h, d), (b, s, hkv, d), (b, s, hkv, d), (b, hkv, t, d), (b, hkv, t, d)]]
    return [*arrays, past_lens.astype(np.int64), seq_lens.astype(np.int64), block.astype(np.int64)]


@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "full-hd512"])
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_fused_attention_reference_matches_the_torch_core(layer, decode):
    """Ring wrap-around (past 13 + 11 new > window 8), windows, image blocks longer than the window, batches of
    different lengths, head_dim 512 with one KV head."""
    inputs = _case(layer, decode, seed=layer + 2 * decode)
    attrs = fa.attributes(TEXT, layer, decode=decode)
    ours = fa.reference(*inputs, **attrs)
    core = AttentionCore(TEXT, layer)
    sliding = TEXT.is_sliding(layer)
    rope = Rope(TEXT.layer_head_dim(layer), TEXT.sliding_rope_theta if sliding else TEXT.full_rope_theta,
                1.0 if sliding else TEXT.full_partial_rotary_factor)
    np.testing.assert_allclose(fa.inv_freq(attrs["head_dim"], attrs["rotary_dim"], attrs["rope_theta"]),
                               rope.inv_freq.numpy(), rtol=3e-7)  # float32 pow: within an ulp
    with torch.no_grad():
        theirs = core(*[torch.from_numpy(x) for x in inputs], rope.inv_freq, decode=decode)
    for name, a, t in zip(fa.OUTPUTS, ours, theirs):
        t = t.numpy()
        assert a.shape == t.shape, name
        err = np.abs(a - t)
        assert err.max() <= 2e-5 * max(1.0, np.abs(t).max()), f"{name}: max err {err.max():.3g} mean {err.mean():.3g}"


def test_patch_embed_reference_matches_torch():
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    emb, proj = VisionEmbedder(cfg.vision), Projection(cfg.vision.mm_embed_dim, cfg.text.hidden_size, 1e-6)
    with torch.no_grad():
        for p in list(emb.parameters()) + list(proj.parameters()):
            p.normal_(0.0, 0.3)
    patches = torch.rand(7, cfg.vision.patch_dim)
    positions = torch.tensor([[0, 0], [1, 0], [2, 3], [5, 1], [0, 2], [-1, -1], [-1, -1]])
    with torch.no_grad():
        want = proj(emb(patches, positions)).numpy()
    weights = {
        "ln1_weight": emb.patch_ln1.weight, "ln1_bias": emb.patch_ln1.bias, "dense_weight": emb.patch_dense.weight,
        "dense_bias": emb.patch_dense.bias, "ln2_weight": emb.patch_ln2.weight, "ln2_bias": emb.patch_ln2.bias,
        "pos_table": emb.pos_embedding, "pos_ln_weight": emb.pos_norm.weight, "pos_ln_bias": emb.pos_norm.bias,
        "proj_weight": proj.embedding_projection.weight,
    }
    got = pe.reference(patches.numpy(), positions.numpy(), *[weights[n].detach().numpy() for n in pe.INPUTS[2:]],
                       **pe.attributes(cfg.vision))
    assert_close(got, want, "PatchEmbed reference vs torch", rel=1e-5)
    assert set(REFERENCES) == {("gemma4", "FusedAttention"), ("gemma4", "PatchEmbed")}


# ------------------------------------------------------------------------------------------------------ rewrites
def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("preset", TEST_PRESETS)
def test_rewrite_counts_and_unchanged_numbers(preset, artifact_store):
    """build-engine made plugin graphs: exact counts, attributes, function bodies; same numbers as the exported
    graphs in ONNX Runtime on shapes other than the export's (batch 3, seq 19, max_len 53)."""
    art = artifact_store(preset)
    manifest = read_manifest(art)
    cfg = PRESETS[preset]
    plug = manifest["plugin_graphs"]
    engine = manifest["engines"]["onnxruntime"]
    # one-graph engines (every attention lowered) serve decode from the prefill plugin graph
    sources = {"prefill": "prefill", "decode": "prefill" if engine.get("one_graph") else "decode"}
    assert engine["from"] == {g: plug[src]["file"] for g, src in sources.items()}
    for graph in ("prefill", "decode"):
        rep = plug[graph]
        assert rep["FusedAttention"] == {"rewritten": cfg.text.num_layers, "refused": {}}
        want = {"FusedAttention": cfg.text.num_layers}
        if graph == "prefill" and cfg.vision is not None:
            want["PatchEmbed"] = 1
        assert rep["nodes"] == want
        model = ir.load(str(art / rep["file"]))
        assert check_plugin_graph(model, cfg, graph) == want
        for n in model.graph:
            if n.domain == "gemma4" and n.op_type == "FusedAttention":
                a = n.attributes
                assert a["plugin_namespace"].value == "gemma4" and a["plugin_version"].value == "1"
                assert a["mode"].value == (graph == "decode") and isinstance(a["rope_theta"].value, float)
                assert [v.name for v in model.functions[(n.domain, n.op_type, n.overload)].inputs] != []
        exported, plugin = _session(art / manifest["graphs"][graph]["file"]), _session(art / rep["file"])
        feeds = feeds_for(cfg, graph, manifest["graphs"][graph]["inputs"], batch=3, seq=19, max_len=53, seed=1)
        for name, a, b in zip([o.name for o in exported.get_outputs()], exported.run(None, feeds),
                              plugin.run(None, feeds)):
            assert_close(b, a, f"{preset} {graph} {name}: plugin graph vs exported", rel=1e-6)


def test_rewrite_leaves_look_alikes_alone(artifact_store):
    """A layer whose core has an extra user outside, and a layer whose nodes belong to another module, are not
    rewritten (with the reason); the others are; the check then refuses the graph."""
    art = artifact_store("tiny")
    cfg = PRESETS["tiny"]
    model = ir.load(str(art / "prefill.onnx"))
    inner = next(n for n in model.graph if any(s.endswith("layers.1.self_attn.core") for s in _scopes(n))
                 and n.op_type == "Softmax")
    inner.outputs[0].name = "spy_src"
    spy = ir.node("Identity", [inner.outputs[0]])
    spy.outputs[0].name = "spy"
    model.graph.append(spy)
    model.graph.outputs.append(spy.outputs[0])
    for n in model.graph:  # layer 2's attention nodes relabelled as another module
        if any(s.endswith("layers.2.self_attn.core") for s in _scopes(n)):
            n.metadata_props["pkg.torch.onnx.name_scopes"] = repr(["", "m.model.language_model.layers.2.other"])
    res = fuse_attention(model, cfg.text, decode=False, **QUIET)
    assert "('spy_src')" in res["refused"][1] and "used outside" in res["refused"][1]
    assert "no nodes from this layer's attention core" in res["refused"][2]
    # layer 2's relabelled nodes read helpers computed in layer 0's core, which then has users outside: refused too
    assert set(res["refused"]) <= {0, 1, 2} and res["rewritten"] == cfg.text.num_layers - len(res["refused"]) >= 3
    assert sum(n.op_type == "FusedAttention" for n in model.graph) == res["rewritten"]
    assert any(n.op_type == "Softmax" and n.outputs[0] is inner.outputs[0] for n in model.graph)  # layer 1 intact
    with pytest.raises(PluginGraphError, match="FusedAttention nodes, expected"):
        check_plugin_graph(model, cfg, "prefill")


def _scopes(node):
    from graphs.outline import scopes_of

    return scopes_of(node)


def test_rewrite_is_idempotent_and_reports_nothing_left(artifact_store):
    art = artifact_store("tiny-text")
    model = ir.load(str(art / read_manifest(art)["plugin_graphs"]["decode"]["file"]))
    res = fuse_attention(model, PRESETS["tiny-text"].text, decode=True, **QUIET)
    assert res["rewritten"] == 0 and set(res["refused"]) == set(range(PRESETS["tiny-text"].text.num_layers))


@pytest.mark.parametrize("preset", ["tiny", "tiny-deep"])
def test_plugin_graphs_run_with_the_numpy_references(preset, artifact_store):
    """No function bodies: the references alone compute the plugin nodes (Polygraphy runner vs ONNX Runtime)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CompareFunc

    art = artifact_store(preset)
    manifest = read_manifest(art)
    cfg = PRESETS[preset]
    for graph in ("prefill", "decode"):
        feeds = feeds_for(cfg, graph, manifest["graphs"][graph]["inputs"], batch=2, seq=13, max_len=41, seed=3)
        proto = onnx.load(str(art / manifest["plugin_graphs"][graph]["file"]), load_external_data=False)
        assert len(proto.functions) > 0  # the runner drops them
        got = run_with_references(art / manifest["plugin_graphs"][graph]["file"], dict(feeds))
        want = dict(zip([o.name for o in _session(art / manifest["graphs"][graph]["file"]).get_outputs()],
                        _session(art / manifest["graphs"][graph]["file"]).run(None, feeds)))
        # tiny-deep's 12 random layers amplify float32 rounding differences (numpy sums in other orders) about 2x per
        # layer: measured 3e-7 of the range at layer 0's caches, 4.5e-4 at layer 11's.  The first layers are held
        # tight (a wrong mask or RoPE would show there), the last ones and the logits at 1e-3.
        for name in want:
            layer = int(name.rsplit("_", 1)[1]) if name.startswith("present_") else 99
            rel = 1e-4 if preset != "tiny-deep" else (1e-5 if layer < 3 else 1e-3)
            assert_close(got[name], want[name], f"{preset} {graph} {name}: numpy references vs ONNX Runtime", rel)
    runners = [OnnxrtRunner(SessionFromOnnx(str(art / manifest["graphs"]["decode"]["file"]), providers=["cpu"])),
               PluginRefRunner(art / manifest["plugin_graphs"]["decode"]["file"])]
    feeds = feeds_for(cfg, "decode", manifest["graphs"]["decode"]["inputs"], batch=2, seq=1, max_len=41, seed=4)
    results = Comparator.run(runners, data_loader=[feeds])
    tol = 1e-3 if preset == "tiny-deep" else 1e-4  # see above
    assert Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=tol, rtol=tol))


def test_rewrite_graph_counts_on_a_fresh_export(artifact_store):
    """`rewrite_graph` on an exported prefill graph returns what changed, rewrite by rewrite."""
    art = artifact_store("tiny")
    cfg = ModelConfig.from_json_dict(read_manifest(art)["model_config"])
    model = ir.load(str(art / "prefill.onnx"))
    res = rewrite_graph(model, cfg, "prefill", **QUIET)
    assert res["FusedAttention"]["rewritten"] == cfg.text.num_layers
    assert res["PatchEmbed"] == {"rewritten": 1, "refused": None}
    assert res["nodes"] == {"FusedAttention": cfg.text.num_layers, "PatchEmbed": 1}


def test_build_without_plugins_still_runs(artifact_store, tmp_path):
    """``--no-plugins`` builds ONNX Runtime from the exported graphs; both engines generate the same tokens."""
    import shutil

    import runtime
    from graphs.build import build_engine

    art = tmp_path / "copy"
    shutil.copytree(artifact_store("tiny-text"), art)
    with_plugins = runtime.generate(runtime.load(art), [2, 30, 31, 32], max_new_tokens=12).tokens
    manifest = build_engine(art, "onnxruntime", plugins=False, **QUIET)
    assert manifest["engines"]["onnxruntime"]["from"] == {"prefill": "prefill.onnx", "decode": "decode.onnx"}
    assert runtime.generate(runtime.load(art), [2, 30, 31, 32], max_new_tokens=12).tokens == with_plugins


@pytest.mark.parametrize("preset", ["tiny"])
def test_prefill_plugin_graph_at_one_token_is_the_decode_graph(preset, artifact_store):
    """What the one TensorRT engine relies on: its decode profile runs the prefill plugin graph with one token per
    sequence (seq_lens 1, no image or audio rows); with the plugin nodes computed by their references that gives
    the decode plugin graph's logits and caches (rings wrapped, batch of different positions)."""
    from runtime.ort_backend import prefill_feeds
    from runtime.prompt import PrefillInputs

    art = artifact_store(preset)
    manifest = read_manifest(art)
    cfg = PRESETS[preset]
    feeds = feeds_for(cfg, "decode", manifest["graphs"]["decode"]["inputs"], batch=3, seq=1, max_len=41, seed=8)
    feeds["past_lens"] = np.array([2, 19, 37], np.int64)  # empty-ish, wrapped and nearly full caches
    want = run_with_references(art / manifest["plugin_graphs"]["decode"]["file"], dict(feeds))
    one = prefill_feeds(PrefillInputs(input_ids=feeds["input_ids"], past_lens=feeds["past_lens"],
                                      seq_lens=np.ones(3, np.int64)), manifest)
    assert one["image_patches"].shape[0] == 0 and one["audio_frames"].shape[0] == 0
    caches = {k: v for k, v in feeds.items() if k.startswith("past_") and k != "past_lens"}
    got = run_with_references(art / manifest["plugin_graphs"]["prefill"]["file"], {**one, **caches})
    assert set(got) == set(want)
    for name in want:
        assert_close(got[name], want[name], f"{preset} {name}: one-token prefill vs decode", 1e-5)
