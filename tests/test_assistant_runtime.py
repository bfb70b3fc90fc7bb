"""The exported assistant graph and the runtime's runner (`runtime.assistant`): ONNX Runtime equals our PyTorch
assistant on shapes other than the export's (plain and centroid-masked heads); `make export-assistant`'s record in
the manifest (sha256, target caches) and its refusals; the runner's drafts equal transformers' candidate generator
round for round (its reading of the target entries given explicitly) and our PyTorch assistant's on the ONNX Runtime
backend's own cache buffers after a prompt longer than the window, read in place; the target embedding rows it
gathers equal the reference's scaled embedding; after a verify call that accepted no draft, its default reading of
a speculative export's rings (window + K + 1 slots) is the reference's on the accepted tokens (window + K: not)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from exporter.assistant import ASSISTANT_PRESETS
from exporter.config import PRESETS
from exporter.export_assistant import export_assistant, export_graph
from runtime.assistant import AssistantRunner, clean_ranges
from runtime.manifest import ArtifactError, read_manifest
from tests.assistant_ref import OurCaches, prompt, record_rounds, reference_ranges, scaled_embedding

K = 4


@pytest.fixture(scope="module")
def tiny_with_assistant(workdir, artifact_store, pairs):
    """The tiny test artifact (same target weights as the reference pair) with the tiny assistant exported in."""
    _, _, _, ckpt = pairs("tiny-assistant")
    out = workdir / "artifact-tiny-assistant"
    if not out.exists():
        shutil.copytree(artifact_store("tiny"), out)
        export_assistant(ckpt, out, log=lambda *_: None)
    return out


@pytest.fixture(scope="module", params=["step", "loop"])
def drafting_artifact(request, workdir, tiny_with_assistant):
    """The artifact the runner drafts from: the assistant step graph called K times, or its ONNX Runtime loop form
    (`graphs.ort.assistant`: K drafts in one call)."""
    if request.param == "step":
        return tiny_with_assistant
    out = workdir / "artifact-tiny-assistant-loop"
    if not out.exists():
        from graphs.ort.assistant import add_ort_assistant

        shutil.copytree(tiny_with_assistant, out)
        add_ort_assistant(out, log=lambda *_: None)
    assert AssistantRunner(out, read_manifest(out)).loop is not None
    return out


def _inputs(model, target, batch, max_len, ring, seed):
    g = torch.Generator().manual_seed(seed)
    t, hb = target.text, model.cfg.backbone_hidden_size
    pos = torch.tensor([max_len - 3, ring + 2, 5][:batch])
    return (torch.randn(batch, hb, generator=g), torch.randn(batch, hb, generator=g), pos,
            torch.arange(int(pos.max()) + 1), pos, (pos - t.sliding_window - 1).clamp(min=0), pos,
            torch.randn(batch, t.num_global_kv_heads, max_len, t.global_head_dim, generator=g),
            torch.randn(batch, t.num_global_kv_heads, max_len, t.global_head_dim, generator=g),
            torch.randn(batch, t.num_kv_heads, ring, t.head_dim, generator=g),
            torch.randn(batch, t.num_kv_heads, ring, t.head_dim, generator=g))


@pytest.mark.parametrize("name", sorted(ASSISTANT_PRESETS))
def test_onnx_graph_equals_pytorch(pairs, name, tmp_path, tiny_with_assistant):
    """ORT vs PyTorch (float64 reference) at batch 1 and 3, cache lengths and ring sizes unlike the export's (the
    tiny assistant's graph is the one `export_assistant` put into the artifact)."""
    import onnxruntime as ort

    _, _, ours, _ = pairs(name)
    target = PRESETS[ASSISTANT_PRESETS[name][0]]
    path = tiny_with_assistant / "assistant" / "assistant.onnx"
    if name != "tiny-assistant":
        path = tmp_path / "assistant.onnx"
        export_graph(ours, target, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    wide = ours.double()
    try:
        for batch, max_len, ring, seed in ((3, 51, target.text.sliding_window + 5, 0), (1, 23, 11, 1)):
            args = _inputs(ours, target, batch, max_len, ring, seed)
            got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
            with torch.no_grad():
                want = wide.step(*(a.double() if a.is_floating_point() else a for a in args))
            span = float(want[0].max() - want[0].min())
            err = float(np.abs(got[0] - want[0].numpy()).max())
            assert err <= 1e-4 * span, f"{name} batch {batch}: logits max err {err:.3g} (range {span:.3g})"
            h_err = float(np.abs(got[1] - want[1].numpy()).max())
            assert h_err <= 1e-4 * float(want[1].abs().max()), f"{name}: next hidden max err {h_err:.3g}"
            assert np.array_equal(got[2], want[2].numpy())
    finally:
        ours.float()


def test_export_records_the_assistant_in_the_manifest(tiny_with_assistant):
    manifest = read_manifest(tiny_with_assistant)  # every file, the assistant's included, matches its sha256
    rec = manifest["assistant"]
    assert rec["file"] == "assistant/assistant.onnx" and rec["file"] in manifest["files"]
    assert any(f.startswith("assistant/") and f != rec["file"] for f in manifest["files"])  # its external data
    types = PRESETS["tiny"].text.layer_types
    last_full = max(i for i, t in enumerate(types) if t == "full_attention")
    last_sliding = max(i for i, t in enumerate(types) if t == "sliding_attention")
    assert rec["target_caches"] == {"full_key": f"past_key_{last_full}", "full_value": f"past_value_{last_full}",
                                    "ring_key": f"past_key_{last_sliding}", "ring_value": f"past_value_{last_sliding}"}
    assert [i["name"] for i in rec["inputs"]][-4:] == ["full_key", "full_value", "ring_key", "ring_value"]


def test_export_and_runner_refusals(tiny_with_assistant, pairs, tmp_path, capsys):
    from exporter.export_assistant import main

    _, _, _, deep_ckpt = pairs("tiny-deep-assistant")
    before = read_manifest(tiny_with_assistant)["files"]
    assert main(["--assistant", str(deep_ckpt), "--artifact", str(tiny_with_assistant)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export-assistant: error:") and "head_dim" in err and err.count("\n") == 1
    assert read_manifest(tiny_with_assistant)["files"] == before  # the refused export changed nothing
    bare = tmp_path / "bare"
    shutil.copytree(tiny_with_assistant, bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    manifest.pop("assistant")
    with pytest.raises(ArtifactError, match="make export-assistant"):
        AssistantRunner(bare, manifest)
    manifest = read_manifest(tiny_with_assistant)
    bad = json.loads(json.dumps(manifest))
    bad["assistant"]["target_caches"]["ring_key"] = "past_key_99"
    from runtime._manifest_schema import SchemaError, validate

    with pytest.raises(SchemaError, match="assistant.target_caches.ring_key"):
        validate(bad)
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_with_assistant, tampered)
    with open(tampered / "assistant" / "assistant.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="assistant.onnx: sha256 differs"):
        read_manifest(tampered)


def test_embedding_rows_equal_the_reference(tiny_with_assistant, pairs):
    target, _, _, _ = pairs("tiny-assistant")
    runner = AssistantRunner(tiny_with_assistant, read_manifest(tiny_with_assistant))
    assert isinstance(runner.embedding.table, np.memmap)  # read from the artifact's weights, not copied
    ids = np.array([3, 7, 300, 2])
    want = np.concatenate([scaled_embedding(target, int(i)).numpy() for i in ids])
    assert np.array_equal(runner.embedding(ids), want)


def test_runner_drafts_equal_transformers(drafting_artifact, pairs):
    """Every round of transformers' assisted generate: the runner, given the target entries in our layout (ring of
    window + K + 1 slots) and the reference's reading of them, drafts the reference's tokens."""
    target, ref, _, _ = pairs("tiny-assistant")
    runner = AssistantRunner(drafting_artifact, read_manifest(drafting_artifact))
    window = PRESETS["tiny"].text.sliding_window
    ids = prompt(2 * window + 3, 3)
    seq, rounds = record_rounds(target, ref, ids, num_draft=K, max_new_tokens=2 * window)
    caches, n_layers = None, len(PRESETS["tiny"].text.layer_types)
    for i, r in enumerate(rounds):
        caches = caches or OurCaches(r.full[0].shape, r.sliding[0].shape, max_len=len(seq) + K, ring=window + K + 1)
        caches.write(r)
        buffers: list = [None] * (2 * n_layers)
        for key, t in zip(("full_key", "full_value", "ring_key", "ring_value"), caches.tensors()):
            buffers[runner.cache_index[key]] = np.ascontiguousarray(t.numpy())
        rg = reference_ranges(r, window)
        got = runner.draft(buffers, [r.input_ids[-1]], r.hidden.numpy(), [rg["position"]], len(r.drafts),
                           ranges={k: [v] for k, v in rg.items() if k != "position"})
        assert got.tokens[0].tolist() == r.drafts, f"round {i}: runner {got.tokens[0].tolist()} vs {r.drafts}"
        if i == 0:  # the default (clean) reading is the reference's in the first round
            clean = runner.draft(buffers, [r.input_ids[-1]], r.hidden.numpy(), [rg["position"]], len(r.drafts))
            assert clean.tokens[0].tolist() == r.drafts


def test_runner_reads_the_backend_caches_in_place(drafting_artifact, pairs):
    """After a batched prefill longer than the window (rings wrapped), the runner on the ONNX Runtime backend's own
    cache OrtValues drafts what our PyTorch assistant drafts on copies of them, logits within 1e-4 of the range;
    changing the backend's ring changes the drafts (it is read where it lies, not copied at bind time)."""
    from runtime.ort_backend import OrtBackend
    from runtime.prompt import PrefillInputs

    target, _, ours, _ = pairs("tiny-assistant")
    manifest = read_manifest(drafting_artifact)
    backend, runner = OrtBackend(drafting_artifact, manifest), AssistantRunner(drafting_artifact, manifest)
    window = PRESETS["tiny"].text.sliding_window
    rows = [prompt(3 * window + 5, 4), prompt(window + 2, 5)]
    lens = np.array([len(r) for r in rows])
    ids = np.zeros((2, lens.max()), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    cache = backend.new_cache(2, 64)
    logits = backend.prefill(PrefillInputs(ids, np.zeros(2, np.int64), lens), cache)
    nxt = logits.argmax(-1)
    with torch.no_grad():
        hidden = np.concatenate([target(input_ids=torch.tensor([r]), output_hidden_states=True)
                                 .hidden_states[-1][:, -1].numpy() for r in rows])
    got = runner.draft(cache, nxt, hidden, lens, K)
    arrays = backend.cache_arrays(cache)
    ring = arrays[runner.cache_index["ring_key"]].shape[2]
    rg = clean_ranges(lens, lens, window, ring)
    full_k, full_v, ring_k, ring_v = (torch.from_numpy(arrays[runner.cache_index[k]])
                                      for k in ("full_key", "full_value", "ring_key", "ring_value"))
    tok, h = torch.from_numpy(nxt), torch.from_numpy(hidden)
    for step in range(K):
        emb = torch.cat([scaled_embedding(target, int(t)) for t in tok])
        with torch.no_grad():
            want, h, tok = ours.step(emb, h, torch.from_numpy(lens), torch.arange(int(lens.max())),
                                     torch.from_numpy(rg["full_len"]), torch.from_numpy(rg["sliding_start"]),
                                     torch.from_numpy(rg["sliding_end"]), full_k, full_v, ring_k, ring_v)
        assert got.tokens[:, step].tolist() == tok.tolist(), f"step {step}"
        span = float(want.max() - want.min())
        assert float(np.abs(got.logits[:, step] - want.numpy()).max()) <= 1e-4 * span
    cache.arrays[runner.cache_index["ring_value"]][...] *= -3.0  # the backend's buffer itself
    changed = runner.draft(cache, nxt, hidden, lens, K)
    assert not np.allclose(changed.logits, got.logits)


def test_int4_graph_equals_dequantized_weights(pairs, tmp_path):
    """``--int4-block``: every Linear (23 in the tiny assistant: 5 per layer, both projections, the LM head) becomes
    an int4 DequantizeLinear -> MatMul; run as written it equals our PyTorch assistant holding the round-to-nearest
    dequantized weights (1e-4 of the logit range); ONNX Runtime's optimiser fuses every one into MatMulNBits."""
    import onnx
    import onnxruntime as ort

    from calib.int4 import dequantize_int4_blockwise, int4_values
    from exporter.assistant import AssistantModel
    from calib.assistant_int4 import quantize_int4

    _, _, ours, _ = pairs("tiny-assistant")
    target, block = PRESETS["tiny"], 16
    path = tmp_path / "assistant.onnx"
    export_graph(ours, target, path)
    assert quantize_int4(path, block) == {"linears": 23, "input_muls": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assistant.onnx", "assistant.onnx.int4.data"]
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    assert ops.count("DequantizeLinear") == 23
    deq = AssistantModel(ours.cfg)
    deq.load_state_dict(ours.state_dict())
    with torch.no_grad():
        weights = [m.weight for m in deq.modules() if isinstance(m, torch.nn.Linear)] + [deq.model.embed_tokens.weight]
        for w in weights:
            q, scales = int4_values(w.numpy().T, block)
            w.copy_(torch.from_numpy(np.ascontiguousarray(dequantize_int4_blockwise(q, scales, block).T)))
    args = _inputs(ours, target, 2, 37, target.text.sliding_window + 3, 2)
    with torch.no_grad():
        want = deq.step(*args)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
    span = float(want[0].max() - want[0].min())
    assert float(np.abs(got[0] - want[0].numpy()).max()) <= 1e-4 * span
    assert np.array_equal(got[2], want[2].numpy())
    fused = ort.SessionOptions()
    fused.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), fused, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 23 and "DequantizeLinear" not in ops


def test_clean_reading_after_a_verify_that_accepted_no_draft(tiny_with_assistant, pairs):
    """A verify call at position L wrote its K + 1 tokens (L..L+K) into the target's caches and every draft was
    rejected; the next round queries at L + 1.  The reference: transformers' candidate generator on the accepted
    tokens alone (a prefill of them, no rejected draft anywhere), which reads positions L - W..L on the sliding layer
    (`reference_ranges` of its round).  On rings of `exporter.model.ring_slots` (W + K + 1) slots written position by
    position through the verify call, the runner's default reading (`clean_ranges` with ``written`` = L + K + 1) is
    that range and drafts the reference's tokens (first step's logits within 1e-4 of the range); on rings of W + K
    slots position L - W is gone: the range is one short, the first step's logits move and the drafts differ (the
    old ring size)."""
    from exporter.model import ring_slots
    from tests.assistant_ref import Round

    target, ref, _, _ = pairs("tiny-assistant")
    runner = AssistantRunner(tiny_with_assistant, read_manifest(tiny_with_assistant))
    cfg = PRESETS["tiny"].text
    window, n_layers = cfg.sliding_window, len(cfg.layer_types)
    accepted = prompt(3 * window + 2, 7)  # positions 0..L; the verify call's first token is the last of them
    last = len(accepted) - 1
    _, rounds = record_rounds(target, ref, accepted, num_draft=K, max_new_tokens=K + 2)
    r, p = rounds[0], last + 1
    assert r.input_ids[:-1] == accepted and len(r.drafts) == K
    rg = reference_ranges(r, window)
    assert rg == {"position": p, "full_len": p, "sliding_start": last - window, "sliding_end": p}
    correction = r.input_ids[-1]  # the target's own token at L + 1: the first draft below is not it (rejected)
    rejected = [t for t in prompt(3 * K, 8)[1:] if t != correction][:K]
    with torch.no_grad():  # the target's keys and values of the verify call's sequence (causal: as it wrote them)
        out = target(input_ids=torch.tensor([accepted + rejected]), return_shared_kv_states=True)
        emb = torch.cat([scaled_embedding(target, correction), r.hidden], -1)[:, None]
        want = ref(inputs_embeds=emb, position_ids=torch.tensor([[p]]),
                   shared_kv_states={"full_attention": r.full, "sliding_attention": r.sliding}).logits[0, 0].numpy()
    history = Round(accepted + rejected, r.hidden, out.shared_kv_states["full_attention"],
                    out.shared_kv_states["sliding_attention"], [])
    span, written = float(np.ptp(want)), last + K + 1
    got = {}
    for ring in (window + K, ring_slots(cfg, K)):
        caches = OurCaches(r.full[0].shape, r.sliding[0].shape, max_len=written + 2, ring=ring)
        caches.write(history)
        buffers: list = [None] * (2 * n_layers)
        for key, t in zip(("full_key", "full_value", "ring_key", "ring_value"), caches.tensors()):
            buffers[runner.cache_index[key]] = np.ascontiguousarray(t.numpy())
        clean = {k: int(v[0]) for k, v in clean_ranges([p], [written], window, ring).items()}
        drafts = runner.draft(buffers, [correction], r.hidden.numpy(), [p], K, written=[written])
        got[ring] = clean, drafts.tokens[0].tolist(), float(np.abs(drafts.logits[0, 0] - want).max()) / span
    clean, tokens, err = got[ring_slots(cfg, K)]
    assert ring_slots(cfg, K) == window + K + 1
    assert clean == {k: v for k, v in rg.items() if k != "position"}
    assert tokens == r.drafts, f"rings of W + K + 1: drafts {tokens}, transformers {r.drafts}"
    assert err <= 1e-4, f"rings of W + K + 1: first step's logits max err {err:.3g} of the range"
    clean, tokens, err = got[window + K]
    assert clean["sliding_start"] == last - window + 1  # the oldest position is lost
    assert err > 1e-2, f"rings of W + K: the first step's logits moved only {err:.3g} of the range"
    assert tokens != r.drafts  # and so did the drafts (not so for every prompt: these random weights are decisive)
