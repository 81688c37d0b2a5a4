"""The Mamba-2 block (used for Attamba's keys/values and as the mixer of the pure-SSM LM).

One block can hold several independent *streams* that share a single input
projection call and a single scan call: Attamba's K and V SSMs read the same
normed input, so fusing them halves the kernel launches. Stream ``s`` owns SSM
heads ``[s*H, (s+1)*H)`` and B/C group ``s`` of the scan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attamba.config import ModelConfig, SSMConfig
from attamba.models.layers import truncated_normal_
from attamba.ops.conv import chunked_causal_conv, conv_step
from attamba.ops.ssm import ScanPlan, plan_scan, scan, ssm_step


@dataclass
class SSMState:
    """What decoding keeps of an SSM block: the conv window and the scan state of the chunk in progress.

    Fixed-size, and :meth:`SSMBlock.step` updates it in place, so a captured step keeps
    reading and writing the same buffers.
    """

    conv: torch.Tensor | None  # [b, channels, conv-1], fp32 (None without conv)
    ssm: torch.Tensor  # [b, streams*heads, head_dim, state_dim], fp32

    def tensors(self) -> list[torch.Tensor]:
        return [self.ssm] if self.conv is None else [self.conv, self.ssm]

    def reset_(self) -> None:
        for tensor in self.tensors():
            tensor.zero_()

    def held_bytes(self, length: int) -> int:
        """The whole state, at any length."""
        return self.allocated_bytes()

    def allocated_bytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors())


class SSMBlock(nn.Module):
    """in_proj -> [z, x, B, C, dt]; chunk-resetting conv + SiLU over [x, B, C]; chunk-reset scan;
    RMSNorm(y * silu(z)); out_proj. Input ``[b, L, d_in]`` (shared by all streams) or
    ``[b, L, streams, d_in]`` (one input per stream); output ``[b, L, streams, d_out]``."""

    def __init__(self, ssm: SSMConfig, d_in: int, d_out: int, streams: int = 1, per_stream_input: bool = False,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.cfg = ssm
        self.streams = streams
        self.per_stream_input = per_stream_input
        self.norm_eps = norm_eps
        hidden, state, heads = ssm.hidden, ssm.state_dim, ssm.heads
        self.proj_width = 2 * hidden + 2 * state + heads  # [z, x, B, C, dt]
        self.conv_width = hidden + 2 * state  # [x, B, C]
        self.in_proj = nn.Parameter(torch.empty(streams, self.proj_width, d_in))
        if ssm.conv > 0:
            self.conv_weight = nn.Parameter(torch.empty(streams * self.conv_width, ssm.conv))
            self.conv_bias = nn.Parameter(torch.empty(streams * self.conv_width))
        self.dt_bias = nn.Parameter(torch.empty(streams * heads))
        self.A_log = nn.Parameter(torch.empty(streams * heads))
        self.D = nn.Parameter(torch.empty(streams * heads))
        self.norm_weight = nn.Parameter(torch.empty(streams, hidden))
        self.out_proj = nn.Parameter(torch.empty(streams, d_out, hidden))

    def reset_parameters(self, std: float, depth_factor: float) -> None:
        cfg = self.cfg
        truncated_normal_(self.in_proj, std)
        truncated_normal_(self.out_proj, cfg.hidden ** -0.5 / depth_factor)
        if cfg.conv > 0:
            bound = cfg.conv ** -0.5  # nn.Conv1d's default for a depthwise kernel of this width
            nn.init.uniform_(self.conv_weight, -bound, bound)
            nn.init.uniform_(self.conv_bias, -bound, bound)
        with torch.no_grad():
            # dt ~ logU(dt_min, dt_max) at init, stored through softplus's inverse
            dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(cfg.dt_min), math.log(cfg.dt_max)))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(cfg.a_min, cfg.a_max).log())
        nn.init.ones_(self.D)
        nn.init.ones_(self.norm_weight)

    def _project(self, u: torch.Tensor) -> torch.Tensor:
        """[..., d_in] or [..., streams, d_in] -> [..., streams, proj_width]"""
        if self.per_stream_input:
            return torch.einsum("...si,spi->...sp", u, self.in_proj)
        return F.linear(u, self.in_proj.flatten(0, 1)).unflatten(-1, (self.streams, self.proj_width))

    def _split(self, zxbcdt: torch.Tensor):
        z, xbc, dt = zxbcdt.split([self.cfg.hidden, self.conv_width, self.cfg.heads], dim=-1)
        return z, xbc, dt

    def _scan_inputs(self, xbc: torch.Tensor, dt: torch.Tensor):
        """Reshape per-stream [x, B, C] and dt into the scan's head/group layout."""
        hidden, state = self.cfg.hidden, self.cfg.state_dim
        x, B, C = xbc.split([hidden, state, state], dim=-1)
        x = x.unflatten(-1, (self.cfg.heads, self.cfg.head_dim)).flatten(-3, -2)  # [..., S*H, p]
        dt = F.softplus(dt.flatten(-2).float() + self.dt_bias.float())  # [..., S*H]
        A = -torch.exp(self.A_log.float())
        return x, dt, A, B, C

    def _output(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Gated RMSNorm per stream, then out_proj: y [..., S, hidden], z [..., S, hidden] -> [..., S, d_out]"""
        return torch.einsum("...sh,soh->...so", _rerun_in_backward(self._gated_norm, y, z), self.out_proj)

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gated = y.float() * F.silu(z.float())
        gated = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        return (gated * self.norm_weight.float()).type_as(z)

    def forward(self, u: torch.Tensor, plan: ScanPlan, return_state: bool = False):
        """``plan`` (from :func:`attamba.ops.ssm.plan_scan`) says where the state resets.

        With ``model.ssm.recompute`` a training forward keeps only ``u`` for the backward, which
        runs the block again: its projections, conv, scan and gated norm hold no memory meanwhile.
        """
        if self.cfg.recompute and not return_state and torch.is_grad_enabled():
            return checkpoint(self._forward, u, plan, use_reentrant=False)
        return self._forward(u, plan, return_state)

    def _forward(self, u: torch.Tensor, plan: ScanPlan, return_state: bool = False):
        b, L = u.shape[:2]
        z, xbc, dt = self._split(self._project(u))
        raw_xbc = xbc
        if self.cfg.conv > 0:
            per_stream = (self.streams, self.conv_width)
            xbc = _rerun_in_backward(chunked_causal_conv, xbc, self.conv_weight.unflatten(0, per_stream),
                                     self.conv_bias.unflatten(0, per_stream), plan.offset_in_chunk)
        x, dt, A, B, C = self._scan_inputs(xbc, dt)
        scanned = scan(x, dt, A, B, C, plan, D=self.D.float(), return_final_state=return_state)
        y, final_state = scanned if return_state else (scanned, None)
        out = self._output(y.reshape(b, L, self.streams, self.cfg.hidden), z)
        if not return_state:
            return out
        return out, SSMState(conv=self._conv_window(raw_xbc, plan.offset_in_chunk), ssm=final_state)

    def _conv_window(self, raw_xbc: torch.Tensor, offset_in_chunk: torch.Tensor) -> torch.Tensor | None:
        """The last conv-1 inputs of the chunk in progress (zeros where they precede its start)."""
        if self.cfg.conv == 0:
            return None
        width = self.cfg.conv - 1
        L = raw_xbc.shape[1]
        window = raw_xbc.flatten(-2)[:, max(0, L - width):].transpose(1, 2).float()  # [b, c, <=width]
        positions = torch.arange(max(0, L - width), L, device=raw_xbc.device)
        current_start = L - 1 - offset_in_chunk[-1]
        window = window * (positions >= current_start).to(window.dtype)
        return F.pad(window, (width - window.shape[-1], 0)).contiguous()

    def step(self, u: torch.Tensor, state: SSMState, reset: torch.Tensor | None = None) -> torch.Tensor:
        """One token: ``u [b, d_in]`` or ``[b, streams, d_in]`` -> ``[b, streams, d_out]``; ``state`` advances in place.

        ``reset`` (float ``[1]``, 1 where this token ends a chunk) zeroes the state after the
        token by a multiply, not a branch, so the step stays one fixed graph.
        """
        b = u.shape[0]
        z, xbc, dt = self._split(self._project(u))
        if self.cfg.conv > 0:
            flat, conv = conv_step(state.conv, xbc.flatten(-2).float(), self.conv_weight.float(),
                                   self.conv_bias.float())
            xbc = flat.type_as(xbc).unflatten(-1, (self.streams, self.conv_width))
        x, dt, A, B, C = self._scan_inputs(xbc, dt)
        y, ssm = ssm_step(state.ssm, x.float(), dt, A, B.float(), C.float(), D=self.D.float())
        keep = 1.0 if reset is None else 1.0 - reset
        if self.cfg.conv > 0:
            state.conv.copy_(conv * keep)
        state.ssm.copy_(ssm * keep)
        return self._output(y.type_as(z).reshape(b, self.streams, self.cfg.hidden), z)


def _rerun_in_backward(fn, *args):
    """``fn(*args)``, whose backward keeps only ``args`` and runs ``fn`` again (mamba_ssm's checkpoint_lvl=1).

    For the conv and the gated norm: elementwise passes over tensors that are kept anyway (the input
    projection's output and the scan's), so a compiled backward reruns each as one fused pass, and
    keeps 2.0 KB per token per layer less at the paper's sizes (counted on CPU).
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


class Mamba2Mixer(nn.Module):
    """The pure-SSM LM's mixer: one stream, state reset only at the start of the sequence."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ssm = SSMBlock(config.ssm, config.dim, config.dim, streams=1, norm_eps=config.norm_eps)

    def reset_parameters(self, std: float, depth_factor: float) -> None:
        self.ssm.reset_parameters(std, depth_factor)

    def plan(self, length: int, device: torch.device) -> ScanPlan:
        starts = torch.zeros(length, dtype=torch.bool)
        starts[0] = True
        return plan_scan(starts, device, self.ssm.cfg.impl)

    def forward(self, x: torch.Tensor, rope, plan: ScanPlan) -> torch.Tensor:
        return self.ssm(x, plan).squeeze(-2)

    def prefill(self, x: torch.Tensor, rope, capacity: int) -> tuple[torch.Tensor, SSMState]:
        """The state has a fixed size: ``capacity`` does not matter."""
        out, state = self.ssm(x, self.plan(x.shape[1], x.device), return_state=True)
        return out.squeeze(-2), state

    def step(self, x: torch.Tensor, rope, position: torch.Tensor, state: SSMState) -> torch.Tensor:
        return self.ssm.step(x[:, 0], state)  # [b, streams=1, d] doubles as [b, L=1, d]
