"""benchmarks/bench_accuracy.py at a tiny size on CPU: wave retrieves every needle at the default
budget, the estimation zone lowers the error, and the Quest-style baseline is what it claims."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_accuracy as ba  # noqa: E402

from retroinfer.config import WaveConfig  # noqa: E402
from retroinfer.wave.index import build_index  # noqa: E402

TINY = ba.Scenario(tokens=4096, heads=8, kv_heads=2, head_dim=64, queries=2, needles=2)


@pytest.fixture(scope="module")
def result():
    return ba.run_accuracy(TINY, trials=1, seed=0, device="cpu", dtype=torch.float32)


def test_wave_retrieves_every_needle_at_default_budget(result):
    s = result["systems"]
    assert result["retrieval_clusters"] == WaveConfig().zone_sizes(result["clusters"])[0]
    assert s["wave"]["recall_min"] == 1.0 and s["wave-noest"]["recall_min"] == 1.0, s
    assert 0.2 < result["needle_mass"] < 0.95, "the needles must matter without being all there is"


def test_estimation_zone_lowers_error(result):
    s = result["systems"]
    assert s["wave"]["rel_err"] < s["wave-noest"]["rel_err"], s
    assert s["wave"]["est_mass"] > 0 and s["wave-noest"]["est_mass"] == 0


def test_replay_matches_the_backend_and_full_is_exact(result):
    s = result["systems"]
    # the membership replay (ranking + zones recomputed here) reproduces the backend's output
    assert s["wave"]["replay_err_max"] < 1e-4 and s["wave-noest"]["replay_err_max"] < 1e-4, s
    assert s["full"]["rel_err_max"] < 1e-4 and s["full"]["recall"] == 1.0


def test_quest_at_full_budget_equals_full_attention():
    sc = ba.Scenario(tokens=2048, heads=4, kv_heads=2, head_dim=32, queries=2, needles=1)
    res = ba.run_trial(sc, seed=1, device="cpu", dtype=torch.float32, wave=WaveConfig(), quest_pages=10**6)
    q = res["quest"]
    assert max(q["rel_err"]) < 1e-5 and min(q["recall"]) == 1.0 and min(q["exact_mass"]) > 1 - 1e-5
    assert q["tokens"][0] == 2048 - 4 - 64


@pytest.mark.parametrize("gqa", ["max", "sum"])
def test_quest_page_bound_bounds_every_key(gqa):
    torch.manual_seed(0)
    H, G, N, D = 3, 4, 16 * 9 + 5, 24                  # a partial last page
    k = torch.randn(H, N, D) * 2 + torch.randn(H, 1, D)
    q = torch.randn(H, G, D)
    lo, hi = ba.quest_page_minmax(k)
    assert lo.shape == (H, 10, D)
    bound = ba.quest_page_bounds(q, lo, hi)            # [H, G, P]
    # the definition, elementwise
    ref = torch.maximum(q[:, :, None] * lo[:, None], q[:, :, None] * hi[:, None]).sum(-1)
    assert torch.allclose(bound, ref, atol=1e-4)
    qk = torch.einsum("hgd,hnd->hgn", q, k)
    page_of = torch.arange(N) // ba.PAGE
    assert (bound[..., page_of] >= qk - 1e-4).all(), "the page bound must bound q.k of its every key"
    # a one-token page: the bound is exact
    lo1, hi1 = ba.quest_page_minmax(k[:, :1])
    assert torch.allclose(ba.quest_page_bounds(q, lo1, hi1)[..., 0], qk[..., 0], atol=1e-4)
    # selection: whole pages, as many as asked, the best-bounded ones
    mask = ba.quest_select(q, k, pages=3, gqa=gqa)
    score = bound.amax(1) if gqa == "max" else bound.sum(1)
    for h in range(H):
        chosen = mask[h].view(-1)[: 9 * ba.PAGE].view(9, ba.PAGE)
        assert ((chosen.all(1)) | (~chosen.any(1))).all()
        picked = set(page_of[mask[h]].unique().tolist())
        assert picked == set(score[h].topk(3).indices.tolist())


def test_index_positions_recovers_the_clusters():
    torch.manual_seed(2)
    T, H, D = 1500, 2, 16
    k, v = torch.randn(T, H, D), torch.randn(T, H, D)
    ix = build_index(k, v, WaveConfig(segment_size=512, tokens_per_cluster=8, kmeans_iters=3))
    kh, vh = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
    cluster_of = ba.index_positions(ix, kh, vh)
    for h in range(H):
        for c in range(0, ix.num_clusters, 17):
            members = cluster_of[h] == c
            size = ix.offsets[h, c + 1] - ix.offsets[h, c]
            assert members.sum() == size
            if size:
                assert torch.allclose(kh[h, members].mean(0), ix.centroids[h, c], atol=1e-5)


def test_cli_runs_without_writing(monkeypatch, capsys):
    def no_write(*a, **k):
        raise AssertionError("the test must not write results")
    monkeypatch.setattr(ba, "write_result", no_write)
    argv = ["--tokens", "2048", "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--queries", "1",
            "--needles", "1", "--trials", "1", "--device", "cpu", "--no-write"]
    assert ba.main(argv) == 0
    out = capsys.readouterr().out
    assert "wave-noest" in out and "quest" in out and "checks:" in out
