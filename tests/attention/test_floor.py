"""benchmarks/floor.py: the bytes a decode step must move, zone by zone, and its floor time; and
bench_decode's reading of them from a running engine (CPU, tiny)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_decode  # noqa: E402
import floor  # noqa: E402

from retroinfer.config import EngineConfig, WaveConfig  # noqa: E402
from retroinfer.engine.llm_engine import LLMEngine  # noqa: E402
from retroinfer.engine.sampling import SamplingParams  # noqa: E402
from retroinfer.models.presets import preset_config  # noqa: E402


def test_wave_zones_at_120k_on_the_8b_shape():
    """Per sequence and layer at 120K tokens (8 KV heads, head dim 128, bf16): the centroids of
    7500 clusters, 1.8% of the K/V rows, 23.2% of the clusters' value means (and log weights)."""
    C, N, H, D = 7500, 120_000, 8, 128
    r, e = WaveConfig().zone_sizes(C)
    b = floor.wave_step_bytes([floor.WaveSeq(C, N, r, e, 100)], H, D, 2, layers=32)
    assert (r, e) == (135, 1740)
    assert b.centroids == C * H * D * 2 * 32
    assert b.retrieval == r * (N // C) * 2 * H * D * 2 * 32
    assert b.estimation == e * (D * 2 + 4) * H * 32
    assert b.steady == 100 * 2 * H * D * 2 * 32 and b.kv == b.weights == b.pcie == 0
    bw = 4.6e12
    assert b.floor_ms(bw) == pytest.approx(b.hbm / bw * 1e3)
    assert sum(b.zone_ms(bw).values()) == pytest.approx(b.floor_ms(bw))


def test_offloaded_rows_move_to_pcie_and_the_slower_link_sets_the_floor():
    s = [floor.WaveSeq(1000, 16_000, 18, 232, 70)]
    plain = floor.wave_step_bytes(s, 8, 128, 2)
    off = floor.wave_step_bytes(s, 8, 128, 2, pcie_bytes=plain.retrieval // 4)
    assert off.pcie == plain.retrieval // 4 and off.retrieval == plain.retrieval - off.pcie
    assert floor.wave_step_bytes(s, 8, 128, 2, pcie_bytes=10**12).pcie == plain.retrieval   # at most all of it
    hbm, slow_pcie = 4.6e12, 1e3
    assert off.floor_ms(hbm, slow_pcie) == pytest.approx(off.pcie / slow_pcie * 1e3)
    assert off.floor_ms(hbm, 1e15) == pytest.approx(off.hbm / hbm * 1e3)


def test_decode_weights_leave_out_an_untied_embedding():
    mc = preset_config("random:llama3-8b")
    untied = mc.vocab_size * mc.hidden_size * 2
    assert floor.decode_weight_bytes(mc, torch.bfloat16) == mc.weight_bytes(torch.bfloat16) - untied


@pytest.mark.parametrize("attention,dense_last", [("full", 0), ("wave", 0), ("wave", 1)])
def test_bench_decode_reads_the_step_bytes_of_a_running_engine(attention, dense_last):
    wave = WaveConfig(segment_size=512, tokens_per_cluster=8, update_every=256, update_clusters=32, window=32,
                      dense_last=dense_last)
    eng = LLMEngine(EngineConfig(model="tiny", device="cpu", attention=attention, wave=wave, prefill_chunk=256))
    for i, n in enumerate((900, 600)):
        eng.add_request(str(i), [1 + (i + j) % 200 for j in range(n)],
                        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    while len(eng.running) < 2:
        eng.step()
    mc = eng.model_cfg
    b = bench_decode.step_bytes(eng)
    assert b.weights == floor.decode_weight_bytes(mc, eng.executor.dtype)
    row = mc.num_kv_heads * mc.head_dim * eng.executor.dtype.itemsize * mc.num_layers
    if attention == "full":
        assert b.kv == sum(s.num_tokens for s in eng.running) * 2 * row
    else:
        be = eng.executor.stages[0].backend
        be = be.wave_part if dense_last else be              # LayerSplitAttention's wave index
        seqs = floor.wave_seqs(be, ["0", "1"])
        assert [s.indexed_tokens for s in seqs] == [be.seqs[k].indexed for k in ("0", "1")]
        assert all(s.clusters > 0 and s.retrieve >= 1 for s in seqs)
        wave_layers = mc.num_layers - dense_last              # the last layer dense: full's bytes
        assert b.centroids == sum(s.clusters for s in seqs) * row // mc.num_layers * wave_layers
        assert b.kv == sum(s.num_tokens for s in eng.running) * 2 * row // mc.num_layers * dense_last
        assert b.retrieval > 0 and b.estimation > 0 and b.steady > 0
