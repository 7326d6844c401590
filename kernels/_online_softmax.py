"""Device functions of split-K (flash-decoding) attention, shared by the kernels that run its
first stage (``paged_decode``, ``weighted_decode``, ``estimate_decode``).

A program owns ``BLOCK_G`` query rows and one split of a row's keys. It walks the split's blocks
with the online softmax in base 2 (scores arrive pre-multiplied by ``log2(e)``, so ``exp2`` is the
exponential):

    m' = max(m, max_j s_j),   l' = l * 2^(m - m') + sum_j 2^(s_j - m'),
    acc' = acc * 2^(m - m') + sum_j 2^(s_j - m') v_j,

and stores the split's normalised state ``o = acc / l`` and ``lse = (m + log2 l) * ln 2`` (natural
log, as ``split_reduce.merge_splits`` reads it); an empty split stores ``o = 0, lse = -inf``.

These are ``jit_helper`` functions: compiled, a kernel inlines them; interpreted, they run through
the Triton interpreter like ``tl.*`` library functions.
"""

from __future__ import annotations

from ._triton_util import LN2, LOG2E, jit_helper, tl

# Globals that a Triton function reads must be constexpr.
_LOG2E = tl.constexpr(LOG2E) if tl is not None else LOG2E
_LN2 = tl.constexpr(LN2) if tl is not None else LN2


@jit_helper
def split_program(HKV):
    """Who this program is in a grid ``(rows * HKV, splits)``: ``(pid, split, row, kv head)``, the
    last two int64 (they scale strides)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    return pid, split, (pid // HKV).to(tl.int64), (pid % HKV).to(tl.int64)


@jit_helper
def split_blocks(n, BLOCK: tl.constexpr, NUM_SPLITS, split):
    """Blocks ``[begin, end)`` of ``BLOCK`` keys that split ``split`` of ``NUM_SPLITS`` takes of a row
    of ``n`` keys: the row's blocks split evenly, the last splits may get fewer or none."""
    n_blocks = tl.cdiv(n, BLOCK)
    per = tl.cdiv(n_blocks, NUM_SPLITS)
    begin = split * per
    return begin, tl.minimum(begin + per, n_blocks)


@jit_helper
def tile_offsets(G, D, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets of the program's query rows (``BLOCK_G >= G``), head dims (``BLOCK_D >= D``) and of
    the keys of one block, with the row and dim masks."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    return offs_g, offs_d, offs_n, offs_g < G, offs_d < D


@jit_helper
def softmax_state(BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """The empty state: running max ``m = -inf``, sum ``l = 0`` and output ``acc = 0`` (fp32)."""
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    return m_i, l_i, acc


@jit_helper
def with_log_weight(s, log_w):
    """Scores ``s [G, N]`` (log2 units) plus each key's natural-log weight ``log_w [N]``."""
    return s + log_w[None, :] * _LOG2E


@jit_helper
def softmax_step(m_i, l_i, acc, s, valid, v, PRECISION: tl.constexpr):
    """One block: scores ``s [G, N]`` (log2 units; keys where ``valid [N]`` is false count as
    weight 0) and values ``v [N, D]`` folded into the state ``(m_i [G], l_i [G], acc [G, D])``."""
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all weights 0 so far
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@jit_helper
def store_split(po_ptr, pl_ptr, pid, split, G, D, NUM_SPLITS, m_i, l_i, acc, offs_g, offs_d, gmask, dmask):
    """The split's normalised state into the partial-state scratch ``part_out [R, NUM_SPLITS, D]``,
    ``part_lse [R, NUM_SPLITS]`` (fp32, contiguous): program ``pid``'s query ``g`` is row
    ``pid * G + g``."""
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    row = pid.to(tl.int64) * G + offs_g
    tl.store(po_ptr + ((row * NUM_SPLITS + split) * D)[:, None] + offs_d[None, :], o,
             mask=gmask[:, None] & dmask[None, :])
    tl.store(pl_ptr + row * NUM_SPLITS + split, lse, mask=gmask)
