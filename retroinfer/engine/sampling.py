"""Sampling parameters (validated) and the batched sampler."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5       # a temperature below this is greedy (vLLM's _SAMPLING_EPS)
MIN_TEMPERATURE = 1e-2    # and one above it is at least this (vLLM's _MAX_TEMP): logits / 1e-40 are inf
SEED_RANGE = (-2**63, 2**63 - 1)    # int64, as vLLM; torch.Generator.manual_seed takes no more


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0       # 0 = greedy
    top_k: int = 0                 # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        """Validates, then clamps the temperature: below GREEDY_BELOW it is 0 (greedy), else at
        least MIN_TEMPERATURE, so that no accepted value can overflow the sampler."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        problems = [
            (_is_int(self.max_tokens) and self.max_tokens >= 1, f"max_tokens must be >= 1 (got {self.max_tokens})"),
            (math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0 and finite (got {self.temperature})"),
            (_is_int(self.top_k) and self.top_k >= 0, f"top_k must be >= 0 (got {self.top_k})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
             f"seed must be an integer in [-2^63, 2^63 - 1] (got {self.seed})"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (all(_is_int(t) for t in self.stop_token_ids), "stop_token_ids must be integers"),
        ]
        for ok, msg in problems:
            if not ok:
                raise ValueError(msg)
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        elif self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class SparseLogits:
    """A decode step's logits as far as the sampler needs them: every row's argmax (all a greedy
    row takes) and the whole rows of those that sample. An executor whose logits are far away (the
    last stage of a pipeline) returns this instead of [B, V], so only token ids cross for greedy
    rows; the tokens are those of the whole logits, since a greedy row takes their argmax."""
    argmax: torch.Tensor                       # [B] int64
    rows: dict[int, torch.Tensor]              # batch row -> its logits [V] float32

    def __len__(self) -> int:
        return self.argmax.shape[0]


class Sampler:
    """One token per row of logits [B, V] (float32), or of `SparseLogits`. Each request keeps its
    own generator, so a seeded request gives the same tokens whatever else shares its batch."""

    def __init__(self, device: torch.device):
        self.device = device

    def generator(self, seed: int | None) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed if seed is not None else torch.seed())
        return g

    def __call__(self, logits: torch.Tensor | SparseLogits, params: list[SamplingParams],
                 generators: list[torch.Generator], errors: dict[int, Exception] | None = None) -> list[int]:
        """`errors`, when given, receives {row: exception} for rows whose sampling raised (their
        token is then meaningless) instead of the exception ending the whole batch."""
        sparse = isinstance(logits, SparseLogits)
        out = logits.argmax.clone() if sparse else logits.argmax(dim=-1)
        for i, p in enumerate(params):
            if not p.greedy:
                try:
                    row = logits.rows[i] if sparse else logits[i]
                    out[i] = self._sample_row(row, p, generators[i])
                except Exception as e:    # noqa: BLE001 - that row's: its parameters, its logits
                    if errors is None:
                        raise
                    errors[i] = e
        if not out.is_cuda:
            return out.tolist()
        # Wait for the step in Event.synchronize, which releases the GIL (a direct .tolist() holds
        # it through the wait): the server's event loop streams the last tokens meanwhile.
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return host.tolist()

    @staticmethod
    def _sample_row(row: torch.Tensor, p: SamplingParams, g: torch.Generator) -> torch.Tensor:
        row = row / p.temperature
        if p.top_k > 0:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, idx = row.sort(descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= p.top_p   # keep the smallest prefix reaching top_p
            drop[0] = False     # and the top token always: a top_p below float32's least (1e-300) is 0
            row = row.scatter(0, idx, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(row.softmax(-1), 1, generator=g)[0]
