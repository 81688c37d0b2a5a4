"""What a model costs, from its config alone: parameters, KV cache, FLOPs, iso-cost baselines.

Nothing here builds a module. The parameter layout mirrors ``attamba.models``
exactly (a test checks ``param_count`` against the real modules), the cache
layout mirrors the cached decoder, and the attention FLOPs follow the mask
token by token, so every number is exact for the chunk layout of
``attamba.ops.chunking`` rather than an ``L/P`` estimate.

Conventions
-----------
* FLOPs: 2 per multiply-accumulate, forward pass, per token. ``flops_per_token``
  is ``2 x matmul weights`` (everything but the embedding table; the output head
  counts even when tied, since its matmul still runs) plus attention (``QK^T``
  and ``AV`` over the keys each query actually attends) plus the SSM's
  depthwise conv and scan. Norms, activations, softmax and per-channel scalars
  are left out, as in the usual ``6ND`` bookkeeping. Training is 3x forward.
* KV cache: per sequence, keys and values, summed over layers.

Iso-KV at the paper's size, and why it is not exactly ``L/P``
-------------------------------------------------------------
The paper sizes its smaller-KV transformer baselines as ``attn_dim = dim / P``
(512/4 = 128, 512/8 = 64, 512/16 = 32 at 1K context), i.e. it assumes Attamba
caches ``L/P`` keys per layer. What the cached decoder really holds after
``L`` tokens is, per layer, the intrinsic boundaries among ``[0, L)`` --
``L/P`` chunk ends *plus token 0* (minus one when a cyclic shift puts a chunk
end on token 0) -- and a ring of the last ``leading_tokens`` keys. At dim 512,
8 layers, 8 heads, L = 1024, 8 leading tokens that is, per layer,
``256+1+8 = 265``, ``128+1+8 = 137`` and ``64+1+8 = 73`` keys for P = 4, 8, 16
(uniform; cyclic is identical except at P = 8, where layer 7 shifts by 7 onto
token 0 and holds 136). The exact budget therefore allows a slightly wider
baseline than ``dim/P`` (132.5, 68.5 and 36.5 for uniform, 68.4 for cyclic
P = 8), and the widest that fits with 8 heads of an even width (RoPE rotates
pairs) is still 128, 64 and 32 -- the paper's widths. With those widths the baseline's cache is
``1024*w / (entries*512)`` of Attamba's: 0.9660 (P=4), 0.9343 (P=8 uniform),
0.9352 (P=8 cyclic) and 0.8767 (P=16), i.e. the paper's baselines were given
3-12 % *less* KV cache than Attamba, never more.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from attamba.config import MATCH_TARGETS, ChunkingConfig, ModelConfig, SSMConfig

# Matched baselines' head widths are multiples of this: RoPE rotates (even, odd) feature pairs.
HEAD_DIM_STEP = 2

# The fused K and V SSMs of an Attamba layer, the single mixer SSM of a Mamba-2 layer.
_SSM_STREAMS = {"attamba": 2, "transformer": 0, "mamba2": 1}


# ----------------------------------------------------------------------------- parameters


def _ssm_matmul_params(ssm: SSMConfig, dim: int, streams: int) -> int:
    """in_proj (dim -> [z, x, B, C, dt]) and out_proj (hidden -> dim) of ``streams`` SSMs."""
    in_proj = (2 * ssm.hidden + 2 * ssm.state_dim + ssm.heads) * dim
    out_proj = dim * ssm.hidden
    return streams * (in_proj + out_proj)


def _ssm_other_params(ssm: SSMConfig, streams: int) -> int:
    """The SSM weights that are not matmuls: depthwise conv, dt_bias, A_log, D, gated-norm weight."""
    conv_channels = ssm.hidden + 2 * ssm.state_dim  # [x, B, C]
    conv = conv_channels * (ssm.conv + 1) if ssm.conv > 0 else 0  # weight taps + bias
    return streams * (conv + 3 * ssm.heads + ssm.hidden)


def _mixer_matmul_params(model: ModelConfig) -> int:
    """Matmul weights of one layer's token mixer (attention or SSM)."""
    d, streams = model.dim, _SSM_STREAMS[model.family]
    ssm = _ssm_matmul_params(model.ssm, d, streams)
    if model.family == "transformer":
        kv_width = model.kv_heads * model.head_dim
        return d * model.width + 2 * d * kv_width + model.width * d  # wq, wk, wv, wo
    if model.family == "attamba":
        wkv = d * 2 * d if model.kv_proj else 0
        return 2 * d * d + wkv + ssm  # wq, wo, [wkv], the K/V SSMs
    return ssm


