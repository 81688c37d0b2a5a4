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
    """This program's tile: its tokens [TILE], which slots hold one, and which pairs (t, s) interact.

    Pairs are s <= t in one chunk. Padding slots (past the tile's end) get chunk -1, so they pair
    only among themselves, where their zero inputs and gradients contribute nothing.
    """
    tile = tl.program_id(0)
    start = tl.load(starts_ptr + tile)
    length = tl.load(lengths_ptr + tile)
    slot = tl.arange(0, TILE)
    valid = slot < length
    tokens = start + slot
    chunk = tl.load(chunk_id_ptr + tokens, mask=valid, other=-1)
    pairs = (slot[:, None] >= slot[None, :]) & (chunk[:, None] == chunk[None, :])
    return tokens, valid, pairs


@triton.jit
def _mm(a, b, dtype: tl.constexpr):
    """a @ b accumulated in fp32; operands in `dtype`: exact fp32 products (no TF32), or bf16/fp16."""
    if dtype == tl.float32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a.to(dtype), b.to(dtype))
    return out


@triton.jit
def _group_scores(B_ptr, C_ptr, batch, group, tokens, valid, pairs,
                  sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n, N: tl.constexpr, dtype: tl.constexpr):
    """The tile's B and C [TILE, N] of `group`, and C_t · B_s on the interacting pairs (else 0),
    which the group's heads share."""
    n = tl.arange(0, N)
    B = tl.load(B_ptr + batch * sB_b + tokens[:, None] * sB_l + group * sB_g + n[None, :] * sB_n,
                mask=valid[:, None], other=0.0)
    C = tl.load(C_ptr + batch * sC_b + tokens[:, None] * sC_l + group * sC_g + n[None, :] * sC_n,
                mask=valid[:, None], other=0.0)
    return B, C, tl.where(pairs, _mm(C, tl.trans(B), dtype), 0.0)


@triton.jit
def _decay(dt_ptr, A_ptr, batch, tokens, valid, head, sdt_b, sdt_l, sdt_h, sA):
    """dt [TILE] (fp32), A_head and exp(min(cs_t - cs_s, 0)) [TILE, TILE].

    dt >= 0 and A <= 0 make cs non-increasing (rounding is monotone too), so on every pair
    s <= t the exponent is <= 0 and the clamp is exact; it only keeps the pairs s > t, which
    the masked scores zero, from overflowing to inf (inf * 0 = nan).
    """
    dt = tl.load(dt_ptr + batch * sdt_b + tokens * sdt_l + head * sdt_h, mask=valid, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + head * sA).to(tl.float32)
    cs = tl.cumsum(dt * A, axis=0)
    return dt, A, tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0))


