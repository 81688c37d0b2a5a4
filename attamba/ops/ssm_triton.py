"""Fused Triton kernels (forward and backward) for the chunk-reset SSD scan when every chunk is short.

With the state reset at every chunk start, a token only sees the earlier tokens of its own
chunk, so per head ``i`` (group ``g = i // (h // G)``) the scan is a decay-masked attention::

    y_t = Σ_{s<=t, chunk(s)=chunk(t)} exp(cs_t - cs_s) (C_t·B_s) dt_s x_s + D_i x_t,
    cs_t = Σ_{m<=t} dt_m A_i                                  (a running sum; only differences matter)

Tiling. `tile_table` packs consecutive whole chunks greedily into tiles of 16, 32 or 64 tokens
(the smallest that holds the longest chunk), so no chunk crosses a tile and every tile is
independent: one program per (tile, batch, group) loads the tile's B and C once, forms ``C Bᵀ``
[TILE, TILE], and loops over the group's h // G heads. The mask ``s <= t and chunk(s) = chunk(t)`` keeps the tile's chunks
apart; slots past the tile's end are loaded as zeros and never stored. Every token belongs to
exactly one tile, so each output element is written by exactly one program: no atomics, and
results are deterministic. ``cs`` is a cumsum over the tile (at most 64 tokens, like mamba_ssm's
chunk cumsums), taken in fp32.

Per head, with ``L[t, s] = mask · exp(cs_t - cs_s)``, ``W = L ∘ (C Bᵀ)``::

    forward    y  = (W · diag(dt)) x + D x
    backward   Pm = dy xᵀ                        (Pm[t, s] = dy_t · x_s)
               dx = (W · diag(dt))ᵀ dy + D dy
               dt gets colsum(Pm ∘ W)            (dt_s scales x_s)
               d(C Bᵀ) += Pm ∘ L · diag(dt)      (summed over the group's heads) -> dC, dB
               Gm = Pm ∘ W · diag(dt)            (= dW ∘ W: the gradient of each exponent cs_t - cs_s)
               dcs = rowsum(Gm) - colsum(Gm);  da = reverse cumsum of dcs   (a_m = dt_m A feeds cs_{t>=m})
               dt gets da · A,   dA gets Σ da · dt,   dD gets Σ dy ∘ x
dA and dD are written as per-(batch, tile, head) partial sums and reduced in torch.

Precision: everything is accumulated in fp32. Matmul operands are in x's dtype: fp32 inputs
use full-precision fp32 dots (``input_precision="ieee"``, no TF32), bf16/fp16 inputs feed the
tensor cores in that dtype (the decay-weighted scores are rounded to it, as in mamba_ssm).

The kernels read x, dt, A, B, C, D and the incoming gradient through their strides, so views
(x sliced out of a projection, an expanded dy) cost no copy; outputs are allocated contiguous.
Both passes are ``torch.library`` custom ops with fake (meta) implementations and an autograd
formula, so `chunk_local_ssd` traces into a single torch.compile graph. Build the `TileTable`
outside compiled code (it reads chunk_start on the host) and move it to the device once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

TILES = (16, 32, 64)  # tile sizes (tokens) the kernels take: tl.dot's smallest M is 16
TILE = TILES[-1]  # the longest chunk the fused kernels take
# Warps per program (forward, backward) by tile size, timed on an H200 (bf16, 16 heads of 32, state
# 32, 16K tokens, CUDA graphs): a tile's elementwise work grows with its size, so small tiles on one
# warp each run the most programs at once. Tile 16 on 1/1 warps took 0.015/0.048 ms against tile
# 64's 0.046/0.21 ms on the 4/8 warps picked earlier from ptxas's register reports.
WARPS = {16: (1, 1), 32: (1, 1), 64: (2, 4)}


# ----------------------------------------------------------------------------- tile table


@dataclass(frozen=True, eq=False)
class TileTable:
    """Whole chunks packed into tiles of at most `tile` consecutive tokens.

    starts, lengths [n_tiles] int32: tile k covers tokens [starts[k], starts[k] + lengths[k]);
    the tiles cover 0..L in order. chunk_id [L] int32: the index of each token's chunk.
    """

    tile: int
    starts: Tensor
    lengths: Tensor
    chunk_id: Tensor
    _copies: dict[torch.device, TileTable] = field(default_factory=dict, init=False, repr=False)

    @property
    def n_tiles(self) -> int:
        return self.starts.numel()

    @property
    def seq_len(self) -> int:
        return self.chunk_id.numel()

    def to(self, device: torch.device | str) -> TileTable:
        """The same table on `device` (copied once per device, then cached)."""
        device = torch.device(device)
        if self.starts.device == device:
            return self
        if device not in self._copies:
            self._copies[device] = TileTable(
                self.tile, self.starts.to(device), self.lengths.to(device), self.chunk_id.to(device)
            )
        return self._copies[device]


@torch.compiler.disable
def tile_table(chunk_start: Tensor, tile: Optional[int] = None) -> Optional[TileTable]:
    """The (cached, CPU) tile table of `chunk_start` (bool [L]), or None if a chunk is longer than `tile`.

    tile is one of TILES; None picks the smallest that holds the longest chunk (the fastest).
    Reads chunk_start on the host: a sync when it lives on the GPU, so keep it on the CPU.
    """
    if tile is not None and tile not in TILES:
        raise ValueError(f"tile_table: tile must be one of {', '.join(map(str, TILES))}, got {tile}")
    return _tile_table(chunk_start.detach().to("cpu", torch.bool).numpy().tobytes(), tile)


@functools.lru_cache(maxsize=128)
def _tile_table(key: bytes, tile: Optional[int]) -> Optional[TileTable]:
    is_start = np.frombuffer(key, dtype=np.bool_).copy()
    is_start[0] = True
    length = is_start.size
    chunk_starts = np.flatnonzero(is_start)
    chunk_ends = np.append(chunk_starts[1:], length)
    longest = (chunk_ends - chunk_starts).max()
    if tile is None:
        tile = next((size for size in TILES if size >= longest), TILE)
    if longest > tile:
        return None
    tile_starts = [0]
    for start, end in zip(chunk_starts.tolist(), chunk_ends.tolist()):
        if end - tile_starts[-1] > tile:  # this chunk would overflow the open tile: it opens the next
            tile_starts.append(start)
    starts = np.array(tile_starts)
    lengths = np.diff(starts, append=length)
    chunk_id = np.cumsum(is_start) - 1

    def int32(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.int32))

    return TileTable(tile, int32(starts), int32(lengths), int32(chunk_id))


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tile_pairs(starts_ptr, lengths_ptr, chunk_id_ptr, TILE: tl.constexpr):
    """This program's tile: its tokens, slots and their chunks [TILE], which slots hold a token, and
    which pairs (t, s) interact.

    Pairs are s <= t in one chunk. Padding slots (past the tile's end) get chunk -1, so they pair
    only among themselves, where their zero gradients contribute nothing.
    """
    tile = tl.program_id(0)
    start = tl.load(starts_ptr + tile)
    length = tl.load(lengths_ptr + tile)
    slot = tl.arange(0, TILE)
    valid = slot < length
    tokens = start + slot
    chunk = tl.load(chunk_id_ptr + tokens, mask=valid, other=-1)
    pairs = (slot[:, None] >= slot[None, :]) & (chunk[:, None] == chunk[None, :])
    return tokens, slot, chunk, valid, pairs


@triton.jit
def _mm(a, b, dtype: tl.constexpr):
    """a @ b accumulated in fp32; operands in `dtype`: exact fp32 products (no TF32), or bf16/fp16."""
    if dtype == tl.float32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a.to(dtype), b.to(dtype))
    return out


@triton.jit
def _chunk_extent(slot, chunk):
    """Each slot's offset in its chunk and how many of its chunk's tokens follow it [TILE].

    A chunk never crosses a tile, so both stay inside the tile; padding slots (chunk -1) count
    among themselves."""
    same_chunk = chunk[:, None] == chunk[None, :]
    first = tl.min(tl.where(same_chunk, slot[None, :], slot[:, None]), axis=1)
    last = tl.max(tl.where(same_chunk, slot[None, :], slot[:, None]), axis=1)
    return slot - first, last - slot


@triton.jit
def _shift(values, slot, by: tl.constexpr, dtype: tl.constexpr):
    """``values[slot - by]`` along the tokens (rows) of a [TILE, K] tile, zero where that leaves the tile.

    A product with a 0/1 matrix on the tensor cores: one term per output, so exact for half values
    and TF32-rounded for fp32 ones in a half-precision run. On an H200 it beat moving the rows
    between threads with ``tl.gather`` (backward 0.225 against 0.265 ms per layer at 1K).
    """
    select = slot[None, :] == slot[:, None] - by  # [s, t]: t = s - by
    if values.dtype == tl.float32:
        if dtype == tl.float32:
            return tl.dot(select.to(tl.float32), values, input_precision="tf32x3")
        return tl.dot(select.to(tl.float32), values, input_precision="tf32")
    return tl.dot(select.to(values.dtype), values)


@triton.jit
def _scan_input(ptr, base, s_l, cols, tokens, slot, offset, valid, w_ptr, bias_ptr, channels,
                TILE: tl.constexpr, K: tl.constexpr, WIDTH: tl.constexpr):
    """One input of the scan [TILE, K] (x of a head, or B or C of a group), its pre-activation and
    the raw values it was computed from.

    With conv weights, silu of the chunk-local causal conv of the raw values, in fp32
    (``weight[c, WIDTH-1-lag]`` multiplies the token `lag` back, which the tile holds when
    ``offset >= lag``); without, the values as stored. ``base + token * s_l + cols`` addresses the
    raw values, ``channels`` [K] the conv's channels.
    """
    raw = tl.load(ptr + base + tokens[:, None] * s_l + cols[None, :], mask=valid[:, None], other=0.0)
    if w_ptr is not None:
        pre = tl.zeros([TILE, K], dtype=tl.float32) + tl.load(bias_ptr + channels).to(tl.float32)[None, :]
        for lag in tl.static_range(WIDTH):
            weight = tl.load(w_ptr + channels * WIDTH + WIDTH - 1 - lag).to(tl.float32)
            if lag == 0:
                pre += raw.to(tl.float32) * weight[None, :]
            else:
                behind = _shift(raw, slot, lag, raw.dtype).to(tl.float32)
                behind = tl.where((offset >= lag)[:, None], behind, 0.0)
                pre += behind * weight[None, :]
        value = tl.where(valid[:, None], pre * tl.sigmoid(pre), 0.0)
    else:
        value = raw
        pre = raw
    return value, pre, raw


@triton.jit
def _store_input_grad(d_value, pre, raw, slot, offset, remaining, valid, w_ptr, channels, d_ptr, d_offsets,
                      dw_part_ptr, db_part_ptr, part, WIDTH: tl.constexpr):
    """Store the gradient of one scan input (see `_scan_input`): as is, or through the SiLU and the conv.

    Through the conv: d_raw[s] = Σ_lag weight[lag] d_pre[s + lag] over the taps that stay in s's
    chunk (``remaining >= lag``). The weight and bias gradients are this tile's sums, stored at
    ``part`` (one row of partial sums per program).
    """
    if w_ptr is not None:
        sig = tl.sigmoid(pre)
        d_pre = tl.where(valid[:, None], d_value * sig * (1.0 + pre * (1.0 - sig)), 0.0)
        d_raw = tl.zeros(d_pre.shape, dtype=tl.float32)
        for lag in tl.static_range(WIDTH):
            weight = tl.load(w_ptr + channels * WIDTH + WIDTH - 1 - lag).to(tl.float32)
            if lag == 0:
                d_raw += d_pre * weight[None, :]
                behind = raw.to(tl.float32)
            else:
                ahead = tl.where((remaining >= lag)[:, None], _shift(d_pre, slot, -lag, raw.dtype), 0.0)
                d_raw += ahead * weight[None, :]
                behind = _shift(raw, slot, lag, raw.dtype).to(tl.float32)
                behind = tl.where((offset >= lag)[:, None], behind, 0.0)
            tl.store(dw_part_ptr + (part + channels) * WIDTH + WIDTH - 1 - lag, tl.sum(d_pre * behind, axis=0))
        tl.store(db_part_ptr + part + channels, tl.sum(d_pre, axis=0))
        d_value = d_raw
    tl.store(d_ptr + d_offsets, d_value.to(d_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _time_step(dt_ptr, base, s_l, tokens, valid, dt_bias_ptr, head):
    """dt [TILE] in fp32 (softplus(dt + dt_bias) with a bias) and its slope d dt / d (stored dt)."""
    raw = tl.load(dt_ptr + base + tokens * s_l, mask=valid, other=0.0).to(tl.float32)
    if dt_bias_ptr is not None:
        u = raw + tl.load(dt_bias_ptr + head).to(tl.float32)
        # softplus(u) = max(u, 0) + log1p(exp(-|u|)), log1p through log(w) z / (w - 1), w = 1 + z
        # (exact to rounding for small z, where log(1 + z) alone would lose z's digits)
        z = tl.exp(-tl.abs(u))
        w = 1.0 + z
        log1p = tl.where(w == 1.0, z, tl.log(w) * z / (w - 1.0))
        dt = tl.where(valid, tl.maximum(u, 0.0) + log1p, 0.0)
        slope = tl.sigmoid(u)
    else:
        dt = raw
        slope = tl.full(raw.shape, 1.0, tl.float32)
    return dt, slope


@triton.jit
def _decay(dt, A):
    """exp(min(cs_t - cs_s, 0)) [TILE, TILE], cs = cumsum(dt * A).

    dt >= 0 and A <= 0 make cs non-increasing (rounding is monotone too), so on every pair
    s <= t the exponent is <= 0 and the clamp is exact; it only keeps the pairs s > t, which
    the masked scores zero, from overflowing to inf (inf * 0 = nan).
    """
    cs = tl.cumsum(dt * A, axis=0)
    return tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0))


@triton.jit
def _ssd_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, wx_ptr, bx_ptr, wB_ptr, bB_ptr, wC_ptr, bC_ptr,
    y_ptr, starts_ptr, lengths_ptr, chunk_id_ptr, seq_len,
    sx_b, sx_l, sx_g, sx_r, sx_p, sdt_b, sdt_l, sdt_g, sdt_r, sA,
    sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n, sD,
    P: tl.constexpr, N: tl.constexpr, TILE: tl.constexpr, HEADS_PER_GROUP: tl.constexpr, WIDTH: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)  # int64 offsets: b * L * h * p may pass 2**31
    group = tl.program_id(2)
    n_heads = tl.num_programs(2) * HEADS_PER_GROUP
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    tokens, slot, chunk, valid, pairs = _tile_pairs(starts_ptr, lengths_ptr, chunk_id_ptr, TILE)
    offset = _chunk_extent(slot, chunk)[0]
    p = tl.arange(0, P)
    n = tl.arange(0, N)
    B = _scan_input(B_ptr, batch * sB_b + group * sB_g, sB_l, n * sB_n, tokens, slot, offset, valid,
                    wB_ptr, bB_ptr, group * N + n, TILE, N, WIDTH)[0]
    C = _scan_input(C_ptr, batch * sC_b + group * sC_g, sC_l, n * sC_n, tokens, slot, offset, valid,
                    wC_ptr, bC_ptr, group * N + n, TILE, N, WIDTH)[0]
    scores = tl.where(pairs, _mm(C, tl.trans(B), dtype), 0.0)  # C_t · B_s, shared by the group's heads

    for r in range(HEADS_PER_GROUP):
        head = group * HEADS_PER_GROUP + r
        x = _scan_input(x_ptr, batch * sx_b + group * sx_g + r * sx_r, sx_l, p * sx_p, tokens, slot, offset,
                        valid, wx_ptr, bx_ptr, head * P + p, TILE, P, WIDTH)[0]
        dt = _time_step(dt_ptr, batch * sdt_b + group * sdt_g + r * sdt_r, sdt_l, tokens, valid, dt_bias_ptr,
                        head)[0]
        decay = _decay(dt, tl.load(A_ptr + head * sA).to(tl.float32))
        # dt scales the columns of W rather than x: x reaches the dot unrounded in low precision.
        y = _mm(scores * decay * dt[None, :], x, dtype)
        if D_ptr is not None:
            y += tl.load(D_ptr + head * sD).to(tl.float32) * x.to(tl.float32)
        out = ((batch * seq_len + tokens[:, None]) * n_heads + head) * P + p[None, :]
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _ssd_bwd_kernel(
    dy_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, wx_ptr, bx_ptr, wB_ptr, bB_ptr, wC_ptr, bC_ptr,
    starts_ptr, lengths_ptr, chunk_id_ptr,
    dx_ptr, ddt_ptr, dB_ptr, dC_ptr, head_part_ptr, dwx_part_ptr, dbx_part_ptr, dwB_part_ptr, dbB_part_ptr,
    dwC_part_ptr, dbC_part_ptr,
    seq_len,
    sdy_b, sdy_l, sdy_h, sdy_p, sx_b, sx_l, sx_g, sx_r, sx_p, sdt_b, sdt_l, sdt_g, sdt_r, sA,
    sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n, sD,
    P: tl.constexpr, N: tl.constexpr, TILE: tl.constexpr, HEADS_PER_GROUP: tl.constexpr, WIDTH: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)  # int64 offsets: b * L * h * p may pass 2**31
    group = tl.program_id(2)
    n_groups = tl.num_programs(2)
    n_heads = n_groups * HEADS_PER_GROUP
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    tokens, slot, chunk, valid, pairs = _tile_pairs(starts_ptr, lengths_ptr, chunk_id_ptr, TILE)
    offset, remaining = _chunk_extent(slot, chunk)
    p = tl.arange(0, P)
    n = tl.arange(0, N)
    program = batch * tl.num_programs(0) + tl.program_id(0)  # the row of this program's partial sums
    B_base, C_base = batch * sB_b + group * sB_g, batch * sC_b + group * sC_g
    # B and C only make the scores here; they are loaded again after the heads' loop, which then
    # holds fewer tiles in registers.
    scores = tl.where(pairs, _mm(_scan_input(C_ptr, C_base, sC_l, n * sC_n, tokens, slot, offset, valid, wC_ptr,
                                             bC_ptr, group * N + n, TILE, N, WIDTH)[0],
                                 tl.trans(_scan_input(B_ptr, B_base, sB_l, n * sB_n, tokens, slot, offset, valid,
                                                      wB_ptr, bB_ptr, group * N + n, TILE, N, WIDTH)[0]), dtype),
                      0.0)
    dscores = tl.zeros([TILE, TILE], dtype=tl.float32)

    for r in range(HEADS_PER_GROUP):
        head = group * HEADS_PER_GROUP + r
        x, x_pre, x_raw = _scan_input(x_ptr, batch * sx_b + group * sx_g + r * sx_r, sx_l, p * sx_p, tokens, slot,
                                      offset, valid, wx_ptr, bx_ptr, head * P + p, TILE, P, WIDTH)
        dy = tl.load(dy_ptr + batch * sdy_b + tokens[:, None] * sdy_l + head * sdy_h + p[None, :] * sdy_p,
                     mask=valid[:, None], other=0.0)
        dt, slope = _time_step(dt_ptr, batch * sdt_b + group * sdt_g + r * sdt_r, sdt_l, tokens, valid,
                               dt_bias_ptr, head)
        A = tl.load(A_ptr + head * sA).to(tl.float32)
        decay = _decay(dt, A)
        w = scores * decay
        dx = _mm(tl.trans(w * dt[None, :]), dy, dtype)
        dy_x = _mm(dy, tl.trans(x), dtype)  # dy_t · x_s
        dw_w = dy_x * w
        dscores += dy_x * decay * dt[None, :]
        dlog = dw_w * dt[None, :]  # gradient of the exponent cs_t - cs_s
        da = tl.cumsum(tl.sum(dlog, axis=1) - tl.sum(dlog, axis=0), axis=0, reverse=True)
        ddt = (tl.sum(dw_w, axis=0) + da * A) * slope
        dyf = dy.to(tl.float32)
        if D_ptr is not None:
            dx += tl.load(D_ptr + head * sD).to(tl.float32) * dyf
        tl.store(ddt_ptr + (batch * seq_len + tokens) * n_heads + head, ddt.to(ddt_ptr.dtype.element_ty),
                 mask=valid)
        # per-head partial sums [program, 3, h]: dA, dD and the dt bias's gradient
        tl.store(head_part_ptr + (program * 3) * n_heads + head, tl.sum(da * dt, axis=0))
        tl.store(head_part_ptr + (program * 3 + 1) * n_heads + head, tl.sum(dyf * x.to(tl.float32)))
        tl.store(head_part_ptr + (program * 3 + 2) * n_heads + head, tl.sum(ddt, axis=0))
        out = ((batch * seq_len + tokens[:, None]) * n_heads + head) * P + p[None, :]
        _store_input_grad(dx, x_pre, x_raw, slot, offset, remaining, valid, wx_ptr, head * P + p, dx_ptr, out,
                          dwx_part_ptr, dbx_part_ptr, program * n_heads * P, WIDTH)

    dscores = tl.where(pairs, dscores, 0.0)  # the gradient of the masked scores
    out = ((batch * seq_len + tokens[:, None]) * n_groups + group) * N + n[None, :]
    part = program * n_groups * N
    B, B_pre, B_raw = _scan_input(B_ptr, B_base, sB_l, n * sB_n, tokens, slot, offset, valid, wB_ptr, bB_ptr,
                                  group * N + n, TILE, N, WIDTH)
    C, C_pre, C_raw = _scan_input(C_ptr, C_base, sC_l, n * sC_n, tokens, slot, offset, valid, wC_ptr, bC_ptr,
                                  group * N + n, TILE, N, WIDTH)
    _store_input_grad(_mm(dscores, B, dtype), C_pre, C_raw, slot, offset, remaining, valid, wC_ptr, group * N + n,
                      dC_ptr, out, dwC_part_ptr, dbC_part_ptr, part, WIDTH)
    _store_input_grad(_mm(tl.trans(dscores), C, dtype), B_pre, B_raw, slot, offset, remaining, valid, wB_ptr,
                      group * N + n, dB_ptr, out, dwB_part_ptr, dbB_part_ptr, part, WIDTH)


# ----------------------------------------------------------------------------- custom ops


def _strides(*tensors: Optional[Tensor]) -> list[int]:
    """Every stride of each tensor in order; 0 for an absent (None) one."""
    return [s for t in tensors for s in (t.stride() if t is not None else (0,))]


def _conv_width(conv_x_weight: Optional[Tensor]) -> int:
    return 0 if conv_x_weight is None else conv_x_weight.shape[-1]


@torch.library.custom_op("attamba::chunk_local_ssd_fwd", mutates_args=())
def _ssd_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], dt_bias: Optional[Tensor],
             conv_x_weight: Optional[Tensor], conv_x_bias: Optional[Tensor], conv_B_weight: Optional[Tensor],
             conv_B_bias: Optional[Tensor], conv_C_weight: Optional[Tensor], conv_C_bias: Optional[Tensor],
             starts: Tensor, lengths: Tensor, chunk_id: Tensor, tile: int) -> Tensor:
    """y [b, L, h, p] from x [b, L, g, h/g, p] and dt [b, L, g, h/g] (see `chunk_local_ssd`)."""
    b, length, groups, per_group, p = x.shape
    n = B.shape[-1]
    y = x.new_empty(b, length, groups * per_group, p)
    _ssd_fwd_kernel[(starts.numel(), b, groups)](
        x, dt, A, B, C, D, dt_bias, conv_x_weight, conv_x_bias, conv_B_weight, conv_B_bias, conv_C_weight,
        conv_C_bias, y, starts, lengths, chunk_id, length, *_strides(x, dt, A, B, C, D),
        P=p, N=n, TILE=tile, HEADS_PER_GROUP=per_group, WIDTH=_conv_width(conv_x_weight),
        num_warps=WARPS[tile][0],
    )
    return y


@_ssd_fwd.register_fake
def _ssd_fwd_fake(x, dt, A, B, C, D, dt_bias, *conv_and_table):
    b, length, groups, per_group, p = x.shape
    return x.new_empty(b, length, groups * per_group, p)


@torch.library.custom_op("attamba::chunk_local_ssd_bwd", mutates_args=())
def _ssd_bwd(dy: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             dt_bias: Optional[Tensor], conv_x_weight: Optional[Tensor], conv_x_bias: Optional[Tensor],
             conv_B_weight: Optional[Tensor], conv_B_bias: Optional[Tensor], conv_C_weight: Optional[Tensor],
             conv_C_bias: Optional[Tensor], starts: Tensor, lengths: Tensor, chunk_id: Tensor, tile: int
             ) -> list[Tensor]:
    """Gradients of x, dt, A, B, C, D, dt_bias and the conv's six weights and biases, each in its input's
    dtype (contiguous, x's and dt's shaped [b, L, h, p] and [b, L, h]); empty for an absent input."""
    b, length, groups, per_group, p = x.shape
    n, h, width = B.shape[-1], groups * per_group, _conv_width(conv_x_weight)
    programs = b * starts.numel()
    dx, ddt = x.new_empty(b, length, h, p), dt.new_empty(b, length, h)
    dB, dC = B.new_empty(B.shape), C.new_empty(C.shape)
    head_part = x.new_empty(programs, 3, h, dtype=torch.float32)
    conv_parts = [x.new_empty(programs, channels, *shape, dtype=torch.float32) if width else None
                  for channels in (h * p, groups * n, groups * n) for shape in ((width,), ())]
    _ssd_bwd_kernel[(starts.numel(), b, groups)](
        dy, x, dt, A, B, C, D, dt_bias, conv_x_weight, conv_x_bias, conv_B_weight, conv_B_bias, conv_C_weight,
        conv_C_bias, starts, lengths, chunk_id, dx, ddt, dB, dC, head_part, *conv_parts,
        length, *_strides(dy, x, dt, A, B, C, D),
        P=p, N=n, TILE=tile, HEADS_PER_GROUP=per_group, WIDTH=width, num_warps=WARPS[tile][1],
    )
    dA, dD, d_dt_bias = (head_part[:, i].sum(dim=0) for i in range(3))  # three tensors: outputs may not alias

    def like(grad: Optional[Tensor], source: Optional[Tensor]) -> Tensor:
        return grad.to(source.dtype).reshape(source.shape) if source is not None else A.new_empty(0)

    conv = (conv_x_weight, conv_x_bias, conv_B_weight, conv_B_bias, conv_C_weight, conv_C_bias)
    return [dx, ddt, like(dA, A), dB, dC, like(dD, D), like(d_dt_bias, dt_bias),
            *(like(part.sum(dim=0) if part is not None else None, source) for part, source in zip(conv_parts, conv))]


@_ssd_bwd.register_fake
def _ssd_bwd_fake(dy, x, dt, A, B, C, D, dt_bias, *conv_and_table):
    b, length, groups, per_group, p = x.shape
    grads = [x.new_empty(b, length, groups * per_group, p), dt.new_empty(b, length, groups * per_group),
             A.new_empty(A.shape), B.new_empty(B.shape), C.new_empty(C.shape)]
    optional = (D, dt_bias, *conv_and_table[:6])
    return grads + [t.new_empty(t.shape) if t is not None else A.new_empty(0) for t in optional]


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    *tensors, ctx.tile = inputs
    ctx.save_for_backward(*tensors)


def _backward(ctx, dy: Tensor) -> tuple[Optional[Tensor], ...]:
    x, dt, A, B, C, *optional, starts, lengths, chunk_id = ctx.saved_tensors
    dx, ddt, dA, dB, dC, *d_optional = _ssd_bwd(dy, x, dt, A, B, C, *optional, starts, lengths, chunk_id, ctx.tile)
    d_optional = [grad if source is not None else None for grad, source in zip(d_optional, optional)]
    return (dx.view(x.shape), ddt.view(dt.shape), dA, dB, dC, *d_optional, None, None, None, None)


_ssd_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class ChunkConv:
    """The depthwise causal conv + SiLU that Mamba runs over x, B and C before the scan, its window
    reset at every chunk start (see :func:`attamba.ops.conv.chunked_causal_conv`).

    Weights ``[*channels, w]`` (``weight[..., -1]`` multiplies the current token) and biases
    ``[*channels]``: x's channels are ``[h, p]``, B's and C's ``[g, n]``.
    """

    x_weight: Tensor
    x_bias: Tensor
    B_weight: Tensor
    B_bias: Tensor
    C_weight: Tensor
    C_bias: Tensor

    def tensors(self) -> list[Tensor]:
        return [self.x_weight, self.x_bias, self.B_weight, self.B_bias, self.C_weight, self.C_bias]


def chunk_local_ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                    table: TileTable, conv: Optional[ChunkConv] = None, dt_bias: Optional[Tensor] = None) -> Tensor:
    """The chunk-reset SSD scan for layouts whose chunks all fit a tile, fused in Triton.

    x [b, L, h, p], or [b, L, g, h/g, p] with the heads of each of B's groups together (a view of
    a per-group projection then needs no copy); dt [b, L, h] or [b, L, g, h/g] (>= 0); A [h] (<= 0);
    B, C [b, L, g, n] (head i reads group i // (h // g)); D [h] or None; table:
    ``tile_table(chunk_start)`` on x's device. Any of them may be a strided view (no copies are
    made). p and n must be powers of two >= 16 (tl.dot's smallest tile).

    With `conv`, x, B and C are the conv's inputs, and the kernels apply it (chunk-local, then
    SiLU) as they load them; with `dt_bias`, the time step is softplus(dt + dt_bias). Neither
    intermediate is written to memory: the backward recomputes them.

    Matmuls run in x's dtype (see above). Returns y [b, L, h, p] in x's dtype; differentiable
    w.r.t. every tensor argument, whose gradients come back in their own dtypes.
    """
    groups, n = B.shape[-2:]
    if x.dim() == 4:
        x = x.unflatten(2, (groups, -1))
    if dt.dim() == 3:
        dt = dt.unflatten(2, (groups, -1))
    p = x.shape[-1]
    if p < 16 or p & (p - 1):
        raise ValueError(f"chunk_local_ssd: the head dim model.ssm.hidden / model.ssm.heads must be a power "
                         f"of two >= 16, got {p}")
    if n < 16 or n & (n - 1):
        raise ValueError(f"chunk_local_ssd: model.ssm.state_dim must be a power of two >= 16, got {n}")
    if table.seq_len != x.shape[1]:
        raise ValueError(f"chunk_local_ssd: the tile table is for {table.seq_len} tokens, x has {x.shape[1]}")
    if table.starts.device != x.device:
        raise ValueError(f"chunk_local_ssd: the tile table is on {table.starts.device}, x on {x.device}; "
                         f"pass table.to(x.device)")
    conv_tensors = [None] * 6 if conv is None else [t.contiguous() for t in conv.tensors()]
    if conv is not None and not 2 <= conv.x_weight.shape[-1] <= 4:
        raise ValueError(f"chunk_local_ssd: the conv width model.ssm.conv must be 2..4, got {conv.x_weight.shape[-1]}")
    return _ssd_fwd(x, dt, A, B, C, D, None if dt_bias is None else dt_bias.contiguous(), *conv_tensors,
                    table.starts, table.lengths, table.chunk_id, table.tile)