def _layer_matmul_params(model: ModelConfig) -> int:
    return _mixer_matmul_params(model) + 3 * model.dim * model.ffn_dim  # SwiGLU w1, w2, w3


def matmul_params(model: ModelConfig) -> int:
    """Weights used once per token in a matmul: every layer plus the output head, no embedding."""
    return model.n_layers * _layer_matmul_params(model) + model.dim * model.vocab_size


def param_count(model: ModelConfig) -> int:
    """``sum(p.numel() for p in build_model(config).parameters())`` (tied weights counted once)."""
    d, streams = model.dim, _SSM_STREAMS[model.family]
    per_layer = _layer_matmul_params(model) + _ssm_other_params(model.ssm, streams) + 2 * d  # + 2 norms
    embedding = model.vocab_size * d
    head = 0 if model.tie_embeddings else d * model.vocab_size
    return embedding + head + d + model.n_layers * per_layer  # + final norm


# ----------------------------------------------------------------------------- KV cache


def _require_positive(value: int, setting: str) -> None:
    if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{setting}: must be an integer >= 1, got {value!r}")


def _layer_boundaries(chunking: ChunkingConfig, context: int, layer: int, n_layers: int,
                      intrinsic: bool) -> torch.Tensor:
    """Bool[context]: one layer's boundary tokens, as the decoder (intrinsic) or the training mask sees them."""
    from attamba.ops import chunking as layout

    boundaries = layout.intrinsic_boundaries if intrinsic else layout.boundary_mask
    return boundaries(context, chunking.strategy, chunking.size, layer, n_layers, seed=chunking.seed)


def kv_width(model: ModelConfig) -> int:
    """Width of one cached key (and of one value): dim for Attamba, kv_heads x head_dim with GQA."""
    if model.family == "attamba":
        return model.dim
    if model.family == "transformer":
        return model.kv_heads * model.head_dim
    return 0


def kv_cache_entries(model: ModelConfig, chunking: ChunkingConfig, context: int) -> int:
    """Keys held per sequence after ``context`` tokens, summed over layers.

    Attamba: each layer's intrinsic boundaries among ``[0, context)`` plus a ring of
    the last ``min(leading_tokens, context)`` keys (``pseudo`` keeps every key).
    Transformer: ``min(context, window)`` keys per layer. Mamba-2: none.
    """
    _require_positive(context, "context")
    if model.family == "transformer":
        window = model.window if model.window is not None else context
        return model.n_layers * min(context, window)
    if model.family == "mamba2":
        return 0
    if chunking.strategy == "pseudo":
        return model.n_layers * context
    ring = min(chunking.leading_tokens, context)
    boundaries = sum(
        int(_layer_boundaries(chunking, context, layer, model.n_layers, intrinsic=True).sum())
        for layer in range(model.n_layers)
    )
    return boundaries + model.n_layers * ring


def kv_cache_bytes(model: ModelConfig, chunking: ChunkingConfig, context: int, bytes_per_value: int = 2) -> int:
    """Bytes of keys and values held per sequence after ``context`` tokens."""
    _require_positive(bytes_per_value, "bytes_per_value")
    return kv_cache_entries(model, chunking, context) * 2 * kv_width(model) * bytes_per_value


