"""Time each Triton kernel of ``retroinfer.kernels`` against its torch reference on CUDA.

Shapes are Llama-3-8B attention (Hq=32, Hkv=8, D=128, bf16) at the sizes the wave index sees.
Times are medians of ``triton.testing.do_bench``; bandwidth counts the bytes a kernel must move
(K and V read for attention, centroids read for scoring, rows read+written for gather).
Prints a table and writes ``benchmarks/results/kernels_<gpu>.json`` with the GPU, versions and
command line.

    python benchmarks/bench_kernels.py            # full run (a few minutes)
    python benchmarks/bench_kernels.py --quick    # fewer sizes, shorter timing
    python benchmarks/bench_kernels.py --only estimate_decode
    python benchmarks/bench_kernels.py --only select --out benchmarks/results/kernels_select_<gpu>.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 64
G = HQ // HKV
DT = torch.bfloat16


def timer(quick: bool):
    from triton.testing import do_bench

    def run(fn):
        return do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median")
    return run


class Measure:
    """Fills a result row: eager and CUDA-graph times of the Triton call, and the torch time."""

    def __init__(self, quick: bool):
        self.t = timer(quick)
        self.tg = graph_timer(self.t)

    def __call__(self, row: dict, fn, ref=None, **extra) -> dict:
        row["triton_ms"] = self.t(fn)
        row["graph_ms"] = self.tg(fn)
        row["torch_ms"] = self.t(ref) if ref is not None else None
        for name, f in extra.items():
            row[f"{name}_ms"] = self.t(f)
        return row


def graph_timer(t, reps: int = 20):
    """Per-call time of ``fn`` replayed from a CUDA graph of ``reps`` calls: the GPU time alone,
    without Python/launch overhead (what a graph-captured decode step pays). None if capture fails."""
    def run(fn):
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(reps):
                    fn()
            return t(g.replay) / reps
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking
            print(f"  (CUDA graph capture failed: {e!r:.120})")
            return None
    return run


def bench_paged_decode(K, m, quick):
    rows = []
    ctxs = [32768, 131072]
    for ctx in ctxs:
        for B in [1, 8]:
            n_pages = math.ceil(ctx / PAGE)
            k_pages = torch.randn(B * n_pages, PAGE, HKV, D, device="cuda", dtype=DT)
            v_pages = torch.randn_like(k_pages)
            bt = torch.randperm(B * n_pages, device="cuda", dtype=torch.int32).view(B, n_pages)
            lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
            q = torch.randn(B, HQ, D, device="cuda", dtype=DT)
            scale = D ** -0.5
            nbytes = 2 * B * ctx * HKV * D * k_pages.element_size()
            row = {"kernel": "paged_decode", "config": f"B={B} ctx={ctx}", "bytes": nbytes}
            ref = None if quick and B * ctx > 131072 else (
                lambda: K.paged_decode_ref(q, k_pages, v_pages, bt, lens, scale))
            m(row, lambda: K.paged_decode(q, k_pages, v_pages, bt, lens, scale), ref)
            # Contiguous-KV SDPA: the speed a paged kernel should reach.
            kc = k_pages[bt.long()].view(B, -1, HKV, D).transpose(1, 2)
            vc = v_pages[bt.long()].view(B, -1, HKV, D).transpose(1, 2)
            del k_pages, v_pages
            kc, vc = kc.contiguous(), vc.contiguous()
            qs = q[:, :, None]
            row["sdpa_ms"] = m.t(lambda: torch.nn.functional.scaled_dot_product_attention(
                qs, kc, vc, scale=scale, enable_gqa=True))
            del kc, vc
            rows.append(row)
    return rows


def bench_weighted_decode(K, m, quick):
    rows = []
    for B, L in ([(1, 4096), (1, 20480)] if quick else [(1, 4096), (1, 20480), (8, 4096), (8, 20480)]):
        q = torch.randn(B, HKV, G, D, device="cuda", dtype=DT)
        k = torch.randn(B, HKV, L, D, device="cuda", dtype=DT)
        v = torch.randn_like(k)
        lens = torch.full((B, HKV), L, device="cuda", dtype=torch.int32)
        lw = torch.randn(B, HKV, L, device="cuda")
        nbytes = 2 * k.numel() * k.element_size() + lw.numel() * 4
        rows.append(m({"kernel": "weighted_decode", "config": f"B={B} L={L}", "bytes": nbytes},
                      lambda: K.weighted_decode(q, k, v, lens, lw, D ** -0.5),
                      lambda: K.weighted_decode_ref(q, k, v, lens, lw, D ** -0.5)))
    return rows


def bench_estimate_decode(K, m, quick):
    """The estimation zone of a wave decode step, C clusters per sequence, S slots: estimate_decode
    reading the cluster pool in place vs the path it replaces (WaveAttention's former torch
    gathers of centroids / value means / log sizes into an [S, H, E, D] buffer, then
    weighted_decode), timed as torch_ms; merge_ms adds the merge_states the new path needs."""
    from retroinfer.attention.wave import zone_caps
    from retroinfer.config import WaveConfig

    rows = []
    for S, C in ([(8, 8192)] if quick else [(8, 8192), (1, 65536), (8, 65536)]):
        r, e = WaveConfig().zone_sizes(C)
        R, E = zone_caps(r, e)                                    # the plan's caps
        q = torch.randn(S, HKV, G, D, device="cuda", dtype=DT)
        cen = torch.randn(HKV, S * C, D, device="cuda", dtype=DT)
        vm = torch.randn_like(cen)
        ls = torch.rand(HKV, S * C, device="cuda") * 4
        top = torch.rand(S, HKV, C, device="cuda").topk(R + E, dim=-1).indices   # local ids, ranked
        base = torch.arange(S, device="cuda") * C
        retrieve = torch.full((S,), r, device="cuda")
        estimate = torch.full((S,), e, device="cuda")
        lens = torch.full((S, HKV), E, device="cuda", dtype=torch.int32)
        other = (torch.randn(S, HKV, G, D, device="cuda"), torch.randn(S, HKV, G, device="cuda"))
        scale = D ** -0.5

        def new():
            return K.estimate_decode(q, cen, vm, ls, top, estimate, scale, base=base, start=retrieve, width=E)

        def old():
            k_x = torch.empty(S, HKV, E, D, device="cuda", dtype=DT)
            v_x = torch.empty_like(k_x)
            log_w = torch.empty(S, HKV, E, device="cuda")
            j = torch.arange(E, device="cuda")
            ids = top.gather(2, (retrieve[:, None, None] + j).clamp(max=top.shape[-1] - 1).expand(S, HKV, E)) \
                + base[:, None, None]
            sel = ids[..., None].expand(-1, -1, -1, D)
            k_x[:] = cen[None].expand(S, -1, -1, -1).gather(2, sel)
            v_x[:] = vm[None].expand(S, -1, -1, -1).gather(2, sel)
            log_w[:] = torch.where(j < estimate[:, None, None], ls[None].expand(S, -1, -1).gather(2, ids),
                                   float("-inf"))
            return K.weighted_decode(q, k_x, v_x, lens, log_w, scale)

        nbytes = S * HKV * e * (2 * D * cen.element_size() + top.element_size() + 4)
        rows.append(m({"kernel": "estimate_decode", "config": f"S={S} C={C} E={e}", "bytes": nbytes},
                      new, old, merge=lambda: K.merge_states(*other, *new())))
    return rows


def bench_centroid_scores(K, m, quick):
    """Config ``c<block_c>/w<warps>/st<stages>/v<waves>``: the logits pass's tile (centroid_scores.TUNE)."""
    cs = importlib.import_module("retroinfer.kernels.centroid_scores")   # the package's name is the function
    default = dict(cs.TUNE)
    tiles = [tuple(default.values())] if quick else \
        [(64, 4, 3, 4), (128, 4, 3, 4), (128, 8, 3, 4), (64, 4, 4, 4), (64, 4, 3, 8), (128, 8, 4, 8), (32, 4, 4, 8),
         (64, 8, 3, 8)]
    rows = []
    for B, C in ([(1, 8192), (1, 65536)] if quick else [(1, 8192), (1, 65536), (8, 8192), (32, 8192)]):
        q = torch.randn(B, HKV, G, D, device="cuda", dtype=DT)
        cen = torch.randn(B, HKV, C, D, device="cuda", dtype=DT)
        cnt = torch.full((B,), C, device="cuda", dtype=torch.int32)
        for tile in tiles:
            cs.TUNE.update(zip(("block_c", "num_warps", "num_stages", "waves"), tile))
            try:
                config = f"B={B} C={C} c{tile[0]}/w{tile[1]}/st{tile[2]}/v{tile[3]}"
                rows.append(m({"kernel": "centroid_scores", "config": config,
                               "bytes": cen.numel() * cen.element_size() + B * HKV * C * 4},
                              lambda: K.centroid_scores(q, cen, cnt, D ** -0.5),
                              lambda: K.centroid_scores_ref(q, cen, cnt, D ** -0.5)))
            finally:
                cs.TUNE.update(default)
    return rows


