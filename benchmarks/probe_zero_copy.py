"""Probe: can a Triton kernel gather 2 KB blocks straight from pinned host memory (UVA), and how
fast, against the copy engine (index_select on the host + .cuda())?"""
import sys
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_blocks(src, dst, ids, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    b = tl.load(ids + i).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    tl.store(dst + i * BLOCK + offs, tl.load(src + b * BLOCK + offs))


def main():
    n_blocks, block = (8 << 30) // 2048, 1024          # 8 GiB of bf16 blocks of 1024 elements
    host = torch.empty(n_blocks, block, dtype=torch.bfloat16, pin_memory=True)
    host[: 1 << 16].normal_()
    dev = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")          # 1 GiB
    flat = host.view(-1)[: dev.numel()]
    for _ in range(2):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record(); dev.copy_(flat, non_blocking=True); e.record(); e.synchronize()
    print(f"copy engine, 1 GiB contiguous pinned -> GPU: {2 ** 30 / (s.elapsed_time(e) / 1e3) / 1e9:.1f} GB/s")
    del dev
    for count in (4096, 65536):
        ids = torch.randint(0, 1 << 16, (count,), device="cuda", dtype=torch.int32)
        dst = torch.empty(count, block, dtype=torch.bfloat16, device="cuda")
        try:
            _gather_blocks[(count,)](host, dst, ids, BLOCK=block)
            torch.cuda.synchronize()
        except Exception as e:
            print("triton zero-copy failed:", type(e).__name__, e)
            return 1
        ok = torch.equal(dst.cpu(), host[ids.long().cpu()])
        t = []
        for _ in range(10):
            s, e = torch.cuda.Event(True), torch.cuda.Event(True)
            s.record(); _gather_blocks[(count,)](host, dst, ids, BLOCK=block); e.record(); e.synchronize()
            t.append(s.elapsed_time(e) / 1e3)
        zc = count * 2048 / sorted(t)[5] / 1e9
        idc = ids.long().cpu()
        t0 = time.perf_counter()
        for _ in range(3):
            host[idc].cuda(non_blocking=False)
        ce = count * 2048 * 3 / (time.perf_counter() - t0) / 1e9
        print(f"blocks={count} correct={ok} zero-copy {zc:.1f} GB/s, host gather + copy {ce:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
