"""Chat rendering against transformers' `apply_chat_template`, the Gemma 4 turn fallback, the artifact's template files,
and `runtime.generation_config.read_generation_config`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("jinja2")

from runtime import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, ArtifactError, chat_prompt
from runtime.generation_config import read_generation_config
from runtime.serve.chat import ChatRenderer, TemplateRefused
from tests.serve_fakes import EOS, TURN_END, FakeModel

# Gemma-like: a system turn first, alternating user/model turns, content as a string or parts (image/audio placeholders),
# `raise_exception`, `tojson`, loop controls, and block tags whose whitespace depends on trim_blocks / lstrip_blocks.
TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first = '<|turn>system\\n' + messages[0]['content'] | trim + '<turn|>\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{{ first }}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% set role = 'model' if message['role'] == 'assistant' else message['role'] %}
<|turn>{{ role }}
{% if message['content'] is string %}
{{ message['content'] | trim }}
{%- else %}
    {% for item in message['content'] %}
        {% if item['type'] == 'image' %}
{{ '<|image|>' }}
        {%- elif item['type'] == 'audio' %}
{{ '<|audio|>' }}
        {%- elif item['type'] == 'text' %}
{{ item['text'] | trim }}
        {%- else %}{% continue %}
        {%- endif %}
    {% endfor %}
{% endif %}
{% if message.name is defined %}{{ message.name | tojson }}{% endif %}
<turn|>
{% endfor %}
{% if add_generation_prompt %}
<|turn>model
{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "  You are brief. <\"&'> é  "},
    {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"},
                                 {"type": "text", "text": " and listen "}, {"type": "audio"}]},
    {"role": "assistant", "content": "A cat meowing."},
    {"role": "user", "content": "Why?"},
]


def _hf_tokenizer(template: str):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "hello"])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                                unk_token="<unk>", pad_token="<pad>", chat_template=template)


def test_template_renders_as_transformers_does():
    tok = _hf_tokenizer(TEMPLATE)
    expected = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ours = ChatRenderer(TEMPLATE, {"bos_token": "<bos>", "eos_token": "<eos>"}).render(MESSAGES)
    assert expected.startswith("<bos>")
    assert ours == expected[len("<bos>"):]  # the runtime's tokenizer adds <bos> itself
    assert ours.count(IMAGE_PLACEHOLDER) == 1 and ours.count(AUDIO_PLACEHOLDER) == 1
    named = [MESSAGES[1] | {"name": "bob"}]
    assert ChatRenderer(TEMPLATE, {"bos_token": "<bos>"}).render(named) == tok.apply_chat_template(
        named, tokenize=False, add_generation_prompt=True)[len("<bos>"):]


def test_template_errors_are_refusals():
    renderer = ChatRenderer(TEMPLATE, {"bos_token": "<bos>"})
    with pytest.raises(TemplateRefused, match="must alternate"):
        renderer.render([{"role": "assistant", "content": "first"}])
    sneaky = ChatRenderer("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TemplateRefused):  # the sandbox refuses attribute access to internals
        sneaky.render(MESSAGES)


def test_template_from_the_artifact_files(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<bos>", "special": True}, "eos_token": "<eos>", "chat_template": TEMPLATE}))
    model = FakeModel(tmp_path, manifest={"tokenizer": ["tokenizer_config.json"]})
    renderer = ChatRenderer.for_model(model)
    assert renderer.has_template and renderer.special_tokens["bos_token"] == "<bos>"
    assert renderer.render(MESSAGES) == ChatRenderer(TEMPLATE, {"bos_token": "<bos>"}).render(MESSAGES)
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}J:{{ messages[0]['content'] }}")
    model.manifest["tokenizer"].append("chat_template.jinja")  # the .jinja file wins, as in transformers
    assert ChatRenderer.for_model(model).render([{"role": "user", "content": "x"}]) == "J:x"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert ChatRenderer.for_model(FakeModel(tmp_path, manifest={"tokenizer": ["tokenizer_config.json"]})).render(
        [{"role": "user", "content": "x"}]) == "D"
    assert not ChatRenderer.for_model(FakeModel(tmp_path, manifest={})).has_template


def test_gemma_turns_without_a_template():
    r = ChatRenderer()
    assert r.render([{"role": "user", "content": "hi"}]) == chat_prompt("hi")
    assert r.render([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]) == chat_prompt(
        "hi", system="S")
    text = r.render(MESSAGES)
    assert text == (f"<|turn>system\n{MESSAGES[0]['content']}<turn|>\n"
                    f"<|turn>user\nLook: {IMAGE_PLACEHOLDER} and listen {AUDIO_PLACEHOLDER}<turn|>\n"
                    "<|turn>model\nA cat meowing.<turn|>\n<|turn>user\nWhy?<turn|>\n<|turn>model\n")


def _model(tmp_path: Path, generation_config: dict | None) -> FakeModel:
    manifest = {}
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
        manifest["generation_config"] = "generation_config.json"
    return FakeModel(tmp_path, manifest=manifest)


def test_generation_config_defaults(tmp_path):
    greedy = read_generation_config(_model(tmp_path, None))
    assert greedy == {"eos_token_ids": (EOS, TURN_END), "temperature": 0.0, "top_k": None, "top_p": None,
                      "max_new_tokens": None}
    gemma = read_generation_config(_model(tmp_path, {"do_sample": True, "top_k": 64, "top_p": 0.95,
                                                     "eos_token_id": [1, 106, 50], "max_new_tokens": 100}))
    assert gemma == {"eos_token_ids": (1, 106, 50), "temperature": 1.0, "top_k": 64, "top_p": 0.95,
                     "max_new_tokens": 100}
    # transformers: without do_sample the temperature is ignored (greedy); its defaults fill what is missing
    assert read_generation_config(_model(tmp_path, {"temperature": 0.3, "eos_token_id": 7}))["temperature"] == 0.0
    assert read_generation_config(_model(tmp_path, {"eos_token_id": 7}))["eos_token_ids"] == (7, EOS, TURN_END)
    sampled = read_generation_config(_model(tmp_path, {"do_sample": True, "top_p": 1.0, "top_k": 0}))
    assert (sampled["temperature"], sampled["top_k"], sampled["top_p"]) == (1.0, None, None)
    assert read_generation_config(_model(tmp_path, {"do_sample": True}))["top_k"] == 50


@pytest.mark.parametrize("bad,key", [({"eos_token_id": "1"}, "eos_token_id"), ({"do_sample": True, "top_k": 2.5},
                                                                                "top_k"),
                                     ({"max_new_tokens": -1}, "max_new_tokens"), ([1, 2], "JSON object")])
def test_generation_config_errors_name_the_key(tmp_path, bad, key):
    with pytest.raises(ArtifactError, match=key) as e:
        read_generation_config(_model(tmp_path, bad))
    assert "generation_config.json" in str(e.value)


def test_server_uses_the_generation_config(tmp_path):
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from runtime.serve import create_app
    from tests.serve_fakes import FakeEngine

    engine = FakeEngine(_model(tmp_path, {"do_sample": True, "temperature": 0.6, "top_k": 64, "top_p": 0.95,
                                          "eos_token_id": [1, 106, 50], "max_new_tokens": 5}))
    with TestClient(create_app(engine, model_name="m")) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200, r.text
        p = engine.submissions[-1]["params"]
        assert (p.temperature, p.top_k, p.top_p, p.max_tokens, p.stop_ids) == (0.6, 64, 0.95, 5, (1, 106, 50))
        c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "temperature": 0,
                                             "top_p": 0.5, "max_tokens": 9})
        p = engine.submissions[-1]["params"]
        assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.0, 64, 0.5, 9)
