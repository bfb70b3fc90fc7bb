"""TensorRT parts: what can be checked without a GPU everywhere, the rest on a GPU machine with TensorRT
(skipped here with the reason).

Without a GPU: the plugins register through the real ``tensorrt.plugin`` package into the lean runtime's plugin
registry (`tests.trt_lean`), with the attribute types the ONNX parser passes and the output aliasing the contract
says, for every layer kind; the engine build refuses a graph whose plugin creators are missing and enables plugin
output aliasing; the runtime backend's binding logic runs against a fake engine and context."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import runtime
from graphs.build import build_engine, tensorrt_unavailable_reason
from graphs.build_tensorrt import PREFILL_CHUNK, plugin_creators, profiles_for
from runtime.manifest import read_manifest
from tests import trt_lean
from tests.trt_emulated import _FAKE_TRT, _FakeContext, _FakeEngine, emulated_trt_backend

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_profiles_cover_prefill_and_decode(artifact_store):
    manifest = read_manifest(artifact_store("tiny"))
    max_len = manifest["max_len"]
    pre = profiles_for(manifest, "prefill", max_batch=4, opt_seq=64, max_soft_tokens=140)
    assert pre["input_ids"] == ((1, 1), (1, min(64, max_len)), (4, min(max_len, PREFILL_CHUNK)))
    assert pre["image_patches"] == ((0, 6912), (140, 6912), (140, 6912))
    assert pre["past_key_5"][2] == (4, 1, max_len, 32) and pre["past_key_0"][0] == (1, 2, 8, 16)
    dec = profiles_for(manifest, "decode", max_batch=4, opt_seq=64, max_soft_tokens=140)
    assert dec["input_ids"] == ((1, 1), (1, 1), (4, 1))
    assert set(dec) == {i["name"] for i in manifest["graphs"]["decode"]["inputs"]}
    capped = profiles_for({**manifest, "max_len": 32768}, "prefill", max_batch=8, opt_seq=512, max_soft_tokens=1120,
                          prefill_chunk=2048)
    assert capped["input_ids"][2] == (8, 2048)  # tokens per call capped, not batch x max_len
    assert capped["past_key_5"][2][2] == 32768  # the cache still holds max_len


def test_one_engine_profiles_are_the_prefill_graph_at_two_sizes(artifact_store):
    """The one engine's profiles: both over the prefill graph's inputs; decode = one token, no media rows, the
    same cache shapes as prefill's (the contexts share the buffers)."""
    from graphs.build_tensorrt import PROFILES, engine_profiles

    manifest = read_manifest(artifact_store("tiny"))
    shapes = engine_profiles(manifest, max_batch=4, opt_seq=64, max_soft_tokens=140, prefill_chunk=PREFILL_CHUNK)
    assert list(shapes) == list(PROFILES) == ["prefill", "decode"]
    names = {i["name"] for i in manifest["graphs"]["prefill"]["inputs"]}
    assert set(shapes["prefill"]) == set(shapes["decode"]) == names
    dec, pre = shapes["decode"], shapes["prefill"]
    assert dec["input_ids"] == ((1, 1), (1, 1), (4, 1)) and dec["seq_lens"] == ((1,), (1,), (4,))
    assert dec["image_patches"] == ((0, 6912),) * 3 and pre["image_patches"][2] == (140, 6912)
    for name in names:
        if name.startswith("past_"):
            assert dec[name] == pre[name], name
    with pytest.raises(ValueError, match="profile 'verify'"):
        profiles_for(manifest, "prefill", max_batch=1, opt_seq=1, max_soft_tokens=70, step="verify")


