"""Depthwise causal convolution + SiLU whose window resets at every chunk start.

Mamba's short conv over ``[x, B, C]``: ``out_t = silu(bias + Σ_k weight[:, w-1-k] * x_{t-k})``,
where taps that would reach before the current chunk's first token read zeros instead, so no
information crosses a chunk boundary. The width is at most 4, so the conv is written as ``w``
shifted multiply-adds: plain tensor ops that run anywhere and fuse under torch.compile.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def chunked_causal_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], offset_in_chunk: Tensor) -> Tensor:
    """Depthwise causal conv + SiLU whose window never reaches before the current chunk's start.

    x [b, L, *c] (the channels may span several dims, e.g. ``[streams, width]``); weight
    [*c, w] (w in 2..4, weight[..., -1] multiplies the current token, like nn.Conv1d with
    padding w-1 and `groups=c`, as in Mamba); bias [*c] or None; offset_in_chunk long [L]
    (from :func:`offset_in_chunk`, on x's device). Returns silu(conv) [b, L, *c] in x's dtype
    (accumulated in fp32).
    """
    _check_conv_inputs(x, weight, bias)
    length, width = x.shape[1], weight.shape[-1]
    if offset_in_chunk.shape != (length,) or offset_in_chunk.dtype != torch.long:
        raise ValueError(f"chunked_causal_conv: offset_in_chunk must be an int64 tensor of shape ({length},), "
                         f"got {offset_in_chunk.dtype} {tuple(offset_in_chunk.shape)}")
    offset = offset_in_chunk.view(1, length, *[1] * (x.dim() - 2))
    with torch.autocast(x.device.type, enabled=False):
        wf = weight.float()
        # w-1 zeros in front: padded[:, t + w-1] = x_t. Kept in x's dtype, since a compiled backward
        # saves this tensor for the weight gradient (in fp32 it cost 2.5 KB per token per layer).
        padded = F.pad(x, (0, 0) * (x.dim() - 2) + (width - 1, 0))
        out = wf.new_zeros(()) if bias is None else bias.float()
        for lag in range(width):
            # Tap `lag` reads x_{t-lag}, which belongs to the current chunk iff lag <= offset_t.
            tap = padded[:, width - 1 - lag: width - 1 - lag + length].float() * wf[..., width - 1 - lag]
            out = out + tap * (lag <= offset)
        return F.silu(out).to(x.dtype)


def conv_step(conv_state: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """One decoding step of `chunked_causal_conv`.

    conv_state [b, c, w-1]: the previous w-1 inputs of the current chunk (zeros where they
    would be before the chunk start); x [b, c]. Returns (silu(out) [b, c] in x's dtype,
    new_conv_state [b, c, w-1] in conv_state's dtype).
    """
    if conv_state.shape != (*x.shape, weight.shape[1] - 1):
        raise ValueError(f"conv_step: conv_state must have shape {(*x.shape, weight.shape[1] - 1)}, "
                         f"got {tuple(conv_state.shape)}")
    window = torch.cat([conv_state, x[..., None].to(conv_state.dtype)], dim=-1)  # [b, c, w]
    with torch.autocast(x.device.type, enabled=False):
        out = (window.float() * weight.float()).sum(dim=-1)
        if bias is not None:
            out = out + bias.float()
        y = F.silu(out).to(x.dtype)
    return y, window[..., 1:]


def offset_in_chunk(chunk_start: Tensor) -> Tensor:
    """Each token's position inside its chunk, int64 ``[L]``, from a bool ``[L]`` layout (token 0 starts one).

    Host work for a layout's plan: the conv then only compares it with its lags.
    """
    token = torch.arange(chunk_start.numel(), device=chunk_start.device)
    first = torch.where(chunk_start, token, torch.zeros_like(token)).cummax(dim=0).values
    return token - first


def _check_conv_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if x.dim() < 3:
        raise ValueError(f"chunked_causal_conv: x must be [b, L, *channels], got shape {tuple(x.shape)}")
    channels = tuple(x.shape[2:])
    if weight.shape[:-1] != channels or not 2 <= weight.shape[-1] <= 4:
        raise ValueError(f"chunked_causal_conv: weight must be [*channels={list(channels)}, w] with w in 2..4 "
                         f"(model.ssm.conv), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != channels:
        raise ValueError(f"chunked_causal_conv: bias must have shape {channels}, got {tuple(bias.shape)}")
