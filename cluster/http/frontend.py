"""From an HTTP body to what the engine replica needs: prompt token ids, sampling parameters, and
the request's KV footprint in bytes (prompt + max_tokens, times the model's KV bytes per token),
which the router uses to place it. Runs the engine's own admission check first, so a request that
can never run is answered 400 here without touching a replica."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from retroinfer.config import parse_dtype
from retroinfer.engine.llm_engine import check_request, load_model_config
from retroinfer.engine.sampling import SamplingParams
from retroinfer.engine.sequence import footprint_tokens
from retroinfer.engine.tokenizer import load_tokenizer

from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, JobRequest,
                       SamplingFields, TokenizeRequest)


@dataclass
class Prepared:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    kv_bytes: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class Frontend:
    def __init__(self, model: str, served_model_name: str | None, dtype: str | None = None,
                 max_model_len: int | None = None, default_max_tokens: int = 256):
        self.model_cfg = load_model_config(model)
        self.tokenizer = load_tokenizer(model)
        self.model_name = served_model_name or Path(model).name
        self.max_model_len = max_model_len or self.model_cfg.max_position_embeddings
        self.bytes_per_token = self.model_cfg.kv_bytes_per_token(parse_dtype(dtype or self.model_cfg.dtype))
        self.default_max_tokens = default_max_tokens

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           code="model_not_found", param="model")

    def completion(self, body: CompletionRequest) -> Prepared:
        self.check_model(body.model)
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            p = p[0]
        ids = self._encode(p) if isinstance(p, str) else list(p)
        return self._prepare("cmpl", ids, body, body.max_tokens or 16)   # OpenAI's default

    def chat(self, body: ChatCompletionRequest) -> Prepared:
        self.check_model(body.model)
        return self._prepare("chatcmpl", self._chat_ids(body.messages), body,
                             body.max_completion_tokens or body.max_tokens or self.default_max_tokens)

    def job(self, body: JobRequest) -> Prepared:
        self.check_model(body.model)
        if body.messages is not None:
            ids = self._chat_ids(body.messages)
        else:
            ids = self._encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        return self._prepare("job", ids, body, body.max_tokens or self.default_max_tokens)

    def tokenize(self, body: TokenizeRequest) -> dict:
        """vLLM's /tokenize: the ids a completion (`prompt`) or a chat (`messages`) would send."""
        self.check_model(body.model)
        if body.messages is None:
            ids = self._encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
        else:
            ids = self._chat_ids(body.messages, body.add_generation_prompt)
            if body.add_special_tokens:      # the tokenizer's own (a BOS) on top of the template's
                ids = self._encode("", add_special_tokens=True) + ids
        strs = None
        if body.return_token_strs:
            hf = getattr(self.tokenizer, "tok", None)
            strs = hf.convert_ids_to_tokens(ids) if hasattr(hf, "convert_ids_to_tokens") else \
                [self.tokenizer.decode([i]) for i in ids]
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        """vLLM's /detokenize: the text of token ids (special tokens skipped, as in completions)."""
        self.check_model(body.model)
        vocab = self.model_cfg.vocab_size
        for i, t in enumerate(body.tokens):
            if not 0 <= t < vocab:
                raise APIError(400, f"tokens.{i}: token id {t} is outside the vocabulary (size {vocab})",
                               code="invalid_request", param="tokens")
        try:
            return {"prompt": self.tokenizer.decode(body.tokens)}
        except Exception as e:     # noqa: BLE001 - e.g. an id past the tokenizer's own vocabulary
            raise APIError(400, f"tokens: cannot be decoded: {type(e).__name__}: {str(e)[:200]}",
                           code="invalid_request", param="tokens") from None

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt; text that is not valid Unicode (a lone surrogate such as
        "\\ud800", which JSON can carry) is a 400, not a failure of the server."""
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except ValueError as e:     # UnicodeEncodeError is one
            raise APIError(400, f"the prompt cannot be encoded: {type(e).__name__}: {e}",
                           code="invalid_prompt", param="prompt") from None

    def _chat_ids(self, messages, add_generation_prompt: bool = True) -> list[int]:
        try:
            return self.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                                      add_generation_prompt=add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_prompt", param="messages") from None

    def _prepare(self, kind: str, ids: list[int], body: SamplingFields, max_tokens: int) -> Prepared:
        try:
            params = SamplingParams(**body.sampling_kwargs(max_tokens))
            check_request(ids, params, self.max_model_len, self.model_cfg.vocab_size)
        except ValueError as e:
            code = "context_length_exceeded" if "context" in str(e) else "invalid_request"
            raise APIError(400, str(e), code=code) from None
        kv_bytes = footprint_tokens(len(ids), params) * self.bytes_per_token
        return Prepared(f"{kind}-{uuid.uuid4().hex}", ids, params, kv_bytes)
