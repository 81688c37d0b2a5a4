"""Attamba's chunk attention on a dense causal flash-attention kernel (``model.attn_impl=flash``).

Query t sees two disjoint key sets:

* the *band*: keys ``t - lead .. t`` (at most ``lead + 1`` of them), and
* the *past boundaries*: boundary keys ``s < t - lead``. Boundaries are sorted, so
  this is a prefix of the gathered boundary keys, of length ``n_visible(t)``.

The second set is a causal attention in disguise. Number the queries that see
``m >= 1`` boundaries as group ``m``; put the ``r``-th query of every group in
*phase* ``r``. Within a phase, the query of group ``m`` sits at index ``m - 1`` and
sees gathered keys ``0 .. m - 1``: plain top-left causal attention over ``n`` keys.
The phases become extra query heads sharing their key/value head (GQA), so one
call of a causal kernel (cuDNN's flash kernel) does all of them with ``~L/P`` keys
instead of ``L``. Regular chunks have phases of ``P`` queries; irregular ones pad
the short groups.

The band is ``lead + 1`` dot products per query: a fused Triton kernel on CUDA
(:mod:`attamba.ops.band_triton`), plain PyTorch elsewhere. The two parts are
merged through their log-sum-exps (inside the kernel on CUDA, which reads the
past part by folded slot, where the causal kernel left it). Their backward
passes run on the *merged* output and log-sum-exp, which makes each part's gradient
that of the one joint softmax (as ring attention does), so the kernel's own
backward serves unchanged.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attamba.ops.chunking import past_boundaries


@dataclass(frozen=True)
class PhaseTable:
    """Where every query goes in the phase-folded causal attention, for one layout."""

    keys: torch.Tensor  # long [n]: the token of each gathered boundary key
    slots: torch.Tensor  # long [phases * n]: the token of each folded query (padding: token 0)
    fold_index: torch.Tensor  # long [L]: each token's folded slot; phases * n if it sees no boundary
    padding_slots: torch.Tensor  # long [k]: the slots that pad short groups (they hold token 0)
    phases: int
    lead: int


def phase_table(boundary: torch.Tensor, lead: int, device: torch.device) -> PhaseTable:
    """The :class:`PhaseTable` of a bool ``[L]`` boundary layout (host work, done once per layout)."""
    length = boundary.shape[0]
    keys, n_visible = past_boundaries(boundary, lead)
    n = keys.numel()
    seeing = (n_visible > 0).nonzero().flatten()
    groups = n_visible[seeing] - 1  # the folded index of each query that sees a boundary
    group_sizes = torch.bincount(groups, minlength=n)
    phases = int(group_sizes.max()) if n else 0
    # the rank of each query within its group (queries of a group are consecutive tokens)
    group_start = torch.cumsum(group_sizes, 0) - group_sizes
    phase = torch.arange(len(seeing)) - group_start[groups]
    slot = phase * n + groups
    slots = torch.zeros(phases * n, dtype=torch.long)
    slots[slot] = seeing
    fold_index = torch.full((length,), phases * n, dtype=torch.long)
    fold_index[seeing] = slot
    holds_query = torch.zeros(phases * n, dtype=torch.bool)
    holds_query[slot] = True
    padding_slots = (~holds_query).nonzero().flatten()
    return PhaseTable(keys.to(device), slots.to(device), fold_index.to(device), padding_slots.to(device),
                      phases, lead)


def chunk_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: PhaseTable) -> torch.Tensor:
    """Attamba attention of ``q [b, h, L, d]`` over ``k, v [b, h_kv, L, d]`` for the layout of ``table``."""
    dtype = joint_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return _chunk_flash_fwd(q, k, v, table.keys, table.slots, table.fold_index, table.padding_slots, table.phases,
                            table.lead, 1.0 / math.sqrt(q.shape[-1]))[0]


def joint_dtype(q: Tensor, k: Tensor, v: Tensor) -> torch.dtype:
    """The one dtype a custom attention op takes all three in, as SDPA would pick (the autocast one
    inside autocast): the backward runs outside autocast, and the kernels want them alike."""
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


# The forward and backward are custom ops, opaque to torch.compile, with the backward registered as the
# forward's autograd formula. (As a traced torch.autograd.Function, torch 2.11's compiled models fed its
# backward a zero gradient in place of the real one: attention learned nothing, silently.)


@torch.library.custom_op("attamba::chunk_flash_fwd", mutates_args=())
def _chunk_flash_fwd(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, slots: Tensor, fold_index: Tensor,
                     padding_slots: Tensor, phases: int, lead: int, scale: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The output, the joint log-sum-exp, and the causal kernel's RNG state (seed, offset) for its backward."""
    table = PhaseTable(keys, slots, fold_index, padding_slots, phases, lead)
    if phases:
        past_out, past_lse, (seed, offset) = _past_forward(q, k, v, table, scale)
        past = (past_out, past_lse, table.fold_index)
    else:
        past, seed, offset = None, _no_state(q), _no_state(q)
    out, lse = _band(q, k, v, lead, scale, past)
    return out.to(q.dtype).contiguous(), lse.contiguous(), seed, offset


