"""Attention accuracy of the wave index on synthetic long contexts, at equal budget.

    python benchmarks/bench_accuracy.py                  # CUDA: T=32768, Llama-3-8B heads, bf16
    python benchmarks/bench_accuracy.py --quick          # CPU: T=8192, fp32, about a minute

The context (per trial, one layer): keys are a mixture of topic centres (about T/64 of them, in
runs along the sequence as topics are in text) plus per-token noise plus a common-mode offset
shared by every key of a head (real keys have one; the index must centre it away); values are
random. Each decode query targets its own needles: `--needles` passages of `--needle-len`
consecutive tokens whose keys point along the query's direction (per KV head; the query heads of
one GQA group share the target), so they dominate that query's attention.

Systems, each attending the same steady zone (sink + local window + decoded tokens):
  full        the engine's full-attention backend (its error is the numeric floor);
  wave        the wave backend with the default WaveConfig (retrieval 1.8%, estimation 23.2%);
  wave-noest  the same with the estimation zone off;
  quest       Quest-style page top-k implemented here: pages of 16 tokens, a page's score is the
              upper bound sum_d max(q_d min_d, q_d max_d) of q.k over its keys (max or sum over
              the GQA group), exact attention over the top pages; as many pages as wave retrieves
              clusters (16 tokens nominal each), i.e. the same 1.8% token budget.

Metrics, against exact fp32 attention over the same (dtype-rounded) K/V:
  recall      share of the query's needle tokens that are attended exactly (for wave: the
              retrieved clusters, found by replaying the backend's own ranking on its index; the
              replayed three-zone output is checked against the backend's, `replay_err`);
  rel_err     ||out - ref|| / ||ref|| per query head, averaged;
  exact_mass  share of the exact softmax mass on the exactly attended tokens; est_mass: on the
              tokens of the estimated clusters.

Reading the numbers: ||ref|| is small where attention is spread over many random values, so
rel_err can exceed 1 when much mass is dropped. The scenario knobs (all `--` options) move the
systems a lot: with tightly clustered keys (`--centre-norm 16`) or single-token needles
(`--needle-len 1 --needles 16`) a page mixes topics and its min/max bound is loose, and Quest
misses needles; at the defaults Quest finds them all and is close to wave without estimation.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, table, write_result  # noqa: E402

from retroinfer.attention import make_backend  # noqa: E402
from retroinfer.config import ModelConfig, WaveConfig  # noqa: E402
from retroinfer.kernels.centroid_scores import centroid_scores  # noqa: E402
from retroinfer.kernels.select import select_zones  # noqa: E402

PAGE = 16
SYSTEMS = ("full", "wave", "wave-noest", "quest")


@dataclass(frozen=True)
class Scenario:
    """One synthetic context (all norms in key space; logits are q.k / sqrt(D))."""
    tokens: int = 32768
    heads: int = 32              # query heads
    kv_heads: int = 8
    head_dim: int = 128
    queries: int = 4             # decode steps per trial, each with its own needles
    needles: int = 4             # needle passages per query (per KV head: its own direction)
    needle_len: int = 16         # consecutive tokens per passage
    tokens_per_topic: int = 64   # topic centres = tokens / this
    run_len: float = 32.0        # mean length of a topic run along the sequence
    centre_norm: float = 8.0     # topic centre norm (logit spread ~ centre_norm / sqrt(D))
    noise: float = 0.5           # per-dimension key noise
    offset_norm: float = 24.0    # common-mode key offset of each head
    needle_logit: float = 7.0    # q.k / sqrt(D) of a needle key for its query (before noise)
    query_cos: float = 0.8       # cosine of a query with its needle direction

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def make_context(sc: Scenario, seed: int, sink: int, window: int) -> dict:
    """Keys/values of the prompt (T tokens) and the decoded tokens (one per query), the queries,
    and the needle positions [Q, needles * needle_len] (shared by the KV heads). CPU fp32."""
    g = torch.Generator().manual_seed(seed)
    T, Q, H, G, D = sc.tokens, sc.queries, sc.kv_heads, sc.group, sc.head_dim
    n = T + Q
    # topic runs: geometric lengths, a uniformly random topic each
    M = max(1, T // sc.tokens_per_topic)
    p = min(1.0 - 1e-9, 1.0 / sc.run_len)                                          # geometric, mean run_len
    u = torch.rand(2 * n, generator=g).clamp_min(1e-12)
    runs = 1 + (u.log() / math.log1p(-p)).floor().long() if p < 1 else torch.ones(2 * n, dtype=torch.long)
    topic = torch.repeat_interleave(torch.randint(0, M, (runs.numel(),), generator=g), runs)[:n]
    centres = sc.centre_norm * _unit(torch.randn(H, M, D, generator=g))
    offset = sc.offset_norm * _unit(torch.randn(H, 1, D, generator=g))
    k = offset + centres[:, topic] + sc.noise * torch.randn(H, n, D, generator=g)     # [H, n, D]
    v = torch.randn(H, n, D, generator=g)
    # needles: non-overlapping passages inside the indexed region [sink, T - window)
    L = sc.needle_len
    slots = (T - window - sink) // L
    need = Q * sc.needles
    assert need <= slots // 2, "too many needles for the context"
    start = (sink + L * torch.randperm(slots, generator=g)[:need]).view(Q, sc.needles)
    pos = (start[..., None] + torch.arange(L)).view(Q, -1)                         # [Q, P*L]
    target = _unit(torch.randn(Q, H, D, generator=g))                              # per query, per KV head
    alpha = sc.needle_logit / sc.query_cos        # |q| = sqrt(D): q.k / sqrt(D) = alpha * query_cos
    for j in range(Q):
        noise = sc.noise * torch.randn(H, pos.shape[1], D, generator=g)
        k[:, pos[j]] = offset + alpha * target[j][:, None] + noise
    # queries: the target direction plus an independent direction per query head, |q| = sqrt(D)
    w = _unit(torch.randn(Q, H, G, D, generator=g))
    w = _unit(w - (w * target[:, :, None]).sum(-1, keepdim=True) * target[:, :, None])
    s = math.sqrt(1 - sc.query_cos ** 2)
    q = math.sqrt(D) * (sc.query_cos * target[:, :, None] + s * w)                  # [Q, H, G, D]
    return {"k": k.transpose(0, 1).contiguous(), "v": v.transpose(0, 1).contiguous(),
            "q": q.reshape(Q, H * G, D), "needle_pos": pos}


# -- Quest-style page top-k -------------------------------------------------------------------
def quest_page_minmax(k: torch.Tensor, page: int = PAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """k [H, N, D] -> elementwise min and max over each page of `page` rows: [H, ceil(N/page), D]."""
    H, N, D = k.shape
    P = -(-N // page)
    kf = k.float()
    pad = P * page - N
    lo = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("inf")).view(H, P, page, D).amin(2)
    hi = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("-inf")).view(H, P, page, D).amax(2)
    return lo, hi


def quest_page_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """q [H, G, D], kmin/kmax [H, P, D] -> [H, G, P] = sum_d max(q_d kmin_d, q_d kmax_d), an upper
    bound of q.k for every key of the page (q_d > 0 picks the max, q_d < 0 the min)."""
    qf = q.float()
    return (torch.einsum("hgd,hpd->hgp", qf.clamp(min=0), kmax)
            + torch.einsum("hgd,hpd->hgp", qf.clamp(max=0), kmin))


def quest_select(q: torch.Tensor, k_mid: torch.Tensor, pages: int, gqa: str = "max") -> torch.Tensor:
    """Top `pages` pages of k_mid [H, N, D] for q [H, G, D]; returns a token mask [H, N]."""
    lo, hi = quest_page_minmax(k_mid)
    b = quest_page_bounds(q, lo, hi)
    score = b.amax(1) if gqa == "max" else b.sum(1)                                # [H, P]
    top = score.topk(min(pages, score.shape[1]), dim=-1).indices
    sel = torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True)
    return sel.repeat_interleave(PAGE, dim=1)[:, :k_mid.shape[1]]


# -- exact references -------------------------------------------------------------------------
def masked_attention(q, k, v, mask, scale, extra=None):
    """fp32 softmax attention of q [H, G, D] over k, v [H, N, D] where mask [H, N]; `extra`
    (keys [H, E, D], values [H, E, D], log weights [H, E]) adds weighted entries. -> out, probs."""
    s = torch.einsum("hgd,hnd->hgn", q.float(), k.float()) * scale
    s = s.masked_fill(~mask[:, None], float("-inf"))
    vals = v.float()
    if extra is not None:
        ek, ev, lw = extra
        se = torch.einsum("hgd,hed->hge", q.float(), ek.float()) * scale + lw[:, None]
        s, vals = torch.cat([s, se], -1), torch.cat([vals, ev.float()], 1)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hgn,hnd->hgd", p, vals), p


def index_positions(ix, k_mid: torch.Tensor, v_mid: torch.Tensor) -> torch.Tensor:
    """Cluster of every indexed token [H, N] (long), recovered by matching the index's
    cluster-sorted rows to the original ones (fingerprint, then exact row equality)."""
    H, N, D = k_mid.shape
    r = torch.randn(D, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(k_mid.device)
    fo = (k_mid.double() * r).sum(-1)
    fi = (ix.keys.double() * r).sum(-1)
    so, order = fo.sort(dim=1)
    at = torch.searchsorted(so, fi).clamp(1, N - 1)
    left_closer = (fi - so.gather(1, at - 1)).abs() <= (so.gather(1, at) - fi).abs()
    pos = order.gather(1, torch.where(left_closer, at - 1, at))                    # index row -> token
    rows = pos[..., None].expand(-1, -1, D)
    assert torch.equal(k_mid.gather(1, rows), ix.keys) and torch.equal(v_mid.gather(1, rows), ix.values), \
        "index rows do not match the prompt's tokens"
    assert (pos.sort(1).values == torch.arange(N, device=pos.device)).all(), "rows are not a permutation"
    sizes = (ix.offsets[:, 1:] - ix.offsets[:, :-1]).long()
    ids = torch.arange(sizes.shape[1], device=pos.device).repeat(H)
    cluster_of_row = torch.repeat_interleave(ids, sizes.flatten()).view(H, N)
    return torch.empty_like(pos).scatter_(1, pos, cluster_of_row)


def wave_zones(ix, cluster_of: torch.Tensor, q: torch.Tensor, r: int, e: int, scale: float):
    """Replay the backend's ranking for q [H, G, D] on its index: the same centroid scores and
    zone selection. Returns token masks [H, N] of the retrieved and the estimated clusters, and
    the estimation entries (centroids, value means, log sizes) in the backend's order."""
    counts = torch.full((1,), ix.num_clusters, dtype=torch.int32, device=q.device)
    scores = centroid_scores(q[None], ix.centroids[None], counts, scale)
    zone = [torch.full((1,), x, device=q.device) for x in (r, e)]
    ret, est = (ids[0].long() for ids in select_zones(scores, counts, *zone, r, e))
    rows = est[..., None].expand(-1, -1, q.shape[-1])
    entries = (ix.centroids.gather(1, rows), ix.value_mean.gather(1, rows), ix.log_size.gather(1, est))
    return _isin_rows(cluster_of, ret), _isin_rows(cluster_of, est), entries


