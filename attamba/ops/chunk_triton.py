"""Attamba's chunk attention in fused Triton kernels (``model.attn_impl=fused``).

Query t sees two disjoint key sets: its *band*, keys ``t - lead .. t``, and its *past
boundaries*, the boundary keys ``s < t - lead``, which are the first ``n_visible[t]`` of the
sorted boundary positions (``n_visible`` never decreases along the sequence). One
flash-attention walk per block of queries covers both: the band's tiles read straight from
``k`` and ``v``, then the boundaries' tiles read through their positions, so nothing is
gathered, folded or copied, and no partial result reaches memory. The online softmax runs in
fp32 registers, the dot products on tensor cores. Out come the output and the log-sum-exp.

Backward, from the output ``o`` and log-sum-exp::

    p = exp(scale q_t·k_s - lse_t),  ds = p (dO_t·v_s - δ_t),  δ_t = dO_t·o_t
    dq_t = scale Σ_s ds k_s       (a program per query block walks the forward's tiles; stores δ)
    dk_s = scale Σ_t ds q_t, dv_s = Σ_t p dO_t:
      past:  a program per block of boundaries walks the queries from the first that sees
             them, into an fp32 buffer by boundary;
      band:  a program per block of keys walks the queries ``s .. s + lead`` and adds the
             buffer's row where its key is a boundary.

Key programs sum their key head's query heads (grouped-query attention). Every output
element is written by one program: no atomics, deterministic. Gradients come back in the
inputs' dtype, accumulated in fp32.
Off CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), which is how the
CPU tests check them against the dense-mask reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from attamba.ops.band_triton import _strides, _unit_rows
from attamba.ops.chunk_flash import joint_dtype
from attamba.ops.chunking import past_boundaries

# The best of nine configurations swept on the H200 at 1K x16 and 16K tokens (README).
BLOCK_M = 64  # queries per program (and per step of a key program's walk over the past)
BLOCK_N = 64  # keys per program (and per step of a query program's walk over the past)
NUM_WARPS = 4
NUM_STAGES = 3
MIN_SPAN = 2048  # queries per program of the boundary keys' backward, at least ...
MAX_SPANS = 8  # ... and at most this many programs per block of boundary keys
_LOG2E = tl.constexpr(1.4426950408889634)  # scores in base 2 inside the kernels


@dataclass(frozen=True)
class BoundaryTable:
    """The boundary positions a layout's queries see, as the kernels read them (built once per layout)."""

    keys: Tensor  # int32 [n]: token of each boundary some query sees past its band, sorted
    n_visible: Tensor  # int32 [L]: how many of ``keys`` query t sees
    key_slot: Tensor  # int32 [L]: each token's index in ``keys``, -1 if it is not one
    lead: int


def boundary_table(boundary: Tensor, lead: int, device: torch.device) -> BoundaryTable:
    """The :class:`BoundaryTable` of a bool ``[L]`` boundary layout (host work)."""
    length = boundary.shape[0]
    keys, n_visible = past_boundaries(boundary, lead)
    key_slot = torch.full((length,), -1, dtype=torch.long)
    key_slot[keys] = torch.arange(keys.numel())
    as_index = dict(device=device, dtype=torch.int32)
    return BoundaryTable(keys.to(**as_index), n_visible.to(**as_index), key_slot.to(**as_index), lead)


# ---------------------------------------------------------------------------
# Kernels. Scores are kept in base 2 (``qk_scale = scale * log2 e``); log-sum-exps in memory
# are natural.