def bench_select(K, m, quick):
    """The wave zones' choice per decode step and layer: select_zones vs the sorted topk it
    replaces (torch_ms; topk_graph_ms: the same replayed from a CUDA graph, unsorted_ms: topk
    without the sort). S * HKV rows of W cluster scores, r = 1.8% and e = 23.2% of W
    (WaveConfig.zone_sizes), caps R, E rounded up as the decode plan does. Config ``row/k<k>``: the
    one-launch method with k keys per thread; ``b<block>/<warps>/s<splits>``: radix with that tile (select.TUNE; sauto:
    split rows as ``select_zones`` picks); ``ok``: the same sets as select_zones_ref."""
    import retroinfer.kernels.select as sel
    from retroinfer.attention.wave import zone_caps
    from retroinfer.config import WaveConfig

    rows = []
    # 32K b1; 128K b8, b32; 512K b1, b8; 1M b1
    for S, W in [(1, 2048), (8, 8192), (32, 8192), (1, 32768), (8, 32768), (1, 65536)]:
        r, e = WaveConfig().zone_sizes(W)
        R, E = zone_caps(r, e)
        sc = torch.randn(S, HKV, G, W, device="cuda").mul(2).softmax(-1).sum(2)   # like centroid_scores
        cnt = torch.full((S,), W, device="cuda", dtype=torch.int32)
        ret_n, est_n = torch.full((S,), r, device="cuda"), torch.full((S,), e, device="cuda")
        ref = [x.sort(-1).values for x in K.select_zones_ref(sc, cnt, ret_n, est_n, R, E)]
        default = dict(sel.TUNE)
        radix = ([(default["block"], default["num_warps"], None)] if quick else
                 [(1024, 4, None), (2048, 8, None), (4096, 8, None)])
        row_ok = [("row", 0, keys, None) for keys in ([32] if quick else [8, 16, 32, 64])] if W <= 2 ** 14 else []
        for method, block, warps, splits in row_ok + [("radix", *c) for c in radix]:
            if method == "row":    # `warps` is the row method's keys per thread
                sel.TUNE.update(row_keys=warps)
            else:
                sel.TUNE.update(block=block or default["block"], num_warps=warps or default["num_warps"])
            run = lambda: K.select_zones(sc, cnt, ret_n, est_n, R, E, splits, method=method)  # noqa: E731
            try:
                ok = all(torch.equal(a.sort(-1).values, b) for a, b in zip(run(), ref))
                config = f"row/k{warps}" if method == "row" else f"b{block}/{warps}/s{splits or 'auto'}"
                row = {"kernel": "select_zones", "config": f"{S * HKV}x{W} {config}",
                       "bytes": S * HKV * (W + R + E) * 4, "ok": ok}
                topk = lambda: sc.topk(R + E, dim=-1, sorted=True)    # noqa: E731
                m(row, run, topk, unsorted=lambda: sc.topk(R + E, dim=-1, sorted=False))
                row["topk_graph_ms"] = m.tg(topk)
            finally:
                sel.TUNE.update(default)
            if not ok:
                print(f"  select_zones {row['config']}: ids differ from select_zones_ref")
            rows.append(row)
    return rows


