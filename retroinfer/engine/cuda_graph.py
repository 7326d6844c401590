"""CUDA graphs of a stage's decode step. At batch 1 a decode step is a few hundred small kernels
whose launch costs more than the GPU work; a replayed graph launches them all at once. One graph per
(padded batch, the backend's `graph_key`), the padded batch being the backend's `graph_batch`;
padded rows read and write only the backend's scratch space and are dropped."""
from __future__ import annotations

import torch

from ..side_stream import SideStream


class _Graph:
    def __init__(self, stage, batch: int, plan, x_like: torch.Tensor):
        dev = stage.device
        self.x = torch.zeros((batch,) + x_like.shape[1:], dtype=x_like.dtype, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        self.plan = stage.backend.static_plan(batch, plan)
        self.graph = torch.cuda.CUDAGraph()
        self.out: torch.Tensor | None = None

    def load(self, backend, plan, x, positions) -> None:
        """x and positions may be on the host (the copy then goes straight into the graph's
        buffers; a pageable source is staged by the driver before the call returns)."""
        B = x.shape[0]
        self.x[:B].copy_(x, non_blocking=True)
        self.positions[:B].copy_(positions, non_blocking=True)
        backend.load_static_plan(self.plan, plan)


class DecodeGraphs:
    def __init__(self, stage):
        self.stage = stage
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.last: _Graph | None = None    # the graph of the latest step (benchmarks replay it alone)

    def run(self, plan, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The step's output is a view of the graph's output buffer, valid until this stage's next
        step (whose replay rewrites it): not cloned, because every consumer is done with it by
        then, in stream order or on the host: the next stage copies it into its own input, the
        sampler reduces it and reads the tokens back (`.tolist()`), a Ray stage copies it to the
        host. A caller that keeps a step's output across steps must clone it."""
        key = (self.stage.backend.graph_batch(x.shape[0]), self.stage.backend.graph_key(plan))
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(key[0], plan, x, positions)
        g.load(self.stage.backend, plan, x, positions)
        g.graph.replay()
        self.last = g
        return g.out[:x.shape[0]]

    def _capture(self, batch: int, plan, x, positions) -> _Graph:
        g = _Graph(self.stage, batch, plan, x)
        g.load(self.stage.backend, plan, x, positions)
        body = lambda: self.stage.decode_body(g.x, g.positions, g.plan)  # noqa: E731
        side = SideStream(self.stage.device)
        with side.fork():      # warm-up compiles the Triton kernels outside capture;
            body()             # its KV writes repeat the step's own: idempotent
        side.join()
        with torch.cuda.graph(g.graph, pool=self.pool):
            g.out = body()
        return g
