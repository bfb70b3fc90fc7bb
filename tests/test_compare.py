"""Polygraphy comparison (what `make compare` runs): ONNX Runtime graphs against our PyTorch model runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from exporter.compare import compare_artifact
from exporter.weights import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_make_compare_passes_on_a_tiny_artifact(artifact_store):
    art = artifact_store("tiny")
    done = subprocess.run([sys.executable, "-m", "exporter.compare", "--artifact", str(art)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[compare] prefill: PASSED" in done.stdout and "[compare] decode: PASSED" in done.stdout


def test_compare_fails_when_the_model_differs(artifact_store, reference_store):
    """The comparison can fail: a PyTorch model with one perturbed weight does not match the graphs."""
    model = load_model(reference_store("tiny")[1])
    with torch.no_grad():
        model.model.language_model.layers[5].mlp.down_proj.weight.mul_(1.05)
    assert compare_artifact(artifact_store("tiny"), model=model, iterations=1, log=lambda *_: None) is False