def bench_kmeans(K, m, quick):
    """The index build's k-means at 128K tokens: one iteration over 16 segments x 8 heads (512
    clusters each: assign, update, centroids), and the global assignment of all 131072 keys per
    head to its 8192 clusters. Assign rows sweep the tile (config
    ``n<block_n>/k<block_k>/w<warps>/s<stages>``, kmeans.TUNE)."""
    import retroinfer.kernels.kmeans as km

    rows = []
    default = dict(km.TUNE)
    tiles = ([(default["block_n"], default["block_k"], default["num_warps"], default["num_stages"])] if quick else
             [(256, 32, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (256, 64, 8, 3), (128, 32, 4, 3), (256, 32, 8, 4),
              (128, 128, 8, 3)])
    for S, N, Kc in [(32 if quick else 128, 8192, 512), (8, 131072, 8192)]:
        x = torch.randn(S, N, D, device="cuda", dtype=DT)
        cen = torch.nn.functional.normalize(torch.randn(S, Kc, D, device="cuda"), dim=-1).to(DT)
        ref = K.kmeans_assign_ref(x, cen)
        cfg = f"S={S} N={N} K={Kc}"
        flops = 2 * S * N * Kc * D
        for bn, bk, w, st in tiles:
            km.TUNE.update(block_n=bn, block_k=bk, num_warps=w, num_stages=st)
            name = f"{cfg} n{bn}/k{bk}/w{w}/s{st}"
            try:
                row = {"kernel": "kmeans_assign", "config": name, "flops": flops,
                       "bytes": x.numel() * 2, "agree": (K.kmeans_assign(x, cen) == ref).float().mean().item()}
                rows.append(m(row, lambda: K.kmeans_assign(x, cen),
                              (lambda: K.kmeans_assign_ref(x, cen)) if Kc <= 512 else None))
            except Exception as e:  # noqa: BLE001 - a tile that does not fit is a result, not a stop
                print(f"  kmeans_assign {name}: {e!r:.120}")
            finally:
                km.TUNE.update(default)
        if Kc <= 512:
            idx = K.kmeans_assign(x, cen)
            for br, w in [(default["update_rows"], default["update_warps"])] if quick else [(32, 4), (16, 2), (64, 4),
                                                                                           (64, 8), (128, 8), (32, 2)]:
                km.TUNE.update(update_rows=br, update_warps=w)
                rows.append(m({"kernel": "kmeans_update", "config": f"{cfg} r{br}/w{w}",
                               "bytes": x.numel() * 2 + S * Kc * D * 4},
                              lambda: K.kmeans_update(x, idx, Kc), lambda: K.kmeans_update_ref(x, idx, Kc)))
                km.TUNE.update(default)
            sums, counts = K.kmeans_update(x, idx, Kc)
            rows.append(m({"kernel": "kmeans_centroids", "config": cfg, "bytes": sums.numel() * 4 + cen.numel() * 2},
                          lambda: K.kmeans_centroids(sums, counts, cen), lambda: K.kmeans_centroids_ref(sums, counts, cen)))
    return rows


def bench_gather(K, m, quick):
    rows = []
    N, C = 131072, 8192
    for R in ([148] if quick else [148, 1180]):
        src_k = torch.randn(HKV, N, D, device="cuda", dtype=DT)
        src_v = torch.randn_like(src_k)
        cuts = torch.sort(torch.randperm(N - 1, device="cuda")[:C - 1] + 1)[0]
        off = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), N)]).int().expand(HKV, -1).contiguous()
        ids = torch.stack([torch.randperm(C, device="cuda")[:R] for _ in range(HKV)])
        Lmax = R * 64
        dk = torch.empty(HKV, Lmax, D, device="cuda", dtype=DT)
        dv = torch.empty_like(dk)
        n = int(K.gather_clusters(src_k, src_v, off, ids, dk, dv, 0).sum())
        rows.append(m({"kernel": "gather_clusters", "config": f"R={R} (~{n // HKV} rows/head)",
                       "bytes": 2 * 2 * n * D * 2},
                      lambda: K.gather_clusters(src_k, src_v, off, ids, dk, dv, 0),
                      lambda: K.gather_clusters_ref(src_k, src_v, off, ids, dk, dv, 0)))
    return rows


