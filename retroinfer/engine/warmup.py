"""The warm-up a replica runs before it takes traffic (and the in-process benchmarks run before they
time anything): the steps a user's requests will take, so that Triton compiles and CUDA-graph
captures of their shapes happen here and not inside a request.

A decode step's CUDA graph is keyed by the batch's power-of-two bucket and the backend's
`graph_key` (for wave, the slot bucket and the index caps, i.e. the context length), and the
scheduler runs a prefill chunk beside the running batch in most steps. So for each warm-up length
`max_batch` requests of that length go through the ordinary scheduling path, joining one at a time:
request i is prefilled beside the decode batch of the i before it (the mixed step) and then decodes
with them for `decode_steps` steps; that decodes at every batch size 1..max_batch. Then they are
aborted oldest first, `decode_steps` steps apart, which decodes the batch sizes on the way down
with the later (higher) slots still busy, as when a wave of requests finishes in arrival order.

That is on a GPU; on a CPU nothing compiles per shape, so one request of each length is the
warm-up (`default_batch`). The cost: `max_batch` prefills of each length, plus about `max_batch * (prefill steps per prompt +
2 * decode_steps)` small decode steps. A length whose request the KV cannot hold fails (the replica
serves without it); one of which fewer than `max_batch` fit covers the batch sizes that fit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from ..kernels import next_pow2
from .executor import default_device
from .protocol import Admission
from .sampling import SamplingParams
from .sequence import Phase, footprint_tokens


@dataclass
class WarmupReport:
    tokens: int                                        # the prompt length warmed up
    requests: int = 0                                  # warm-up requests that reached decode
    batches: list[int] = field(default_factory=list)   # the decode batch of every warm-up step, in order
    mixed_steps: int = 0                               # steps that prefilled beside a decode batch
    seconds: float = 0.0
    error: str | None = None
    graphs: list = field(default_factory=list)         # CUDA-graph keys the local stages hold afterwards

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({b for b in self.batches if b})

    @property
    def buckets(self) -> list[int]:
        """The padded batches the CUDA graphs were captured at; without graphs (CPU), the power-of-two
        buckets of the batches decoded at (a backend may cap them: wave at its slots)."""
        if self.graphs:
            return sorted({key[0] for key in self.graphs})
        return sorted({next_pow2(b) for b in self.batch_sizes})

    def summary(self) -> str:
        b = self.batch_sizes
        span = f"{b[0]}..{b[-1]}" if b else "none"
        return (f"{self.requests} request(s), decode batches {span}, {self.mixed_steps} mixed step(s), "
                f"{len(self.graphs)} graph(s), {self.seconds:.1f} s")


def _prompt(n: int, j: int, vocab: int) -> list[int]:
    return [1 + (7 * i + 13 * j) % (vocab - 1) for i in range(n)]


def graph_keys(engine) -> list:
    """The CUDA-graph keys (batch bucket, backend key) the in-process stages have captured."""
    keys = []
    for st in getattr(engine.executor, "stages", ()):
        if getattr(st, "graphs", None) is not None:
            keys += list(st.graphs.graphs)
    return keys


def default_batch(engine) -> int:
    """max_batch where the device compiles per shape (CUDA: graphs, Triton); 1 on a CPU, where
    no batch size costs more the first time and max_batch prefills would only slow the start
    (tiny, 2048 tokens, max_batch 16 on 2 cores: 71.5 s against 2.2 s)."""
    devices = list(engine.cfg.devices) or [engine.cfg.device or default_device()]   # the stages' devices
    return engine.cfg.max_batch if any(str(d).startswith("cuda") for d in devices) else 1


def warm_up_length(engine, tokens: int, batch: int | None = None, decode_steps: int = 2) -> WarmupReport:
    """The warm-up of one prompt length on an idle engine (see the module); leaves it idle."""
    t0 = time.perf_counter()
    B = batch or default_batch(engine)
    n = max(1, min(tokens, engine.max_model_len - 4))
    rep = WarmupReport(tokens=n)
    sch, vocab = engine.scheduler, engine.model_cfg.vocab_size
    per_join = 1 if sch.budget_tokens is None else math.ceil(n / sch.budget_tokens) + 1
    # enough tokens for the first request to live until the last has joined (fewer: the batch
    # shrinks early, which the report shows); at least 4, as a lone request's warm-up had
    max_tokens = max(4, min(engine.max_model_len - n, B * (per_join + decode_steps) + 4))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    seqs = []

    def step(joining=None) -> None:
        dec = sum(1 for s in sch.running if not s.aborted)
        if dec and joining is not None and joining.phase in (Phase.QUEUED, Phase.PREFILL):
            rep.mixed_steps += 1
        rep.batches.append(dec)
        for out in engine.step():
            if out.error and rep.error is None:
                rep.error = out.error

    try:
        for j in range(B):
            if j and sch.check(footprint_tokens(n, params)) is not Admission.ADMITTED:
                break                     # the KV holds no more of these: the batch sizes so far
            rid = f"__warmup_{n}_{j}__"
            engine.add_request(rid, _prompt(n, j, vocab), params)   # raises if it can never fit
            seq = engine.seqs[rid]
            seqs.append(seq)
            while seq.phase in (Phase.QUEUED, Phase.PREFILL) and engine.has_work():
                step(seq)
            if seq.phase is not Phase.DECODE:
                break                     # it failed (rep.error) or finished already
            rep.requests += 1
            for _ in range(decode_steps):
                step()
        for seq in seqs:                  # down again, oldest first
            engine.abort(seq.request_id)
            for _ in range(decode_steps):
                if engine.has_work():
                    step()
    except ValueError as e:               # refused at admission (e.g. more KV than the engine holds)
        rep.error = str(e)
    finally:
        for seq in seqs:
            engine.abort(seq.request_id)
        while engine.has_work():
            engine.step()
    if rep.error is None and not rep.requests:
        rep.error = "no warm-up request reached decode"
    rep.graphs = graph_keys(engine)
    rep.seconds = time.perf_counter() - t0
    return rep


def warm_up(engine, lengths, batch: int | None = None, decode_steps: int = 2, log=None) -> list[WarmupReport]:
    """`warm_up_length` for each length in turn; `log(report)` after each, if given."""
    reports = []
    for n in lengths:
        rep = warm_up_length(engine, n, batch, decode_steps)
        reports.append(rep)
        if log is not None:
            log(rep)
    return reports
