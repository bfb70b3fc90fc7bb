"""TensorRT parts: what can be checked without a GPU everywhere, the rest on a GPU machine with TensorRT
(skipped here with the reason).

Without a GPU: the plugins register through the real ``tensorrt.plugin`` package into the lean runtime's plugin
registry (`tests.trt_lean`), with the attribute types the ONNX parser passes and the output aliasing the contract
says, for every layer kind; the engine build refuses a graph whose plugin creators are missing and enables plugin
output aliasing; the runtime backend's binding logic runs against a fake engine and context."""

from __future__ import annotations

import contextlib
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
    """Sliding/full x prefill/decode: presents aliased to pasts (in place) except sliding prefill (new ring);
    attributes arrive with the parser's types and come out as Python ints/floats."""
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
        want = (-1, -1, -1) if (sliding and not decode) else (-1, 3, 4)
        assert aliases == want == tp.output_aliases(int(decode), int(sliding)), (sliding, decode)
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
    assert seen == {(1, 0, -1), (0, 0, 3), (1, 1, 3), (0, 1, 3)}


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
class _FakeEngine:
    def __init__(self, inputs, outputs, aliases):
        self.io = list(inputs) + list(outputs)
        self.inputs, self.aliases = set(inputs), aliases
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, i):
        return self.io[i]

    def get_tensor_mode(self, name):
        return "in" if name in self.inputs else "out"

    def get_aliased_input_tensor(self, name):
        return self.aliases.get(name)


class _FakeContext:
    def __init__(self):
        self.shapes, self.addresses, self.refuse, self.runs = {}, {}, set(), 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = shape
        return name not in self.refuse

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return ptr != 0 and name not in self.refuse

    def execute_async_v3(self, stream):
        self.runs += 1
        return "execute" not in self.refuse


def _fake_backend(artifact_store, *, alias_sliding_prefill=False):
    import torch

    from runtime.ort_backend import is_cache
    from runtime.trt_backend import TrtBackend

    manifest = read_manifest(artifact_store("tiny"))
    manifest["engines"]["tensorrt"] = {"prefill": "x", "decode": "y", "prefill_chunk": 16}
    layer_types = manifest["model_config"]["text"]["layer_types"]
    caches = [i["name"] for i in manifest["graphs"]["decode"]["inputs"] if is_cache(i["name"])]
    b = TrtBackend.__new__(TrtBackend)
    stream = type("Stream", (), {"cuda_stream": 7, "synchronize": lambda self: None})()
    b.torch, b.root, b.manifest, b.device, b.stream = torch, Path("fake"), manifest, "cpu", stream
    b.trt = type("trt", (), {"TensorIOMode": type("M", (), {"INPUT": "in"})})
    b.engines, b.contexts = {}, {}
    for graph in ("prefill", "decode"):
        plain = [i["name"] for i in manifest["graphs"][graph]["inputs"] if not is_cache(i["name"])]
        aliases = {}
        for name in caches:
            sliding = layer_types[int(name.rsplit("_", 1)[1])] == "sliding_attention"
            if graph == "decode" or not sliding or alias_sliding_prefill:
                aliases[name.replace("past_", "present_")] = name
        presents = [n.replace("past_", "present_") for n in caches]
        # the engine lists its I/O in another order than the manifest: caches reversed, plain inputs last
        b.engines[graph] = _FakeEngine(caches[::-1] + plain, ["logits"] + presents[::-1], aliases)
        b.contexts[graph] = _FakeContext()
    b._on_stream = contextlib.nullcontext
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


@pytest.mark.skipif(not (HAS_TRT and _gpu()), reason="needs tensorrt and a CUDA GPU")
def test_tensorrt_engine_generates_like_onnxruntime(artifact_store):
    art = artifact_store("tiny")
    build_engine(art, "tensorrt", dtype="fp32", log=lambda *_: None)  # fp32 + IEEE kernels: token-exact
    trt_model, ort_model = runtime.load(art, backend="tensorrt"), runtime.load(art, backend="onnxruntime")
    for prompt in ([2, 40, 41, 42, 43], [2, 7, 9]):
        assert runtime.generate(trt_model, prompt, max_new_tokens=24).tokens == \
            runtime.generate(ort_model, prompt, max_new_tokens=24).tokens


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
