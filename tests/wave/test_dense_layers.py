"""Wave attention with dense first / last layers (attention/layer_split.py)."""
import pytest
import torch

from retroinfer.attention import KVCapacityError, make_backend
from retroinfer.attention.full import FullAttention
from retroinfer.attention.layer_split import LayerSplitAttention
from retroinfer.attention.wave import WaveAttention
from retroinfer.config import ConfigError, EngineConfig, WaveConfig
from retroinfer.engine.llm_engine import LLMEngine, load_model_config
from retroinfer.engine.sampling import SamplingParams

EXACT = dict(retrieval_frac=1.0, estimation_frac=0.0, segment_size=1024, update_every=256, update_clusters=16)
MC = load_model_config("tiny")           # 4 layers


def _generate(cfg, prompt, n=40):
    eng = LLMEngine(cfg)
    return [t for o in eng.generate(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for t in o.token_ids]


def test_dense_layers_of_a_model():
    assert WaveConfig().dense_layers(32) == set()
    assert WaveConfig(dense_first=2, dense_last=1).dense_layers(32) == {0, 1, 31}
    assert WaveConfig(dense_first=40).dense_layers(4) == {0, 1, 2, 3}
    with pytest.raises(ConfigError):
        WaveConfig(dense_last=-1)


@pytest.mark.parametrize("first,last,kind", [(0, 0, WaveAttention), (1, 0, LayerSplitAttention),
                                             (1, 2, LayerSplitAttention), (2, 2, FullAttention)])
def test_make_backend_by_layers(first, last, kind):
    b = make_backend("wave", MC, range(MC.num_layers), "cpu", torch.float32, 1 << 26,
                     WaveConfig(dense_first=first, dense_last=last), 2)
    assert type(b) is kind


def test_a_stage_without_dense_layers_is_plain_wave():
    b = make_backend("wave", MC, range(1, 3), "cpu", torch.float32, 1 << 26, WaveConfig(dense_first=1, dense_last=1), 2)
    assert type(b) is WaveAttention


@pytest.mark.parametrize("first,last", [(1, 0), (0, 1), (1, 1)])
def test_exact_wave_with_dense_layers_equals_full(first, last):
    prompt = torch.randint(1, 250, (3000,), generator=torch.Generator().manual_seed(1)).tolist()
    base = EngineConfig(model="tiny", device="cpu", dtype="float32", kv_budget_bytes=1 << 27, max_model_len=4096)
    want = _generate(base.with_overrides(attention="full"), prompt)
    wave = WaveConfig(**EXACT, dense_first=first, dense_last=last)
    assert _generate(base.with_overrides(attention="wave", wave=wave), prompt) == want


def test_dense_layer_attends_like_full_attention():
    """Default (sparse) budget: the dense layer's output is full attention's, the others are not."""
    torch.manual_seed(0)
    T, H, D = 1500, MC.num_kv_heads, MC.head_dim
    split = make_backend("wave", MC, range(2), "cpu", torch.float32, 1 << 26, WaveConfig(dense_first=1), 2)
    full = FullAttention(MC, range(2), "cpu", torch.float32, 1 << 26)
    kv = {li: (torch.randn(T, H, D), torch.randn(T, H, D)) for li in range(2)}
    for b in (split, full):
        b.reserve("s", T + 1)
        for li in range(2):
            b.write_prefill(li, "s", *kv[li], 0)
    q = torch.randn(1, MC.num_heads, D)
    k1, v1 = torch.randn(1, H, D), torch.randn(1, H, D)
    ps, pf = split.plan_decode(["s"]), full.plan_decode(["s"])
    out = [(split.decode(li, ps, q, k1, v1), full.decode(li, pf, q, k1, v1)) for li in range(2)]
    assert torch.allclose(out[0][0], out[0][1], atol=1e-5)
    assert not torch.allclose(out[1][0], out[1][1], atol=1e-3)


def test_capacity_is_the_smaller_part_and_a_failed_reserve_holds_nothing():
    b = make_backend("wave", MC, range(MC.num_layers), "cpu", torch.float32, 1 << 26, WaveConfig(dense_last=1), 2)
    cap = b.stats()["capacity_bytes"] // b.bytes_per_token
    with pytest.raises(KVCapacityError):
        b.reserve("big", cap * 4)
    assert b.stats()["used_bytes"] == 0
    b.reserve("ok", cap // 2)
    assert 0 < b.stats()["used_bytes"] <= b.stats()["capacity_bytes"]
    b.free("ok")
    assert b.stats()["used_bytes"] == 0
