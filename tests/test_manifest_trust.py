"""The manifest is the only way into an artifact: schema, paths inside the artifact, listed files, external data.

Most cases use a stand-in artifact built here in milliseconds (`make_fake_artifact`): two real ONNX graphs whose
logits are a constant row kept in external data, and a manifest written by `runtime.manifest.write_manifest`.  It
loads and generates with the real ONNX Runtime backend, so each refusal below is a refusal of a loadable artifact.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import runtime  # noqa: E402
from runtime._onnx_refs import external_data_locations  # noqa: E402
from runtime.manifest import ArtifactError, read_manifest, sha256_file, write_manifest  # noqa: E402

VOCAB, MAX_LEN, FAVOURITE = 16, 8, 12
TOKENS = {"pad": 0, "eos": 1, "bos": 2, "turn_start": 3, "turn_end": 4, "boi": 5, "eoi": 6, "image": 7, "boa": 8,
          "eoa": 9, "audio": 10, "video": 11}
_CACHE = ["batch", 1, "max_len", 4]


def _io(graph: str) -> tuple[list[dict], list[dict]]:
    seq = "seq" if graph == "prefill" else 1
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", seq]},
              {"name": "past_lens", "dtype": "int64", "shape": ["batch"]},
              {"name": "past_key_0", "dtype": "float32", "shape": _CACHE},
              {"name": "past_value_0", "dtype": "float32", "shape": _CACHE}]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", VOCAB]},
               {"name": "present_key_0", "dtype": "float32", "shape": _CACHE},
               {"name": "present_value_0", "dtype": "float32", "shape": _CACHE}]
    return inputs, outputs


def _external(tensor, location: str, data: bytes, data_path: Path) -> None:
    data_path.parent.mkdir(parents=True, exist_ok=True)
    data_path.write_bytes(data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def write_graph(path: Path, graph: str, location: str, data_path: Path | None = None) -> None:
    """A stand-in graph: logits[b] = a constant row (argmax FAVOURITE) kept in external data at ``location``."""
    def info(spec):
        dtype = TensorProto.INT64 if spec["dtype"] == "int64" else TensorProto.FLOAT
        return helper.make_tensor_value_info(spec["name"], dtype, spec["shape"])

    row = np.linspace(-1, 1, VOCAB, dtype=np.float32)
    row[FAVOURITE] = 5.0
    weight = numpy_helper.from_array(row, "row")
    _external(weight, location, row.tobytes(), data_path or path.parent / location)
    nodes = [
        helper.make_node("Cast", ["past_lens"], ["lens_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["lens_f", "axis1"], ["lens_col"]),
        helper.make_node("Mul", ["lens_col", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "row"], ["logits"]),  # (batch, vocab)
        helper.make_node("Identity", ["past_key_0"], ["present_key_0"]),
        helper.make_node("Identity", ["past_value_0"], ["present_value_0"]),
    ]
    inits = [weight, numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.zeros(1, np.float32), "zero")]
    inputs, outputs = _io(graph)
    g = helper.make_graph(nodes, graph, [info(s) for s in inputs], [info(s) for s in outputs], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def fake_manifest(*, vision: bool = True, mm_posemb_size: int = 4, tokenizer: list[str] | None = None) -> dict:
    cfg = {"text": {"vocab_size": VOCAB, "layer_types": ["full_attention"], "sliding_window": 4},
           "vision": {"patch_size": 16, "pooling_kernel_size": 3, "mm_posemb_size": mm_posemb_size} if vision else None,
           "audio": {"samples_per_token": 640}, "tokens": dict(TOKENS)}
    graphs = {g: {"file": f"{g}.onnx", "inputs": _io(g)[0], "outputs": _io(g)[1]} for g in ("prefill", "decode")}
    return {"model_config": cfg, "max_len": MAX_LEN, "graphs": graphs, "tokenizer": tokenizer or [], "engines": {}}


def make_fake_artifact(root: Path, **manifest_kwargs) -> Path:
    """A loadable artifact at ``root``: both graphs share weights.data; the manifest lists every file."""
    root.mkdir(parents=True)
    for g in ("prefill", "decode"):
        write_graph(root / f"{g}.onnx", g, "weights.data")
    write_manifest(root, fake_manifest(**manifest_kwargs))
    return root


def _edit(root: Path, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def _relist(root: Path, *rels: str) -> None:
    """Record the current sha256 of ``rels`` in the manifest (what a writer would have done)."""
    def change(m):
        for rel in rels:
            m["files"][rel] = sha256_file(root / rel)
    _edit(root, change)


@pytest.fixture
def art(tmp_path) -> Path:
    return make_fake_artifact(tmp_path / "art")


def test_fake_artifact_loads_and_generates(art):
    out = runtime.generate(runtime.load(art), [2, 3], max_new_tokens=2)
    assert out.tokens == [FAVOURITE, FAVOURITE]


# ------------------------------------------------------------------ paths the manifest names
def test_engine_path_outside_the_artifact_is_refused(tmp_path, art):
    """The issue's case: engines.onnxruntime.prefill -> an absolute path to a valid graph outside the artifact."""
    outside = tmp_path / "elsewhere"
    write_graph(outside / "prefill.onnx", "prefill", "weights.data")
    runtime.load(art)

    def point_outside(m):
        m["engines"]["onnxruntime"] = {"prefill": str(outside / "prefill.onnx"), "decode": "decode.onnx"}

    _edit(art, point_outside)
    for verify in (True, False):
        with pytest.raises(ArtifactError) as e:
            runtime.load(art, verify=verify)
        assert "manifest.json: engines.onnxruntime.prefill: expected a relative path inside the artifact, got " \
               f"'{outside / 'prefill.onnx'}'" in str(e.value)
    _edit(art, lambda m: m["engines"]["onnxruntime"].update(prefill="../elsewhere/prefill.onnx"))
    with pytest.raises(ArtifactError, match=r"engines\.onnxruntime\.prefill: expected a relative path"):
        runtime.load(art)