def kv_bytes_per_token(model: ModelConfig, chunking: ChunkingConfig, context: int,
                       bytes_per_value: int = 2) -> float:
    """``kv_cache_bytes / context``: what one token of context costs in cache, on average."""
    return kv_cache_bytes(model, chunking, context, bytes_per_value) / context


def state_bytes(model: ModelConfig, bytes_per_value: int = 2) -> int:
    """Constant-size decoding state per sequence: every SSM's scan state and conv window.

    Per stream, the scan state is ``hidden x state_dim`` and the conv window keeps the
    last ``conv - 1`` inputs of ``[x, B, C]``. For Attamba this is the chunk in
    progress of the K and V SSMs; for Mamba-2 its whole memory; a transformer has none.
    (The decoder keeps these in fp32: pass ``bytes_per_value=4`` for its footprint.)
    """
    _require_positive(bytes_per_value, "bytes_per_value")
    ssm = model.ssm
    conv_window = max(ssm.conv - 1, 0) * (ssm.hidden + 2 * ssm.state_dim)
    per_stream = ssm.hidden * ssm.state_dim + conv_window
    return model.n_layers * _SSM_STREAMS[model.family] * per_stream * bytes_per_value


# ----------------------------------------------------------------------------- FLOPs


def _causal_keys(context: int, window: int) -> int:
    """Sum over queries t < context of min(t + 1, window): keys a (windowed) causal query attends."""
    window = min(window, context)
    return window * (window + 1) // 2 + (context - window) * window


def _attamba_layer_keys(boundary: torch.Tensor, lead: int) -> int:
    """Sum over queries of the keys the Attamba mask lets them see in one layer.

    Query t sees key s iff (s < t and s is a boundary) or t - lead <= s <= t: the
    boundaries before the window's start, plus the window itself.
    """
    t = torch.arange(boundary.numel())
    start = (t - lead).clamp(min=0)
    boundaries_before = torch.cat([torch.zeros(1, dtype=torch.long), boundary.long().cumsum(0)])
    return int((boundaries_before[start] + (t - start + 1)).sum())


def attended_keys(model: ModelConfig, chunking: ChunkingConfig, context: int) -> int:
    """Sum over layers and over the queries of a ``context``-long training sequence of keys attended."""
    _require_positive(context, "context")
    if model.family == "mamba2":
        return 0
    if model.family == "transformer":
        window = model.window if model.window is not None else context
        return model.n_layers * _causal_keys(context, window)
    if chunking.strategy == "pseudo":
        return model.n_layers * _causal_keys(context, context)
    return sum(
        _attamba_layer_keys(_layer_boundaries(chunking, context, layer, model.n_layers, intrinsic=False),
                            chunking.leading_tokens)
        for layer in range(model.n_layers)
    )


def attention_flops_per_token(model: ModelConfig, chunking: ChunkingConfig, context: int) -> float:
    """Forward ``QK^T`` and ``AV`` FLOPs per token, averaged over a ``context``-long sequence.

    Each attended key costs ``width`` MACs for the score (over all query heads,
    GQA included) and ``width`` for the value sum: ``4 * width`` FLOPs.
    """
    return 4 * model.width * attended_keys(model, chunking, context) / context


def ssm_flops_per_token(model: ModelConfig, chunking: ChunkingConfig, context: int) -> float:
    """Forward FLOPs per token of the SSMs' depthwise conv and chunk-reset scan (no in/out projections).

    Per stream and token: the conv is ``conv`` MACs per ``[x, B, C]`` channel; the scan
    updates the ``hidden x state_dim`` state as ``h = a*h + (dt*x) B^T`` (3 FLOPs per
    element) and reads it out as ``y = h C`` (2 per element). The reset zeroes the state
    at chunk starts without skipping work, so the count depends on neither ``chunking``
    nor ``context``; they are taken so that every per-token cost has one signature.
    """
    _require_positive(context, "context")
    ssm = model.ssm
    conv = 2 * ssm.conv * (ssm.hidden + 2 * ssm.state_dim)
    scan = 5 * ssm.hidden * ssm.state_dim
    return float(model.n_layers * _SSM_STREAMS[model.family] * (conv + scan))