def bench_cluster_reorder(K, m, quick):
    """The index build's last pass at 128K tokens: 8 heads' KV into 8192 clusters each, with the
    clusters' mean keys and values. Config ``r<block_r>/w<warps>`` (cluster_layout.TUNE)."""
    import importlib
    cl = importlib.import_module("retroinfer.kernels.cluster_layout")
    T, C = 131004, 8192
    k, v = (torch.randn(T, HKV, D, device="cuda", dtype=DT) for _ in range(2))
    order, offsets = K.cluster_order(torch.randint(0, C, (HKV, T), device="cuda"), C)
    rows, default = [], dict(cl.TUNE)
    for br, w in [(default["block_r"], default["num_warps"])] if quick else [(16, 2), (16, 4), (32, 4), (8, 1), (8, 2)]:
        cl.TUNE.update(block_r=br, num_warps=w)
        try:
            rows.append(m({"kernel": "cluster_reorder", "config": f"T={T} C={C} r{br}/w{w}", "bytes": 4 * k.numel() * 2},
                          lambda: K.cluster_reorder(k, v, order, offsets),
                          lambda: K.cluster_reorder_ref(k, v, order, offsets)))
        finally:
            cl.TUNE.update(default)
    return rows


BENCHES = {"paged_decode": bench_paged_decode, "weighted_decode": bench_weighted_decode,
           "estimate_decode": bench_estimate_decode, "select": bench_select,
           "centroid_scores": bench_centroid_scores, "kmeans": bench_kmeans, "gather": bench_gather,
           "cluster_reorder": bench_cluster_reorder}


