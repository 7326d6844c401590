"""The engine on CUDA: prefill attention, the full and wave backends through the Triton kernels,
and wave == full at a 100% retrieval budget on the tiny preset and the Llama-3-8B architecture."""
import gc

import pytest
import torch

from retroinfer.attention.prefill import causal_attention
from retroinfer.config import EngineConfig, WaveConfig
from retroinfer.engine.llm_engine import LLMEngine
from retroinfer.engine.sampling import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q_start", [0, 1000])
def test_causal_attention_matches_reference(dtype, q_start):
    torch.manual_seed(q_start)
    c = 777
    q = torch.randn(c, 32, 128, device="cuda", dtype=dtype)
    k = torch.randn(q_start + c, 8, 128, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    got = causal_attention(q, k, v, q_start).double()
    ref = causal_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), q_start).cuda()
    assert (got - ref).norm() / ref.norm() < 1e-2


def _generate(cfg: EngineConfig, prompt, n):
    eng = LLMEngine(cfg)
    out = [t for o in eng.generate(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
           for t in o.token_ids]
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    return out


def test_tiny_cuda_equals_cpu():
    prompt = list(range(1, 250)) * 4
    base = EngineConfig(model="tiny", dtype="float32", kv_budget_bytes=1 << 28)
    assert _generate(base.with_overrides(device="cuda"), prompt, 64) == \
        _generate(base.with_overrides(device="cpu"), prompt, 64)


def test_cuda_graph_decode_equals_eager():
    prompt = list(range(1, 200)) * 3
    base = EngineConfig(model="random:llama3-8b", dtype="bfloat16", device="cuda", max_model_len=4096)
    assert _generate(base.with_overrides(cuda_graphs=True), prompt, 32) == \
        _generate(base.with_overrides(cuda_graphs=False), prompt, 32)


@pytest.mark.parametrize("model,prompt_len", [("tiny", 3000), ("random:llama3-8b", 3000)])
def test_wave_full_budget_equals_full(model, prompt_len):
    wave = WaveConfig(retrieval_frac=1.0, estimation_frac=0.0, segment_size=1024, update_every=256,
                      update_clusters=16)
    base = EngineConfig(model=model, dtype="float32", device="cuda", max_model_len=8192, wave=wave)
    prompt = torch.randint(0, 250, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    n = 300 if model == "tiny" else 40     # tiny: past an index update
    full = _generate(base.with_overrides(attention="full"), prompt, n)
    wave_out = _generate(base.with_overrides(attention="wave"), prompt, n)
    assert wave_out == full


def test_wave_default_budget_runs_bf16():
    cfg = EngineConfig(model="random:llama3-8b", dtype="bfloat16", device="cuda", attention="wave",
                       max_model_len=40000)
    prompt = torch.randint(0, 128000, (32768,), generator=torch.Generator().manual_seed(2)).tolist()
    out = _generate(cfg, prompt, 16)
    assert len(out) == 16


def test_offload_equals_gpu_resident_wave():
    """The wave buffer's host pool (zero-copy gathers, the cache's bookkeeping, the side stream,
    replayed as CUDA graphs) gives the GPU-resident index's tokens, decoded eagerly."""
    # Every cluster retrieved and fp32: the result cannot depend on the (atomics-ordered) k-means.
    wave = WaveConfig(retrieval_frac=1.0, estimation_frac=0.0, segment_size=1024, update_every=256,
                      update_clusters=16)
    base = EngineConfig(model="random:llama3-8b", dtype="float32", device="cuda", attention="wave",
                        max_model_len=8192, wave=wave, max_batch=4)
    prompt = torch.randint(0, 128000, (6000,), generator=torch.Generator().manual_seed(3)).tolist()
    resident = _generate(base.with_overrides(cuda_graphs=False), prompt, 300)    # eager
    offload = _generate(base.with_overrides(offload=True, host_kv_budget_bytes=8 << 30), prompt, 300)   # graphs
    assert offload == resident


def _batch(cfg: EngineConfig, prompts, n):
    eng = LLMEngine(cfg)
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    toks = {str(i): [] for i in range(len(prompts))}
    while eng.has_work():
        for o in eng.step():
            assert o.error is None, o.error
            toks[o.request_id] += o.token_ids
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    return [toks[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("attention,dense", [("full", 0), ("wave", 0), ("wave", 1)])
def test_graphs_at_a_max_batch_that_is_not_a_power_of_two(attention, dense):
    """A batch of 6 with max_batch 6 is captured at 6, not padded to 8 (the backend has 6 slots);
    also wave with a dense first and last layer (both parts' plans in one graph)."""
    prompts = [torch.randint(1, 250, (1500 + 100 * i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(6)]
    base = EngineConfig(model="tiny", dtype="float32", device="cuda", attention=attention, max_batch=6,
                        max_model_len=4096, kv_budget_bytes=1 << 28,
                        wave=WaveConfig(dense_first=dense, dense_last=dense))
    assert _batch(base.with_overrides(cuda_graphs=True), prompts, 24) == \
        _batch(base.with_overrides(cuda_graphs=False), prompts, 24)
