"""The INT4 AWQ assistant (`calib.assistant_int4`, ``--int4-method awq``): on activation statistics built with a few
loud channels per Linear input (the case AWQ exists for), the factors it picks cut the output error of every Linear
group against round-to-nearest, computed here in numpy on all the rows (not only the ones the search sampled, not
from its own report); the graph it writes equals our PyTorch assistant holding those effective weights (AWQ factors
folded into the norms and up_proj, kept as a Mul before pre_projection and o_proj); bad methods and inputs are
refused (CLI and Makefile, exit 2) leaving the artifact as it was.  The demo pair's acceptance and exactness with an
INT4 AWQ assistant: tests/test_speculative_demo_pair.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calib.stats import EDGES, Stats, TensorStats
from exporter.config import PRESETS
from exporter.export_assistant import export_graph
from tests.assistant_ref import reference_pair
from tests.test_assistant_runtime import _inputs

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16


@pytest.fixture(scope="module")
def tiny(workdir):
    return reference_pair("tiny-assistant", workdir)


def _rtn(w: np.ndarray, bs: int) -> np.ndarray:
    """Dequantized round-to-nearest of a float32 (in, out) weight, written from the definition: per block of ``bs``
    input rows and output column, scale max|w| / 7, values round-half-even(w / scale) clipped to [-8, 7]."""
    out = np.empty_like(w)
    for b in range(0, w.shape[0], bs):
        blk = w[b:b + bs]
        amax = np.abs(blk).max(axis=0)
        s = np.where(amax > 0, amax / np.float32(7.0), np.float32(1.0)).astype(np.float32)
        out[b:b + bs] = np.clip(np.rint(blk / s), -8, 7) * s
    return out


def _loud_stats(weights: dict[str, np.ndarray], seed: int = 0):
    """Per Linear input: 256 rows of N(0, 1) activations with 3 channels 30x louder; the rows by module."""
    rng = np.random.default_rng(seed)
    rows, tensors = {}, {}
    for module, w in weights.items():
        x = rng.standard_normal((256, w.shape[0])).astype(np.float32)
        x[:, rng.choice(w.shape[0], 3, replace=False)] *= 30.0
        st = TensorStats(np.zeros(x.shape[1], np.float32), np.zeros(len(EDGES) - 1, np.int64))  # 128 sample rows
        st.update(x)
        rows[module], tensors[module] = x, st
    return rows, Stats(tensors, {"data": "test: loud channels"})


def test_awq_factors_beat_rtn_and_the_graph_equals_its_effective_weights(tiny, tmp_path):
    import onnxruntime as ort

    from calib.assistant_int4 import SCALES, quantize_int4
    from exporter.assistant import AssistantModel

    _, _, ours, _ = tiny
    target = PRESETS["tiny"]
    weights = {n: m.weight.detach().numpy().T.copy() for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    weights["lm_head"] = ours.model.embed_tokens.weight.detach().numpy().T.copy()  # (in, out) float32
    # Linears sharing an input see the same rows (the graph's grouping: gate/up, post_projection/LM head)
    shared = {"up_proj": "gate_proj", "post_projection": "lm_head"}
    rows, stats = _loud_stats({m: w for m, w in weights.items() if not any(m.endswith(k) for k in shared)})
    for m in weights:
        for k, v in shared.items():
            if m.endswith(k):
                src = m[: -len(k)] + v
                rows[m], stats.tensors[m] = rows[src], stats.tensors[src]
    path = tmp_path / "assistant.onnx"
    export_graph(ours, target, path)
    done = quantize_int4(path, BLOCK, stats, log=lambda *_: None)
    assert done["linears"] == len(weights) == 23
    assert done["input_muls"] == 1 + len(ours.model.layers)  # pre_projection and every o_proj
    rec = json.loads((tmp_path / SCALES).read_text())
    assert done["record"]["quantization"]["scales"] == f"assistant/{SCALES}"

    factor = {m: np.ones(w.shape[0], np.float32) for m, w in weights.items()}  # input channel j: W row j times s_j
    out_div = {m: np.ones(w.shape[1], np.float32) for m, w in weights.items()}  # output column: up_proj / down's s
    for g in rec["awq"]["groups"]:
        for m in g["modules"]:
            factor[m] = np.asarray(g["factors"], np.float32)
        if g["fold"] == "linear":
            out_div[g["into"]] = np.asarray(g["factors"], np.float32)
    for m, f in rec["awq"]["input_mul"].items():
        factor[m] = np.asarray(f, np.float32)
    groups = {}
    for m in weights:
        groups.setdefault(id(rows[m]), []).append(m)
    assert len(groups) == 2 + 4 * len(ours.model.layers)  # pre_projection, post/LM head; q, o, gate/up, down
    effective = {}
    for m, w in weights.items():
        r, c = factor[m][:, None], out_div[m][None, :]
        effective[m] = _rtn(w * r / c, BLOCK) / r * c
    for members in groups.values():
        x = rows[members[0]].astype(np.float64)
        w = np.concatenate([weights[m] for m in members], axis=1).astype(np.float64)
        rtn = np.concatenate([_rtn(weights[m], BLOCK) for m in members], axis=1)
        awq = np.concatenate([_rtn(weights[m] * factor[m][:, None], BLOCK) / factor[m][:, None] for m in members],
                             axis=1)  # the search's own weights (before any up_proj / down fold)
        e_rtn, e_awq = (float(np.mean(np.square(x @ (w - q)))) for q in (rtn, awq))
        assert not np.all(factor[members[0]] == 1.0), members  # loud channels: RTN is never the best here
        assert e_awq < 0.9 * e_rtn, (members, e_awq, e_rtn)

    deq = AssistantModel(ours.cfg)
    deq.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for n, mod in deq.named_modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(torch.from_numpy(np.ascontiguousarray(effective[n].T)))
        deq.model.embed_tokens.weight.copy_(torch.from_numpy(np.ascontiguousarray(effective["lm_head"].T)))
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


def test_refusals_leave_the_artifact_unchanged(artifact_store, tiny, tmp_path, capsys):
    """A method other than awq/rtn (argparse's exit 2; make's own check), calibration data with rtn, an empty data
    directory, and AWQ on a target exported without --speculative (no drafting rounds to calibrate on)."""
    from calib.assistant_int4 import main

    _, _, _, ckpt = tiny
    art = tmp_path / "tiny"
    shutil.copytree(artifact_store("tiny"), art)
    before = (art / "manifest.json").read_bytes()
    listing = sorted(p.name for p in art.iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--assistant", str(ckpt), "--artifact", str(art), "--int4-method", "gptq"])
    assert e.value.code == 2 and "--int4-method: invalid choice: 'gptq'" in capsys.readouterr().err
    cases = [(["--int4-method", "rtn", "--data", str(empty)], "rtn takes none"),
             (["--data", str(empty)], "no prompts found"), (["--max-new-tokens", "0"], "--max-new-tokens"),
             ([], "--speculative")]
    for extra, words in cases:
        assert main(["--assistant", str(ckpt), "--artifact", str(art), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("assistant-int4: error:") and words in err and err.count("\n") == 1, err
    run = subprocess.run(["make", "-s", "-o", ".venv/.installed", "export-assistant", f"PY={sys.executable}",
                          f"ASSISTANT={ckpt}", f"OUT={art}", "PRECISION=int4", "INT4_METHOD=gptq"],
                         check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "INT4_METHOD=gptq; expected awq or rtn" in run.stderr, run.stderr
    assert (art / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in art.iterdir()) == listing