def test_tensorrt_build_parses_the_prefill_graph_once_with_two_profiles(trt_registry, artifact_store, tmp_path,
                                                                         monkeypatch):
    """`_build` hands Polygraphy one network (the prefill plugin graph, strongly typed), a config with the prefill
    profile then the decode one (shapes from `engine_profiles`), and saves one engine; the record names it for both
    steps with the profile indices."""
    import polygraphy.backend.trt as ptrt

    import graphs.build_tensorrt as bt

    art = artifact_store("tiny")
    manifest = read_manifest(art)
    seen = {}

    def network(path, strongly_typed):
        seen["network"] = (path, strongly_typed)
        return "network"

    def engine(network, config):
        seen["engine"] = network
        seen["config"] = config
        return "engine"

    monkeypatch.setattr(ptrt, "NetworkFromOnnxPath", network)
    monkeypatch.setattr(ptrt, "EngineFromNetwork", engine)
    monkeypatch.setattr(ptrt, "SaveEngine", lambda engine, path: (lambda: seen.setdefault("saved", (engine, path))))
    monkeypatch.setattr(bt, "aliasing_config", lambda profiles: ("aliased", profiles))
    source = manifest["plugin_graphs"]["prefill"]["file"]
    record = bt._build(art, manifest, source, tmp_path, max_batch=4, opt_seq=64, max_soft_tokens=140,
                       prefill_chunk=16, log=lambda *_: None)
    assert seen["network"] == (str(art / source), True) and seen["engine"] == "network"
    assert seen["saved"] == ("engine", str(tmp_path / "model.engine"))
    kind, profiles = seen["config"]
    want = bt.engine_profiles(manifest, max_batch=4, opt_seq=64, max_soft_tokens=140, prefill_chunk=16)
    assert kind == "aliased" and len(profiles) == 2
    for profile, step in zip(profiles, ("prefill", "decode")):
        assert {k: (v.min, v.opt, v.max) for k, v in profile.items()} == want[step], step
    assert profiles[0]["input_ids"].max == (4, 16) and profiles[1]["input_ids"].max == (4, 1)
    assert record["prefill"] == record["decode"] == bt.ENGINE_FILE and record["one_engine"]
    assert record["profile_index"] == {"prefill": 0, "decode": 1}
    assert record["profiles"]["decode"]["image_patches"] == [[0, 6912]] * 3


