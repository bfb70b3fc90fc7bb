"""Shared fixtures: reference checkpoints written by transformers, our artifacts exported from them.

Every tiny preset in `exporter.config.TEST_PRESETS` gets a checkpoint (seeded random weights, perturbed away from
the initialiser's ones/zeros so norms, layer scalars and biases matter) and an artifact exported from it with our
loader.  Both are built once per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from exporter.config import PRESETS, TEST_PRESETS  # noqa: E402


def pytest_sessionstart(session):
    """Hypothesis writes caches (./.hypothesis) while collecting: keep them in this session's temporary directory."""
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:
        return
    set_hypothesis_home_dir(session.config._tmp_path_factory.mktemp("hypothesis"))

# The artifacts are exported with this maximum length; tests run other shapes.
ARTIFACT_MAX_LEN = 200


def build_reference(preset: str, seed: int = 0):
    """transformers' Gemma4UnifiedForConditionalGeneration for a preset, with perturbed seeded weights."""
    import torch
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    cfg = PRESETS[preset]
    torch.manual_seed(seed)
    ref = Gemma4UnifiedForConditionalGeneration(Gemma4UnifiedConfig(**cfg.to_hf_dict())).eval()
    # Eager attention is the reference's plain definition; its SDPA path differs from it by up to ~7e-4 of the
    # logit range on image prompts longer than the window (tiny-deep), more than our tolerance.
    ref.set_attn_implementation("eager")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.normal_(0.0, 0.5, generator=gen)  # larger logits: greedy choices far from ties
            elif name.endswith(".weight") and p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias") or name.endswith("pos_embedding"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        for i, layer in enumerate(ref.model.language_model.layers):
            layer.layer_scalar.fill_(0.6 + 0.15 * (i % 4))
    return ref


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gemma4")


@pytest.fixture(scope="session")
def pairs(workdir):
    """name -> (transformers target, transformers assistant, our assistant, its checkpoint dir) of
    `exporter.assistant.ASSISTANT_PRESETS[name]`, built once per session (tests/assistant_ref.py)."""
    from tests.assistant_ref import reference_pair  # it imports this module: not at import time

    store = {}

    def get(name):
        if name not in store:
            store[name] = reference_pair(name, workdir)
        return store[name]

    return get


@pytest.fixture(scope="session")
def reference_store(workdir):
    """preset -> (transformers model, checkpoint dir); built lazily."""
    store: dict[str, tuple] = {}

    def get(preset: str):
        if preset not in store:
            ref = build_reference(preset)
            path = workdir / f"ckpt-{preset}"
            ref.save_pretrained(path)
            store[preset] = (ref, path)
        return store[preset]

    return get


@pytest.fixture(scope="session")
def artifact_store(workdir, reference_store):
    """preset -> artifact dir exported from the transformers checkpoint the way `make export` does it (traced
    without weights, weights streamed from the checkpoint), then engine-built for ONNX Runtime (ring decode in
    place)."""
    store: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in store:
            from exporter.export import export_artifact
            from exporter.stream import fake_model
            from graphs.build import build_engine

            _, ckpt = reference_store(preset)
            out = workdir / f"artifact-{preset}"
            max_len = min(ARTIFACT_MAX_LEN, PRESETS[preset].text.max_position_embeddings)
            export_artifact(
                fake_model(PRESETS[preset]), out, max_len=max_len, source={"checkpoint": str(ckpt)},
                weights_from=ckpt, log=lambda *_: None,
            )
            # the ring engines' decode in place (what `auto` gives every ring engine; the copying form is covered by
            # tests/test_lower_ort.py)
            build_engine(out, "onnxruntime", ort_ring_decode="in_place", log=lambda *_: None)
            store[preset] = out
        return store[preset]

    return get


@pytest.fixture(params=TEST_PRESETS)
def preset(request) -> str:
    return request.param


DEMO_CKPT = Path(__file__).resolve().parents[1] / "demo" / "checkpoint"


@pytest.fixture(scope="session")
def demo_artifact(workdir):
    """The committed demo checkpoint exported as `make demo` does (fp32, max_len 256, with its tokenizer)."""
    from exporter.export import export_artifact
    from exporter.stream import fake_model

    out = workdir / "artifact-demo"
    export_artifact(fake_model(PRESETS["demo"]), out, max_len=256, tokenizer_dir=DEMO_CKPT, weights_from=DEMO_CKPT,
                    source={"checkpoint": str(DEMO_CKPT)}, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def demo_accuracy(demo_artifact) -> float:
    """Held-out exact-answer accuracy of the fp32 demo artifact (`make eval`: 150 questions)."""
    from demo.evaluate import evaluate

    right, n = evaluate(str(demo_artifact), n=150, log=lambda *_: None)
    return right / n


@pytest.fixture(scope="session")
def demo_engine_artifact(demo_artifact, workdir):
    """The demo artifact with its ONNX Runtime engine built (`make demo`'s artifact): what the server serves."""
    import shutil

    from graphs.build import build_engine

    out = workdir / "artifact-demo-engine"
    shutil.copytree(demo_artifact, out)
    build_engine(out, "onnxruntime", log=lambda *_: None)
    return out