COLUMNS = ("triton_ms", "graph_ms", "torch_ms", "sdpa_ms")
HEADER = (f"{'kernel':<16} {'config':<28} {'triton ms':>10} {'graph ms':>9} {'torch ms':>9} "
          f"{'sdpa ms':>8} {'triton':>10} {'graph':>10} {'vs torch':>8}")


def fmt_rate(row, key):
    ms = row.get(key)
    if ms is None:
        return "-"
    if "flops" in row:
        return f"{row['flops'] / ms / 1e9:.0f}TF/s"
    return f"{row['bytes'] / ms / 1e6:.0f}GB/s"


def fmt_row(row) -> str:
    def ms(key):
        v = row.get(key)
        return "-" if v is None else f"{v:.3f}"
    speed = f"x{row['speedup']:.1f}" if row.get("speedup") else "-"
    extra = "".join(f"  {k}={ms(k)}" for k in row if k.endswith("_ms") and k not in COLUMNS)
    return (f"{row['kernel']:<16} {row['config']:<28} {ms('triton_ms'):>10} {ms('graph_ms'):>9} "
            f"{ms('torch_ms'):>9} {ms('sdpa_ms'):>8} {fmt_rate(row, 'triton_ms'):>10} "
            f"{fmt_rate(row, 'graph_ms'):>10} {speed:>8}{extra}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes and shorter timing")
    p.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run only these benchmarks")
    p.add_argument("--out", help="JSON path (default benchmarks/results/kernels_<gpu>.json)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "the CPU path of retroinfer.kernels is the torch reference itself.", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("bench_kernels.py needs triton installed", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("RETROINFER_TRITON_INTERPRET", None)
    try:
        import retroinfer.kernels as K
    except ImportError as e:
        print(f"cannot import retroinfer.kernels ({e}); install the repo: pip install -e . --no-deps",
              file=sys.stderr)
        return 2

    m = Measure(args.quick)
    rows = []
    print(HEADER)
    for name in args.only or list(BENCHES):
        for row in BENCHES[name](K, m, args.quick):
            for key in ("triton", "graph", "torch", "sdpa"):
                if row.get(f"{key}_ms") is not None:
                    rate = row.get("flops", row["bytes"]) / row[f"{key}_ms"] / 1e6
                    row[f"{key}_{'gflops' if 'flops' in row else 'GBps'}"] = rate
            if row.get("torch_ms"):
                row["speedup"] = row["torch_ms"] / row["triton_ms"]
            rows.append(row)
            print(fmt_row(row), flush=True)
            torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name()
    out = Path(args.out) if args.out else (
        RESULTS / f"kernels_{re.sub(r'[^a-z0-9]+', '_', gpu.lower()).strip('_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "command": " ".join([sys.executable] + sys.argv),
            "quick": args.quick, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "shape": {"Hq": HQ, "Hkv": HKV, "D": D, "page_size": PAGE, "dtype": str(DT)},
            "timing": "triton.testing.do_bench median, ms; graph_ms: the triton call replayed from a "
            "CUDA graph of 20 calls (GPU time without launch overhead)", "results": rows}
    out.write_text(json.dumps(meta, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