def _isin_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [H, N] long, ids [H, R] -> [H, N] bool: x[h, n] in ids[h]."""
    C = int(max(x.max().item(), ids.max().item() if ids.numel() else 0)) + 1
    hit = torch.zeros(x.shape[0], C, dtype=torch.bool, device=x.device)
    if ids.numel():
        hit.scatter_(1, ids, True)
    return hit.gather(1, x)


def _decode_all(backend, T, q, k, v, seq="s"):
    """Prefill T tokens, then one decode step per query (appending k[T + t], v[T + t])."""
    backend.reserve(seq, T + q.shape[0])
    backend.write_prefill(0, seq, k[:T], v[:T], 0)
    outs = []
    for t in range(q.shape[0]):
        plan = backend.plan_decode([seq])
        outs.append(backend.decode(0, plan, q[t:t + 1], k[T + t:T + t + 1], v[T + t:T + t + 1]))
    return torch.cat(outs)


# -- one trial --------------------------------------------------------------------------------
def run_trial(sc: Scenario, seed: int, device, dtype, wave: WaveConfig, quest_gqa: str = "max",
              quest_pages: int | None = None) -> dict:
    """All systems on one synthetic context. Returns {system: {metric: [per query values]}}.
    `quest_pages` overrides Quest's budget (default: as many pages as wave retrieves clusters)."""
    dev = torch.device(device)
    ctx = make_context(sc, seed, wave.sink, wave.window)
    T, Q, H, G, D = sc.tokens, sc.queries, sc.kv_heads, sc.group, sc.head_dim
    k, v, q = (ctx[n].to(dev, dtype) for n in ("k", "v", "q"))
    needle_pos = ctx["needle_pos"].to(dev)
    cfg = ModelConfig(arch="llama", vocab_size=1, hidden_size=sc.heads * D, intermediate_size=1,
                      num_layers=1, num_heads=sc.heads, num_kv_heads=H, head_dim=D)
    scale = D ** -0.5
    budget = 4 * (T + Q + wave.sink + wave.window + wave.update_every) * cfg.kv_bytes_per_token(dtype)
    lo, hi = wave.sink, T - wave.window                                           # indexed region
    kh, vh = k.transpose(0, 1), v.transpose(0, 1)                                 # [H, T + Q, D]
    k_mid, v_mid = kh[:, lo:hi].contiguous(), vh[:, lo:hi].contiguous()

    # the engine's backends: one layer, one sequence, prefill then Q decode steps
    outs, index, timing = {}, {}, {}
    for name in ("full", "wave", "wave-noest"):
        w = wave if name != "wave-noest" else replace(wave, estimation_frac=0.0)
        backend = make_backend("full" if name == "full" else "wave", cfg, range(1), dev, dtype, budget,
                               w, max_seqs=1)
        t0 = time.perf_counter()
        outs[name] = _decode_all(backend, T, q, k, v).view(Q, H, G, D).float()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        timing[name] = time.perf_counter() - t0
        if name != "full":
            ix = backend.index_of("s", 0)
            assert ix.num_tokens == hi - lo, "the backend indexed an unexpected range"
            index[name] = (ix, index_positions(ix, k_mid, v_mid), *w.zone_sizes(ix.num_clusters))

    res = {s: {"rel_err": [], "recall": [], "exact_mass": [], "est_mass": [], "tokens": []} for s in SYSTEMS}
    res["wave"]["replay_err"], res["wave-noest"]["replay_err"] = [], []
    needle_mass = []
    for t in range(Q):
        n = T + t + 1
        qt, kt, vt = q[t].view(H, G, D), kh[:, :n], vh[:, :n]
        everything = torch.ones(H, n, dtype=torch.bool, device=dev)
        ref, p_ref = masked_attention(qt, kt, vt, everything, scale)
        steady = torch.zeros(H, n, dtype=torch.bool, device=dev)
        steady[:, :lo] = steady[:, hi:] = True
        needles = needle_pos[t]
        needle_mass.append(p_ref[..., needles].sum(-1).mean().item())

        def record(name, out, exact, est=None):
            m = res[name]
            m["rel_err"].append(((out - ref).norm(dim=-1) / ref.norm(dim=-1)).mean().item())
            m["recall"].append(exact[:, needles].float().mean().item())
            m["exact_mass"].append((p_ref * exact[:, None]).sum(-1).mean().item())
            m["est_mass"].append(0.0 if est is None else (p_ref * est[:, None]).sum(-1).mean().item())
            m["tokens"].append(exact[:, lo:hi].sum(-1).float().mean().item())

        record("full", outs["full"][t], everything)
        for name in ("wave", "wave-noest"):
            ix, cluster_of, r, e = index[name]
            retrieved, estimated, entries = wave_zones(ix, cluster_of, qt, r, e, scale)
            exact, est = steady.clone(), torch.zeros_like(steady)
            exact[:, lo:hi], est[:, lo:hi] = retrieved, estimated
            replay, _ = masked_attention(qt, kt, vt, exact, scale, entries)
            res[name]["replay_err"].append(((outs[name][t] - replay).norm() / replay.norm()).item())
            record(name, outs[name][t], exact, est if e else None)
        exact = steady.clone()
        pages = quest_pages if quest_pages is not None else index["wave"][2]
        exact[:, lo:hi] = quest_select(qt, k_mid, pages, quest_gqa)
        record("quest", masked_attention(qt, kt, vt, exact, scale)[0], exact)
    ix, _, r, e = index["wave"]
    res.update(needle_mass=needle_mass, timing_s=timing, clusters=ix.num_clusters,
               retrieval_clusters=r, estimation_clusters=e)
    return res