@pytest.mark.parametrize("bad", ["../x.data", "/etc/passwd", "a/../../x", "./prefill.onnx", "a\\..\\b", "", "C:/x"])
def test_files_entries_must_stay_inside(art, bad):
    _edit(art, lambda m: m["files"].update({bad: "0" * 64}))
    with pytest.raises(ArtifactError, match=r"manifest\.json: files\[.*\]: expected a relative path inside the artifact"):
        runtime.load(art, verify=False)


def test_graph_not_listed_in_files_is_refused(art):
    write_graph(art / "extra.onnx", "prefill", "weights.data")
    _edit(art, lambda m: m["engines"].update(onnxruntime={"prefill": "extra.onnx", "decode": "decode.onnx"}))
    with pytest.raises(ArtifactError, match=r"engines\.onnxruntime\.prefill: 'extra\.onnx' is not listed in `files`"):
        runtime.load(art, verify=False)


def test_symlink_out_of_the_artifact_is_refused(tmp_path, art):
    secret = tmp_path / "secret.data"
    os.replace(art / "weights.data", secret)
    os.symlink(secret, art / "weights.data")
    assert sha256_file(art / "weights.data") == json.loads((art / "manifest.json").read_text())["files"]["weights.data"]
    for verify in (True, False):  # the hash matches: only the location gives it away
        with pytest.raises(ArtifactError, match=r"weights\.data: listed in manifest\.json as 'weights\.data' but it "
                                                r"resolves to .*secret\.data, outside the artifact"):
            runtime.load(art, verify=verify)


def test_symlinked_directory_out_of_the_artifact_is_refused(tmp_path, art):
    outside = tmp_path / "outside"
    write_graph(outside / "prefill.onnx", "prefill", "weights.data")
    os.symlink(outside, art / "ort")
    _edit(art, lambda m: m["files"].update({"ort/prefill.onnx": sha256_file(outside / "prefill.onnx")}))
    with pytest.raises(ArtifactError, match=r"ort/prefill\.onnx.* outside the artifact"):
        runtime.load(art)


def test_symlink_inside_the_artifact_is_allowed(art):
    os.replace(art / "weights.data", art / "real.data")
    os.symlink("real.data", art / "weights.data")
    _relist(art, "real.data")
    assert runtime.generate(runtime.load(art), [2], max_new_tokens=1).tokens == [FAVOURITE]


# ------------------------------------------------------------------ external data inside the graphs
def test_external_data_outside_the_artifact_is_refused_before_onnxruntime(tmp_path, art):
    write_graph(art / "prefill.onnx", "prefill", "../stolen.data", data_path=tmp_path / "stolen.data")
    _relist(art, "prefill.onnx")
    with pytest.raises(ArtifactError) as e:
        runtime.load(art)
    msg = str(e.value)
    assert "prefill.onnx: tensor 'row' keeps its data in '../stolen.data', outside the artifact; refused" in msg
    assert "ONNX Runtime" not in msg  # our check, not ONNX Runtime's