@_chunk_flash_fwd.register_fake
def _chunk_flash_fwd_fake(q, k, v, keys, slots, fold_index, padding_slots, phases, lead, scale):
    return (q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32), _no_state(q), _no_state(q))


@torch.library.custom_op("attamba::chunk_flash_bwd", mutates_args=())
def _chunk_flash_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, seed: Tensor,
                     offset: Tensor, keys: Tensor, slots: Tensor, fold_index: Tensor, padding_slots: Tensor,
                     phases: int, lead: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in fp32 (or wider): the cast to the inputs' dtypes is left to the compiled graph to fuse."""
    table = PhaseTable(keys, slots, fold_index, padding_slots, phases, lead)
    grad_out = grad_out.contiguous()
    if not phases:
        dq, dk, dv = _band_gradients(grad_out, q, k, v, out, lse, lead, scale)
    else:  # the past part first: the band's kernel adds its dq as it writes its own
        past_dq, dkeys, dvalues = _past_gradients(grad_out, q, k, v, out, lse, table, scale, (seed, offset))
        dq, dk, dv = _band_gradients(grad_out, q, k, v, out, lse, lead, scale, (past_dq, table.fold_index))
        dk.index_add_(2, table.keys, dkeys.to(dk.dtype))
        dv.index_add_(2, table.keys, dvalues.to(dv.dtype))
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_chunk_flash_bwd.register_fake
def _chunk_flash_bwd_fake(grad_out, q, k, v, out, lse, seed, offset, keys, slots, fold_index, padding_slots,
                          phases, lead, scale):
    wide = torch.promote_types(q.dtype, torch.float32)
    return q.new_empty(q.shape, dtype=wide), k.new_empty(k.shape, dtype=wide), v.new_empty(v.shape, dtype=wide)


def _no_state(q: Tensor) -> Tensor:
    """A placeholder RNG seed or offset where no causal kernel runs (the outputs of a custom op are fixed)."""
    return q.new_zeros((), dtype=torch.long)


