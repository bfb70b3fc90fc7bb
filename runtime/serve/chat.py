"""Chat messages -> one prompt string, through the checkpoint's own chat template when the artifact carries one.

The template is ``chat_template.jinja`` or the ``chat_template`` of ``tokenizer_config.json`` among the artifact's
tokenizer files (the manifest's ``tokenizer`` list).  It is rendered as transformers' ``apply_chat_template`` does:
an immutable sandboxed jinja2 environment with ``trim_blocks``/``lstrip_blocks`` and the ``loopcontrols``
extension, ``raise_exception``, a ``tojson`` that does not escape HTML, ``strftime_now``, the special tokens of
``tokenizer_config.json`` (``bos_token``, ``eos_token``, ...) and ``add_generation_prompt=True``.  Messages are plain
dicts whose content is a string or a list of parts ``{"type": "text", "text": ...}``, ``{"type": "image"}``,
``{"type": "audio"}``, the form Hugging Face templates read; keys whose value is None are dropped, as transformers
does.  A leading ``bos_token`` is cut from the result because the runtime's tokenizer adds ``<bos>`` itself.

Without a template, the Gemma 4 turn format of `runtime.chat_prompt` is written for any number of turns:
``<|turn>{system|user|model}\\n{content}<turn|>\\n`` per message, then ``<|turn>model\\n``.  Image and audio parts
become `IMAGE_PLACEHOLDER` / `AUDIO_PLACEHOLDER` where they stand.

Does not tokenize, load media, or know about HTTP.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from runtime.tokenizer import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER

__all__ = ["ChatRenderer", "TemplateRefused", "load_chat_template"]

_ROLE_TURN = {"system": "system", "developer": "system", "user": "user", "assistant": "model"}
_PART_TEXT = {"image": IMAGE_PLACEHOLDER, "audio": AUDIO_PLACEHOLDER}


class TemplateRefused(ValueError):
    """The chat template raised an error for these messages (e.g. roles that do not alternate)."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]  # an AddedToken written as a dict
    return None


def load_chat_template(root: Path, tokenizer_files: list[str]) -> tuple[str | None, dict[str, str]]:
    """The artifact's chat template (or None) and the special tokens its tokenizer_config.json names."""
    by_name = {rel.rsplit("/", 1)[-1]: root / rel for rel in tokenizer_files}
    config: dict = {}
    if "tokenizer_config.json" in by_name:
        config = json.loads(by_name["tokenizer_config.json"].read_text())
    specials = {k: t for k, v in config.items() if k.endswith("_token") and (t := _token_text(v)) is not None}
    if "chat_template.jinja" in by_name:
        return by_name["chat_template.jinja"].read_text(), specials
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return (template if isinstance(template, str) else None), specials


def _environment():
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatRenderer:
    """Renders a list of chat messages (plain dicts) into the prompt text the engine tokenizes."""

    def __init__(self, template: str | None = None, special_tokens: dict[str, str] | None = None) -> None:
        self.special_tokens = dict(special_tokens or {})
        self._template = _environment().from_string(template) if template is not None else None

    @classmethod
    def for_model(cls, model: Any) -> ChatRenderer:
        """The renderer of a `runtime.LoadedModel` (its ``root`` and ``manifest['tokenizer']``)."""
        template, specials = load_chat_template(Path(model.root), list(model.manifest.get("tokenizer") or []))
        return cls(template, specials)

    @property
    def has_template(self) -> bool:
        return self._template is not None

    def render(self, messages: list[dict[str, Any]]) -> str:
        if self._template is None:
            return _gemma_turns(messages)
        from jinja2.exceptions import TemplateError

        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            text = self._template.render(messages=messages, add_generation_prompt=True, tools=None, documents=None,
                                         **self.special_tokens)
        except TemplateError as e:
            raise TemplateRefused(f"the model's chat template refused these messages: {e}") from None
        bos = self.special_tokens.get("bos_token")
        return text[len(bos):] if bos and text.startswith(bos) else text


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] if part["type"] == "text" else _PART_TEXT[part["type"]] for part in content)


def _gemma_turns(messages: list[dict[str, Any]]) -> str:
    turns = [f"<|turn>{_ROLE_TURN[m['role']]}\n{_content_text(m.get('content'))}<turn|>\n" for m in messages]
    return "".join(turns) + "<|turn>model\n"
