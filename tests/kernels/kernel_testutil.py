"""Helpers shared by the kernel tests (imported by basename: pytest puts this folder on sys.path)."""

import zlib

import pytest
import torch

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
INTERP_DTYPES = [torch.float16, torch.float32]       # bf16 tl.dot is garbage under the interpreter
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
GPU = [pytest.mark.gpu]


def gen(device, *key) -> torch.Generator:
    """A generator on ``device`` seeded from the case itself: every case draws different data."""
    return torch.Generator(device=device).manual_seed(zlib.crc32(repr(key).encode()))


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, device=g.device).to(dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(out, ref, dtype, what=""):
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{what}: relative error {err:.3g} >= {TOL[dtype]:.0g} ({dtype})"


def poison_cuda_cache(device) -> None:
    """Fill freed blocks of the CUDA caching allocator with NaN, so a kernel output that a launch
    forgets to write (allocated by torch.empty inside the launcher) shows up as NaN."""
    if torch.device(device).type == "cuda":
        x = torch.full((1 << 26,), float("nan"), device=device)
        del x


def cases(interp, gpu_only=()):
    """(device, dtype, case) params: interp cases on CPU (fp16/fp32) and on CUDA (all dtypes),
    gpu_only cases on CUDA only."""
    out = []
    for i, c in enumerate(interp):
        for dt in INTERP_DTYPES:
            out.append(pytest.param("cpu", dt, c, id=f"interp-{str(dt)[6:]}-{i}"))
        for dt in GPU_DTYPES:
            out.append(pytest.param("cuda", dt, c, marks=GPU, id=f"cuda-{str(dt)[6:]}-{i}"))
    for i, c in enumerate(gpu_only):
        for dt in GPU_DTYPES:
            out.append(pytest.param("cuda", dt, c, marks=GPU, id=f"cuda-large-{str(dt)[6:]}-{i}"))
    return out
