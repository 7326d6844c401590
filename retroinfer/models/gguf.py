"""GGUF checkpoints (llama.cpp's format) as a model source.

The engine reads Hugging Face directories (config.json + safetensors + tokenizer). A GGUF file is
turned into one once, through transformers' GGUF support (which uses the `gguf` library): weights
dequantised (every quant type transformers reads: F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the
K-quants Q2_K..Q6_K), q/k rows un-permuted to Hugging Face's layout, config, tokenizer and chat
template. The directory is cached beside nothing the user owns (`~/.cache/retroinfer/converted/`,
or $RETROINFER_CACHE), keyed by the file's size and mtime, so a second start reads safetensors
directly."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..config import ConfigError

FORMAT_VERSION = 1   # bump when the converted layout changes


def cache_root() -> Path:
    return Path(os.environ.get("RETROINFER_CACHE", Path.home() / ".cache" / "retroinfer"))


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the only *.gguf in a directory that has no
    config.json. None when `path` is not a GGUF source."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise ConfigError(f"{path}: several .gguf files ({', '.join(f.name for f in files)}); "
                              "name one")
        return files[0] if files else None
    return None


def converted_dir(gguf: Path) -> Path:
    st = gguf.stat()
    return cache_root() / "converted" / f"{gguf.stem}-{st.st_size:x}-{int(st.st_mtime):x}-v{FORMAT_VERSION}"


def gguf_to_hf(gguf: Path, out: Path | None = None, dtype: str = "bfloat16") -> Path:
    """Converts `gguf` into a Hugging Face directory (once; cached) and returns its path."""
    out = out or converted_dir(gguf)
    if (out / "config.json").is_file():
        return out
    try:
        import gguf as _  # noqa: F401  (transformers needs it; say so in one line if absent)
    except ImportError:
        raise ConfigError("reading GGUF files needs the `gguf` package (pip install gguf)") from None
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        kw = dict(gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    except Exception as e:   # transformers raises many kinds (unsupported arch, quant type, ...)
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"{gguf}: cannot read this GGUF file ({type(e).__name__}: {e})") from None
    sd = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(tmp / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    tok.save_pretrained(str(tmp))
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": stop_ids(tok, cfg)}))
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def stop_ids(tok, cfg: dict) -> list[int]:
    """Tokens that end a turn: the config's and tokenizer's EOS, plus the chat template's
    end-of-turn marker (a GGUF's eos can be <|endoftext|> while turns end with <|im_end|>)."""
    ids = {cfg.get("eos_token_id"), tok.eos_token_id}
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"):
        tid = tok.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tok.unk_token_id and marker in (tok.chat_template or "") + str(tok.eos_token):
            ids.add(tid)
    return sorted(i for i in ids if isinstance(i, int))
