"""pydantic models of the OpenAI-compatible requests and responses this server takes and gives.

Requests list every OpenAI field the server understands; fields it cannot honour (``tools``, ``logprobs``,
penalties, ...) are declared too, so that a non-default value is refused by name (`runtime.serve.translate`) rather
than silently ignored.  Unknown fields are ignored.  Content parts and messages are flat models (one model, a
``type``/``role`` literal and a check of which fields go with it) so that validation errors point at the field the
client wrote (``messages[0].content[1].image_url``) and not at a union member.

Only validation of shapes and ranges lives here: no engine, no media decoding, no prompt rendering.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "Completion",
    "CompletionRequest",
    "ContentPart",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "Usage",
]

_SEED_MAX = 2**63 - 1


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Request):
    url: str = Field(description="a data: URL of a PNG or JPEG image (file:// inside --allow-media-dir if enabled)")
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="low: 70 soft tokens, high: 1120, auto or absent: the server's --max-soft-tokens")


class InputAudio(_Request):
    data: str = Field(description="base64 of a 16 kHz mono WAV file")
    format: Literal["wav"]


class ContentPart(_Request):
    type: Literal["text", "image_url", "input_audio"]
    text: str | None = None
    image_url: ImageURL | None = None
    input_audio: InputAudio | None = None

    @model_validator(mode="after")
    def _has_its_field(self) -> ContentPart:
        if getattr(self, self.type) is None:
            raise ValueError(f"a content part of type {self.type!r} needs a {self.type!r} field")
        return self


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = Field(None, description="refused unless empty: this server has no tools")

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self


class StreamOptions(_Request):
    include_usage: bool | None = None


class ResponseFormat(_Request):
    type: str


class _Sampling(_Request):
    """Fields shared by chat and text completions."""

    model: str | None = Field(None, description="the served model's id (GET /v1/models); may be left out")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, description="an extension: sample among the k most likely tokens")
    seed: int | None = Field(None, ge=0, le=_SEED_MAX)
    stop: str | list[str] | None = Field(None, description="up to 16 strings; generation stops before any of them")
    n: int | None = Field(None, ge=1, description="only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = Field(None, description="only 0 is supported")
    presence_penalty: float | None = Field(None, description="only 0 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="only an empty map is supported")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="only false is supported")
    top_logprobs: int | None = Field(None, description="only 0 is supported")
    tools: list[Any] | None = Field(None, description="refused unless empty")
    tool_choice: Any | None = Field(None, description="only 'none' is supported")
    functions: list[Any] | None = Field(None, description="refused unless empty")
    function_call: Any | None = Field(None, description="only 'none' is supported")
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = Field(None, description="only {'type': 'text'} is supported")
    modalities: list[str] | None = Field(None, description="only ['text'] is supported")
    audio: Any | None = Field(None, description="audio output is not supported")
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[Annotated[StrictInt, Field(ge=0)]] | list[str] = Field(
        description="a string, or a list of token ids; a list of strings only with one string in it")
    echo: bool | None = Field(None, description="only false is supported")
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, description="only 1 is supported")
    logprobs: int | None = Field(None, description="only 0 or null is supported")


# ---- responses -------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class _Choice(BaseModel):
    index: int
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class _Answer(BaseModel):
    """What every response object carries besides its ``object`` tag, ``choices`` and ``usage``."""

    id: str
    created: int
    model: str


class ChatChoice(_Choice):
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Choice):
    delta: Delta


class ChatCompletionChunk(_Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_Choice):
    text: str


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gemma4-deploy"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