def _save_for_backward(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, keys, slots, fold_index, padding_slots, phases, lead, scale = inputs
    out, lse, seed, offset = output
    ctx.save_for_backward(q, k, v, out, lse, seed, offset, keys, slots, fold_index, padding_slots)
    ctx.phases, ctx.lead, ctx.scale = phases, lead, scale


def _backward(ctx, grad_out: Tensor, *_unused_grads):
    q, k, v, out, lse, seed, offset, keys, slots, fold_index, padding_slots = ctx.saved_tensors
    dq, dk, dv = _chunk_flash_bwd(grad_out, q, k, v, out, lse, seed, offset, keys, slots, fold_index, padding_slots,
                                  ctx.phases, ctx.lead, ctx.scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


_chunk_flash_fwd.register_autograd(_backward, setup_context=_save_for_backward)


# ---------------------------------------------------------------------------
# The band: keys t - lead .. t, fused in Triton on CUDA (attamba.ops.band_triton); below,
# the same arithmetic as lead + 1 shifted dot products in fp32 PyTorch, its reference.


_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _fused_band(q: torch.Tensor) -> bool:
    """Whether the Triton band kernels take ``q`` (CUDA, and a power-of-two head dim for their aranges)."""
    return q.is_cuda and _HAVE_TRITON and q.shape[-1] & (q.shape[-1] - 1) == 0


def _band(q, k, v, lead: int, scale: float, past=None):
    """The band's output and log-sum-exp, merged with the past boundaries' if given.

    ``past = (out [b, h, S, d], lse [b, h, S], index [L])``: query t's past is row ``index[t]``
    (none where ``index[t] >= S``), as the folded causal kernel leaves it.
    """
    if _fused_band(q):
        from attamba.ops import band_triton
        return band_triton.band_forward(q, k, v, lead, scale, past)
    out, lse = _band_forward(q, k, v, lead, scale)
    if past is None:
        return out, lse
    folded_out, folded_lse, index = past
    past_out = _rows_of(folded_out, index, 0.0)
    past_lse = _rows_of(folded_lse.unsqueeze(-1), index, float("-inf")).squeeze(-1)
    joint = torch.logaddexp(lse, past_lse)
    return (out * (lse - joint).exp().unsqueeze(-1) + _wide(past_out) * (past_lse - joint).exp().unsqueeze(-1),
            joint)


def _band_gradients(grad_out, q, k, v, out, lse, lead: int, scale: float, past_dq=None):
    """The band's fp32 (dq, dk, dv) under the joint softmax of ``out`` and ``lse``.

    ``past_dq = (dq [b, h, S, d], index [L])`` adds the past part's dq, read as :func:`_band` reads its past.
    """
    if _fused_band(q):
        from attamba.ops import band_triton
        return band_triton.band_backward(grad_out, q, k, v, out, lse, lead, scale, past_dq)
    dq, dk, dv = _band_backward(grad_out, q, k, v, out, lse, lead, scale)
    if past_dq is not None:
        dq = dq + _rows_of(*past_dq, 0.0)
    return dq, dk, dv


def _rows_of(x: torch.Tensor, index: torch.Tensor, fill: float) -> torch.Tensor:
    """``[b, h, S, ...]`` -> ``[b, h, L, ...]``: row ``index[t]`` for each t, ``fill`` where ``index[t] >= S``."""
    padding = x.new_full((*x.shape[:2], 1, *x.shape[3:]), fill)
    return torch.cat([x, padding], dim=2).index_select(2, index.clamp(max=x.shape[2]))


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32: the band, the merge and gradients accumulate there."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _shift(x: torch.Tensor, offset: int) -> torch.Tensor:
    """``x`` moved ``offset`` positions along dim -2: ``out[t] = x[t - offset]``, zeros where out of range.

    Built by padding a slice rather than concatenating, so the compiler recomputes it in the
    backward instead of keeping a copy of ``x`` for every offset.
    """
    length = x.shape[-2]
    offset = max(-length, min(length, offset))
    if offset >= 0:
        return F.pad(x[..., :length - offset, :], (0, 0, offset, 0))
    return F.pad(x[..., -offset:, :], (0, 0, 0, -offset))


def _windows(x: torch.Tensor, lead: int) -> torch.Tensor:
    """``[..., L, d]`` -> ``[..., L, d, lead + 1]`` (a view of a padded copy): entry ``w`` is ``x[t - w]``."""
    return F.pad(x, (0, 0, lead, 0)).unfold(-2, lead + 1, 1).flip(-1)


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[b, h, L, d]`` -> ``[b, h_kv, h / h_kv, L, d]``: query heads grouped under their key/value head."""
    b, h, length, d = q.shape
    return q.view(b, kv_heads, h // kv_heads, length, d)


def _band_scores(q: torch.Tensor, k: torch.Tensor, lead: int, scale: float) -> torch.Tensor:
    """``[..., L, lead + 1]``: ``scale * q[t] . k[t - w]``, ``-inf`` where ``t - w < 0``."""
    length = q.shape[-2]
    scores = (q.unsqueeze(-1) * _windows(k, lead)).sum(-2) * scale
    before_start = torch.arange(lead + 1, device=q.device) > torch.arange(length, device=q.device)[:, None]
    return scores.masked_fill(before_start, float("-inf"))


def _band_mix(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_w p[t, w] x[t - w]``."""
    return sum(p[..., w, None] * _shift(x, w) for w in range(p.shape[-1]))


def _band_spread(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`_band_mix` in its second argument: ``out[s] = sum_w p[s + w, w] x[s + w]``."""
    return sum(_shift(p[..., w, None] * x, -w) for w in range(p.shape[-1]))


def _band_forward(q, k, v, lead: int, scale: float):
    kv_heads = k.shape[1]
    qg, kg, vg = _grouped(_wide(q), kv_heads), _wide(k).unsqueeze(2), _wide(v).unsqueeze(2)
    scores = _band_scores(qg, kg, lead, scale)
    lse = scores.logsumexp(-1)
    out = _band_mix((scores - lse.unsqueeze(-1)).exp(), vg)
    return out.flatten(1, 2), lse.flatten(1, 2)


def _band_backward(grad_out, q, k, v, out, lse, lead: int, scale: float):
    kv_heads = k.shape[1]
    qg, kg, vg = _grouped(_wide(q), kv_heads), _wide(k).unsqueeze(2), _wide(v).unsqueeze(2)
    dout, outg = _grouped(_wide(grad_out), kv_heads), _grouped(_wide(out), kv_heads)
    lseg = lse.view(qg.shape[:-1])
    p = (_band_scores(qg, kg, lead, scale) - lseg.unsqueeze(-1)).exp()  # under the joint softmax
    dp = _band_scores(dout, vg, lead, 1.0).nan_to_num(neginf=0.0)
    delta = (dout * outg).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = _band_mix(ds, kg).flatten(1, 2)
    dk = _band_spread(ds, qg).sum(2)
    dv = _band_spread(p, dout).sum(2)
    return dq, dk, dv


# ---------------------------------------------------------------------------
# The past boundaries: phase-folded causal flash attention


def _fold(x: torch.Tensor, table: PhaseTable) -> torch.Tensor:
    """``[b, h, L, d]`` -> ``[b, h * phases, n, d]``: queries in their phase and group."""
    b, h, _, d = x.shape
    return x.index_select(2, table.slots).view(b, h * table.phases, -1, d)


def _heads_unfolded(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Folded ``[b, h * phases, n, ...]`` -> ``[b, h, phases * n, ...]``: each head's slots, in slot order."""
    return x.reshape(x.shape[0], heads, -1, *x.shape[3:])


def _past_forward(q, k, v, table: PhaseTable, scale: float):
    """The past boundaries' output ``[b, h, phases * n, d]`` and log-sum-exp by folded slot, and the kernel state."""
    keys, values = k.index_select(2, table.keys), v.index_select(2, table.keys)
    out, lse, kernel_state = _causal_forward(_fold(q, table), keys, values, scale)
    heads = q.shape[1]
    return _heads_unfolded(out, heads), _heads_unfolded(lse, heads), kernel_state


def _past_gradients(grad_out, q, k, v, out, lse, table: PhaseTable, scale: float, kernel_state):
    """The past boundaries' part of the gradients: dq by folded slot ``[b, h, phases * n, d]``, and
    the gathered keys' and values' ``[b, h_kv, n, d]``."""
    keys, values = k.index_select(2, table.keys), v.index_select(2, table.keys)
    grad_folded = _fold(grad_out, table)
    # Padding slots get a zero gradient, so they add nothing (their log-sum-exp, token 0's, is finite).
    _heads_unfolded(grad_folded, q.shape[1]).index_fill_(2, table.padding_slots, 0)
    folded_lse = _fold(lse.unsqueeze(-1), table).squeeze(-1)
    folded_dq, dkeys, dvalues = _causal_backward(grad_folded, _fold(q, table), keys, values,
                                                 _fold(out, table), folded_lse, scale, kernel_state)
    return _heads_unfolded(folded_dq, q.shape[1]), dkeys, dvalues


def _flash_eligible(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _causal_forward(q, k, v, scale: float):
    """Top-left causal attention of ``q [b, h, n, d]`` over ``k, v [b, h_kv, n, d]``.

    On CUDA in half precision this is cuDNN's flash kernel, the one PyTorch's SDPA itself
    prefers on Hopper (faster there than ``_scaled_dot_product_flash_attention``: see the
    README). It takes fewer key/value heads than query heads as they are (grouped-query
    attention), so the phases' shared keys are never copied per phase. Returns the output,
    the log-sum-exp, and the kernel's RNG (seed, offset), which its backward wants back.
    """
    if _flash_eligible(q):
        out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, True, False, scale=scale)
        return out, lse.squeeze(-1), (seed, offset)
    # fp32, or no GPU: the same arithmetic in dense matrices (the fused kernel takes half precision on CUDA)
    scores = _causal_scores(q, k, scale)
    lse = scores.logsumexp(-1)
    return (scores - lse.unsqueeze(-1)).exp() @ _grouped_kv(v, q), lse, (_no_state(q), _no_state(q))


def _causal_backward(grad_out, q, k, v, out, lse, scale: float, kernel_state):
    """Gradients of :func:`_causal_forward` given the (joint) output and log-sum-exp of every query."""
    if _flash_eligible(q):
        n = q.shape[2]
        seed, offset = kernel_state
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad_out.to(q.dtype), q, k, v,
            out.to(q.dtype).contiguous(), lse.unsqueeze(-1).contiguous(), seed, offset, None, None, None, n, n,
            0.0, True, scale=scale)
        return dq, _sum_groups(dk, k.shape[1]), _sum_groups(dv, k.shape[1])
    grad_out, out = _wide(grad_out), _wide(out)
    p = (_causal_scores(q, k, scale) - lse.unsqueeze(-1)).exp()
    dp = grad_out @ _grouped_kv(v, q).transpose(-1, -2)
    ds = p * (dp - (grad_out * out).sum(-1, keepdim=True)) * scale
    dq = ds @ _grouped_kv(k, q)
    dk, dv = ds.transpose(-1, -2) @ _wide(q), p.transpose(-1, -2) @ grad_out
    return dq, _sum_groups(dk, k.shape[1]), _sum_groups(dv, k.shape[1])


def _causal_scores(q, k, scale: float) -> torch.Tensor:
    n = q.shape[2]
    scores = _wide(q) @ _grouped_kv(k, q).transpose(-1, -2) * scale
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf"))


def _grouped_kv(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Key/value heads ``[b, h_kv, n, d]`` repeated to ``q``'s heads, in fp32: query head j reads head
    j // (h / h_kv), as cuDNN's grouped-query attention does."""
    b, kv_heads, n, d = x.shape
    heads = q.shape[1]
    return _wide(x).unsqueeze(2).expand(b, kv_heads, heads // kv_heads, n, d).reshape(b, heads, n, d)


def _sum_groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[b, h, n, d]`` -> ``[b, h_kv, n, d]`` in at least fp32: each key/value head's query heads summed."""
    b, h, n, d = x.shape
    return x.view(b, kv_heads, h // kv_heads, n, d).sum(2, dtype=torch.promote_types(x.dtype, torch.float32))
