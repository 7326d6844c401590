"""Small randomly initialised Llama / Qwen2 checkpoints written with transformers' own
`save_pretrained`, plus a byte-level BPE tokenizer, for parity and end-to-end tests."""
from __future__ import annotations

from pathlib import Path

import torch

SMALL = dict(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
             rms_norm_eps=1e-5, tie_word_embeddings=False)


def make_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog " * 4, "hello world, long context serving " * 4]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size - 2, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    fast.save_pretrained(str(path))


def make_hf_model(path: Path, arch: str = "llama", shard_bytes: int | None = None, seed: int = 0,
                  **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = {**SMALL, **overrides}
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    with torch.no_grad():   # HF init is near-zero; larger weights make the logits discriminative
        for p in model.parameters():
            p.normal_(0, 0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    if shard_bytes:
        model.save_pretrained(str(path), max_shard_size=shard_bytes)
    else:
        model.save_pretrained(str(path))
    make_tokenizer(path, kw["vocab_size"])
    return path
