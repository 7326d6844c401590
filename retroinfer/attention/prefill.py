"""Dense causal attention of a chunk of prompt queries against the prompt's keys so far."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SCORE_BYTES = 256 << 20     # score matrix per call where SDPA materialises it (fp32, CPU)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int) -> torch.Tensor:
    """q: [c, Hq, D] are prompt rows q_start..q_start+c-1; k, v: [q_start+c, Hkv, D].
    Returns [c, Hq, D]: row i attends to keys 0..q_start+i (bottom-right causal alignment)."""
    c, e = q.shape[0], k.shape[0]
    assert e == q_start + c, (q.shape, k.shape, q_start)
    flash = q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
    rows = max(1, SCORE_BYTES // (4 * q.shape[1] * e))
    if not flash and c > rows:   # the non-flash paths hold [Hq, rows, e] scores: bound them
        return torch.cat([causal_attention(q[i:i + rows], k[:q_start + i + rows], v[:q_start + i + rows], q_start + i)
                          for i in range(0, c, rows)])
    qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if q.device.type == "cuda":
        # Flash attention with native GQA; the lower-right causal bias keeps it on the flash path.
        from torch.nn.attention.bias import causal_lower_right
        mask = None if c == e else causal_lower_right(c, e)
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)
    group = q.shape[1] // k.shape[1]
    kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
    if c == e:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    else:
        rows = torch.arange(q_start, e, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=torch.arange(e, device=q.device) <= rows)
    return o.squeeze(0).transpose(0, 1)
