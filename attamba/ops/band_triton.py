"""Fused Triton kernels for the band of :mod:`attamba.ops.chunk_flash`: keys ``t - lead .. t``.

Every query sees at most ``lead + 1`` band keys, all within ``lead`` rows of itself, so the
band is a sliding window far too narrow for tensor cores: each program takes BLOCK queries
of one head and walks the ``lead + 1`` offsets, one dot product per query and offset, with
the online softmax in registers. The shifted key rows overlap from one offset to the next
and are served from cache, so the kernels move each tensor about once, in its own dtype.

Forward (per query t, offsets w = 0 .. lead, ``s = t - w >= 0``)::

    band_out[t] = Σ_w softmax_w(scale q_t·k_s) v_s,   band_lse[t] = logsumexp_w(scale q_t·k_s)

and, given the past boundaries' ``(past_out, past_lse)``, the merged output and
log-sum-exp of the one joint softmax, so the band's partial output never reaches memory.
The past comes as the folded causal kernel left it: query t reads row ``past_index[t]``
(none if that is past the last row), so it is never unfolded into a copy of its own.

Backward, from the *merged* output ``o`` and log-sum-exp (which makes these the band's
share of the joint softmax's gradient)::

    p = exp(scale q_t·k_s - lse_t),  ds = p (dO_t·v_s - δ_t),  δ_t = dO_t·o_t
    dq_t = scale Σ_w ds k_s       (one program per query block; it also stores δ)
    dk_s = scale Σ_w ds q_t,  dv_s = Σ_w p dO_t    (t = s + w; one program per key block,
                                                    summing its key head's query heads)

The query kernel also adds the past part's dq, read folded through ``past_index`` like
the forward's past.

Every output element is written by one program: no atomics, deterministic. Arithmetic is
fp32; gradients come back in fp32, for the caller to add the past part's dk and dv before casting.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 64  # queries (or keys) per program


@triton.jit
def _rows(ptr, batch_offset, rows, valid, D: tl.constexpr, stride_l):
    """[BLOCK, D] rows of one head as fp32, zeros where not ``valid``."""
    dims = tl.arange(0, D)
    return tl.load(ptr + batch_offset + rows[:, None] * stride_l + dims[None, :], mask=valid[:, None],
                   other=0.0).to(tl.float32)


@triton.jit
def _past_rows(PAST_INDEX, t, in_range, past_rows):
    """The folded row of each query's past, and which queries have one."""
    row = tl.load(PAST_INDEX + t, mask=in_range, other=past_rows)
    return row, in_range & (row < past_rows)


@triton.jit
def _query_block(length, heads, group, BLOCK: tl.constexpr):
    """This program's (batch * heads + head, batch, head, key/value head, its BLOCK tokens, which exist)."""
    bh = tl.program_id(1)
    b, h = bh // heads, bh % heads
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return bh, b, h, h // group, t, t < length


@triton.jit
def _band_fwd_kernel(Q, K, V, PAST_O, PAST_LSE, PAST_INDEX, O, LSE,
                     sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                     spo_b, spo_h, spo_l, spl_b, spl_h, so_b, so_h, so_l,
                     length, heads, group, scale, past_rows,
                     LEAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, HAS_PAST: tl.constexpr):
    bh, b, h, kv_h, t, in_range = _query_block(length, heads, group, BLOCK)
    q = _rows(Q, b * sq_b + h * sq_h, t, in_range, D, sq_l)
    row_max = tl.full([BLOCK], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, D], tl.float32)
    for w in tl.static_range(LEAD + 1):
        s = t - w
        seen = in_range & (s >= 0)
        k = _rows(K, b * sk_b + kv_h * sk_h, s, seen, D, sk_l)
        # offset 0 is always seen, so every row's maximum is finite from the first step on
        score = tl.where(s >= 0, tl.sum(q * k, axis=1) * scale, float("-inf"))
        new_max = tl.maximum(row_max, score)
        decay = tl.exp(row_max - new_max)
        p = tl.exp(score - new_max)
        v = _rows(V, b * sv_b + kv_h * sv_h, s, seen, D, sv_l)
        acc = acc * decay[:, None] + p[:, None] * v
        row_sum = row_sum * decay + p
        row_max = new_max
    lse = row_max + tl.log(row_sum)
    out = acc / row_sum[:, None]
    if HAS_PAST:
        row, has_past = _past_rows(PAST_INDEX, t, in_range, past_rows)
        past_lse = tl.load(PAST_LSE + b * spl_b + h * spl_h + row, mask=has_past, other=float("-inf"))
        past_out = _rows(PAST_O, b * spo_b + h * spo_h, row, has_past, D, spo_l)
        joint = tl.maximum(lse, past_lse) + tl.log(1.0 + tl.exp(-tl.abs(lse - past_lse)))
        out = out * tl.exp(lse - joint)[:, None] + past_out * tl.exp(past_lse - joint)[:, None]
        lse = joint
    dims = tl.arange(0, D)
    tl.store(O + b * so_b + h * so_h + t[:, None] * so_l + dims[None, :], out.to(O.dtype.element_ty),
             mask=in_range[:, None])
    tl.store(LSE + bh * length + t, lse, mask=in_range)


