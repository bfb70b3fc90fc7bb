"""Validated OpenAI requests -> what `Engine.submit` takes: a prompt, media bytes, `SamplingParams`, a soft-token budget.

Refuses (`APIError` 400 naming the field) what the server cannot honour: ``n`` > 1, non-zero penalties, a
``logit_bias``, ``logprobs``, tools and function calling, a ``response_format`` other than text, audio output,
``echo``/``suffix``/``best_of`` on completions; and an unknown ``model`` (404 ``model_not_found``, as OpenAI does).
Fields the request leaves unset take the artifact's defaults (`runtime.generation_config.read_generation_config`),
whose eos ids always become stop ids.  ``max_tokens`` defaults to the generation config's ``max_new_tokens``, else
to the model's whole context for chat and to 16 (OpenAI's default) for completions.

No engine calls, no HTTP: `runtime.serve.routes` submits what this returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.serve.chat import ChatRenderer, TemplateRefused
from runtime.serve.errors import APIError
from runtime.serve.media import audio_bytes, image_bytes
from runtime.serve.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from runtime.tokenizer import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER

__all__ = ["ServeContext", "Submission", "chat_submission", "completion_submission"]

DETAIL_SOFT_TOKENS = {"low": 70, "high": 1120}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_STOP_STRINGS = 16


@dataclass
class ServeContext:
    """What the translation needs to know about the server and the model."""

    model_name: str
    renderer: ChatRenderer
    defaults: dict[str, Any]  # read_generation_config(model)
    sampling_params: type  # runtime.engine.SamplingParams
    max_len: int
    max_soft_tokens: int = 280
    allow_media_dir: Path | None = None
    max_media_bytes: int = 32 << 20


@dataclass
class Submission:
    prompt: str | list[int]
    params: Any  # SamplingParams
    images: list[bytes] = field(default_factory=list)
    audio: list[bytes] = field(default_factory=list)
    max_soft_tokens: int = 280
    stream: bool = False
    include_usage: bool = False
    field: str = "prompt"  # what the engine's InputError is about: "messages" (chat) or "prompt"


def _unsupported(param: str, value: Any, supported: str) -> APIError:
    return APIError(400, f"{param}={value!r} is not supported by this server ({supported})", param=param,
                    code="unsupported_parameter")


def _check_common(req: _Sampling, ctx: ServeContext) -> None:
    if req.model is not None and req.model != ctx.model_name:
        raise APIError(404, f"model {req.model!r} does not exist; this server serves {ctx.model_name!r}",
                       param="model", code="model_not_found")
    if req.n not in (None, 1):
        raise _unsupported("n", req.n, "one choice per request: n=1")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0):
            raise _unsupported(name, getattr(req, name), "only 0")
    if req.logit_bias:
        raise _unsupported("logit_bias", req.logit_bias, "only an empty map")


def _check_chat(req: ChatCompletionRequest) -> None:
    if req.logprobs:
        raise _unsupported("logprobs", req.logprobs, "only false")
    if req.top_logprobs not in (None, 0):
        raise _unsupported("top_logprobs", req.top_logprobs, "only 0")
    for name in ("tools", "functions"):
        if getattr(req, name):
            raise _unsupported(name, "[...]", "no tool or function calling")
    for name in ("tool_choice", "function_call"):
        if getattr(req, name) not in (None, "none"):
            raise _unsupported(name, getattr(req, name), "only 'none'")
    if req.response_format is not None and req.response_format.type != "text":
        raise _unsupported("response_format", req.response_format.type, "only {'type': 'text'}")
    if req.modalities not in (None, ["text"]):
        raise _unsupported("modalities", req.modalities, "only ['text']")
    if req.audio is not None:
        raise _unsupported("audio", "{...}", "text output only")
    for i, m in enumerate(req.messages):
        if m.tool_calls:
            raise _unsupported(f"messages[{i}].tool_calls", "[...]", "no tool calling")


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop: {len(items)} strings; at most {MAX_STOP_STRINGS}", param="stop")
    for i, s in enumerate(items):
        if not s:
            where = "stop" if isinstance(stop, str) else f"stop[{i}]"
            raise APIError(400, f"{where}: an empty stop string", param=where)
    return tuple(items)


def _params(req: _Sampling, ctx: ServeContext, max_tokens: int | None, default_max_tokens: int):
    d = ctx.defaults
    if max_tokens is None:
        max_tokens = d.get("max_new_tokens") or default_max_tokens
    temperature = d["temperature"] if req.temperature is None else req.temperature
    return ctx.sampling_params(
        max_tokens=int(max_tokens),
        temperature=float(temperature),
        top_k=d["top_k"] if req.top_k is None else req.top_k,
        top_p=d["top_p"] if req.top_p is None else req.top_p,
        seed=req.seed,
        stop_ids=tuple(d["eos_token_ids"]),
        stop_strings=_stop_strings(req.stop),
    )


def _stream_flags(req: _Sampling) -> tuple[bool, bool]:
    stream = bool(req.stream)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if include_usage and not stream:
        raise APIError(400, "stream_options: only allowed with stream=true", param="stream_options")
    return stream, include_usage


def _message_parts(req: ChatCompletionRequest, ctx: ServeContext):
    """Messages as template dicts, the media bytes in order, and the soft-token budget their ``detail`` asks."""
    messages, images, audio = [], [], []
    budget: tuple[int, str] | None = None
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if not isinstance(m.content, list):
            messages.append({"role": role, "content": m.content or ""})
            continue
        parts = []
        for j, part in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            if m.role != "user":
                raise APIError(400, f"{where}: {part.type} parts are accepted in user messages only", param=where)
            if part.type == "image_url":
                images.append(image_bytes(part.image_url.url, f"{where}.image_url.url", allow_dir=ctx.allow_media_dir,
                                          max_bytes=ctx.max_media_bytes))
                soft = DETAIL_SOFT_TOKENS.get(part.image_url.detail or "auto", ctx.max_soft_tokens)
                if budget is not None and budget[0] != soft:
                    raise APIError(400, f"{where}.image_url.detail: asks for {soft} soft tokens but {budget[1]} asks "
                                        f"for {budget[0]}; all images of a request share one detail level",
                                   param=f"{where}.image_url.detail")
                budget = (soft, f"{where}.image_url.detail")
                parts.append({"type": "image"})
            else:
                audio.append(audio_bytes(part.input_audio.data, f"{where}.input_audio.data"))
                parts.append({"type": "audio"})
        messages.append({"role": role, "content": parts})
    return messages, images, audio, (budget[0] if budget else ctx.max_soft_tokens)


def chat_submission(req: ChatCompletionRequest, ctx: ServeContext) -> Submission:
    _check_common(req, ctx)
    _check_chat(req)
    stream, include_usage = _stream_flags(req)
    messages, images, audio, soft = _message_parts(req, ctx)
    try:
        prompt = ctx.renderer.render(messages)
    except TemplateRefused as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    for placeholder, media, kind in ((IMAGE_PLACEHOLDER, images, "image"), (AUDIO_PLACEHOLDER, audio, "audio")):
        if prompt.count(placeholder) != len(media):
            raise APIError(400, f"messages: the prompt holds {prompt.count(placeholder)} {placeholder} placeholder(s) "
                                f"for {len(media)} {kind} part(s); do not write {placeholder} in message text",
                           param="messages")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = _params(req, ctx, max_tokens, ctx.max_len)
    return Submission(prompt, params, images, audio, soft, stream, include_usage, "messages")


def completion_submission(req: CompletionRequest, ctx: ServeContext) -> Submission:
    _check_common(req, ctx)
    if req.echo:
        raise _unsupported("echo", req.echo, "only false")
    if req.suffix:
        raise _unsupported("suffix", req.suffix, "no suffix")
    if req.best_of not in (None, 1):
        raise _unsupported("best_of", req.best_of, "only 1")
    if req.logprobs not in (None, 0):
        raise _unsupported("logprobs", req.logprobs, "only 0 or null")
    stream, include_usage = _stream_flags(req)
    prompt: str | list[int] = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, f"prompt: a list of {len(prompt)} strings; this server takes one prompt per request",
                           param="prompt")
        prompt = prompt[0]
    if len(prompt) == 0:
        raise APIError(400, "prompt: empty; give a string or a non-empty list of token ids", param="prompt")
    params = _params(req, ctx, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)
    return Submission(prompt, params, [], [], ctx.max_soft_tokens, stream, include_usage)