def flops_per_token(model: ModelConfig, chunking: ChunkingConfig, context: int, training: bool = False) -> float:
    """``2 x matmul weights + attention + SSM`` forward FLOPs per token; ``training`` adds backward (3x)."""
    forward = (2 * matmul_params(model) + attention_flops_per_token(model, chunking, context)
               + ssm_flops_per_token(model, chunking, context))
    return 3 * forward if training else forward


# ----------------------------------------------------------------------------- iso-cost baselines


@dataclass(frozen=True)
class Match:
    """The transformer baseline width that matches an Attamba config on one cost."""

    attn_dim: int
    target: str  # kv_cache | flops | params
    attamba_value: float
    baseline_value: float
    ratio: float  # baseline_value / attamba_value, <= 1 by construction


def transformer_baseline(model: ModelConfig, attn_dim: int, window: int | None = None) -> ModelConfig:
    """The transformer an Attamba config is compared with: same shell, full MHA, optional sliding window."""
    return dataclasses.replace(model, family="transformer", attn_dim=attn_dim, n_kv_heads=None,
                               window=window, match=None)


def _cost(target: str) -> Callable[[ModelConfig, ChunkingConfig, int], float]:
    costs: dict[str, Callable[[ModelConfig, ChunkingConfig, int], float]] = {
        "kv_cache": kv_cache_bytes,
        "flops": flops_per_token,
        "params": lambda model, chunking, context: param_count(model),
    }
    if target not in costs:
        raise ValueError(f"model.match: got {target!r}, allowed values are {', '.join(MATCH_TARGETS)}")
    return costs[target]


def _largest_fitting(fits: Callable[[int], bool]) -> int:
    """Largest k >= 1 with ``fits(k)``, for ``fits`` true at 1 and monotone (true, then false)."""
    low, high = 1, 2
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def match_attn_dim(model: ModelConfig, chunking: ChunkingConfig, context: int, target: str,
                   window: int | None = None) -> Match:
    """The widest transformer baseline the model can run costing no more than Attamba: ``attn_dim`` is
    ``n_heads`` heads of an even width (``HEAD_DIM_STEP``: RoPE rotates pairs of features).

    ``target`` is the cost matched at ``context``: ``kv_cache`` bytes, forward
    ``flops`` per token, or ``params``. Every cost grows with ``attn_dim``, so the
    answer is the widest such ``attn_dim`` whose cost does not exceed Attamba's.
    """
    cost = _cost(target)
    if model.family != "attamba":
        raise ValueError(f"model.family: iso-cost matching starts from an attamba config, got {model.family!r}")
    budget = cost(model, chunking, context)
    step = HEAD_DIM_STEP * model.n_heads

    def baseline_cost(steps: int) -> float:
        return cost(transformer_baseline(model, steps * step, window), chunking, context)

    if baseline_cost(1) > budget:
        raise ValueError(
            f"model.match: no transformer baseline fits Attamba's {target} budget of {budget:g} at "
            f"context {context}: even attn_dim={step} ({model.n_heads} heads of {HEAD_DIM_STEP}, the narrowest "
            f"RoPE can rotate) costs {baseline_cost(1):g}"
        )
    attn_dim = _largest_fitting(lambda k: baseline_cost(k) <= budget) * step
    value = cost(transformer_baseline(model, attn_dim, window), chunking, context)
    return Match(attn_dim=attn_dim, target=target, attamba_value=float(budget), baseline_value=float(value),
                 ratio=value / budget)
