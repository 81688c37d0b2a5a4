"""Attention kernels: Attamba's chunk mask, full causal and sliding-window attention.

Layout everywhere: ``q`` is ``[b, h, L, d]`` and ``k``/``v`` are ``[b, h_kv, L, d]``
with ``h % h_kv == 0`` (GQA), RoPE already applied; outputs are ``[b, h, L, d]``
in ``q``'s dtype; the softmax scale is ``1/sqrt(d)``.

Attamba's mask: query t sees key s iff ``(s < t and boundary[s])`` or
``t - lead <= s <= t``. Three implementations, picked by ``impl``
(``model.attn_impl``):

* ``reference``: SDPA with the dense ``[L, L]`` mask. Runs anywhere; the oracle.
* ``flash``: a causal flash kernel (cuDNN's) over the ``~L/P`` boundary keys, the
  queries folded into phases, plus a ``lead + 1`` key band in fused Triton kernels,
  merged by log-sum-exp (:mod:`attamba.ops.chunk_flash`). Exact forward and backward
  everywhere (dense fp32 matrices and PyTorch stand in for the kernels off CUDA or in
  fp32). On the H200 it trains fastest at 64K tokens; the fused kernels are ahead below (README).
* ``flex``: never builds an ``L x L`` mask. The boundary keys/values are gathered
  once and put in front of all keys, ``[k_boundary | k]``, and a FlexAttention
  block mask lets query t see gathered key j iff ``pos[j] < t - lead`` (so a
  boundary inside the band is not counted twice) and raw key s iff
  ``t - lead <= s <= t``. The gathered part is causal-like over
  ``L/P`` keys and the raw part a narrow band, so almost every block is skipped.
  Fast and differentiable on CUDA; on CPU FlexAttention runs forward only.
* ``fused``: one Triton kernel per pass walks each query block's band and then its past
  boundaries, read through their positions: no mask, no gathered copies, no merge
  (:mod:`attamba.ops.chunk_triton`). Fastest on the H200 below 64K tokens (README). CUDA;
  on CPU in Triton's interpreter when ``TRITON_INTERPRET=1`` (the tests), the ``reference``
  elsewhere.
* ``auto``: on CUDA, ``flash`` for chunk attention over at least ``FLASH_FROM_LENGTH``
  tokens and ``fused`` otherwise; ``reference`` elsewhere.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from attamba.config import ATTN_IMPLS
from attamba.ops.chunk_flash import PhaseTable, chunk_flash_attention, phase_table
from attamba.ops.chunking import past_boundaries

if TYPE_CHECKING:
    from attamba.ops.chunk_triton import BoundaryTable

# FlexAttention's sparse block size. The gathered keys are padded to a multiple
# of it so the raw keys start on a block edge and the KV length varies little
# between layers (fewer recompilations).
_FLEX_BLOCK = 128

# From this many tokens `auto` runs chunk attention on the flash path, below it on the fused
# kernels (H200, README: fused trains 1K and 16K fastest; flash 2.74x the transformer at 64K).
FLASH_FROM_LENGTH = 65536

# Enough compiled variants for every (sequence length, KV length, mask) a model
# and a benchmark sweep meet; the default (8) silently falls back to eager.
_RECOMPILE_LIMIT = 64


# ---------------------------------------------------------------------------
# Dense masks (the definitions)


def boundary_mask(boundary: torch.Tensor, leading_tokens: int) -> torch.Tensor:
    """Bool ``[L, L]`` (query, key): Attamba's mask for a ``[L]`` boundary layout."""
    _check_leading_tokens(leading_tokens)
    positions = torch.arange(boundary.shape[0], device=boundary.device)
    query, key = positions[:, None], positions[None, :]
    past_boundary = boundary[None, :] & (key < query)
    leading = (key <= query) & (key >= query - leading_tokens)
    return past_boundary | leading


