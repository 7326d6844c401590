"""The bytes a decode step must move, zone by zone, and the time that takes at the card's
bandwidth measured in the same run: the floor no kernel can beat, against which a measured step
is `achieved / floor`.

Per sequence, layer and KV head, wave attention's step must read
- the steady zone: keys and values of its sink, window and decoded-but-not-indexed tokens;
- every cluster's centroid, to score them (the estimation zone then reuses those scores);
- the retrieval zone: the keys and values of its clusters' rows (on average indexed tokens /
  clusters rows a cluster);
- the estimation zone: each cluster's value mean and log weight;
and the model's weights once a step. Scores and zone ids that kernels write and read back are the
implementation's, not the floor's. Offloaded (the wave buffer), the retrieved rows that miss the GPU
cluster cache cross PCIe instead of HBM: the two links work at once, so the floor is the slower
of the two. Full attention reads every cached key and value.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

LOG_WEIGHT_BYTES = 4       # float32 log size per cluster


@dataclass(frozen=True)
class WaveSeq:
    """One sequence's index as a decode step sees it (the same in every layer)."""
    clusters: int
    indexed_tokens: int
    retrieve: int            # clusters attended exactly
    estimate: int            # clusters estimated from their means
    steady_rows: int         # sink + window + decoded tokens not yet indexed, this step's included


@dataclass
class StepBytes:
    weights: int = 0
    steady: int = 0
    centroids: int = 0
    retrieval: int = 0
    estimation: int = 0
    kv: int = 0              # full attention: every cached key and value
    pcie: int = 0            # offload: retrieved rows read from host memory

    @property
    def hbm(self) -> int:
        return self.weights + self.steady + self.centroids + self.retrieval + self.estimation + self.kv

    def floor_ms(self, hbm_bytes_per_s: float, pcie_bytes_per_s: float | None = None) -> float:
        t = self.hbm / hbm_bytes_per_s
        if self.pcie and pcie_bytes_per_s:
            t = max(t, self.pcie / pcie_bytes_per_s)
        return t * 1e3

    def zone_ms(self, hbm_bytes_per_s: float, pcie_bytes_per_s: float | None = None) -> dict[str, float]:
        """Each zone's bytes over its link, in ms (what that zone alone would take at the floor)."""
        out = {k: v / hbm_bytes_per_s * 1e3 for k, v in asdict(self).items() if k != "pcie" and v}
        if self.pcie and pcie_bytes_per_s:
            out["pcie"] = self.pcie / pcie_bytes_per_s * 1e3
        return out

    def __add__(self, other: "StepBytes") -> "StepBytes":
        return StepBytes(**{k: v + getattr(other, k) for k, v in asdict(self).items()})


def decode_weight_bytes(model_cfg, dtype) -> int:
    """The weights a decode step reads: every layer's and the output projection's; of an untied
    input embedding only the batch's rows, left out."""
    untied = 0 if model_cfg.tie_word_embeddings else model_cfg.vocab_size * model_cfg.hidden_size * dtype.itemsize
    return model_cfg.weight_bytes(dtype) - untied


def wave_step_bytes(seqs: list[WaveSeq], num_kv_heads: int, head_dim: int, elem: int, layers: int = 1,
                    pcie_bytes: int = 0) -> StepBytes:
    """The attention bytes of one wave decode step over `layers` layers (weights not included).
    `pcie_bytes`: retrieved keys and values read from host memory in the step (the engine's
    `pcie_bytes_per_step`); they move from HBM's retrieval bytes to PCIe's."""
    heads = num_kv_heads * layers
    row = head_dim * elem * heads                         # one key (or value) in every KV head and layer
    b = StepBytes()
    for s in seqs:
        per_cluster = s.indexed_tokens / s.clusters if s.clusters else 0
        b.steady += s.steady_rows * 2 * row
        b.centroids += s.clusters * row
        b.retrieval += int(s.retrieve * per_cluster * 2 * row)
        b.estimation += s.estimate * (row + LOG_WEIGHT_BYTES * heads)
    moved = min(b.retrieval, int(pcie_bytes))
    b.retrieval -= moved
    b.pcie = moved
    return b


def full_step_bytes(lengths: list[int], num_kv_heads: int, head_dim: int, elem: int, layers: int = 1) -> StepBytes:
    """Full attention: every cached key and value of every sequence, this step's token included."""
    return StepBytes(kv=sum(lengths) * num_kv_heads * head_dim * elem * 2 * layers)


def wave_seqs(backend, seq_ids) -> list[WaveSeq]:
    """The `WaveSeq`s of sequences in a wave backend (`retroinfer.attention.wave`), as its next
    decode step will see them."""
    out = []
    for sid in seq_ids:
        st = backend.seqs[sid]
        r, e = backend.wave.zone_sizes(st.clusters) if st.clusters else (0, 0)
        out.append(WaveSeq(st.clusters, st.indexed, r, e, st.steady + 1))
    return out
