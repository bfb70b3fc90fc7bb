"""The export carries the checkpoint's chat template and generation config into the artifact, listed and hashed like
every other file, and the server's readers find them in the loaded artifact."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime import ArtifactError, load
from runtime.generation_config import read_generation_config
from tests.conftest import DEMO_CKPT

pytest.importorskip("torch")
pytest.importorskip("jinja2")

TEMPLATE = "{{ bos_token }}{% for m in messages %}<|turn>{{ m['role'] }}\n{{ m['content'] }}<turn|>\n{% endfor %}" \
           "{% if add_generation_prompt %}<|turn>model\n{% endif %}"


def test_export_carries_chat_template_and_generation_config(tmp_path):
    from exporter.config import PRESETS
    from exporter.export import export_artifact
    from exporter.stream import fake_model
    from runtime.serve.chat import ChatRenderer

    ckpt = tmp_path / "ckpt"
    shutil.copytree(DEMO_CKPT, ckpt)
    (ckpt / "chat_template.jinja").write_text(TEMPLATE)
    (ckpt / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 64, "top_p": 0.95,
                                                             "eos_token_id": [1, 106]}))
    out = tmp_path / "artifact"
    manifest = export_artifact(fake_model(PRESETS["demo"]), out, max_len=32, tokenizer_dir=ckpt, weights_from=ckpt,
                               log=lambda *_: None)
    assert "chat_template.jinja" in manifest["tokenizer"] and manifest["generation_config"] == "generation_config.json"
    assert {"chat_template.jinja", "generation_config.json"} <= set(manifest["files"])
    model = load(out)
    defaults = read_generation_config(model)
    assert (defaults["temperature"], defaults["top_k"], defaults["top_p"]) == (1.0, 64, 0.95)
    assert defaults["eos_token_ids"][:2] == (1, 106)
    renderer = ChatRenderer.for_model(model)
    assert renderer.render([{"role": "user", "content": "hi"}]) == "<|turn>user\nhi<turn|>\n<|turn>model\n"
    (out / "generation_config.json").write_text("{}")  # hashed like every other file
    with pytest.raises(ArtifactError, match="generation_config.json"):
        load(out)
