"""The assistant on TensorRT (`graphs.trt_assistant`, `runtime.trt_assistant`).

Without a GPU: the graph prepared for TensorRT runs on ONNX Runtime and drafts the step graph's tokens (fp32 and
fp16 Linears; bf16 checked by structure: ONNX Runtime's CPU has no bf16 MatMul), for both assistant presets; the op
check refuses what the TensorRT parser does not import and passes look-alikes it does; ``make build-engine
BACKEND=tensorrt`` (Polygraphy faked, its inputs checked) builds the assistant's engine beside the target's, records
it (file, sha256, source graph) and leaves the artifact as it was when a build fails; the runner, over an engine
emulated by ONNX Runtime (`tests.trt_emulated`) on the emulated TensorRT backend, drafts transformers' tokens
round for round, reads the backend's cache tensors by address, and greedy `runtime.generate(draft="assistant")`
gives plain greedy's tokens; refusals name the command that fixes them.  On a GPU with TensorRT: the real engines.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import runtime
from exporter.assistant import ASSISTANT_PRESETS
from exporter.config import PRESETS
from exporter.export import export_artifact
from exporter.export_assistant import export_assistant, export_graph
from exporter.stream import fake_model
from graphs.build import build_engine
from graphs.trt_assistant import (
    ENGINE_FILE,
    assistant_profile,
    check_tensorrt_ops,
    prepare_assistant,
)
from runtime.assistant import OFFSET
from runtime.errors import InputError
from runtime.manifest import ArtifactError, read_manifest
from runtime.speculative import verify as spec
from runtime.trt_assistant import TrtAssistantRunner, trt_engine_problem
from tests.assistant_ref import OurCaches, prompt, record_rounds, reference_ranges
from tests.test_tensorrt import HAS_TRT, _gpu, trt_registry  # noqa: F401  (a fixture)
from tests.trt_emulated import emulated_trt_assistant, emulated_trt_backend

K, MAX_LEN = 3, 200
WINDOW = PRESETS["tiny"].text.sliding_window


@pytest.fixture(scope="module")
def art(reference_store, pairs, tmp_path_factory):
    """The tiny target exported with --speculative K, its ONNX Runtime engine, the tiny assistant exported in."""
    _, ckpt = reference_store("tiny")
    out = tmp_path_factory.mktemp("trt-assistant") / "artifact"
    export_artifact(fake_model(PRESETS["tiny"]), out, max_len=MAX_LEN, source={"checkpoint": str(ckpt)},
                    weights_from=ckpt, speculative=K, log=lambda *_: None)
    build_engine(out, "onnxruntime", ort_ring_decode="in_place", log=lambda *_: None)
    export_assistant(pairs("tiny-assistant")[3], out, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def emulated(art, tmp_path_factory):
    """(ONNX Runtime model, a model on the emulated TensorRT backend with the emulated assistant engine): the
    manifest records the assistant's engine as `graphs.build_tensorrt` does (in memory; no engine file)."""
    prepared = tmp_path_factory.mktemp("prepared") / "assistant.onnx"
    model, _ = prepare_assistant(art / "assistant" / "assistant.onnx", dtype="fp32")
    ir.save(model, prepared, external_data="assistant.onnx.data")
    ort_model = runtime.load(art, backend="onnxruntime")
    manifest = json.loads(json.dumps(ort_model.manifest))
    rec = manifest["assistant"]
    rec["engines"] = {"tensorrt": {"file": ENGINE_FILE, "from": rec["file"], "from_sha256": manifest["files"][rec["file"]]}}
    backend = emulated_trt_backend(art, prefill_chunk=96)
    runner = emulated_trt_assistant(art, backend, prepared)
    return ort_model, dataclasses.replace(ort_model, backend=backend, manifest=manifest, _assistant=runner)