@triton.jit
def _in_head(valid, D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The mask of ``valid`` rows over a tile's dims: without padding, rows alone (unmasked dims
    keep loads and stores vectorised)."""
    mask = valid[:, None]
    if HEAD_DIM < D:
        mask = mask & (tl.arange(0, D) < HEAD_DIM)[None, :]
    return mask


@triton.jit
def _tile(ptr, offset, rows, valid, D: tl.constexpr, HEAD_DIM: tl.constexpr, stride_l):
    """``[rows, D]`` of one head in its own dtype, zeros where not ``valid`` and in the padding dims."""
    dims = tl.arange(0, D)
    return tl.load(ptr + offset + rows[:, None] * stride_l + dims[None, :], mask=_in_head(valid, D, HEAD_DIM),
                   other=0.0)


@triton.jit
def _key_value(K, V, k_base, v_base, rows, valid, D: tl.constexpr, HEAD_DIM: tl.constexpr, sk_l, sv_l):
    """The key and value tiles of ``rows``."""
    return _tile(K, k_base, rows, valid, D, HEAD_DIM, sk_l), _tile(V, v_base, rows, valid, D, HEAD_DIM, sv_l)


@triton.jit
def _past_key_value(KEYS, K, V, k_base, v_base, start, n_keys, D: tl.constexpr, HEAD_DIM: tl.constexpr, sk_l,
                    sv_l, BLOCK_N: tl.constexpr):
    """Boundaries ``start .. start + BLOCK_N`` of the table: their indices j and their key and value tiles."""
    j = start + tl.arange(0, BLOCK_N)
    exists = j < n_keys
    pos = tl.load(KEYS + j, mask=exists, other=0)
    k, v = _key_value(K, V, k_base, v_base, pos, exists, D, HEAD_DIM, sk_l, sv_l)
    return j, k, v


@triton.jit
def _attend(q, k, v, seen, row_max, row_sum, acc, qk_scale, PRECISION: tl.constexpr):
    """One key tile's step of the online softmax (base 2)."""
    score = tl.where(seen, tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(score, axis=1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that have seen nothing yet
    decay = tl.exp2(row_max - safe_max)
    p = tl.exp2(score - safe_max[:, None])
    acc = acc * decay[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return new_max, row_sum * decay + tl.sum(p, axis=1), acc


@triton.jit
def _query_grad(q, k, v, do, lse2, delta, seen, dq, qk_scale, PRECISION: tl.constexpr):
    """One key tile's share of dq (unscaled)."""
    p = tl.where(seen, tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None]), 0.0)
    ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _key_grads(k, v, q, do, lse2, delta, seen, dk, dv, qk_scale, PRECISION: tl.constexpr):
    """One query tile's share of dk (unscaled) and dv; ``seen`` is [keys, queries]."""
    p = tl.where(seen, tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :]), 0.0)
    dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
    ds = p * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
    return dk + tl.dot(ds.to(q.dtype), q, input_precision=PRECISION), dv


@triton.jit
def _key_grads_of_rows(k, v, Q, DO, LSE, DELTA, q_base, do_base, row_base, t, valid, seen, dk, dv, qk_scale,
                       D: tl.constexpr, HEAD_DIM: tl.constexpr, sq_l, sdo_l, PRECISION: tl.constexpr):
    """`_key_grads` for the queries ``t`` of one head, their tiles, log-sum-exps and δ loaded here."""
    row = row_base + t
    q = _tile(Q, q_base, t, valid, D, HEAD_DIM, sq_l)
    do = _tile(DO, do_base, t, valid, D, HEAD_DIM, sdo_l)
    lse2 = tl.load(LSE + row, mask=valid, other=0.0) * _LOG2E
    return _key_grads(k, v, q, do, lse2, tl.load(DELTA + row, mask=valid, other=0.0), seen, dk, dv, qk_scale, PRECISION)


@triton.jit
def _band_seen(t, s, length, LEAD: tl.constexpr):
    """[queries, keys]: key s is in query t's band."""
    return (s[None, :] <= t[:, None]) & (s[None, :] >= t[:, None] - LEAD) & (s[None, :] >= 0) & (
        s[None, :] < length)


@triton.jit
def _query_block(heads, group, sk_b, sk_h, sv_b, sv_h, length, BLOCK_M: tl.constexpr):
    """A query program's (batch * heads + head, batch, head, its key and value heads' offsets,
    its first token, its BLOCK_M tokens, which exist)."""
    bh = tl.program_id(1)
    b, h = bh // heads, bh % heads
    kv_h = h // group
    first = tl.program_id(0) * BLOCK_M
    t = first + tl.arange(0, BLOCK_M)
    return bh, b, h, b * sk_b + kv_h * sk_h, b * sv_b + kv_h * sv_h, first, t, t < length


