"""Tokenizers: the model directory's (Hugging Face, chat template included) or, for the tiny
preset, a byte tokenizer that needs no files."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError
from ..models.presets import is_preset


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 = <bos>, 257 = <eos>. The random-weight presets have larger
    vocabularies: each id past the bytes decodes to "\u2047" (sentencepiece's unknown mark), so
    every generated token streams as text, as a real tokenizer's would."""
    bos_id, eos_id = 256, 257

    @property
    def eos_token_ids(self) -> list[int]:
        return [self.eos_id]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.bos_id] * add_special_tokens + list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run.clear()
            if i > self.eos_id:
                out.append("\u2047")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return self.encode(text + "<|assistant|>\n" * add_generation_prompt)


class HFTokenizer:
    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer
        try:
            self.tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as e:   # transformers raises many kinds; the user needs one line
            raise ConfigError(f"{model_dir}: cannot load tokenizer ({type(e).__name__}: {e})") from None
        plain = Path(model_dir) / "tokenizer.json"
        if plain.is_file() and not self.tok.encode("hello world", add_special_tokens=False):
            # a tokenizer.json that is not the class AutoTokenizer guessed (a word-level one in a
            # Qwen2 directory encodes to nothing through Qwen2Tokenizer): read the file as it is
            from transformers import PreTrainedTokenizerFast
            self.tok = PreTrainedTokenizerFast(tokenizer_file=str(plain), **_special_tokens(model_dir))

    @property
    def eos_token_ids(self) -> list[int]:
        return [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
        out = self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _special_tokens(model_dir) -> dict:
    p = Path(model_dir) / "tokenizer_config.json"
    cfg = json.loads(p.read_text()) if p.is_file() else {}
    keys = ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template")
    return {k: cfg[k] for k in keys if isinstance(cfg.get(k), str)}


def load_tokenizer(model: str):
    return ByteTokenizer() if is_preset(model) else HFTokenizer(model)


class IncrementalDetokenizer:
    """Text deltas as tokens arrive, decoding only a short window of recent tokens (a whole
    re-decode per token would cost O(n^2) over a long answer). The window starts a few tokens
    back so that tokenizers that drop or merge leading spaces decode the new text in context; an
    incomplete UTF-8 tail is held back until it completes. `text` is everything emitted so far."""

    def __init__(self, tokenizer, context: int = 6):
        self.tok, self.text = tokenizer, ""
        self.prefix, self.read = 0, 0       # window start; tokens already turned into text
        self.context = context

    def delta(self, ids: list[int]) -> str:
        before = self.tok.decode(ids[self.prefix:self.read])
        after = self.tok.decode(ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        d = after[len(before):]
        self.read = len(ids)
        self.prefix = max(0, self.read - self.context)
        self.text += d
        return d
