"""Plot decode tokens/s against context length from bench_decode result files, one line per
file (e.g. full attention and RetroInfer from the same GPU run):

    python benchmarks/plot_decode.py benchmarks/results/sweep_full_*.json \
        benchmarks/results/sweep_wave_offload_*.json -o benchmarks/results/decode_vs_context.png

Each point is the best tokens/s over the batch sizes measured at that context (graph rows only
when both were measured); its batch size is written beside it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def best_by_context(rows: list[dict]) -> dict[int, dict]:
    best: dict[int, dict] = {}
    for r in rows:
        if "tokens_per_s" not in r or r.get("cuda_graphs") is False:
            continue
        if r["context"] not in best or r["tokens_per_s"] > best[r["context"]]["tokens_per_s"]:
            best[r["context"]] = r
    return best


def label(data: dict) -> str:
    if data.get("attention") == "wave":
        return "RetroInfer (wave index" + (" + wave buffer, KV in host memory)" if data.get("offload") else ")")
    return "full attention (KV on the GPU)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/decode_vs_context.png"))
    a = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    gpus, ticks = set(), set()
    for path in a.results:
        data = json.loads(path.read_text())
        gpus.add(data.get("env", {}).get("gpu", "?"))
        pts = sorted(best_by_context(data["rows"]).items())
        if not pts:
            continue
        xs, ys = [c / 1024 for c, _ in pts], [r["tokens_per_s"] for _, r in pts]
        ax.plot(xs, ys, marker="o", label=label(data))
        ticks.update(xs)
        for x, (_, r) in zip(xs, pts):
            ax.annotate(f"b{r['batch']}", (x, r["tokens_per_s"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("context (K tokens)")
    ax.set_ylabel("decode tokens/s (best batch)")
    ax.set_title(f"{data.get('model', '')} decode, {', '.join(sorted(gpus))}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