@triton.jit
def _band_bwd_query_kernel(DO, Q, K, V, O, LSE, PAST_DQ, PAST_INDEX, DQ, DELTA,
                           sdo_b, sdo_h, sdo_l, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                           so_b, so_h, so_l, spd_b, spd_h, spd_l, slse_b, slse_h,
                           length, heads, group, scale, past_rows,
                           LEAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, HAS_PAST: tl.constexpr):
    bh, b, h, kv_h, t, in_range = _query_block(length, heads, group, BLOCK)
    q = _rows(Q, b * sq_b + h * sq_h, t, in_range, D, sq_l)
    do = _rows(DO, b * sdo_b + h * sdo_h, t, in_range, D, sdo_l)
    delta = tl.sum(do * _rows(O, b * so_b + h * so_h, t, in_range, D, so_l), axis=1)
    lse = tl.load(LSE + b * slse_b + h * slse_h + t, mask=in_range, other=0.0)
    dq = tl.zeros([BLOCK, D], tl.float32)
    for w in tl.static_range(LEAD + 1):
        s = t - w
        seen = in_range & (s >= 0)
        k = _rows(K, b * sk_b + kv_h * sk_h, s, seen, D, sk_l)
        v = _rows(V, b * sv_b + kv_h * sv_h, s, seen, D, sv_l)
        p = tl.where(seen, tl.exp(tl.sum(q * k, axis=1) * scale - lse), 0.0)
        ds = p * (tl.sum(do * v, axis=1) - delta)
        dq += ds[:, None] * k
    dq *= scale
    if HAS_PAST:
        row, has_past = _past_rows(PAST_INDEX, t, in_range, past_rows)
        dq += _rows(PAST_DQ, b * spd_b + h * spd_h, row, has_past, D, spd_l)
    dims = tl.arange(0, D)
    tl.store(DQ + bh * length * D + t[:, None] * D + dims[None, :], dq, mask=in_range[:, None])
    tl.store(DELTA + bh * length + t, delta, mask=in_range)