def run_accuracy(sc: Scenario, trials: int = 1, seed: int = 0, device="cpu", dtype=torch.float32,
                 wave: WaveConfig | None = None, quest_gqa: str = "max",
                 quest_pages: int | None = None) -> dict:
    """The benchmark's core: `trials` contexts; per system the mean (and worst) of each metric."""
    wave = wave or WaveConfig()
    trial_res = [run_trial(sc, seed + i, device, dtype, wave, quest_gqa, quest_pages) for i in range(trials)]
    systems = {}
    for s in SYSTEMS:
        agg = {}
        for metric in trial_res[0][s]:
            vals = [x for tr in trial_res for x in tr[s][metric]]
            agg[metric] = sum(vals) / len(vals)
            if metric in ("recall",):
                agg["recall_min"] = min(vals)
            if metric in ("rel_err", "replay_err"):
                agg[metric + "_max"] = max(vals)
        if s in trial_res[0]["timing_s"]:
            agg["prefill_decode_s"] = sum(tr["timing_s"][s] for tr in trial_res) / len(trial_res)
        systems[s] = agg
    needle_mass = [x for tr in trial_res for x in tr["needle_mass"]]
    return {"systems": systems, "needle_mass": sum(needle_mass) / len(needle_mass),
            "clusters": trial_res[0]["clusters"], "retrieval_clusters": trial_res[0]["retrieval_clusters"],
            "estimation_clusters": trial_res[0]["estimation_clusters"],
            "timing_s": [tr["timing_s"] for tr in trial_res]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small CPU-sized run (T=8192, 1 trial)")
    for f in fields(Scenario):
        note = " (8192 with --quick)" if f.name == "tokens" else ""
        ap.add_argument("--" + f.name.replace("_", "-"), type={"int": int, "float": float}[f.type],
                        default=None, help=f"default {f.default}{note}")
    ap.add_argument("--trials", type=int, default=None, help="contexts (default 3; 1 quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--quest-gqa", default="max", choices=["max", "sum"])
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/")
    ap.add_argument("--name", default="accuracy")
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        a.dtype or ("bfloat16" if device.startswith("cuda") else "float32")]
    sc = Scenario(**{f.name: getattr(a, f.name) for f in fields(Scenario) if getattr(a, f.name) is not None})
    if a.quick and a.tokens is None:
        sc = replace(sc, tokens=8192)
    wave = WaveConfig()
    trials = a.trials or (1 if a.quick else 3)
    t0 = time.perf_counter()
    out = run_accuracy(sc, trials, a.seed, device, dtype, wave, a.quest_gqa)
    wall = time.perf_counter() - t0
    rows = [dict(system=s, **out["systems"][s]) for s in SYSTEMS]
    print(f"T={sc.tokens} Hq={sc.heads} Hkv={sc.kv_heads} D={sc.head_dim} {str(dtype)[6:]} on {device}; "
          f"{trials} trial(s) x {sc.queries} queries; clusters {out['clusters']} (retrieval "
          f"{out['retrieval_clusters']}, estimation {out['estimation_clusters']}); needles take "
          f"{out['needle_mass']:.1%} of the attention mass; {wall:.1f} s")
    table(rows, ["system", "recall", "recall_min", "rel_err", "rel_err_max", "exact_mass", "est_mass",
                 "tokens", "replay_err_max", "prefill_decode_s"])
    s = out["systems"]
    checks = {"wave_recall_1": s["wave"]["recall_min"] == 1.0,
              "estimation_lowers_error": s["wave"]["rel_err"] < s["wave-noest"]["rel_err"],
              "wave_beats_quest": s["wave"]["rel_err"] < s["quest"]["rel_err"]}
    print("checks:", " ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in checks.items()))
    if not a.no_write:
        write_result(a.name, {"scenario": asdict(sc), "wave": asdict(wave), "dtype": str(dtype)[6:],
                              "device": device, "trials": trials, "seed": a.seed, "quest_page": PAGE,
                              "quest_gqa": a.quest_gqa, "wall_s": wall, "checks": checks, **out,
                              "env": environment()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