@triton.jit
def _past_limits(N_VISIBLE, t, in_range, first, length, BLOCK_M: tl.constexpr):
    """How many past boundaries each query sees, and the most any query of the block sees (its last's)."""
    limit = tl.load(N_VISIBLE + t, mask=in_range, other=0)
    return limit, tl.load(N_VISIBLE + tl.minimum(first + BLOCK_M, length) - 1)


@triton.jit
def _fwd_kernel(Q, K, V, KEYS, N_VISIBLE, O, LSE,
                sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_l,
                length, n_keys, heads, group, qk_scale,
                LEAD: tl.constexpr, LEAD_PAD: tl.constexpr, D: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    bh, b, h, k_base, v_base, first, t, in_range = _query_block(heads, group, sk_b, sk_h, sv_b, sv_h, length,
                                                                BLOCK_M)
    q = _tile(Q, b * sq_b + h * sq_h, t, in_range, D, HEAD_DIM, sq_l)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # the band: this block's own keys, then the LEAD_PAD before them
    s = first + tl.arange(0, BLOCK_M)
    k_band, v_band = _key_value(K, V, k_base, v_base, s, s < length, D, HEAD_DIM, sk_l, sv_l)
    row_max, row_sum, acc = _attend(q, k_band, v_band, _band_seen(t, s, length, LEAD), row_max, row_sum, acc,
                                    qk_scale, PRECISION)
    if LEAD > 0:
        s = first - LEAD_PAD + tl.arange(0, LEAD_PAD)
        k_band, v_band = _key_value(K, V, k_base, v_base, s, s >= 0, D, HEAD_DIM, sk_l, sv_l)
        row_max, row_sum, acc = _attend(q, k_band, v_band, _band_seen(t, s, length, LEAD), row_max, row_sum, acc,
                                    qk_scale, PRECISION)
    # the past boundaries, up to the most any query here sees
    limit, most = _past_limits(N_VISIBLE, t, in_range, first, length, BLOCK_M)
    for start in range(0, most, BLOCK_N):
        j, k, v = _past_key_value(KEYS, K, V, k_base, v_base, start, n_keys, D, HEAD_DIM, sk_l, sv_l, BLOCK_N)
        row_max, row_sum, acc = _attend(q, k, v, j[None, :] < limit[:, None], row_max, row_sum, acc, qk_scale,
                                        PRECISION)
    has_keys = row_sum > 0  # every query sees itself; only rows past the end see nothing
    lse = tl.where(has_keys, (row_max + tl.log2(tl.where(has_keys, row_sum, 1.0))) / _LOG2E, 0.0)
    out = acc / tl.where(has_keys, row_sum, 1.0)[:, None]
    dims = tl.arange(0, D)
    tl.store(O + b * so_b + h * so_h + t[:, None] * so_l + dims[None, :], out.to(O.dtype.element_ty),
             mask=_in_head(in_range, D, HEAD_DIM))
    tl.store(LSE + bh * length + t, lse, mask=in_range)


@triton.jit
def _bwd_query_kernel(DO, Q, K, V, O, LSE, KEYS, N_VISIBLE, DQ, DELTA,
                      sdo_b, sdo_h, sdo_l, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_l,
                      length, n_keys, heads, group, scale, qk_scale,
                      LEAD: tl.constexpr, LEAD_PAD: tl.constexpr, D: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    bh, b, h, k_base, v_base, first, t, in_range = _query_block(heads, group, sk_b, sk_h, sv_b, sv_h, length,
                                                                BLOCK_M)
    q = _tile(Q, b * sq_b + h * sq_h, t, in_range, D, HEAD_DIM, sq_l)
    do = _tile(DO, b * sdo_b + h * sdo_h, t, in_range, D, HEAD_DIM, sdo_l)
    delta = tl.sum(do.to(tl.float32) * _tile(O, b * so_b + h * so_h, t, in_range, D, HEAD_DIM, so_l).to(tl.float32),
                   axis=1)
    lse2 = tl.load(LSE + bh * length + t, mask=in_range, other=0.0) * _LOG2E
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    s = first + tl.arange(0, BLOCK_M)
    k_band, v_band = _key_value(K, V, k_base, v_base, s, s < length, D, HEAD_DIM, sk_l, sv_l)
    dq = _query_grad(q, k_band, v_band, do, lse2, delta, _band_seen(t, s, length, LEAD), dq, qk_scale, PRECISION)
    if LEAD > 0:
        s = first - LEAD_PAD + tl.arange(0, LEAD_PAD)
        k_band, v_band = _key_value(K, V, k_base, v_base, s, s >= 0, D, HEAD_DIM, sk_l, sv_l)
        dq = _query_grad(q, k_band, v_band, do, lse2, delta, _band_seen(t, s, length, LEAD), dq, qk_scale,
                         PRECISION)
    limit, most = _past_limits(N_VISIBLE, t, in_range, first, length, BLOCK_M)
    for start in range(0, most, BLOCK_N):
        j, k, v = _past_key_value(KEYS, K, V, k_base, v_base, start, n_keys, D, HEAD_DIM, sk_l, sv_l, BLOCK_N)
        dq = _query_grad(q, k, v, do, lse2, delta, j[None, :] < limit[:, None], dq, qk_scale, PRECISION)
    dims = tl.arange(0, D)
    tl.store(DQ + bh * length * HEAD_DIM + t[:, None] * HEAD_DIM + dims[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=_in_head(in_range, D, HEAD_DIM))
    tl.store(DELTA + bh * length + t, delta, mask=in_range)


@triton.jit
def _bwd_past_key_kernel(DO, Q, K, V, LSE, DELTA, KEYS, N_VISIBLE, DK_PAST, DV_PAST,
                         sdo_b, sdo_h, sdo_l, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                         length, n_keys, heads, kv_heads, scale, qk_scale, span,
                         GROUP: tl.constexpr, LEAD: tl.constexpr, D: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(1)
    b, kv_h = bh // kv_heads, bh % kv_heads
    j, k, v = _past_key_value(KEYS, K, V, b * sk_b + kv_h * sk_h, b * sv_b + kv_h * sv_h, tl.program_id(0) * BLOCK_N,
                              n_keys, D, HEAD_DIM, sk_l, sv_l, BLOCK_N)
    # this program's share of the queries: its span, from the first query that sees the block's
    # first boundary (none before it sees any of them)
    span_start = tl.program_id(2) * span
    first = tl.maximum(tl.load(KEYS + tl.program_id(0) * BLOCK_N) + LEAD + 1, span_start)
    last = tl.minimum(span_start + span, length)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for member in tl.static_range(GROUP):
        h = kv_h * GROUP + member
        for start in range(first // BLOCK_M * BLOCK_M, last, BLOCK_M):
            t = start + tl.arange(0, BLOCK_M)
            in_range = t < last
            limit = tl.load(N_VISIBLE + t, mask=in_range, other=0)
            dk, dv = _key_grads_of_rows(k, v, Q, DO, LSE, DELTA, b * sq_b + h * sq_h, b * sdo_b + h * sdo_h,
                                        (b * heads + h) * length, t, in_range, j[:, None] < limit[None, :], dk, dv,
                                        qk_scale, D, HEAD_DIM, sq_l, sdo_l, PRECISION)
    dims = tl.arange(0, D)
    offsets = (tl.program_id(2) * tl.num_programs(1) + bh) * n_keys * D + j[:, None] * D + dims[None, :]
    exists = (j < n_keys)[:, None]
    tl.store(DK_PAST + offsets, dk * scale, mask=exists)  # buffers keep the padded width
    tl.store(DV_PAST + offsets, dv, mask=exists)


@triton.jit
def _bwd_band_key_kernel(DO, Q, K, V, LSE, DELTA, KEY_SLOT, DK_PAST, DV_PAST, DK, DV,
                         sdo_b, sdo_h, sdo_l, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                         length, n_keys, heads, kv_heads, scale, qk_scale, spans,
                         GROUP: tl.constexpr, LEAD: tl.constexpr, LEAD_PAD: tl.constexpr,
                         D: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_N: tl.constexpr, HAS_PAST: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(1)
    b, kv_h = bh // kv_heads, bh % kv_heads
    first = tl.program_id(0) * BLOCK_N
    s = first + tl.arange(0, BLOCK_N)
    in_range = s < length
    k = _tile(K, b * sk_b + kv_h * sk_h, s, in_range, D, HEAD_DIM, sk_l)
    v = _tile(V, b * sv_b + kv_h * sv_h, s, in_range, D, HEAD_DIM, sv_l)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for member in tl.static_range(GROUP):
        h = kv_h * GROUP + member
        q_base, do_base = b * sq_b + h * sq_h, b * sdo_b + h * sdo_h
        row_base = (b * heads + h) * length
        # the queries of this block's own tokens, then the LEAD_PAD after them
        t = first + tl.arange(0, BLOCK_N)
        valid = t < length
        dk, dv = _key_grads_of_rows(k, v, Q, DO, LSE, DELTA, q_base, do_base, row_base, t, valid,
                                    tl.trans(_band_seen(t, s, length, LEAD)) & valid[None, :], dk, dv, qk_scale,
                                    D, HEAD_DIM, sq_l, sdo_l, PRECISION)
        if LEAD > 0:
            t = first + BLOCK_N + tl.arange(0, LEAD_PAD)
            valid = t < length
            dk, dv = _key_grads_of_rows(k, v, Q, DO, LSE, DELTA, q_base, do_base, row_base, t, valid,
                                        tl.trans(_band_seen(t, s, length, LEAD)) & valid[None, :], dk, dv, qk_scale,
                                        D, HEAD_DIM, sq_l, sdo_l, PRECISION)
    dk *= scale
    dims = tl.arange(0, D)
    if HAS_PAST:  # boundary keys add what the queries past their band gave them, span by span
        slot = tl.load(KEY_SLOT + s, mask=in_range, other=-1)
        is_key = slot >= 0
        for part in range(0, spans):
            past = (part * tl.num_programs(1) + bh) * n_keys * D + slot[:, None] * D + dims[None, :]
            dk += tl.load(DK_PAST + past, mask=is_key[:, None], other=0.0)
            dv += tl.load(DV_PAST + past, mask=is_key[:, None], other=0.0)
    offsets = bh * length * HEAD_DIM + s[:, None] * HEAD_DIM + dims[None, :]
    written = _in_head(in_range, D, HEAD_DIM)
    tl.store(DK + offsets, dk.to(DK.dtype.element_ty), mask=written)
    tl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=written)


# ---------------------------------------------------------------------------
# Launchers, as custom ops (opaque to torch.compile) with the backward as the forward's autograd formula


def _precision(dtype: torch.dtype) -> str:
    """Products as accurate as the inputs: half ones are exact on tensor cores anyway; fp32 ones go
    through three TF32 products (each operand split into its TF32 part and the remainder), which
    keep fp32's accuracy and compile about four times faster than fp32 products without tensor cores
    (``ieee``: ~49 s per case of four kernels at heads of 64, against ~11 s)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _tile_width(n: int) -> int:
    """``n`` rows or dims as a tile: a power of two of at least 16 (tensor cores), the rest masked.
    For the head dim, and for the band's rows beyond a block (``lead``)."""
    return max(16, triton.next_power_of_2(n))


def _extent(x: Tensor) -> int:
    """How many elements from ``x``'s first to its last (a strided view spans more than its own)."""
    return 1 + sum((n - 1) * stride for n, stride in zip(x.shape, x.stride()))


def _query_spans(length: int) -> tuple[int, int]:
    """How the boundary keys' backward splits the queries: (span, number of spans).

    A block of early boundaries is seen by almost every query, so one program walking them
    all would take ``P`` times as long as any forward program: the spans (at most
    ``MAX_SPANS``, of ``MIN_SPAN`` queries or more) run in parallel, each into its own fp32
    buffer, which the band's key program sums.
    """
    span = max(MIN_SPAN, triton.cdiv(length, MAX_SPANS))
    span = triton.cdiv(span, BLOCK_M) * BLOCK_M
    return span, triton.cdiv(length, span)


@torch.library.custom_op("attamba::chunk_fused_fwd", mutates_args=())
def _fused_fwd(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, n_visible: Tensor, key_slot: Tensor, lead: int,
               scale: float) -> tuple[Tensor, Tensor]:
    b, h, length, d = q.shape
    q, k, v = _unit_rows(q, k, v)
    out = q.new_empty(q.shape)
    lse = q.new_empty(b, h, length, dtype=torch.float32)
    _fwd_kernel[(triton.cdiv(length, BLOCK_M), b * h)](
        q, k, v, keys, n_visible, out, lse, *_strides(q, k, v, out), length, keys.numel(), h, h // k.shape[1],
        scale * _LOG2E.value, LEAD=lead, LEAD_PAD=_tile_width(lead), D=_tile_width(d), HEAD_DIM=d, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, PRECISION=_precision(q.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out, lse


@_fused_fwd.register_fake
def _fused_fwd_fake(q, k, v, keys, n_visible, key_slot, lead, scale):
    b, h, length, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(b, h, length, dtype=torch.float32)


@torch.library.custom_op("attamba::chunk_fused_bwd", mutates_args=())
def _fused_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, keys: Tensor,
               n_visible: Tensor, key_slot: Tensor, lead: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    b, h, length, d = q.shape
    kv_heads, n_keys = k.shape[1], keys.numel()
    grad_out, q, k, v, out = _unit_rows(grad_out, q, k, v, out)
    lse = lse.contiguous()
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    delta = q.new_empty(b, h, length, dtype=torch.float32)
    span, spans = _query_spans(length)
    dk_past = k.new_empty(spans, b, kv_heads, max(n_keys, 1), _tile_width(d), dtype=torch.float32)
    dv_past = torch.empty_like(dk_past)
    common = dict(D=_tile_width(d), HEAD_DIM=d, LEAD=lead, PRECISION=_precision(q.dtype), num_warps=NUM_WARPS,
                  num_stages=NUM_STAGES)
    _bwd_query_kernel[(triton.cdiv(length, BLOCK_M), b * h)](
        grad_out, q, k, v, out, lse, keys, n_visible, dq, delta, *_strides(grad_out, q, k, v, out),
        length, n_keys, h, h // kv_heads, scale, scale * _LOG2E.value, LEAD_PAD=_tile_width(lead), BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, **common)
    if n_keys:
        _bwd_past_key_kernel[(triton.cdiv(n_keys, BLOCK_N), b * kv_heads, spans)](
            grad_out, q, k, v, lse, delta, keys, n_visible, dk_past, dv_past, *_strides(grad_out, q, k, v),
            length, n_keys, h, kv_heads, scale, scale * _LOG2E.value, span, GROUP=h // kv_heads, BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N, **common)
    _bwd_band_key_kernel[(triton.cdiv(length, BLOCK_N), b * kv_heads)](
        grad_out, q, k, v, lse, delta, key_slot, dk_past, dv_past, dk, dv, *_strides(grad_out, q, k, v),
        length, n_keys, h, kv_heads, scale, scale * _LOG2E.value, spans, GROUP=h // kv_heads,
        LEAD_PAD=_tile_width(lead), BLOCK_N=BLOCK_N, HAS_PAST=n_keys > 0, **common)
    return dq, dk, dv


@_fused_bwd.register_fake
def _fused_bwd_fake(grad_out, q, k, v, out, lse, keys, n_visible, key_slot, lead, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_for_backward(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, keys, n_visible, key_slot, lead, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, keys, n_visible, key_slot)
    ctx.lead, ctx.scale = lead, scale


def _backward(ctx, grad_out: Tensor, _grad_lse):
    q, k, v, out, lse, keys, n_visible, key_slot = ctx.saved_tensors
    dq, dk, dv = _fused_bwd(grad_out, q, k, v, out, lse, keys, n_visible, key_slot, ctx.lead, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_fused_fwd.register_autograd(_backward, setup_context=_save_for_backward)


def fused_chunk_attention(q: Tensor, k: Tensor, v: Tensor, table: BoundaryTable) -> Tensor:
    """Attamba attention of ``q [b, h, L, d]`` over ``k, v [b, h_kv, L, d]`` for the layout of ``table``."""
    if max(_extent(q), _extent(k), _extent(v)) >= 2 ** 31:
        raise ValueError(f"model.attn_impl=fused: q {tuple(q.shape)} spans 2^31 elements or more, past the "
                         f"kernels' 32-bit offsets; use fewer sequences per step or model.attn_impl=flash")
    dtype = joint_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return _fused_fwd(q, k, v, table.keys, table.n_visible, table.key_slot, table.lead,
                      q.shape[-1] ** -0.5)[0]