def test_external_data_absolute_location_is_refused(tmp_path, art):
    target = tmp_path / "abs.data"
    write_graph(art / "decode.onnx", "decode", str(target), data_path=target)
    _relist(art, "decode.onnx")
    with pytest.raises(ArtifactError, match=rf"decode\.onnx: tensor 'row' keeps its data in '{target}', outside"):
        runtime.load(art)


def test_external_data_not_listed_is_refused(art):
    write_graph(art / "prefill.onnx", "prefill", "sub/unlisted.data")
    _relist(art, "prefill.onnx")
    with pytest.raises(ArtifactError, match=r"keeps its data in 'sub/unlisted\.data' \(sub/unlisted\.data\), which "
                                            r"manifest\.json does not list"):
        runtime.load(art)


def test_onnxruntime_refusal_names_the_graph(art):
    """External data that passes our checks but that ONNX Runtime cannot use (too short) is reported per file."""
    (art / "weights.data").write_bytes(b"\0" * 8)  # the graphs read 64 bytes
    _relist(art, "weights.data")
    with pytest.raises(ArtifactError, match=r"prefill\.onnx: ONNX Runtime .* cannot load this graph"):
        runtime.load(art)


def test_external_data_locations_equal_onnx_helper(tmp_path):
    """Our protobuf reader finds the same external tensors as onnx's own helper, in subgraphs and functions too."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    def ext(name, location):
        t = numpy_helper.from_array(np.arange(3, dtype=np.float32) + len(name), name)
        _external(t, location, t.raw_data or np.arange(3, dtype=np.float32).tobytes(), tmp_path / location)
        return t

    inner = helper.make_graph([helper.make_node("Identity", ["c"], ["y"])], "inner", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [ext("c", "sub.data")])
    nodes = [helper.make_node("Constant", [], ["k"], value=ext("k", "const.data")),
             helper.make_node("If", ["cond"], ["out"], then_branch=inner, else_branch=inner)]
    inline = numpy_helper.from_array(np.ones(2, np.float32), "inline")
    g = helper.make_graph(nodes, "outer", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3])], [ext("w", "w.data"), inline])
    fn = helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Constant", [], ["b"],
                              value=ext("fk", "fn.data"))], [helper.make_opsetid("", 21)])
    model = helper.make_model(g, functions=[fn], opset_imports=[helper.make_opsetid("", 21),
                                                                helper.make_opsetid("local", 1)])
    ours = sorted(external_data_locations(model.SerializeToString()))
    assert ours == [("c", "sub.data"), ("c", "sub.data"), ("fk", "fn.data"), ("k", "const.data"), ("w", "w.data")]
    reference = sorted((t.name, {e.key: e.value for e in t.external_data}["location"])
                       for t in _get_all_tensors(model) if uses_external_data(t))
    assert ours == reference


def test_external_data_locations_of_exported_graphs(artifact_store):
    """On a real exported + optimised artifact, every graph's external tensors are found, and load passes."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    art = artifact_store("tiny-text")
    manifest = read_manifest(art)
    graphs = [f for f in manifest["files"] if f.endswith(".onnx")]
    assert len(graphs) >= 4
    for rel in graphs:
        model = onnx.load(str(art / rel), load_external_data=False)
        reference = sorted((t.name, {e.key: e.value for e in t.external_data}["location"])
                           for t in _get_all_tensors(model) if uses_external_data(t))
        assert sorted(external_data_locations((art / rel).read_bytes())) == reference, rel
        assert reference, f"{rel} keeps no external data; the test would prove nothing"


