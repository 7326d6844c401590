"""OpenAI-compatible request models (validated) and response builders, and the API error type.
Unknown fields are ignored, as OpenAI-compatible servers do; fields whose feature is not
implemented (n > 1, logprobs, echo, penalties, tools) are rejected with a 400 that says so.
Sampling fields are bounded as vLLM bounds them: `seed` within int64, `top_p` in (0, 1],
`temperature` in [0, 2] (below 1e-5 it means greedy: `SamplingParams` clamps it), no NaN or
infinity anywhere."""
from __future__ import annotations

import functools
import math
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator


class APIError(Exception):
    """An error for the client, in OpenAI's format: {"error": {"message", "type", "code", "param"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
             405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def body(self) -> dict:
        return {"error": {"message": _printable(self.message), "type": self.TYPES.get(self.status, "error"),
                          "code": self.code, "param": _printable(self.param)}}


def _printable(s: str | None) -> str | None:
    """Text that encodes as UTF-8 (a lone surrogate from the request, quoted back, would not)."""
    return None if s is None else s.encode("utf-8", "backslashreplace").decode("utf-8")


def validation_error(errors: list[dict]) -> APIError:
    """A 400 from pydantic's errors for a request body: `param` is the field's path (`prompt`,
    `messages.0.content`), without pydantic's union-member tags (`prompt.str`) or a JSON
    decoding error's character offset."""
    if not errors:
        return APIError(400, "invalid request body", code="invalid_request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        where = first.get("loc", ())[-1:]
        at = f" (at character {where[0]})" if where and isinstance(where[0], int) else ""
        return APIError(400, f"the body is not valid JSON{at}: {first.get('ctx', {}).get('error', 'invalid')}",
                        code="invalid_json")
    path = _field_path(first.get("loc", ()))
    msgs = []
    for e in errors:     # a union's members each report: say what each would have needed
        if _field_path(e.get("loc", ())) == path:
            m = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
            if m not in msgs:
                msgs.append(m)
    msg = "; or ".join(msgs[:4])
    return APIError(400, f"{path}: {msg}" if path else msg, code="invalid_request", param=path or None)


def _field_path(loc) -> str:
    """`("body", "prompt", "str")` -> "prompt"; `("body", "messages", 0, "content")` -> "messages.0.content"."""
    if loc[:1] != ("body",):
        return ".".join(str(x) for x in loc[1:])       # query and path parameters: no unions
    return ".".join(str(x) for x in loc[1:] if isinstance(x, int) or x in _field_names())


@functools.cache
def _field_names() -> frozenset[str]:
    return frozenset(name for model in (CompletionRequest, ChatCompletionRequest, JobRequest, ChatMessage,
                                        ContentPart, StreamOptions, TokenizeRequest, DetokenizeRequest)
                     for name in model.model_fields)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="0 or -1: off")
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        v = [v] if isinstance(v, str) else v
        if v is not None and (len(v) > 16 or any(not s for s in v)):
            raise ValueError("stop must be up to 16 non-empty strings")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.n != 1:
            raise ValueError(f"n={self.n} is not supported: this server returns one choice per request (n=1)")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported")
        return self

    def sampling_kwargs(self, max_tokens: int) -> dict:
        return {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": max(0, self.top_k), "seed": self.seed, "stop": list(self.stop or []),
                "stop_token_ids": list(self.stop_token_ids or []), "ignore_eos": self.ignore_eos}


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_unsupported(self):
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise ValueError("a batch of prompts is not supported: send one prompt per request")
        for name, bad in (("echo", self.echo), ("logprobs", self.logprobs is not None),
                          ("best_of", self.best_of not in (None, 1)), ("suffix", self.suffix is not None)):
            if bad:
                raise ValueError(f"{name} is not supported")
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(p.type != "text" for p in self.content):
            raise ValueError("only text content parts are supported")
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    tools: list | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _chat_unsupported(self):
        if self.logprobs:
            raise ValueError("logprobs is not supported")
        if self.tools:
            raise ValueError("tools are not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format other than text is not supported")
        for m in self.messages:
            m.text()
        return self


class JobRequest(SamplingFields):
    """A long-context job: a completion (`prompt`) or a chat (`messages`), run to the end."""
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.stream:
            raise ValueError("jobs do not stream; follow GET /v1/jobs/{id}/events instead")
        for m in self.messages or []:
            m.text()
        return self


class TokenizeRequest(BaseModel):
    """vLLM's `POST /tokenize`: a `prompt` (as a completion encodes it) or `messages` (as a chat
    does). `add_special_tokens` defaults to True for a prompt and False for messages (the chat
    template writes its own; True adds the tokenizer's on top of it)."""
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        for m in self.messages or []:
            m.text()
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's `POST /detokenize`: token ids back to text."""
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[StrictInt]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish_reason: str | None, use: dict | None,
                    chunk: bool = False) -> dict:
    out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if use is not None or not chunk:
        out["usage"] = use
    return out


def chat_body(rid: str, model: str, text: str, finish_reason: str | None, use: dict | None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}], "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}
