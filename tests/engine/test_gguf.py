"""GGUF as a model source: a small Llama-architecture GGUF written here with the `gguf` writer
(Q8_0 matrices, a byte-level BPE tokenizer with a chat template) is converted, loaded by the
engine, and its greedy tokens match transformers reading the same file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from retroinfer.config import ConfigError, EngineConfig, ModelConfig  # noqa: E402
from retroinfer.engine.llm_engine import LLMEngine  # noqa: E402
from retroinfer.engine.sampling import SamplingParams  # noqa: E402
from retroinfer.models.catalog import CATALOG, display_name, resolve_model  # noqa: E402
from retroinfer.models.gguf import find_gguf  # noqa: E402

H, I, LAYERS, HEADS, KV_HEADS, D = 64, 128, 2, 4, 2, 16
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_vocab() -> list[str]:
    """GPT-2's byte -> printable character table: byte-level BPE tokens of single bytes."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tiny_gguf(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    tokens = _byte_vocab() + ["Ġt", "he", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(D)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 3) + [3, 3, 3])
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(vocab - 3)
    w.add_eos_token_id(vocab - 3)
    w.add_chat_template(CHAT)

    def mat(name, rows, cols):   # Q8_0: blocks of 32 along a row
        x = (rng.standard_normal((rows, cols)) / cols ** 0.5).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def vec(name, n):
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, H)).astype(np.float32))
    for i in range(LAYERS):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", H)
        mat(p + "attn_q.weight", HEADS * D, H)
        mat(p + "attn_k.weight", KV_HEADS * D, H)
        mat(p + "attn_v.weight", KV_HEADS * D, H)
        mat(p + "attn_output.weight", H, HEADS * D)
        vec(p + "ffn_norm.weight", H)
        mat(p + "ffn_gate.weight", I, H)
        mat(p + "ffn_up.weight", I, H)
        mat(p + "ffn_down.weight", H, I)
    vec("output_norm.weight", H)
    mat("output.weight", vocab, H)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gguf")
    os.environ["RETROINFER_CACHE"] = str(d / "cache")
    write_tiny_gguf(d / "tiny-test.gguf")
    yield d / "tiny-test.gguf"
    os.environ.pop("RETROINFER_CACHE", None)


def test_converts_once_into_a_hf_directory(tiny_gguf):
    out = Path(resolve_model(str(tiny_gguf)))
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in out.iterdir()}
    cfg = ModelConfig.from_dir(out)
    assert (cfg.arch, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("llama", 2, 4, 2, 16)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(tiny_gguf.parent)) == str(out)      # a directory holding one .gguf
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp    # cached, not converted again
    assert display_name(str(tiny_gguf)) == "tiny-test"


def test_greedy_tokens_equal_transformers_on_the_same_file(tiny_gguf):
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(EngineConfig(model=resolve_model(str(tiny_gguf)), device="cpu", dtype="float32"))
    ids = engine.tokenizer.encode("the theory of the thing")
    assert len(ids) > 5
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ours = [t for o in engine.generate(ids, params) for t in o.token_ids]

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                               dtype=torch.float32)
    out = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
    assert ours == out[0, len(ids):].tolist()


def test_chat_template_and_stop_tokens_come_from_the_file(tiny_gguf):
    engine = LLMEngine(EngineConfig(model=resolve_model(str(tiny_gguf)), device="cpu", dtype="float32"))
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    text = engine.tokenizer.tok.decode(ids)
    assert text.startswith("<|im_start|>user\nhi<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    im_end = engine.tokenizer.tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in engine.eos        # the template's turn end stops generation, beside the EOS


def test_bad_sources_are_one_line_errors(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ConfigError, match="cannot read this GGUF"):
        resolve_model(str(bad))
    with pytest.raises(ConfigError, match="no such file"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "two").mkdir()
    for n in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / n).write_bytes(b"")
    with pytest.raises(ConfigError, match="several .gguf"):
        find_gguf(tmp_path / "two")


def test_pull_offline_is_a_clear_error(tmp_path):
    """With no index reachable, `pull` says so in one line (pip pointed at a dead index)."""
    env = dict(os.environ, RETROINFER_CACHE=str(tmp_path), PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_NO_INDEX="0", PIP_FIND_LINKS="", PIP_RETRIES="0", PIP_TIMEOUT="1")
    code = ("from retroinfer.models.catalog import pull\n"
            "from retroinfer.config import ConfigError\n"
            "try:\n    pull('smollm2-135m')\nexcept ConfigError as e:\n    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("ERR cannot download smollm2-135m"), r.stdout + r.stderr
    assert "smollm2-135m" in CATALOG


def test_word_level_tokenizer_json_falls_back_to_the_file(tmp_path):
    """A Qwen2 directory whose tokenizer.json is word-level: AutoTokenizer's guess may encode to
    nothing; the file read as it is gives one id a word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from retroinfer.engine.tokenizer import HFTokenizer
    words = ["hello", "world", "the", "cat", "[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer",
                                                                "unk_token": "[UNK]"}))
    t = HFTokenizer(tmp_path)
    assert len(t.encode("hello world the cat " * 10)) == 40


def test_generation_config_stop_tokens_are_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": 7}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 7]}))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == (7, 9)


def test_models_cli_lists_the_catalog_and_refuses_unknown_names(capsys):
    from retroinfer.cli import main
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in CATALOG)
    assert main(["models", "pull", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