# ------------------------------------------------------------------ schema
_SCHEMA_CASES = [
    (lambda m: m.pop("max_len"), "max_len: missing"),
    (lambda m: m.update(max_len="8"), "max_len: expected an integer >= 2, got '8'"),
    (lambda m: m.update(max_len=True), "max_len: expected an integer >= 2, got True"),
    (lambda m: m["model_config"]["text"].update(vocab_size=0), "model_config.text.vocab_size: expected an integer >= 1"),
    (lambda m: m["model_config"]["text"].update(layer_types=["dense"]),
     "model_config.text.layer_types[0]: expected 'sliding_attention' or 'full_attention', got 'dense'"),
    (lambda m: m["model_config"]["tokens"].pop("eos"), "model_config.tokens.eos: missing"),
    (lambda m: m["model_config"]["tokens"].update(image=99),
     "model_config.tokens.image: id 99 is not below model_config.text.vocab_size (16)"),
    (lambda m: m["model_config"]["vision"].update(mm_posemb_size=None),
     "model_config.vision.mm_posemb_size: expected an integer >= 1, got None"),
    (lambda m: m["graphs"].pop("decode"), "graphs.decode: missing"),
    (lambda m: m["graphs"]["prefill"].update(file=None),
     "graphs.prefill.file: expected a relative path inside the artifact, got None"),
    (lambda m: m["graphs"]["decode"]["inputs"][0].update(shape=["batch", -1]),
     "graphs.decode.inputs[0].shape[1]: expected an integer >= 0, got -1"),
    (lambda m: m["graphs"]["decode"]["inputs"].pop(3),
     "graphs.decode.inputs: 1 past_key_*/past_value_* inputs, expected 2 per layer"),
    (lambda m: m.update(tokenizer="tokenizer.json"), "tokenizer: expected a list, got 'tokenizer.json'"),
    (lambda m: m.update(tokenizer=["/home/me/tokenizer.json"]),
     "tokenizer[0]: expected a relative path inside the artifact, got '/home/me/tokenizer.json'"),
    (lambda m: m.update(engines={"onnxruntime": {"prefill": "prefill.onnx"}}), "engines.onnxruntime.decode: missing"),
    (lambda m: m["files"].update({"weights.data": "abc"}),
     "files['weights.data']: expected a sha256 digest (64 lowercase hex digits), got 'abc'"),
    (lambda m: m.update(files=[]), "files: expected an object mapping relative paths to sha256 digests"),
]


@pytest.mark.parametrize("change,message", _SCHEMA_CASES, ids=[m.split(":")[0] for _, m in _SCHEMA_CASES])
def test_schema_names_the_bad_key(art, change, message):
    _edit(art, change)
    with pytest.raises(ArtifactError) as e:
        read_manifest(art, verify=False)
    assert f"manifest.json: {message}" in str(e.value)


@pytest.mark.parametrize("text,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"format": "something-else"}', "not a gemma4-deploy-artifact manifest"),
    ("\xff\xfe", "not valid JSON"),
])
def test_malformed_manifest_file(art, text, message):
    (art / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ArtifactError, match=message):
        runtime.load(art)


def test_writers_manifests_pass_the_schema(artifact_store):
    """Exported, engine-built artifacts (plugin graphs, ort/ graphs) are valid: the schema is not stricter than us."""
    manifest = read_manifest(artifact_store("tiny"))
    assert "onnxruntime" in manifest["engines"] and manifest["engines"]["onnxruntime"]["prefill"].startswith("ort/")


# ------------------------------------------------------------------ tokenizer
def _word_tokenizer(path: Path, vocab: dict[str, int]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_only_the_listed_tokenizer_is_opened(tmp_path):
    art = make_fake_artifact(tmp_path / "art")
    _word_tokenizer(art / "tokenizer.json", {"<unk>": 13, "<bos>": 2, "hello": 14})
    assert runtime.load(art).tokenizer is None  # present but not listed: never read
    _relist(art, "tokenizer.json")
    _edit(art, lambda m: m.update(tokenizer=["tokenizer.json"]))
    assert runtime.load(art).tokenizer.encode("hello") == [2, 14]


def test_tokenizer_larger_than_the_model_is_refused(tmp_path):
    art = make_fake_artifact(tmp_path / "art")
    _word_tokenizer(art / "tokenizer.json", {"<unk>": 13, "<bos>": 2, "hello": 14, "huge": 400})
    _relist(art, "tokenizer.json")
    _edit(art, lambda m: m.update(tokenizer=["tokenizer.json"]))
    model = runtime.load(art)
    assert runtime.generate(model, "hello", max_new_tokens=1).tokens == [FAVOURITE]
    with pytest.raises(runtime.InputError, match=r"prompt 0: the tokenizer \(tokenizer\.json\) gave id 400 for 'huge' "
                                                 r"\(token 2\), but the model's vocabulary has 16 ids"):
        runtime.generate(model, "hello huge", max_new_tokens=1)
