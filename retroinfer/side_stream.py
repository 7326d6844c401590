"""A second CUDA stream for work that may overlap the current stream's (a no-op on CPU)."""
from __future__ import annotations

import contextlib

import torch


class SideStream:
    """``with side.fork():`` queues work on the side stream after everything queued so far on the
    current stream; ``join()`` makes the current stream wait for all of it. Capturable in a CUDA
    graph (the fork and the join are the graph's branches).

    Memory: a tensor the side work reads must stay alive until the join, or be
    ``record_stream``-ed onto ``side.stream`` (the host pool's offload copies do that). A block
    the side work frees is reused by later side work only, which a later ``fork`` orders after
    the current stream's reads of it."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def fork(self):
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            yield

    def join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
