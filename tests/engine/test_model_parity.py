"""Our Llama / Qwen2 forward passes against transformers' own, on checkpoints it wrote."""
from pathlib import Path

import pytest
import torch

from retroinfer.config import EngineConfig, ModelConfig
from retroinfer.engine.llm_engine import LLMEngine
from retroinfer.engine.sampling import SamplingParams
from retroinfer.engine.stage import Stage

from tests.hf_models import make_hf_model

CASES = {
    "llama-gqa": dict(arch="llama"),
    "llama-mha-tied": dict(arch="llama", num_key_value_heads=8, tie_word_embeddings=True),
    "llama3-rope-scaling": dict(arch="llama", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2-bias-sharded": dict(arch="qwen2", shard_bytes=200_000),
    "qwen2-yarn": dict(arch="qwen2", rope_parameters={
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 64}),
}


@pytest.fixture(scope="module", params=list(CASES))
def model_dir(request, tmp_path_factory):
    kw = dict(CASES[request.param])
    return make_hf_model(tmp_path_factory.mktemp(request.param), **kw)


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_logits_match_transformers(model_dir):
    torch.manual_seed(1)
    cfg = ModelConfig.from_dir(model_dir)
    ids = torch.randint(0, cfg.vocab_size, (150,))
    with torch.no_grad():
        ref = hf_model(model_dir)(ids[None]).logits[0].float()
    stage = Stage(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", prefill_chunk=64,
                               kv_budget_bytes=1 << 24), cfg, range(cfg.num_layers), "cpu")
    stage.reserve("s", 200)
    hidden = stage.shard.prefill(stage.shard.embed(ids), 0, stage.backend, "s", 64)
    ours = stage.shard.logits(hidden)
    assert (ours - ref).abs().max().item() <= 1e-4
    # Decode path: the next token's logits through the paged KV cache.
    nxt = torch.tensor([7])
    with torch.no_grad():
        ref_next = hf_model(model_dir)(torch.cat([ids, nxt])[None]).logits[0, -1].float()
    ours_next = stage.decode(["s"], nxt, torch.tensor([150]))[0]
    assert (ours_next - ref_next).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers(model_dir):
    torch.manual_seed(2)
    cfg = ModelConfig.from_dir(model_dir)
    ids = torch.randint(0, cfg.vocab_size, (40,)).tolist()
    with torch.no_grad():
        ref = hf_model(model_dir).generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu",
                                    kv_budget_bytes=1 << 24))
    got = []
    for out in engine.generate(ids, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)):
        got += out.token_ids
    assert got == ref