def sliding_window_mask(length: int, window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``[L, L]`` (query, key): query t sees the ``window`` keys ``t - window + 1 .. t``."""
    _check_window(window)
    positions = torch.arange(length, device=device)
    query, key = positions[:, None], positions[None, :]
    return (key <= query) & (key > query - window)


# ---------------------------------------------------------------------------
# Public entry points


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    boundary: torch.Tensor,
    leading_tokens: int,
    impl: str = "auto",
) -> torch.Tensor:
    """Attamba attention: each query sees past boundary keys and its ``leading_tokens`` predecessors.

    ``boundary`` is a bool ``[L]`` layout shared by the batch (any device).
    ``impl``: ``"reference"`` = SDPA with the dense mask (CPU/CUDA, the oracle);
    ``"flash"`` = phase-folded flash attention plus a band (CUDA kernel; exact anywhere);
    ``"flex"`` = FlexAttention over ``[gathered boundary keys | all keys]``, no
    ``L x L`` mask (CUDA; forward-only on CPU); ``"auto"`` = flash on CUDA from
    ``FLASH_FROM_LENGTH`` tokens, fused below, reference off CUDA; ``"fused"`` = one Triton
    kernel per pass over each query's band and past boundaries (CUDA).
    Models prepare the mask once with :func:`chunk_mask` and call :func:`attend_chunks`.
    """
    _check_qkv(q, k, v)
    if boundary.shape != (q.shape[2],) or boundary.dtype != torch.bool:
        raise ValueError(f"boundary: expected a bool tensor of shape ({q.shape[2]},) (the sequence length), "
                         f"got {boundary.dtype} {tuple(boundary.shape)}")
    return attend_chunks(q, k, v, chunk_mask(boundary, leading_tokens, q.device, impl))


@dataclass(frozen=True)
class ChunkMask:
    """Attamba's mask for one (boundary layout, leading tokens, device), ready to attend with.

    Built on the host once (:func:`chunk_mask`, cached by the layout's contents), so that
    compiled forwards only read its tensors and constants.
    """

    boundary: torch.Tensor  # bool [L] on the device
    leading_tokens: int
    impl: str  # "reference", "flash" or "flex"
    table: PhaseTable | None = None  # flash: where each query goes in the phase-folded attention
    boundaries: BoundaryTable | None = None  # fused: the boundary keys each query sees
    key_index: torch.Tensor | None = None  # flex: source token of every key in [gathered | raw]
    block_mask: BlockMask | None = None  # flex: the sparse block mask over those keys


def chunk_mask(boundary: torch.Tensor, leading_tokens: int, device: torch.device | str,
               impl: str = "auto") -> ChunkMask:
    """The (cached) :class:`ChunkMask` of a bool ``[L]`` boundary layout on ``device``."""
    _check_leading_tokens(leading_tokens)
    device = torch.device(device)
    resolved = resolve_chunk_impl(impl, device, boundary.shape[0])
    contents = boundary.detach().to("cpu", torch.bool).numpy().tobytes()
    return _build_chunk_mask(contents, leading_tokens, device, resolved)


def attend_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: ChunkMask) -> torch.Tensor:
    """Attamba attention under a prepared :class:`ChunkMask` (no host work: safe to compile)."""
    _check_qkv(q, k, v)
    if mask.impl == "flash":
        return chunk_flash_attention(q, k, v, mask.table)
    if mask.impl == "fused" and _fused_runs(q):
        from attamba.ops.chunk_triton import fused_chunk_attention
        return fused_chunk_attention(q, k, v, mask.boundaries)
    if mask.impl == "flex" and q.shape[-1] >= _FLEX_MIN_HEAD_DIM:
        # One gather builds [gathered boundary keys | all keys]; its backward
        # scatter-adds into k and v, so boundary tokens get both gradients.
        keys = k.index_select(2, mask.key_index)
        values = v.index_select(2, mask.key_index)
        return _flex(q, keys, values, mask.block_mask)
    return _sdpa(q, k, v, attn_mask=boundary_mask(mask.boundary, mask.leading_tokens))


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Full causal attention (``window=None``) or a sliding window of ``window`` keys (itself included).

    Full causal, or a window covering the whole sequence, always runs SDPA with
    ``is_causal=True`` (flash attention on CUDA). A narrower window runs
    FlexAttention under ``impl="flex"`` or ``"flash"`` (``"auto"`` on CUDA) and SDPA with a
    dense window mask under ``"reference"`` (``"auto"`` elsewhere).
    """
    _check_qkv(q, k, v)
    resolved = _resolve_impl(impl, q.device)
    length = q.shape[2]
    if window is None or window >= length:
        return _sdpa(q, k, v, is_causal=True)
    _check_window(window)
    if resolved != "reference" and q.shape[-1] >= _FLEX_MIN_HEAD_DIM:  # FlexAttention runs the window
        block_mask = _window_block_mask(length, window, q.device)
        return _flex(q, k, v, block_mask)
    return _sdpa(q, k, v, attn_mask=sliding_window_mask(length, window, q.device))


# ---------------------------------------------------------------------------
# Input checks


# FlexAttention's compiled kernels need at least this head width.
_FLEX_MIN_HEAD_DIM = 16


def resolve_chunk_impl(impl: str, device: torch.device, length: int) -> str:
    """The implementation chunk attention over ``length`` tokens runs for ``model.attn_impl=impl``."""
    resolved = _resolve_impl(impl, device)
    if impl == "auto" and device.type == "cuda":
        return "flash" if length >= FLASH_FROM_LENGTH else "fused"
    return resolved


def _fused_runs(q: torch.Tensor) -> bool:
    """Whether the fused kernels take ``q``: on CUDA, or in Triton's interpreter (the CPU tests)."""
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _resolve_impl(impl: str, device: torch.device) -> str:
    """``"reference"``, ``"flash"`` or ``"flex"`` for ``impl`` on ``device``."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"model.attn_impl: got {impl!r}, allowed values are {', '.join(ATTN_IMPLS)}")
    if impl == "auto":
        return "flex" if device.type == "cuda" else "reference"
    return impl


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q, k, v: expected [b, h, L, d] with k and v alike, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, length, d = q.shape
    b_kv, h_kv, length_kv, d_kv = k.shape
    if (b_kv, length_kv, d_kv) != (b, length, d) or h % h_kv != 0:
        raise ValueError(f"k, v: expected [{b}, h_kv, {length}, {d}] with h_kv dividing {h} query heads, "
                         f"got {tuple(k.shape)}")


def _check_leading_tokens(leading_tokens: int) -> None:
    if not isinstance(leading_tokens, int) or leading_tokens < 0:
        raise ValueError(f"chunking.leading_tokens: must be an integer >= 0, got {leading_tokens!r}")


def _check_window(window: int) -> None:
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"model.window: must be an integer >= 1, got {window!r}")


# ---------------------------------------------------------------------------
# Kernels


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **mask) -> torch.Tensor:
    """PyTorch SDPA, sharing k/v heads across query groups without repeating them."""
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **mask)


@functools.cache
def _compiled_flex_attention():
    """``torch.compile``'d ``flex_attention``: the fused kernel (eager flex builds full score matrices)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _compiled_create_block_mask():
    """``torch.compile``'d ``create_block_mask``: eager evaluates the mask densely, ``L x KV`` bools."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    return torch.compile(create_block_mask, dynamic=False)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    # Inside a compiled model the graph already fuses flex_attention into its kernel. On
    # CPU flex is forward-only and compiling it costs tens of seconds for no speed-up over
    # the reference; eager there serves to check layouts.
    compiled = q.is_cuda and not torch.compiler.is_compiling()
    attend = _compiled_flex_attention() if compiled else flex_attention
    return attend(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def _block_mask(mask_mod, q_len: int, kv_len: int, device: torch.device) -> BlockMask:
    """A batch- and head-broadcast block mask, built without a dense mask on CUDA."""
    build = _compiled_create_block_mask() if device.type == "cuda" else create_block_mask
    return build(mask_mod, None, None, q_len, kv_len, device=device, BLOCK_SIZE=_FLEX_BLOCK)


# ---------------------------------------------------------------------------
# Sliding window through FlexAttention


@functools.lru_cache(maxsize=32)
def _window_block_mask(length: int, window: int, device: torch.device) -> BlockMask:
    def in_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return _block_mask(in_window, length, length, device)


# ---------------------------------------------------------------------------
# Chunk attention through FlexAttention


@functools.lru_cache(maxsize=128)
def _build_chunk_mask(contents: bytes, leading_tokens: int, device: torch.device, impl: str) -> ChunkMask:
    """The mask of the layout whose bool bytes are ``contents``; for flex, its gather index and block mask."""
    boundary = torch.frombuffer(bytearray(contents), dtype=torch.bool)
    if impl == "flash":
        return ChunkMask(boundary.to(device), leading_tokens, impl, table=phase_table(boundary, leading_tokens, device))
    if impl == "fused":
        from attamba.ops.chunk_triton import boundary_table
        return ChunkMask(boundary.to(device), leading_tokens, impl,
                         boundaries=boundary_table(boundary, leading_tokens, device))
    if impl != "flex":
        return ChunkMask(boundary.to(device), leading_tokens, impl)
    length = boundary.shape[0]
    positions = torch.arange(length)
    # The gathered keys query t sees are a prefix of them: its length is all the mask needs.
    boundaries, n_visible = past_boundaries(boundary, leading_tokens)
    n_gathered = -(-boundaries.numel() // _FLEX_BLOCK) * _FLEX_BLOCK
    # Padding keys copy token 0 and lie past every query's visible prefix, so
    # they are never seen (and get no gradient).
    padding = boundaries.new_zeros(n_gathered - boundaries.numel())
    key_index = torch.cat([boundaries, padding, positions]).to(device)
    n_visible = n_visible.to(device, torch.int32)

    # Index arithmetic instead of loading each key's position: the forward
    # kernel runs 4-7x faster (H200, L = 16K and 64K).
    def visible(b, h, q_idx, kv_idx):
        raw = kv_idx - n_gathered  # token position of a raw key
        in_band = (raw >= q_idx - leading_tokens) & (raw <= q_idx)
        return torch.where(kv_idx < n_gathered, kv_idx < n_visible[q_idx], in_band)

    block_mask = _block_mask(visible, length, n_gathered + length, device)
    return ChunkMask(boundary.to(device), leading_tokens, impl, key_index=key_index, block_mask=block_mask)