# ---------------------------------------------------------------------------------------------- the prepared graph
def _chain(session, feeds: dict, table: np.ndarray, tokens: np.ndarray, steps: int):
    """``steps`` drafting steps of a step graph: each step's token's row of ``table`` and next hidden feed the next."""
    hidden, toks, logits = feeds["hidden"], [], []
    for _ in range(steps):
        out = session.run(None, dict(feeds, token_embeds=table[tokens], hidden=hidden))
        logits.append(out[0])
        hidden, tokens = out[1], out[2]
        toks.append(tokens)
    return np.stack(toks, 1), np.stack(logits, 1), hidden


@pytest.mark.parametrize("name", sorted(ASSISTANT_PRESETS))
def test_prepared_graph_drafts_the_step_graphs_tokens(name, pairs, art, tmp_path):
    """The prepared graph on ONNX Runtime, 4 chained steps at batch 3 with caches, rings and reads unlike the
    export's: fp32 drafts the step graph's tokens with logits within 1e-5 of their range, fp16 Linears the same
    tokens with logits within 2e-2 of the range (seen: 1e-3); bf16 casts every MatMul Linear (23 in the tiny
    assistant; the centroid-masked head's Gemm stays fp32) and leaves no op TensorRT does not import."""
    import onnxruntime as ort

    from exporter.linears import find_linears

    _, _, ours, _ = pairs(name)
    target = PRESETS[ASSISTANT_PRESETS[name][0]].text
    step = art / "assistant" / "assistant.onnx"
    if name != "tiny-assistant":
        step = tmp_path / "assistant.onnx"
        export_graph(ours, PRESETS[ASSISTANT_PRESETS[name][0]], step)
    rng = np.random.default_rng(7)
    b, max_len, ring, hb = 3, 37, target.sliding_window + 6, ours.cfg.backbone_hidden_size
    pos = np.array([30, ring + 3, 4])
    feeds = {"hidden": rng.standard_normal((b, hb)).astype(np.float32), "position": pos,
             "full_slots": np.arange(int(pos.max())), "full_len": pos,
             "sliding_start": np.maximum(pos - target.sliding_window - 1, 0), "sliding_end": pos}
    for key, (h, d, t) in {"full_key": (target.num_global_kv_heads, target.global_head_dim, max_len),
                           "full_value": (target.num_global_kv_heads, target.global_head_dim, max_len),
                           "ring_key": (target.num_kv_heads, target.head_dim, ring),
                           "ring_value": (target.num_kv_heads, target.head_dim, ring)}.items():
        feeds[key] = rng.standard_normal((b, h, t, d)).astype(np.float32)
    table = rng.standard_normal((target.vocab_size, hb)).astype(np.float32)
    first = np.array([5, 77, 140])
    want = _chain(ort.InferenceSession(str(step), providers=["CPUExecutionProvider"]), feeds, table, first, 4)
    span = float(np.ptp(want[1]))
    for dtype, tol in (("fp32", 1e-5), ("fp16", 2e-2)):
        model, report = prepare_assistant(step, dtype=dtype)
        path = tmp_path / f"prepared-{dtype}.onnx"
        ir.save(model, path, external_data=f"prepared-{dtype}.onnx.data")
        got = _chain(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), feeds, table, first, 4)
        err = np.abs(got[1] - want[1])
        assert got[0].tolist() == want[0].tolist(), f"{name} {dtype}: drafts {got[0].tolist()} vs {want[0].tolist()}"
        assert err.max() <= tol * span, f"{name} {dtype}: logits max err {err.max():.3g} mean {err.mean():.3g} " \
                                        f"(range {span:.3g})"
    found = find_linears(ir.load(str(step)))
    matmuls = sum(lin.node.op_type == "MatMul" for lin in found.values())  # a Gemm (the centroids) stays fp32
    model, report = prepare_assistant(step, dtype="bf16")
    assert report["linears"] == len(found) and (name != "tiny-assistant" or matmuls == 23)
    weights = [n.inputs[1] for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    assert len(weights) == matmuls and all(w.dtype == ir.DataType.BFLOAT16 for w in weights)
    # the same inputs but sliding_offset, a constant 0 there (TensorRT caches are rings)
    assert [i.dtype for i in model.graph.inputs] == [i.dtype for i in ir.load(str(step)).graph.inputs
                                                     if i.name != OFFSET]


def _graph(nodes, inputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          list(inits))
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)]))
    from onnx_ir.passes import common

    common.ShapeInferencePass()(model)
    return model