@triton.jit
def _band_bwd_key_kernel(DO, Q, K, V, LSE, DELTA, DK, DV,
                         sdo_b, sdo_h, sdo_l, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                         slse_b, slse_h,
                         length, heads, kv_heads, scale,
                         GROUP: tl.constexpr, LEAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(1)
    b, kv_h = bh // kv_heads, bh % kv_heads
    s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = s < length
    k = _rows(K, b * sk_b + kv_h * sk_h, s, in_range, D, sk_l)
    v = _rows(V, b * sv_b + kv_h * sv_h, s, in_range, D, sv_l)
    dk = tl.zeros([BLOCK, D], tl.float32)
    dv = tl.zeros([BLOCK, D], tl.float32)
    for member in tl.static_range(GROUP):
        h = kv_h * GROUP + member
        for w in tl.static_range(LEAD + 1):
            t = s + w
            seen = in_range & (t < length)
            q = _rows(Q, b * sq_b + h * sq_h, t, seen, D, sq_l)
            do = _rows(DO, b * sdo_b + h * sdo_h, t, seen, D, sdo_l)
            lse = tl.load(LSE + b * slse_b + h * slse_h + t, mask=seen, other=0.0)
            delta = tl.load(DELTA + (b * heads + h) * length + t, mask=seen, other=0.0)
            p = tl.where(seen, tl.exp(tl.sum(q * k, axis=1) * scale - lse), 0.0)
            ds = p * (tl.sum(do * v, axis=1) - delta)
            dk += ds[:, None] * q
            dv += p[:, None] * do
    dims = tl.arange(0, D)
    offsets = bh * length * D + s[:, None] * D + dims[None, :]
    tl.store(DK + offsets, dk * scale, mask=in_range[:, None])
    tl.store(DV + offsets, dv, mask=in_range[:, None])


def _strides(*tensors: Tensor) -> list[int]:
    """Each tensor's strides but the last (the kernels read rows of unit stride)."""
    return [s for t in tensors for s in t.stride()[:-1]]


def _unit_rows(*tensors: Tensor) -> list[Tensor]:
    """The tensors, copied where their last dim is strided (row vectors, or a log-sum-exp's tokens)."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _no_past(q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Placeholders for the kernels' past pointer and stride arguments when there is no past (never read)."""
    return q, q.new_empty(1, 1, dtype=torch.float32), q.new_empty(1, dtype=torch.long)


@torch.library.custom_op("attamba::band_attention_fwd", mutates_args=())
def _band_fwd(q: Tensor, k: Tensor, v: Tensor, past_out: Optional[Tensor], past_lse: Optional[Tensor],
              past_index: Optional[Tensor], lead: int, scale: float) -> tuple[Tensor, Tensor]:
    b, h, length, d = q.shape
    q, k, v = _unit_rows(q, k, v)
    has_past = past_out is not None
    if has_past:
        past_out, past_lse, past_index = _unit_rows(past_out, past_lse, past_index)
    else:
        past_out, past_lse, past_index = _no_past(q)
    out = q.new_empty(q.shape)
    lse = q.new_empty(b, h, length, dtype=torch.float32)
    _band_fwd_kernel[(triton.cdiv(length, BLOCK), b * h)](
        q, k, v, past_out, past_lse, past_index, out, lse, *_strides(q, k, v, past_out), *past_lse.stride()[:2],
        *_strides(out), length, h, h // k.shape[1], scale, past_out.shape[2],
        LEAD=lead, D=d, BLOCK=BLOCK, HAS_PAST=has_past)
    return out, lse


@_band_fwd.register_fake
def _band_fwd_fake(q, k, v, past_out, past_lse, past_index, lead, scale):
    b, h, length, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(b, h, length, dtype=torch.float32)


@torch.library.custom_op("attamba::band_attention_bwd", mutates_args=())
def _band_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              past_dq: Optional[Tensor], past_index: Optional[Tensor], lead: int,
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    b, h, length, d = q.shape
    kv_heads = k.shape[1]
    grad_out, q, k, v, out, lse = _unit_rows(grad_out, q, k, v, out, lse)
    has_past = past_dq is not None
    if has_past:
        past_dq, past_index = _unit_rows(past_dq, past_index)
    else:
        past_dq, _, past_index = _no_past(q)
    dq = q.new_empty(q.shape, dtype=torch.float32)
    dk = k.new_empty(k.shape, dtype=torch.float32)
    dv = v.new_empty(v.shape, dtype=torch.float32)
    delta = q.new_empty(b, h, length, dtype=torch.float32)
    blocks = triton.cdiv(length, BLOCK)
    common = dict(LEAD=lead, D=d, BLOCK=BLOCK)
    _band_bwd_query_kernel[(blocks, b * h)](
        grad_out, q, k, v, out, lse, past_dq, past_index, dq, delta, *_strides(grad_out, q, k, v, out, past_dq),
        *lse.stride()[:2], length, h, h // kv_heads, scale, past_dq.shape[2], HAS_PAST=has_past, **common)
    _band_bwd_key_kernel[(blocks, b * kv_heads)](
        grad_out, q, k, v, lse, delta, dk, dv, *_strides(grad_out, q, k, v), *lse.stride()[:2],
        length, h, kv_heads, scale, GROUP=h // kv_heads, **common)
    return dq, dk, dv


@_band_bwd.register_fake
def _band_bwd_fake(grad_out, q, k, v, out, lse, past_dq, past_index, lead, scale):
    return (q.new_empty(q.shape, dtype=torch.float32), k.new_empty(k.shape, dtype=torch.float32),
            v.new_empty(v.shape, dtype=torch.float32))


def band_forward(q: Tensor, k: Tensor, v: Tensor, lead: int, scale: float,
                 past: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """The band's output (in q's dtype) and fp32 log-sum-exp, merged with ``past = (out, lse, index)`` if given.

    q [b, h, L, d]; k, v [b, h_kv, L, d]; past out [b, h, S, d] and lse [b, h, S] in any
    S rows, of which query t reads row ``index[t]`` (long [L]; ``>= S``: t sees no past key).
    d must be a power of two.
    """
    past_out, past_lse, past_index = past if past is not None else (None, None, None)
    return _band_fwd(q, k, v, past_out, past_lse, past_index, lead, scale)


def band_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, lead: int,
                  scale: float, past_dq: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The band's (dq, dk, dv) in fp32 under the joint softmax of output ``out`` and log-sum-exp ``lse``.

    With ``past_dq = (dq [b, h, S, d], index [L])``, query t's dq also gets row ``index[t]``
    of the past part's (none if ``index[t] >= S``), as :func:`band_forward` reads its past.
    """
    past, past_index = past_dq if past_dq is not None else (None, None)
    return _band_bwd(grad_out, q, k, v, out, lse, past, past_index, lead, scale)

