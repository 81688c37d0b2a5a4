"""Mamba-2 (SSD) selective scan whose state resets at every chunk start.

Recurrence, per head (state ``[p, n]``)::

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t ⊗ B_t     (state_{t-1} := 0 at a chunk start)
    y_t     = state_t · C_t + D * x_t

Unrolled inside one chunk this is a decay-masked attention,
``y_t = Σ_{s<=t} exp(Σ_{s<k<=t} dt_k A) (C_t·B_s) dt_s x_s``, which every fast path evaluates
in blocks. ``chunk_scan(impl=...)`` picks one of:

* ``reference``  the step-by-step recurrence in fp32 (the oracle; any layout, slow).
* ``blockdiag``  short chunks: tokens scattered into a padded ``[chunks, longest chunk]`` grid,
                 one decay-masked matmul per chunk, no scan (static shapes, torch.compile-friendly).
* ``ssd``        any layout: Mamba-2's chunked SSD over fixed blocks, with masks for the resets.
* ``triton``     mamba_ssm's fused Triton kernels with ``seq_idx`` resets (CUDA only; long chunks).
* ``tiled``      our fused Triton forward and backward for chunks of at most 64 tokens, packed
                 into tiles (:mod:`attamba.ops.ssm_triton`; CUDA, or Triton's interpreter).

Layouts are analysed on the host once: :func:`plan_scan` returns a :class:`ScanPlan` (cached by
the layout's contents) and :func:`scan` runs it, so compiled models see no host work.

Shapes: x ``[b, L, h, p]``, dt ``[b, L, h]``, A ``[h]``, B and C ``[b, L, g, n]`` (head ``i`` reads
group ``i // (h // g)``), D ``[h]``, chunk_start bool ``[L]``, state ``[b, h, p, n]``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from attamba.ops.conv import offset_in_chunk

if TYPE_CHECKING:  # imported lazily at run time: it needs triton
    from attamba.ops.ssm_triton import TileTable

IMPLS = ("auto", "reference", "blockdiag", "ssd", "triton", "tiled")
BLOCKDIAG_MAX_CHUNK = 64  # longest chunk `auto` sends to the block-diagonal path
SSD_BLOCK = 64  # internal block length of the plain-PyTorch SSD
TRITON_BLOCK = 64  # chunk_size handed to mamba_ssm's kernels
TILE = 64  # the longest chunk the `tiled` kernel takes (its largest tile; see ssm_triton.TILES)

ScanResult = tuple[Tensor, Optional[Tensor]]


# ----------------------------------------------------------------------------- public API


def chunk_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_start: Tensor,
    D: Optional[Tensor] = None,
    impl: str = "auto",
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2 (SSD) selective scan with the state reset at every chunk start.

    x: [b, L, h, p]; dt: [b, L, h] (already positive: softplus applied by caller);
    A: [h] (negative reals); B, C: [b, L, g, n] with h % g == 0 (head i uses group i // (h//g));
    D: [h] or None (skip: y += D * x); chunk_start: bool [L] (token 0 always starts a chunk).
    Returns y [b, L, h, p] in x's dtype, or (y, final_state [b, h, p, n], fp32) if
    return_final_state: the state after token L-1, accumulated since the last chunk start.

    The layout is analysed on the host (cached by its contents); models call
    :func:`plan_scan` once per layer and sequence length and :func:`scan` in their
    forward, which keeps that host work out of compiled graphs.
    """
    return scan(x, dt, A, B, C, plan_scan(chunk_start, x.device, impl), D, return_final_state)


def scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    plan: "ScanPlan",
    D: Optional[Tensor] = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`chunk_scan` over a layout prepared by :func:`plan_scan` (no host work: safe to compile).

    The PyTorch paths compute in fp32 (autocast is switched off inside); the Triton paths
    feed x, B, C to their kernels in their own dtype and accumulate in fp32.
    """
    _check_scan_inputs(x, dt, A, B, C, plan.chunk_start, D)
    impl = plan.impl
    if impl == "tiled" and not runs_tiled(plan, x.shape[-1], B.shape[-1], return_final_state):
        impl = "blockdiag"
    with torch.autocast(x.device.type, enabled=False):
        if impl == "tiled":
            from attamba.ops.ssm_triton import chunk_local_ssd

            y = chunk_local_ssd(x, dt.float(), A.float(), B.to(x.dtype), C.to(x.dtype),
                                None if D is None else D.float(), plan.tiles)
            return y.to(x.dtype)
        if impl == "triton":
            y, state = _triton_scan(x, dt, A, B, C, plan.chunk_start, return_final_state)
        else:
            y, state = _TORCH_SCANS[impl](x.float(), dt.float(), A.float(), B.float(), C.float(), plan,
                                          return_final_state)
        if D is not None:
            y = y.float() + D.float()[:, None] * x.float()
    y = y.to(x.dtype)
    return (y, state) if return_final_state else y


def ssm_step(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """One decoding step of the same recurrence (no reset: the caller zeroes `state` at a chunk start).

    state [b, h, p, n] fp32; x [b, h, p]; dt [b, h]; A [h]; B, C [b, g, n]; D [h] or None.
    Returns (y [b, h, p] in x's dtype, new_state [b, h, p, n] fp32).
    """
    heads_per_group = x.shape[1] // B.shape[1]
    with torch.autocast(x.device.type, enabled=False):
        xf, dtf = x.float(), dt.float()
        Bh = B.float().repeat_interleave(heads_per_group, dim=1)  # [b, h, n]
        Ch = C.float().repeat_interleave(heads_per_group, dim=1)
        decay = torch.exp(dtf * A.float())[..., None, None]  # [b, h, 1, 1]
        new_state = decay * state.float() + (dtf[..., None] * xf)[..., None] * Bh[:, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
        if D is not None:
            y = y + D.float()[:, None] * xf
    return y.to(x.dtype), new_state


def select_impl(
    device: torch.device | str, chunk_start: Tensor, impl: str = "auto", *, triton: Optional[bool] = None,
    tiled: Optional[bool] = None,
) -> str:
    """The scan implementation `chunk_scan` runs for this device, layout and requested `impl`.

    `auto` on CUDA picks our fused `tiled` kernel when every chunk is short (<= TILE tokens)
    and some chunk resets, else mamba_ssm's Triton kernels for long chunks or no resets at all
    (a pure SSM LM); elsewhere, or without those kernels, `blockdiag` when every chunk is short
    (<= BLOCKDIAG_MAX_CHUNK), else `ssd`. `triton` and `tiled` say whether mamba_ssm's and our
    Triton kernels can run; None detects it. An explicit impl is returned as is.
    """
    if impl not in IMPLS:
        raise ValueError(f"model.ssm.impl: got {impl!r}, allowed values are {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    triton = on_cuda and (triton_available() if triton is None else triton)
    tiled = on_cuda and (tiled_available() if tiled is None else tiled)
    layout = chunk_layout(chunk_start, "cpu")  # only its sizes are needed here
    if tiled and layout.resets and layout.max_len <= TILE:
        return "tiled"
    short = layout.max_len <= BLOCKDIAG_MAX_CHUNK
    if triton and (not short or not layout.resets):
        return "triton"
    return "blockdiag" if short else "ssd"


def triton_available() -> bool:
    """Whether mamba_ssm's Triton kernels can run here (a CUDA device and an importable mamba_ssm)."""
    return torch.cuda.is_available() and _load_triton_kernel()[0] is not None


def tiled_available() -> bool:
    """Whether our fused short-chunk kernel can run here (a CUDA device and an importable triton)."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def tiled_widths(head_dim: int, state_dim: int) -> bool:
    """Whether the `tiled` kernel takes these widths (powers of two >= 16)."""
    return all(width >= 16 and width & (width - 1) == 0 for width in (head_dim, state_dim))


def runs_tiled(plan: "ScanPlan", head_dim: int, state_dim: int, return_final_state: bool = False) -> bool:
    """Whether `scan` runs the `tiled` kernels for this plan: the plan chose them, and the kernels
    keep no final state (prefill falls back to blockdiag), and under `auto` the widths must suit them."""
    return (plan.impl == "tiled" and not return_final_state
            and (plan.requested != "auto" or tiled_widths(head_dim, state_dim)))


# ----------------------------------------------------------------------------- layouts and plans


@dataclass(frozen=True)
class ChunkLayout:
    """Where the chunks of one `chunk_start` are, as index tensors on one device.

    gather [n_chunks * max_len]: the token that fills each slot of the padded
    ``[n_chunks, max_len]`` grid (L, one past the end, marks padding: an appended zero token);
    scatter [L]: the grid slot that holds each token.
    """

    n_chunks: int
    max_len: int
    resets: bool  # does any chunk start after token 0?
    gather: Tensor
    scatter: Tensor


@dataclass(frozen=True)
class ScanPlan:
    """One layout made ready for :func:`scan` on one device: the host work done once.

    A model builds its plans outside the compiled region (they are cached by the layout's
    contents), so the compiled forward only reads tensors and Python constants from them.
    """

    impl: str  # the implementation `scan` runs (never "auto")
    requested: str  # model.ssm.impl as asked: under "auto", shapes `tiled` cannot take fall back
    chunk_start: Tensor  # bool [L] on the device
    offset_in_chunk: Tensor  # int64 [L] on the device: each token's position in its chunk (the conv's reach)
    layout: ChunkLayout  # the padded grid of the `blockdiag` path
    tiles: Optional["TileTable"]  # the `tiled` kernel's token ranges (None unless impl == "tiled")


def plan_scan(chunk_start: Tensor, device: torch.device | str, impl: str = "auto") -> ScanPlan:
    """The (cached) :class:`ScanPlan` of `chunk_start` on `device` for the requested `impl`.

    Reading the layout is a host sync when chunk_start lives on the GPU; keep it on the CPU.
    """
    if chunk_start.dim() != 1 or chunk_start.dtype != torch.bool:
        raise ValueError(f"chunk_scan: chunk_start must be a 1-d bool tensor, "
                         f"got {chunk_start.dtype} {tuple(chunk_start.shape)}")
    device = torch.device(device)
    if impl == "tiled" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"model.ssm.impl='tiled' needs a CUDA device, got {device} (or Triton's interpreter: "
                         f"TRITON_INTERPRET=1); allowed values here are auto, reference, blockdiag, ssd")
    key = chunk_start.detach().to("cpu").numpy().tobytes()
    return _plan_from_bytes(key, device, impl)


@functools.lru_cache(maxsize=128)
def _plan_from_bytes(key: bytes, device: torch.device, impl: str) -> ScanPlan:
    chunk_start = _bool_tensor(key)
    chosen = select_impl(device, chunk_start, impl)
    tiles = None
    if chosen == "tiled":
        from attamba.ops.ssm_triton import tile_table

        tiles = tile_table(chunk_start)
        if tiles is None:
            raise ValueError(f"model.ssm.impl='tiled' needs every chunk to be at most {TILE} tokens; "
                             f"use model.ssm.impl=auto")
        tiles = tiles.to(device)
    return ScanPlan(chosen, impl, chunk_start.to(device), offset_in_chunk(chunk_start).to(device),
                    _layout_from_bytes(key, device), tiles)


def chunk_layout(chunk_start: Tensor, device: torch.device | str) -> ChunkLayout:
    """The (cached) grid layout of `chunk_start` on `device` (cache key: the layout's bytes)."""
    key = chunk_start.detach().to("cpu", torch.bool).numpy().tobytes()
    return _layout_from_bytes(key, torch.device(device))


def _bool_tensor(key: bytes) -> Tensor:
    return torch.from_numpy(np.frombuffer(key, dtype=np.bool_).copy())


@functools.lru_cache(maxsize=128)
def _layout_from_bytes(key: bytes, device: torch.device) -> ChunkLayout:
    is_start = _bool_tensor(key)
    is_start[0] = True
    length = is_start.numel()
    starts = is_start.nonzero().flatten()
    lengths = torch.diff(starts, append=torch.tensor([length]))
    n_chunks, max_len = starts.numel(), int(lengths.max())
    token = torch.arange(length)
    chunk = torch.cumsum(is_start, 0) - 1
    scatter = chunk * max_len + token - starts[chunk]
    gather = torch.full((n_chunks * max_len,), length)
    gather[scatter] = token
    return ChunkLayout(n_chunks, max_len, n_chunks > 1, gather.to(device), scatter.to(device))


# ----------------------------------------------------------------------------- reference


def _reference_scan(x, dt, A, B, C, plan: ScanPlan, want_state: bool) -> ScanResult:
    """The recurrence one token at a time: the oracle the fast paths are tested against."""
    chunk_start = plan.chunk_start
    b, _, h, p = x.shape
    state = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t, starts in enumerate(chunk_start.tolist()):
        if starts:
            state = torch.zeros_like(state)
        y, state = ssm_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), (state if want_state else None)


# ----------------------------------------------------------------------------- shared block math
# Block tensors carry heads split as [g, r] (group, head within group), so B and C broadcast
# over r without being copied per head: xdt [b, k, T, g, r, p], log-decays [b, k, T, g, r],
# B and C [b, k, T, g, n], where k counts blocks and T is the block length.


def _split_heads(x: Tensor, dt: Tensor, A: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """dt-scaled inputs ``[b, L, g, r, p]`` and per-token log-decays ``dt*A`` ``[b, L, g, r]``."""
    xdt = (x * dt[..., None]).unflatten(2, (groups, -1))
    log_decay = (dt * A).unflatten(2, (groups, -1))
    return xdt, log_decay


def _segsum(v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``out[..., i, j] = Σ_{j<m<=i} v[..., m]``, -inf where not mask (default: where j > i).

    Summed directly rather than as a difference of two cumsums, whose rounding error grows
    with the running sum (eps * |cumsum|) instead of with the segment itself. A mask must
    only keep pairs j <= i, so that every exponent taken of the result is <= 0.
    """
    m = v.shape[-1]
    lower = torch.ones(m, m, dtype=torch.bool, device=v.device).tril()
    sums = v[..., :, None].expand(*v.shape, m).masked_fill(~lower.tril(-1), 0.0).cumsum(dim=-2)
    return sums.masked_fill(~(lower if mask is None else mask), float("-inf"))


def _decay_matrix(log_decay: Tensor, mask: Tensor) -> Tensor:
    """``W[b, k, g, r, t, s] = exp(Σ_{s<m<=t} log_decay_m)`` where mask[k or 1, t, s], else 0."""
    return _segsum(log_decay.permute(0, 1, 3, 4, 2), mask[:, None, None]).exp()


def _intra_block(xdt: Tensor, B: Tensor, C: Tensor, decay: Tensor) -> Tensor:
    """``y_t = Σ_s W[t, s] (C_t·B_s) xdt_s`` within each block (the SSD quadratic form)."""
    scores = torch.einsum("bktgn,bksgn->bkgts", C, B)[:, :, :, None] * decay
    return torch.einsum("bkgrts,bksgrp->bktgrp", scores, xdt)


def _block_states(xdt: Tensor, B: Tensor, decay: Tensor) -> Tensor:
    """State ``[b, k, g, r, p, n]`` after each block's last token.

    Row T-1 of the decay matrix holds each token's decay to the block end (and zeros for
    tokens the mask cut off from the last token), so the state is ``Σ_s W[T-1, s] xdt_s ⊗ B_s``.
    """
    return torch.einsum("bkgrs,bksgrp,bksgn->bkgrpn", decay[..., -1, :], xdt, B)


# ----------------------------------------------------------------------------- blockdiag


def _blockdiag_scan(x, dt, A, B, C, plan: ScanPlan, want_state: bool) -> ScanResult:
    """Short chunks: one decay-masked matmul per chunk of a padded [n_chunks, max_len] grid.

    Padding slots hold a zero token (dt = 0: no decay, no input) after each chunk's real
    tokens, so they change neither the outputs nor the chunk's final state.
    """
    b, length, h, p = x.shape
    layout = plan.layout
    xdt, log_decay = _split_heads(x, dt, A, B.shape[2])

    def to_grid(t: Tensor) -> Tensor:  # [b, L, ...] -> [b, n_chunks, max_len, ...]
        padded = torch.cat([t, t.new_zeros(t[:, :1].shape)], dim=1)
        return padded.index_select(1, layout.gather).unflatten(1, (layout.n_chunks, layout.max_len))

    xdt, log_decay, B, C = map(to_grid, (xdt, log_decay, B, C))
    causal = torch.ones(layout.max_len, layout.max_len, dtype=torch.bool, device=x.device).tril()
    decay = _decay_matrix(log_decay, causal[None])
    y = _intra_block(xdt, B, C, decay)
    y = y.flatten(1, 2).index_select(1, layout.scatter).reshape(b, length, h, p)
    if not want_state:
        return y, None
    state = _block_states(xdt[:, -1:], B[:, -1:], decay[:, -1:])[:, 0]
    return y, state.reshape(b, h, p, -1)


# ----------------------------------------------------------------------------- ssd


def _ssd_scan(x, dt, A, B, C, plan: ScanPlan, want_state: bool) -> ScanResult:
    """Chunked SSD over fixed blocks for any layout (long chunks, or no resets at all).

    Within a block: the quadratic form, masked to pairs of the same chunk. Across blocks: the
    state at each block end (from its last chunk's tokens) is carried forward with the
    blocks' decays and dropped once a block containing a chunk start is crossed.
    """
    b, length, h, p = x.shape
    block = min(SSD_BLOCK, length)
    n_blocks = -(-length // block)
    pad = n_blocks * block - length
    # Trailing padding is a zero token with dt = 0 and no chunk start: it changes nothing.
    xdt, log_decay = _split_heads(x, dt, A, B.shape[2])
    xdt, log_decay, B, C = (
        F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)).unflatten(1, (n_blocks, block))
        for t in (xdt, log_decay, B, C)
    )
    starts = F.pad(plan.chunk_start, (0, pad)).view(n_blocks, block)
    chunk_id = starts.flatten().cumsum(0).view(n_blocks, block)

    causal = torch.ones(block, block, dtype=torch.bool, device=x.device).tril()
    decay = _decay_matrix(log_decay, (chunk_id[:, :, None] == chunk_id[:, None, :]) & causal)
    y = _intra_block(xdt, B, C, decay)

    from_block_start = log_decay.cumsum(dim=2)  # [b, k, T, g, r]: log-decay since the block began
    states = _block_states(xdt, B, decay)
    entering, final = _carry_states(states, from_block_start[:, :, -1], starts.any(dim=1))
    no_reset_yet = starts.cumsum(dim=1) == 0  # [k, T]
    carried = from_block_start.exp() * no_reset_yet[None, :, :, None, None]
    y = y + torch.einsum("bktgn,bkgrpn,bktgr->bktgrp", C, entering, carried)

    y = y.flatten(1, 2)[:, :length].reshape(b, length, h, p)
    return y, (final.reshape(b, h, p, -1) if want_state else None)


def _carry_states(states: Tensor, block_log_decay: Tensor, block_resets: Tensor) -> tuple[Tensor, Tensor]:
    """States entering each block and the state after the last one.

    ``H_i = Σ_{j<=i} exp(Σ_{j<m<=i} d_m) [no chunk starts in blocks j+1..i] S_j`` with
    block states S [b, k, g, r, p, n], block log-decays d [b, k, g, r], resets [k] bool.
    """
    resets_so_far = block_resets.cumsum(dim=0)
    alive = (resets_so_far[:, None] == resets_so_far[None, :]).tril()  # [k(i), k(j)]
    weight = _segsum(block_log_decay.permute(0, 2, 3, 1), alive).exp()  # [b, g, r, k, k]
    after = torch.einsum("bgrij,bjgrpn->bigrpn", weight, states)
    entering = torch.cat([torch.zeros_like(after[:, :1]), after[:, :-1]], dim=1)
    return entering, after[:, -1]


_TORCH_SCANS: dict[str, Callable[..., ScanResult]] = {
    "reference": _reference_scan,
    "blockdiag": _blockdiag_scan,
    "ssd": _ssd_scan,
}


# ----------------------------------------------------------------------------- triton


@functools.cache
def _load_triton_kernel() -> tuple[Optional[Callable], str]:
    """mamba_ssm's ``mamba_chunk_scan_combined`` (or None) and why it failed to import.

    mamba_ssm's package ``__init__`` imports its CUDA extension ``selective_scan_cuda``
    unconditionally; the Triton kernels don't need it, so an empty stand-in is registered
    when the real extension is not installed.
    """
    try:
        if "selective_scan_cuda" not in sys.modules and importlib.util.find_spec("selective_scan_cuda") is None:
            sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as error:  # any failure (missing package, triton, driver) means "unavailable"
        return None, f"{type(error).__name__}: {error}"
    return mamba_chunk_scan_combined, ""


def _triton_scan(x, dt, A, B, C, chunk_start, want_state: bool) -> ScanResult:
    """mamba_ssm's fused kernels; chunk resets become sequence boundaries (``seq_idx``)."""
    if x.device.type != "cuda":
        raise ValueError(f"model.ssm.impl='triton' needs a CUDA device, got {x.device}; "
                         f"allowed values here are auto, reference, blockdiag, ssd")
    kernel, reason = _load_triton_kernel()
    if kernel is None:
        raise RuntimeError(f"model.ssm.impl='triton' needs mamba_ssm's Triton kernels, which failed to "
                           f"import ({reason}); install the gpu extra or use model.ssm.impl=auto")
    seq_idx = (chunk_start.cumsum(0) - 1).to(torch.int32).expand(x.shape[0], -1).contiguous()
    out = kernel(x.contiguous(), dt.float().contiguous(), A.float().contiguous(),
                 B.to(x.dtype).contiguous(), C.to(x.dtype).contiguous(), chunk_size=TRITON_BLOCK,
                 seq_idx=seq_idx, return_final_states=want_state)
    return out if want_state else (out, None)


# ----------------------------------------------------------------------------- validation


def _check_scan_inputs(x, dt, A, B, C, chunk_start, D) -> None:
    if x.dim() != 4:
        raise ValueError(f"chunk_scan: x must be [b, L, h, p], got shape {tuple(x.shape)}")
    b, length, h, _ = x.shape
    expected = {"dt": (dt, (b, length, h)), "A": (A, (h,)), "C": (C, tuple(B.shape))}
    if D is not None:
        expected["D"] = (D, (h,))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"chunk_scan: {name} must have shape {shape}, got {tuple(tensor.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, length) or h % B.shape[2] != 0:
        raise ValueError(f"chunk_scan: B must be [b={b}, L={length}, g, n] with g dividing h={h}, "
                         f"got {tuple(B.shape)}")
    if chunk_start.shape != (length,) or chunk_start.dtype != torch.bool:
        raise ValueError(f"chunk_scan: chunk_start must be a bool tensor of shape ({length},), "
                         f"got {chunk_start.dtype} {tuple(chunk_start.shape)}")