def test_op_check_refuses_what_the_parser_does_not_import():
    """Each form the parser documents against is named with its node; look-alikes it imports pass."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [2])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    const_axes = helper.make_node("Constant", [], ["ca"], value=axes)
    big_k = helper.make_tensor("big_k", TensorProto.INT64, [1], [4000])
    small_k = helper.make_tensor("small_k", TensorProto.INT64, [1], [2])
    bad = _graph([helper.make_node("Unique", ["x"], ["u"], name="unique"),
                  helper.make_node("ReduceMean", ["x", "i"], ["m"], name="mean_dynamic_axes"),
                  helper.make_node("Pow", ["i", "i"], ["p"], name="pow_int"),
                  helper.make_node("TopK", ["x", "big_k"], ["tv", "ti"], name="topk_big"),
                  helper.make_node("SkipSimplifiedLayerNormalization", ["x", "x"], ["y"], name="contrib",
                                   domain="com.microsoft")], [x, i], [big_k])
    with pytest.raises(ValueError) as e:
        check_tensorrt_ops(bad)
    msg = str(e.value)
    for node in ("unique", "mean_dynamic_axes", "pow_int", "topk_big", "contrib"):
        assert node in msg, (node, msg)
    assert len(msg.splitlines()) == 6
    ok = _graph([const_axes, helper.make_node("ReduceMean", ["x", "ca"], ["m"], name="mean"),
                 helper.make_node("TopK", ["x", "small_k"], ["tv", "ti"], name="topk"),
                 helper.make_node("Pow", ["x", "x"], ["y"], name="pow")], [x], [small_k])
    assert check_tensorrt_ops(ok) == {"Constant": 1, "ReduceMean": 1, "TopK": 1, "Pow": 1}


def test_profile_covers_the_targets_caches(art):
    manifest = read_manifest(art)
    shapes = assistant_profile(manifest, max_batch=4)
    assert set(shapes) == {s["name"] for s in manifest["assistant"]["inputs"]} - {OFFSET}  # a constant there
    ring_slots = manifest["speculative"]["ring_slots"]
    assert shapes["ring_key"] == ((1, 2, ring_slots, 16), (1, 2, ring_slots, 16), (4, 2, ring_slots, 16))
    assert shapes["full_value"][2] == (4, 1, MAX_LEN, 32) and shapes["full_slots"] == ((1,), (MAX_LEN,), (MAX_LEN,))
    assert shapes["position"] == ((1,), (1,), (4,)) and shapes["hidden"][2] == (4, 64)


# ---------------------------------------------------------------------------------------------- build and record
def _fake_polygraphy(monkeypatch, seen: dict, fail: bool = False):
    import polygraphy.backend.trt as ptrt

    import graphs.build_tensorrt as bt

    def network(path, strongly_typed):
        model = onnx.load(path, load_external_data=False)
        seen["network"] = (path, strongly_typed, {t.data_type for t in model.graph.initializer if len(t.dims) == 2})
        return "network"

    def save(engine, path):
        def write():
            if fail:
                raise RuntimeError("assistant builder failed")
            open(path, "wb").write(b"assistant engine")  # noqa: SIM115
        return write

    monkeypatch.setattr(ptrt, "NetworkFromOnnxPath", network)
    monkeypatch.setattr(ptrt, "EngineFromNetwork", lambda network, config: seen.setdefault("config", config))
    monkeypatch.setattr(ptrt, "CreateConfig", lambda profiles: {"profiles": profiles})
    monkeypatch.setattr(ptrt, "SaveEngine", save)
    monkeypatch.setattr(bt, "_build", lambda root, manifest, source, stage, **kw: (
        (stage / "model.engine").write_bytes(b"target engine"),
        {"prefill": bt.ENGINE_FILE, "decode": bt.ENGINE_FILE, "one_engine": True,
         "profile_index": {"prefill": 0, "decode": 1}})[1])
    monkeypatch.setattr("graphs.build.tensorrt_unavailable_reason", lambda: None)


def test_build_engine_builds_and_records_the_assistant_engine(trt_registry, art, pairs, tmp_path,  # noqa: F811
                                                             monkeypatch):
    """`make build-engine BACKEND=tensorrt`: the assistant's prepared graph (bf16 Linears, strongly typed) with the
    profile of `assistant_profile` is built into engines/ beside the target's engine and recorded as
    ``assistant.engines.tensorrt`` (file hashed, from = the step graph and its sha256); a failing assistant build
    leaves engines/ and the manifest as they were, no staging directory behind; `add_trt_assistant` rebuilds it
    alone after the assistant is exported again (which drops the record)."""
    from graphs.trt_assistant import add_trt_assistant

    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    seen: dict = {}
    _fake_polygraphy(monkeypatch, seen)
    build_engine(copy, "tensorrt", log=lambda *_: None)
    manifest = read_manifest(copy)  # every file, the engines included, matches its sha256
    rec = manifest["assistant"]["engines"]["tensorrt"]
    assert rec["file"] == ENGINE_FILE and rec["from"] == "assistant/assistant.onnx" and rec["dtype"] == "bf16"
    assert rec["from_sha256"] == manifest["files"]["assistant/assistant.onnx"] and ENGINE_FILE in manifest["files"]
    assert "assistant" not in manifest["engines"]["tensorrt"] and trt_engine_problem(copy, manifest) is None
    assert (copy / ENGINE_FILE).read_bytes() == b"assistant engine"
    path, strongly_typed, weight_types = seen["network"]
    assert strongly_typed and TensorProto.BFLOAT16 in weight_types and "assistant-cast" in path
    profile = seen["config"]["profiles"][0]
    assert {k: (v.min, v.opt, v.max) for k, v in profile.items()} == assistant_profile(manifest, max_batch=8)
    assert not [p for p in copy.rglob("*") if p.name.startswith(".") or "assistant-cast" in p.name]
    before = {p: p.read_bytes() for p in (copy / "engines").iterdir()} | {copy / "manifest.json": (copy / "manifest.json").read_bytes()}
    _fake_polygraphy(monkeypatch, seen, fail=True)
    with pytest.raises(RuntimeError, match="assistant builder failed"):
        build_engine(copy, "tensorrt", log=lambda *_: None)
    assert {p: p.read_bytes() for p in before} == before and sorted((copy / "engines").iterdir()) == sorted(
        p for p in before if p.parent.name == "engines")
    assert not [p for p in copy.iterdir() if p.name.startswith(".")]
    export_assistant(pairs("tiny-assistant")[3], copy, log=lambda *_: None)  # a new record: no engine in it
    assert "has no TensorRT engine" in trt_engine_problem(copy, read_manifest(copy))
    with pytest.raises(RuntimeError, match="assistant builder failed"):
        add_trt_assistant(copy, log=lambda *_: None)
    assert not [p for p in copy.iterdir() if p.name.startswith(".")]
    _fake_polygraphy(monkeypatch, seen)
    manifest = add_trt_assistant(copy, log=lambda *_: None)
    assert trt_engine_problem(copy, read_manifest(copy)) is None
    assert manifest["assistant"]["engines"]["tensorrt"]["max_batch"] == 8


# ---------------------------------------------------------------------------------------------- refusals
def test_refusals_name_the_command(emulated, art):
    """On TensorRT, draft='assistant' needs the assistant's current engine: without an assistant, without its
    engine, and with an engine built from another assistant graph, the reason and the command; the runner refuses
    the same before touching TensorRT."""
    _, trt_model = emulated
    backend = trt_model.backend
    spec.check_draft(backend, "assistant", K, trt_model.manifest)  # the recorded engine: accepted
    no_assistant = {k: v for k, v in trt_model.manifest.items() if k != "assistant"}
    with pytest.raises(InputError, match="make export-assistant"):
        spec.check_draft(backend, "assistant", K, no_assistant)
    no_engine = dict(trt_model.manifest, assistant=dict(trt_model.manifest["assistant"], engines={}))
    with pytest.raises(InputError, match=f"make build-engine BACKEND=tensorrt OUT={art}"):
        spec.check_draft(backend, "assistant", K, no_engine)
    stale = json.loads(json.dumps(trt_model.manifest))
    stale["assistant"]["engines"]["tensorrt"]["from_sha256"] = "0" * 64
    with pytest.raises(InputError, match="exported again since.*graphs.trt_assistant"):
        spec.check_draft(backend, "assistant", K, stale)
    for manifest in (no_assistant, no_engine, stale):
        with pytest.raises(ArtifactError, match="make "):
            TrtAssistantRunner(art, manifest, backend)
    with pytest.raises(InputError, match="ONNX Runtime engines \\(ring and window\\) and on TensorRT"):
        spec.check_draft(type("B", (), {"name": "other", "max_draft_tokens": K})(), "assistant", K)


def test_cli_without_a_target_engine(art, capsys):
    """``python -m graphs.trt_assistant``: one error line naming the command that builds both engines (exit 2);
    ``--if-engine`` (what ``make export-assistant`` runs) says why it built nothing and exits 0; nothing written."""
    from graphs.trt_assistant import main

    files = read_manifest(art)["files"]
    assert main(["--artifact", str(art)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trt-assistant: error:") and "make build-engine BACKEND=tensorrt" in err
    assert main(["--artifact", str(art), "--if-engine"]) == 0
    assert "no target TensorRT engine" in capsys.readouterr().out
    assert read_manifest(art)["files"] == files and not (art / ENGINE_FILE).exists()


# ---------------------------------------------------------------------------------------------- the runner
def test_runner_drafts_transformers_tokens_round_for_round(emulated, pairs):
    """Every round of transformers' assisted generate (prompt of 2 windows + 3, 2 windows of new tokens, K = 4):
    the TensorRT runner (emulated engine), given the target entries in our layout as torch tensors, drafts the
    reference's tokens; the first round also with its default (clean) reading."""
    _, trt_model = emulated
    runner = trt_model.assistant_runner()
    target, ref, _, _ = pairs("tiny-assistant")
    _, rounds = record_rounds(target, ref, prompt(2 * WINDOW + 3, 3), num_draft=4, max_new_tokens=2 * WINDOW)
    caches, layers = None, len(PRESETS["tiny"].text.layer_types)
    assert len(rounds) > 10
    for i, r in enumerate(rounds):
        caches = caches or OurCaches(r.full[0].shape, r.sliding[0].shape, max_len=MAX_LEN, ring=WINDOW + 4 + 1)
        caches.write(r)
        buffers: list = [None] * (2 * layers)
        for key, t in zip(("full_key", "full_value", "ring_key", "ring_value"), caches.tensors()):
            buffers[runner.cache_index[key]] = t.contiguous()
        rg = reference_ranges(r, WINDOW)
        got = runner.draft(buffers, [r.input_ids[-1]], r.hidden.numpy(), [rg["position"]], len(r.drafts),
                           ranges={k: [v] for k, v in rg.items() if k != "position"})
        assert got.tokens[0].tolist() == r.drafts, f"round {i}: {got.tokens[0].tolist()} vs {r.drafts}"
        if i == 0:
            clean = runner.draft(buffers, [r.input_ids[-1]], r.hidden.numpy(), [rg["position"]], len(r.drafts))
            assert clean.tokens[0].tolist() == r.drafts