def test_tensorrt_build_replaces_engines_only_when_complete(trt_registry, artifact_store, tmp_path, monkeypatch):
    """The engine is built in a staging directory that replaces engines/ when complete: an older layout's files
    are gone after a build, a failed build leaves engines/ as it was, no staging directory stays behind; the bf16
    cast copy is what gets parsed, the fp32 plugin graph is untouched."""
    import shutil

    import graphs.build_tensorrt as bt

    art = tmp_path / "art"
    shutil.copytree(artifact_store("tiny"), art)
    manifest = read_manifest(art)
    sources = {g: manifest["plugin_graphs"][g]["file"] for g in ("prefill", "decode")}
    (art / "engines").mkdir()
    for name in ("prefill.engine", "decode.engine"):  # an older two-engine build
        (art / "engines" / name).write_bytes(b"old")
    plugin_bytes = (art / sources["prefill"]).read_bytes()
    parsed = []

    def fake_build(root, manifest, source, stage, **kw):
        parsed.append(source)
        assert (root / source).is_file() and ".bf16." in source and stage.name in source
        (stage / "model.engine").write_bytes(b"engine")
        return {"prefill": bt.ENGINE_FILE, "decode": bt.ENGINE_FILE, "one_engine": True}

    monkeypatch.setattr(bt, "_build", fake_build)
    record = bt.build_tensorrt(art, manifest, sources, log=lambda *_: None)
    assert record["one_engine"] and record["dtype"] == "bf16" and len(parsed) == 1
    assert sorted(p.name for p in (art / "engines").iterdir()) == ["model.engine"]
    assert not [p for p in art.iterdir() if p.name.startswith(".")]  # no staging/old directory left
    assert (art / sources["prefill"]).read_bytes() == plugin_bytes

    def failing_build(root, manifest, source, stage, **kw):
        (stage / "model.engine").write_bytes(b"half")
        raise RuntimeError("builder failed")

    monkeypatch.setattr(bt, "_build", failing_build)
    with pytest.raises(RuntimeError, match="builder failed"):
        bt.build_tensorrt(art, manifest, sources, log=lambda *_: None)
    assert (art / "engines" / "model.engine").read_bytes() == b"engine"
    assert not [p for p in art.iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(HAS_TRT and _gpu(), reason="this machine can build TensorRT engines")
def test_without_tensorrt_build_and_load_say_why_and_fall_back(artifact_store):
    art = artifact_store("tiny-text")
    assert tensorrt_unavailable_reason()
    with pytest.raises(RuntimeError, match="cannot build a TensorRT engine"):
        build_engine(art, "tensorrt", log=lambda *_: None)
    assert "tensorrt" not in read_manifest(art)["engines"]
    assert runtime.load(art).backend.name == "onnxruntime"  # auto falls back


# ---------------------------------------------------------------------- registration (lean runtime, no GPU)
@pytest.fixture(scope="module")
def trt_registry():
    """(tensorrt, tensorrt.plugin, plugins.tensorrt_plugins) on the lean runtime; undone after the module."""
    if HAS_TRT:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    else:
        if reason := trt_lean.unavailable_reason():
            pytest.skip(reason)
        trt, trtp = trt_lean.install()
    import plugins.tensorrt_plugins as tp

    yield trt, trtp, tp
    if not HAS_TRT:
        for name in [n for n in sys.modules if n == "tensorrt" or n.startswith("tensorrt.")]:
            del sys.modules[name]
        sys.modules.pop("plugins.tensorrt_plugins", None)


def test_tensorrt_wheels_are_one_release():
    if reason := trt_lean.unavailable_reason():
        pytest.skip(reason)
    versions = trt_lean.versions()
    assert len(set(versions.values())) == 1, versions
    import tensorrt_lean_bindings

    assert tensorrt_lean_bindings.__version__ == versions["tensorrt-lean-cu12-bindings"]
    # the plugin package is the same source in both bindings wheels (we import the full bindings' copy)
    full = Path(importlib.util.find_spec("tensorrt_bindings").submodule_search_locations[0]) / "plugin"
    lean = Path(tensorrt_lean_bindings.__file__).parent / "plugin"
    for f in sorted(full.glob("*.py")):
        assert f.read_bytes() == (lean / f.name).read_bytes(), f.name


def _plugin(trt, name, attrs):
    """Create the plugin as the ONNX parser does from node attributes: INT as int32, FLOAT as float32 fields."""
    creator = trt.get_plugin_registry().get_creator(name, "1", "gemma4")
    arrays, fields = [], []  # a PluginField points into its array: keep the arrays alive
    for f in creator.field_names:
        value = attrs[f.name]
        is_int = isinstance(value, int)
        arrays.append(np.array([value], np.int32 if is_int else np.float32))
        kind = trt.PluginFieldType.INT32 if is_int else trt.PluginFieldType.FLOAT32
        fields.append(trt.PluginField(f.name, arrays[-1], kind))
    return creator.create_plugin(name, "gemma4", trt.PluginFieldCollection(fields), trt.TensorRTPhase.BUILD)


def test_plugins_register_in_the_tensorrt_registry(trt_registry):
    trt, trtp, tp = trt_registry
    assert tp.check_registered() == []
    assert tp.check_registered([("FusedAttention", "2", "gemma4")]) == ["gemma4::FusedAttention (version 2)"]
    reg = trt.get_plugin_registry()
    fa_creator = reg.get_creator("FusedAttention", "1", "gemma4")
    pe_creator = reg.get_creator("PatchEmbed", "1", "gemma4")
    assert fa_creator is not None and pe_creator is not None
    assert {(c.name, c.plugin_namespace) for c in reg.all_creators} >= {("FusedAttention", "gemma4"),
                                                                        ("PatchEmbed", "gemma4")}
    ints = {"mode", "sliding", "window", "num_heads", "num_kv_heads", "head_dim", "rotary_dim"}
    assert {f.name: f.type for f in fa_creator.field_names} == {
        **{k: trt.PluginFieldType.INT64 for k in ints}, "rope_theta": trt.PluginFieldType.FLOAT64,
        "scale": trt.PluginFieldType.FLOAT64}
    assert {f.name: f.type for f in pe_creator.field_names} == {"ln_eps": trt.PluginFieldType.FLOAT64,
                                                                "rms_eps": trt.PluginFieldType.FLOAT64}


@pytest.mark.parametrize("preset", ["gemma4-12b", "tiny"])
def test_plugin_aliasing_and_types_for_every_layer_kind(trt_registry, preset):
    """Sliding/full x prefill/decode: presents aliased to pasts (in place) for every kind, sliding prefill included
    (what lets one engine serve prefill and decode); attributes arrive with the parser's types and come out as
    Python ints/floats."""
    from exporter.config import PRESETS
    from plugins import fused_attention as fa
    from plugins import patch_embed as pe

    trt, _, tp = trt_registry
    text = PRESETS[preset].text
    kinds = {(text.is_sliding(i), decode): i for i in range(text.num_layers) for decode in (False, True)}
    assert len(kinds) == 4
    F, I = trt.DataType.FLOAT, trt.DataType.INT64
    for (sliding, decode), layer in kinds.items():
        attrs = fa.attributes(text, layer, decode=decode)
        plugin = _plugin(trt, "FusedAttention", attrs)
        assert plugin.attrs == {k: v for k, v in attrs.items() if k in plugin.attrs}
        assert all(type(plugin.attrs[k]) is type(attrs[k]) for k in plugin.attrs)
        types = plugin.get_output_data_types([F, F, F, F, F, I, I, I], [4, 4, 4, 4, 4, 1, 1, 2])
        assert list(types) == [F, F, F]
        aliases = tuple(plugin.get_aliased_input(i) for i in range(3))
        assert aliases == (-1, 3, 4) == tp.OUTPUT_ALIASES, (sliding, decode)
    plugin = _plugin(trt, "PatchEmbed", pe.attributes(PRESETS[preset].vision))
    assert list(plugin.get_output_data_types([F, I] + [F] * 10, [2, 2, 1, 1, 2, 1, 1, 1, 3, 1, 1, 2])) == [F]
    assert plugin.get_aliased_input(0) == -1


def test_plugin_graph_nodes_match_the_registered_creators(trt_registry, artifact_store):
    """Every plugin node of the tiny artifact's graphs names a registered creator and carries every attribute the
    creator takes, with the ONNX type the parser converts (INT -> int, FLOAT -> float)."""
    from graphs.build_tensorrt import require_plugin_creators

    trt, _, tp = trt_registry
    art = artifact_store("tiny")
    manifest = read_manifest(art)
    reg = trt.get_plugin_registry()
    seen = set()
    for graph in ("prefill", "decode"):
        path = art / manifest["plugin_graphs"][graph]["file"]
        require_plugin_creators(path)  # does not raise: all registered
        assert plugin_creators(path) == ({("FusedAttention", "1", "gemma4"), ("PatchEmbed", "1", "gemma4")}
                                         if graph == "prefill" else {("FusedAttention", "1", "gemma4")})
        for node in onnx.load(str(path), load_external_data=False).graph.node:
            attrs = {a.name: a for a in node.attribute}
            if "plugin_namespace" not in attrs:
                continue
            creator = reg.get_creator(node.op_type, "1", "gemma4")
            for f in creator.field_names:
                assert f.name in attrs, f"{node.name}: no attribute {f.name}"
                want = onnx.AttributeProto.INT if f.type == trt.PluginFieldType.INT64 else onnx.AttributeProto.FLOAT
                assert attrs[f.name].type == want, f"{node.name}.{f.name}"
            if node.op_type == "FusedAttention":
                values = {k: onnx.helper.get_attribute_value(a) for k, a in attrs.items()}
                plugin = _plugin(trt, "FusedAttention", values)
                plugin.get_output_data_types([trt.DataType.FLOAT] * 5 + [trt.DataType.INT64] * 3, [4] * 5 + [1, 1, 2])
                seen.add((values["sliding"], values["mode"], plugin.get_aliased_input(1)))
    assert seen == {(1, 0, 3), (0, 0, 3), (1, 1, 3), (0, 1, 3)}


def test_build_refuses_a_graph_whose_plugin_is_not_registered(trt_registry, artifact_store, tmp_path):
    from graphs.build_tensorrt import require_plugin_creators

    art = artifact_store("tiny")
    model = onnx.load(str(art / read_manifest(art)["plugin_graphs"]["decode"]["file"]), load_external_data=False)
    for node in model.graph.node:
        for a in node.attribute:
            if a.name == "plugin_version":
                a.s = b"7"
    path = tmp_path / "decode.v7.onnx"
    onnx.save(model, str(path))
    with pytest.raises(RuntimeError, match=r"gemma4::FusedAttention \(version 7\).*layer 0's body"):
        require_plugin_creators(path)


def test_engine_config_enables_plugin_output_aliasing(trt_registry, monkeypatch):
    import polygraphy.backend.trt as ptrt

    from graphs.build_tensorrt import aliasing_config

    trt = trt_registry[0]
    calls = []

    class Config:
        def set_preview_feature(self, feature, on):
            calls.append((feature, on))

    monkeypatch.setattr(ptrt, "CreateConfig", lambda profiles: (lambda builder, network: Config()))
    aliasing_config(["profile"])("builder", "network")
    assert calls == [(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)]


# ---------------------------------------------------------------------- runtime backend against fakes
def _fake_backend(artifact_store, *, one_engine=False, alias_sliding_prefill=False):
    """A TrtBackend over fake engines: the two-engine layout (sliding prefill rings out of place unless
    ``alias_sliding_prefill``), or ``one_engine``: one engine of the prefill graph, every cache aliased, two
    profiles, contexts made by the backend."""
    import torch

    from runtime.ort_backend import is_cache
    from runtime.trt_backend import TrtBackend

    manifest = read_manifest(artifact_store("tiny"))
    manifest["engines"]["tensorrt"] = (
        {"prefill": "m", "decode": "m", "one_engine": True, "profile_index": {"prefill": 0, "decode": 1},
         "prefill_chunk": 16} if one_engine else {"prefill": "x", "decode": "y", "prefill_chunk": 16})
    layer_types = manifest["model_config"]["text"]["layer_types"]
    caches = [i["name"] for i in manifest["graphs"]["decode"]["inputs"] if is_cache(i["name"])]
    b = TrtBackend.__new__(TrtBackend)
    stream = type("Stream", (), {"cuda_stream": 7, "synchronize": lambda self: None})()
    b.torch, b.root, b.manifest, b.device, b.stream = torch, Path("fake"), manifest, "cpu", stream
    b.trt = _FAKE_TRT
    b.engines, b.contexts = {}, {}
    b._on_stream = contextlib.nullcontext
    for graph in ("prefill", "decode"):
        source = "prefill" if one_engine else graph
        plain = [i["name"] for i in manifest["graphs"][source]["inputs"] if not is_cache(i["name"])]
        aliases = {}
        for name in caches:
            sliding = layer_types[int(name.rsplit("_", 1)[1])] == "sliding_attention"
            if graph == "decode" or not sliding or alias_sliding_prefill or one_engine:
                aliases[name.replace("past_", "present_")] = name
        presents = [n.replace("past_", "present_") for n in caches]
        # the engine lists its I/O in another order than the manifest: caches reversed, plain inputs last
        engine = _FakeEngine(caches[::-1] + plain, ["logits"] + presents[::-1], aliases,
                             memory=(1000, 24) if one_engine else (500,))
        b.engines[graph] = b.engines.get("prefill", engine) if one_engine else engine
    if one_engine:
        b._make_contexts({"prefill": 0, "decode": 1})
    else:
        b.contexts = {g: _FakeContext() for g in ("prefill", "decode")}
    b._setup(manifest)
    b.captured = []
    b._capture = lambda: b.captured.append(1) or type("G", (), {"replay": lambda self: None})()
    return b, caches, manifest


def test_trt_backend_binds_by_name_checks_results_and_binds_empty_inputs(artifact_store):
    from runtime.prompt import PrefillInputs

    b, caches, manifest = _fake_backend(artifact_store)
    assert b.prefill_chunk == 16
    cache = b.new_cache(2, int(manifest["max_len"]))
    ctx = b.contexts["prefill"]
    inputs = PrefillInputs(input_ids=np.array([[2, 5, 6], [2, 7, 0]]), past_lens=np.zeros(2, np.int64),
                           seq_lens=np.array([3, 2]))
    before = [c.data_ptr() for c in cache]
    b.prefill(inputs, cache)
    for i, name in enumerate(caches):  # by name, not by the engine's order
        assert ctx.addresses[name] == before[i], name
        assert ctx.shapes[name] == tuple(cache[i].shape)
        present = name.replace("past_", "present_")
        sliding = manifest["model_config"]["text"]["layer_types"][int(name.rsplit("_", 1)[1])] == "sliding_attention"
        assert (ctx.addresses[present] == before[i]) == (not sliding), name  # aliased: in place
        assert cache[i].data_ptr() == ctx.addresses[present]  # the cache is what the engine wrote
    assert ctx.shapes["image_patches"] == (0, 6912) and ctx.addresses["image_patches"] != 0  # not a null address
    assert ctx.shapes["input_ids"] == (2, 3)
    ctx.refuse = {"past_key_3"}
    with pytest.raises(RuntimeError, match="past_key_3"):
        b.prefill(inputs, cache)
    ctx.refuse = {"execute"}
    with pytest.raises(RuntimeError, match="prefill engine"):
        b.prefill(inputs, cache)


def test_trt_backend_decode_graph_is_per_binding(artifact_store):
    b, caches, manifest = _fake_backend(artifact_store)
    max_len = int(manifest["max_len"])
    cache = b.new_cache(2, max_len)
    ids, lens = np.array([[3], [4]]), np.array([5, 6])
    b.decode(ids, lens, cache)
    b.decode(ids, lens, cache)  # replay: no new capture, no re-binding
    assert len(b.captured) == 1 and b.contexts["decode"].runs == 1
    cache3 = b.new_cache(3, max_len)  # a new cache invalidates the graph
    b.decode(np.array([[3], [4], [5]]), np.array([5, 6, 7]), cache3)
    assert len(b.captured) == 2 and b.contexts["decode"].runs == 2
    b.decode(ids, lens, cache)  # another batch size re-binds the context: captured again, not the old graph replayed
    assert len(b.captured) == 3 and b.contexts["decode"].runs == 3
    assert b.contexts["decode"].shapes["input_ids"] == (2, 1)


def test_trt_backend_without_engine_aliasing_uses_new_buffers_and_no_graph(artifact_store):
    b, caches, manifest = _fake_backend(artifact_store)
    b.engines["decode"].aliases = {}
    b._setup(manifest)
    cache = b.new_cache(1, int(manifest["max_len"]))
    before = [c.data_ptr() for c in cache]
    b.decode(np.array([[3]]), np.array([4]), cache)
    assert all(c.data_ptr() != p for c, p in zip(cache, before)) and b.captured == []


def test_trt_backend_one_engine_two_profiles_one_scratch(artifact_store):
    """The one-engine layout: one engine object for both steps, a context per profile (prefill 0, decode 1), one
    scratch allocation of the larger profile's size shared by both, every cache bound in place by both contexts."""
    from runtime.prompt import PrefillInputs

    b, caches, manifest = _fake_backend(artifact_store, one_engine=True)
    assert b.one_engine and b.engines["prefill"] is b.engines["decode"]
    pre, dec = b.contexts["prefill"], b.contexts["decode"]
    assert pre is not dec and (pre.profile, dec.profile) == (0, 1)
    assert pre.memory == dec.memory == (b.scratch.data_ptr(), 1000)  # the larger profile's size, one buffer
    assert all(b.aliased["prefill"].values()) and all(b.aliased["decode"].values())
    cache = b.new_cache(2, int(manifest["max_len"]))
    before = [c.data_ptr() for c in cache]
    inputs = PrefillInputs(input_ids=np.array([[2, 5, 6], [2, 7, 0]]), past_lens=np.zeros(2, np.int64),
                           seq_lens=np.array([3, 2]))
    b.prefill(inputs, cache)
    b.decode([3, 4], [3, 2], cache)
    for ctx in (pre, dec):
        for i, name in enumerate(caches):  # sliding layers too: in place in both steps
            assert ctx.addresses[name] == ctx.addresses[name.replace("past_", "present_")] == before[i], name
    assert [c.data_ptr() for c in cache] == before
    # decode is a one-token prefill on the decode profile: ones for seq_lens, empty media on real addresses
    assert dec.shapes["input_ids"] == (2, 1) and dec.shapes["seq_lens"] == (2,)
    assert dec.shapes["image_patches"] == (0, 6912) and dec.addresses["image_patches"] != 0
    assert pre.shapes["input_ids"] == (2, 3)
    assert len(b.captured) == 1
    b.prefill(inputs, cache)  # an in-place prefill keeps the decode context's binding and its graph
    b.decode([5, 6], [4, 3], cache)
    assert len(b.captured) == 1 and dec.runs == 1
    with pytest.raises(ValueError, match="2 token ids but 3 past lengths"):
        b.decode([5, 6], [4, 3, 1], cache)


def test_trt_backend_refuses_an_inconsistent_engine_record(artifact_store):
    from runtime.manifest import ArtifactError
    from runtime.trt_backend import engine_layout

    assert engine_layout(Path("a"), {"prefill": "x", "decode": "y"}) == (False, {"prefill": 0, "decode": 0})
    one = {"prefill": "m", "decode": "m", "one_engine": True, "profile_index": {"prefill": 0, "decode": 1}}
    assert engine_layout(Path("a"), one) == (True, {"prefill": 0, "decode": 1})
    with pytest.raises(ArtifactError, match="one_engine=True but its prefill and decode engines are 'm' and 'y'"):
        engine_layout(Path("a"), {**one, "decode": "y"})
    with pytest.raises(ArtifactError, match="one_engine=None"):
        engine_layout(Path("a"), {"prefill": "m", "decode": "m"})
    for bad in ({"prefill": 0, "decode": 0}, {"prefill": 0}, {"prefill": 0, "decode": "1"}):
        with pytest.raises(ArtifactError, match="profile_index"):
            engine_layout(Path("a"), {**one, "profile_index": bad})
    b, _, manifest = _fake_backend(artifact_store, one_engine=True)
    with pytest.raises(RuntimeError, match="decode on optimization profile 2, the engine has 2"):
        b._make_contexts({"prefill": 0, "decode": 2})
    b.engines["prefill"].create_execution_context = lambda strategy: type(
        "C", (_FakeContext,), {"set_optimization_profile_async": lambda self, i, s: False})()
    with pytest.raises(RuntimeError, match="optimization profile 0 for the prefill context"):
        b._make_contexts({"prefill": 0, "decode": 1})


# ------------------------------------------------------------------ the backend end to end over an emulated engine
def test_trt_backend_generates_like_onnxruntime_over_an_emulated_engine(artifact_store):
    """`runtime.generate` through `TrtBackend` (one engine, two contexts, decode as a one-token prefill, chunked
    prefill at 16 tokens per call for text and audio, the decode graph replayed from its bound buffers) over an engine emulated by
    ONNX Runtime running the prefill plugin graph on the bound host addresses: the same greedy tokens as the ONNX
    Runtime backend, for long prompts (rings wrapped, chunks), a batch of different lengths, images and audio.  The
    caches stay the buffers the backend allocated (every present aliased)."""
    from exporter.config import PRESETS
    from tests.cases import MAX_SOFT_TOKENS, cases

    art = artifact_store("tiny")
    b = emulated_trt_backend(art)
    captures, replays = b.captures, b.replays
    ort_model = runtime.load(art, backend="onnxruntime")
    trt_model = dataclasses.replace(ort_model, backend=b)
    allocated = []  # (cache list, its buffers' addresses when allocated)
    new_cache = b.new_cache

    def allocate(*a):
        cache = new_cache(*a)
        allocated.append((cache, [c.data_ptr() for c in cache]))
        return cache

    b.new_cache = allocate
    cfg = PRESETS["tiny"]
    for name, case in cases(cfg).items():
        batched = len(case.ids) > 1
        kw = dict(images=case.images if batched else case.images[0], audio=case.audio if batched else case.audio[0],
                  max_new_tokens=12, max_soft_tokens=MAX_SOFT_TOKENS)
        prompt = case.ids if batched else case.ids[0]
        b.prefill_chunk = 16 if not any(case.images) else 96  # an image's soft tokens are never split
        want = runtime.generate(ort_model, prompt, **kw)
        got = runtime.generate(trt_model, prompt, **kw)
        want, got = (want, got) if batched else ([want], [got])
        assert [g.tokens for g in got] == [w.tokens for w in want], name
        cache, pointers = allocated[-1]
        assert [c.data_ptr() for c in cache] == pointers, name  # every step wrote the allocated buffers
    # one eager decode step (and capture) per generation, every later step a replay of the bound buffers
    assert len(captures) == len(cases(cfg)) and len(replays) > 0
    assert b.contexts["decode"].runs == len(cases(cfg)) + len(replays)
    assert b.contexts["prefill"].runs > len(cases(cfg))  # long prompts took several 16-token calls


@pytest.mark.skipif(not (HAS_TRT and _gpu()), reason="needs tensorrt and a CUDA GPU")
def test_tensorrt_engine_generates_like_onnxruntime(artifact_store):
    art = artifact_store("tiny")
    build_engine(art, "tensorrt", dtype="fp32", log=lambda *_: None)  # fp32 + IEEE kernels: token-exact
    record = read_manifest(art)["engines"]["tensorrt"]
    assert record["one_engine"] and record["prefill"] == record["decode"] == "engines/model.engine"
    assert sorted(p.name for p in (art / "engines").iterdir()) == ["model.engine"]
    trt_model, ort_model = runtime.load(art, backend="tensorrt"), runtime.load(art, backend="onnxruntime")
    backend = trt_model.backend
    assert backend.engines["prefill"] is backend.engines["decode"]
    import tensorrt as trt

    engine = backend.engines["prefill"]
    assert engine.num_optimization_profiles == 2
    assert all(engine.get_aliased_input_tensor(n.replace("past_", "present_")) == n for n in backend.cache_index)
    for prompt in ([2, 40, 41, 42, 43], [2, 7, 9]):
        assert runtime.generate(trt_model, prompt, max_new_tokens=24).tokens == \
            runtime.generate(ort_model, prompt, max_new_tokens=24).tokens
    # one copy of the weights: the engine's weight bytes are about the artifact's fp32 weights, not twice them
    weights = engine.get_engine_stat(trt.EngineStat.TOTAL_WEIGHTS_SIZE)
    data = sum(f.stat().st_size for f in art.glob("*.data"))
    assert 0.5 * data < weights < 1.5 * data, (weights, data)


def test_graphs_use_only_forms_tensorrt_documents(artifact_store):
    """CumSum only on floats (TensorRT documents it for float types) and TensorScatter only in linear mode (the
    mode TensorRT documents), in the exported and the plugin graphs: both matter for `--no-plugins` builds."""
    import onnx_ir as ir

    art = artifact_store("tiny")
    manifest = read_manifest(art)
    files = [manifest["graphs"][g]["file"] for g in ("prefill", "decode")]
    files += [manifest["plugin_graphs"][g]["file"] for g in ("prefill", "decode")]
    cumsums = 0
    for rel in files:
        model = ir.load(str(art / rel))
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type == "CumSum":
                cumsums += 1
                assert node.inputs[0].dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16), \
                    f"{rel}: {node.name} CumSum on {node.inputs[0].dtype}"
            if node.op_type == "TensorScatter":
                mode = node.attributes.get("mode")
                assert mode is None or mode.value == "linear", f"{rel}: {node.name} TensorScatter mode {mode.value}"
    assert cumsums > 0  # the image/audio placement and the image blocks are still computed with CumSum