@triton.jit
def _ssd_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, starts_ptr, lengths_ptr, chunk_id_ptr,
    seq_len, n_heads,
    sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sA,
    sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n, sD,
    P: tl.constexpr, N: tl.constexpr, TILE: tl.constexpr, HEADS_PER_GROUP: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)  # int64 offsets: b * L * h * p may pass 2**31
    group = tl.program_id(2)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    tokens, valid, pairs = _tile_pairs(starts_ptr, lengths_ptr, chunk_id_ptr, TILE)
    p = tl.arange(0, P)
    B, C, scores = _group_scores(B_ptr, C_ptr, batch, group, tokens, valid, pairs,
                                 sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n, N, dtype)

    for r in range(HEADS_PER_GROUP):
        head = group * HEADS_PER_GROUP + r
        x = tl.load(x_ptr + batch * sx_b + tokens[:, None] * sx_l + head * sx_h + p[None, :] * sx_p,
                    mask=valid[:, None], other=0.0)
        dt, A, decay = _decay(dt_ptr, A_ptr, batch, tokens, valid, head, sdt_b, sdt_l, sdt_h, sA)
        # dt scales the columns of W rather than x: x reaches the dot unrounded in low precision.
        y = _mm(scores * decay * dt[None, :], x, dtype)
        if D_ptr is not None:
            y += tl.load(D_ptr + head * sD).to(tl.float32) * x.to(tl.float32)
        out = ((batch * seq_len + tokens[:, None]) * n_heads + head) * P + p[None, :]
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _ssd_bwd_kernel(
    dy_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, starts_ptr, lengths_ptr, chunk_id_ptr,
    dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr,
    seq_len, n_heads,
    sdy_b, sdy_l, sdy_h, sdy_p, sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sA,
    sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n, sD,
    P: tl.constexpr, N: tl.constexpr, TILE: tl.constexpr, HEADS_PER_GROUP: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)  # int64 offsets: b * L * h * p may pass 2**31
    group = tl.program_id(2)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    tokens, valid, pairs = _tile_pairs(starts_ptr, lengths_ptr, chunk_id_ptr, TILE)
    p = tl.arange(0, P)
    n = tl.arange(0, N)
    B, C, scores = _group_scores(B_ptr, C_ptr, batch, group, tokens, valid, pairs,
                                 sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n, N, dtype)
    dscores = tl.zeros([TILE, TILE], dtype=tl.float32)
    partial = (batch * tl.num_programs(0) + tl.program_id(0)) * n_heads  # [b, n_tiles, h] partial sums

    for r in range(HEADS_PER_GROUP):
        head = group * HEADS_PER_GROUP + r
        x = tl.load(x_ptr + batch * sx_b + tokens[:, None] * sx_l + head * sx_h + p[None, :] * sx_p,
                    mask=valid[:, None], other=0.0)
        dy = tl.load(dy_ptr + batch * sdy_b + tokens[:, None] * sdy_l + head * sdy_h + p[None, :] * sdy_p,
                     mask=valid[:, None], other=0.0)
        dt, A, decay = _decay(dt_ptr, A_ptr, batch, tokens, valid, head, sdt_b, sdt_l, sdt_h, sA)
        w = scores * decay
        dx = _mm(tl.trans(w * dt[None, :]), dy, dtype)
        dy_x = _mm(dy, tl.trans(x), dtype)  # dy_t · x_s
        dw_w = dy_x * w
        dscores += dy_x * decay * dt[None, :]
        dlog = dw_w * dt[None, :]  # gradient of the exponent cs_t - cs_s
        da = tl.cumsum(tl.sum(dlog, axis=1) - tl.sum(dlog, axis=0), axis=0, reverse=True)
        ddt = tl.sum(dw_w, axis=0) + da * A
        dyf = dy.to(tl.float32)
        if D_ptr is not None:
            dx += tl.load(D_ptr + head * sD).to(tl.float32) * dyf
        out = ((batch * seq_len + tokens[:, None]) * n_heads + head) * P + p[None, :]
        tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=valid[:, None])
        tl.store(ddt_ptr + (batch * seq_len + tokens) * n_heads + head, ddt.to(ddt_ptr.dtype.element_ty),
                 mask=valid)
        tl.store(dA_part_ptr + partial + head, tl.sum(da * dt, axis=0))
        tl.store(dD_part_ptr + partial + head, tl.sum(dyf * x.to(tl.float32)))

    dscores = tl.where(pairs, dscores, 0.0)  # the gradient of the masked scores
    n_groups = tl.num_programs(2)
    out = ((batch * seq_len + tokens[:, None]) * n_groups + group) * N + n[None, :]
    dC = _mm(dscores, B, dtype)
    tl.store(dC_ptr + out, dC.to(dC_ptr.dtype.element_ty), mask=valid[:, None])
    dB = _mm(tl.trans(dscores), C, dtype)
    tl.store(dB_ptr + out, dB.to(dB_ptr.dtype.element_ty), mask=valid[:, None])


# ----------------------------------------------------------------------------- custom ops


def _strides(*tensors: Optional[Tensor]) -> list[int]:
    """Every stride of each tensor in order; 0 for an absent (None) one."""
    return [s for t in tensors for s in (t.stride() if t is not None else (0,))]