def test_runner_reads_the_backend_caches_in_place(emulated):
    """After a batched prefill longer than the window on the emulated TensorRT backend, the runner drafts what the
    ONNX Runtime runner drafts on the ONNX Runtime backend's caches after the same prefill (tokens; logits within
    1e-4 of their range), at batch 2 and on a row view; the cache tensors it binds are the backend's by address,
    and scaling the backend's ring buffer changes the drafts (read where it lies)."""
    from runtime.prompt import PrefillInputs

    ort_model, trt_model = emulated
    rows = [prompt(3 * WINDOW + 5, 4), prompt(WINDOW + 2, 5)]
    lens = np.array([len(r) for r in rows])
    ids = np.zeros((2, lens.max()), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    drafts = {}
    for key, model in (("ort", ort_model), ("trt", trt_model)):
        cache = model.backend.new_cache(2, MAX_LEN)
        logits = model.backend.prefill(PrefillInputs(ids, np.zeros(2, np.int64), lens), cache)
        hidden = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
        drafts[key] = model.assistant_runner().draft(cache, logits.argmax(-1), hidden, lens, K)
        if key == "trt":
            runner, backend = model.assistant_runner(), model.backend
            bound = runner.context.addresses
            assert all(bound[k] == cache[i].data_ptr() for k, i in runner.cache_index.items())
            view = backend.rows(cache, 1, 2)
            row = runner.draft(view, logits.argmax(-1)[1:], hidden[1:], lens[1:], K)
            assert bound["ring_key"] == cache[runner.cache_index["ring_key"]][1:].data_ptr()
            assert row.tokens.tolist() == drafts["trt"].tokens[1:].tolist()
            cache[runner.cache_index["ring_value"]].mul_(-3.0)
            changed = runner.draft(cache, logits.argmax(-1), hidden, lens, K)
            assert not np.allclose(changed.logits, drafts["trt"].logits)
    assert drafts["trt"].tokens.tolist() == drafts["ort"].tokens.tolist()
    span = float(np.ptp(drafts["ort"].logits))
    err = np.abs(drafts["trt"].logits - drafts["ort"].logits)
    assert err.max() <= 1e-4 * span, f"logits max err {err.max():.3g} mean {err.mean():.3g} (range {span:.3g})"
    assert np.abs(drafts["trt"].hidden - drafts["ort"].hidden).max() <= 1e-4 * np.abs(drafts["ort"].hidden).max()


def _greedy_equal(model, prompts, ks=(1, K)):
    plain = runtime.generate(model, prompts, max_new_tokens=3 * WINDOW)
    for k in ks:
        stats = spec.SpecStats()
        got = runtime.generate(model, prompts, max_new_tokens=3 * WINDOW, draft="assistant", num_draft_tokens=k,
                               spec_stats=stats)
        assert [g.tokens for g in got] == [p.tokens for p in plain], f"K={k}"
        assert stats.drafted > 0 and stats.verify_calls > 0, stats
    return plain


def test_greedy_with_the_assistant_equals_plain_on_emulated_tensorrt(emulated):
    """`runtime.generate(draft="assistant")` on the TensorRT backend (engines emulated): plain greedy's tokens,
    batch of two, prompt and output several windows long (rings wrap, rejected drafts written), K = 1 and 3; plain
    greedy on it equals the ONNX Runtime backend's."""
    ort_model, trt_model = emulated
    prompts = [prompt(2 * WINDOW + 3, 8), prompt(5, 9)]
    plain = _greedy_equal(trt_model, prompts)
    assert [p.tokens for p in plain] == [p.tokens for p in runtime.generate(ort_model, prompts,
                                                                              max_new_tokens=3 * WINDOW)]


@pytest.mark.skipif(not (HAS_TRT and _gpu()), reason="needs tensorrt and a CUDA GPU (builds and runs real engines)")
def test_tensorrt_assistant_generates_plain_greedy_tokens(art, tmp_path):
    """Real engines (fp32, IEEE kernels): `make build-engine BACKEND=tensorrt` builds the assistant's engine beside
    the target's; greedy with draft='assistant' on TensorRT equals plain greedy token for token; its first drafts
    equal the ONNX Runtime runner's after the same prefill."""
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    build_engine(copy, "tensorrt", dtype="fp32", log=lambda *_: None)
    model = runtime.load(copy, backend="tensorrt")
    assert isinstance(model.assistant_runner(), TrtAssistantRunner)
    _greedy_equal(model, [prompt(2 * WINDOW + 3, 8), prompt(5, 9)])
    _greedy_equal(model, prompt(3 * WINDOW, 10))