@torch.library.custom_op("attamba::chunk_local_ssd_fwd", mutates_args=())
def _ssd_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             starts: Tensor, lengths: Tensor, chunk_id: Tensor, tile: int) -> Tensor:
    b, length, h, p = x.shape
    groups, n = B.shape[2:]
    y = x.new_empty(x.shape)
    _ssd_fwd_kernel[(starts.numel(), b, groups)](
        x, dt, A, B, C, D, y, starts, lengths, chunk_id, length, h, *_strides(x, dt, A, B, C, D),
        P=p, N=n, TILE=tile, HEADS_PER_GROUP=h // groups, num_warps=WARPS[tile][0],
    )
    return y


@_ssd_fwd.register_fake
def _ssd_fwd_fake(x, dt, A, B, C, D, starts, lengths, chunk_id, tile):
    return x.new_empty(x.shape)


@torch.library.custom_op("attamba::chunk_local_ssd_bwd", mutates_args=())
def _ssd_bwd(dy: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             starts: Tensor, lengths: Tensor, chunk_id: Tensor, tile: int
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, ddt, dA, dB, dC, dD), each in its input's dtype (dD in fp32 when D is None)."""
    b, length, h, p = x.shape
    groups, n = B.shape[2:]
    dx, ddt, dB, dC = x.new_empty(x.shape), dt.new_empty(dt.shape), B.new_empty(B.shape), C.new_empty(C.shape)
    dA_part = x.new_empty(b, starts.numel(), h, dtype=torch.float32)
    dD_part = torch.empty_like(dA_part)
    _ssd_bwd_kernel[(starts.numel(), b, groups)](
        dy, x, dt, A, B, C, D, starts, lengths, chunk_id, dx, ddt, dB, dC, dA_part, dD_part,
        length, h, *_strides(dy, x, dt, A, B, C, D), P=p, N=n, TILE=tile, HEADS_PER_GROUP=h // groups,
        num_warps=WARPS[tile][1],
    )
    dD = dD_part.sum(dim=(0, 1)).to(D.dtype if D is not None else torch.float32)
    return dx, ddt, dA_part.sum(dim=(0, 1)).to(A.dtype), dB, dC, dD


@_ssd_bwd.register_fake
def _ssd_bwd_fake(dy, x, dt, A, B, C, D, starts, lengths, chunk_id, tile):
    dD = A.new_empty(A.shape, dtype=D.dtype if D is not None else torch.float32)
    return tuple(t.new_empty(t.shape) for t in (x, dt, A, B, C)) + (dD,)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    *tensors, ctx.tile = inputs
    ctx.save_for_backward(*tensors)


def _backward(ctx, dy: Tensor) -> tuple[Optional[Tensor], ...]:
    x, dt, A, B, C, D, starts, lengths, chunk_id = ctx.saved_tensors
    dx, ddt, dA, dB, dC, dD = _ssd_bwd(dy, x, dt, A, B, C, D, starts, lengths, chunk_id, ctx.tile)
    return dx, ddt, dA, dB, dC, (dD if D is not None else None), None, None, None, None


_ssd_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def chunk_local_ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                    table: TileTable) -> Tensor:
    """The chunk-reset SSD scan for layouts whose chunks all fit a tile, fused in Triton.

    x [b, L, h, p]; dt [b, L, h] (>= 0: softplus applied); A [h] (<= 0); B, C [b, L, G, n] (head
    i reads group i // (h // G)); D [h] or None; table: ``tile_table(chunk_start)`` on x's device.
    Any of them may be a strided view (no copies are made). p and n must be powers of two >= 16
    (tl.dot's smallest tile; aranges are powers of two). Matmuls run in x's dtype (see above).
    Returns y [b, L, h, p] in x's dtype; differentiable w.r.t. x, dt, A, B, C and D, whose
    gradients come back in their own dtypes.
    """
    p, n = x.shape[-1], B.shape[-1]
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
    return _ssd_fwd(x, dt, A, B, C, D, table.starts, table.lengths, table.chunk_id, table.tile)
