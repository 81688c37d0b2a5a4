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
from attamba.ops.ssm import ScanPlan, plan_scan, runs_tiled, scan, ssm_step


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

    def _project(self, u: torch.Tensor, rows: slice) -> torch.Tensor:
        """[..., d_in] or [..., streams, d_in] -> [..., streams, width]: in_proj's ``rows`` of every stream."""
        weight = self.in_proj[:, rows]
        if self.per_stream_input:
            return torch.einsum("...si,spi->...sp", u, weight)
        return F.linear(u, weight.flatten(0, 1)).unflatten(-1, (self.streams, weight.shape[1]))

    def _gate(self, u: torch.Tensor) -> torch.Tensor:
        """z: [..., streams, hidden]"""
        return self._project(u, slice(0, self.cfg.hidden))

    def _conv_and_dt_inputs(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[x, B, C] before the conv, [..., streams, conv_width], and dt, [..., streams, heads]."""
        xbcdt = self._project(u, slice(self.cfg.hidden, None))
        return xbcdt.split([self.conv_width, self.cfg.heads], dim=-1)

    def _conv_and_dt(self, u: torch.Tensor, offset_in_chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[x, B, C] after the chunked conv, and dt (a copy: a view would keep the projection alive)."""
        xbc, dt = self._conv_and_dt_inputs(u)
        if self.cfg.conv > 0:
            per_stream = (self.streams, self.conv_width)
            xbc = chunked_causal_conv(xbc, self.conv_weight.unflatten(0, per_stream),
                                      self.conv_bias.unflatten(0, per_stream), offset_in_chunk)
        return xbc, dt.contiguous()

    def _scan_inputs(self, xbc: torch.Tensor, dt: torch.Tensor):
        """Reshape per-stream [x, B, C] and dt into the scan's head/group layout."""
        hidden, state = self.cfg.hidden, self.cfg.state_dim
        x, B, C = xbc.split([hidden, state, state], dim=-1)
        x = x.unflatten(-1, (self.cfg.heads, self.cfg.head_dim)).flatten(-3, -2)  # [..., S*H, p]
        dt = F.softplus(dt.flatten(-2).float() + self.dt_bias.float())  # [..., S*H]
        A = -torch.exp(self.A_log.float())
        return x, dt, A, B, C

    def _conv_fuses_into_scan(self, plan: ScanPlan, return_state: bool) -> bool:
        """Whether the `tiled` kernels, where `scan` would run them, also run the conv and dt's softplus."""
        return self.cfg.conv > 0 and runs_tiled(plan, self.cfg.head_dim, self.cfg.state_dim, return_state)

    def _fused_conv_scan(self, u: torch.Tensor, plan: ScanPlan) -> torch.Tensor:
        """The scan's output [b, L, S*H, p] straight from the projection: the kernels apply the chunked
        conv + SiLU to [x, B, C] and softplus(dt + dt_bias) as they load them, and rerun both in the
        backward, so neither is written to memory."""
        from attamba.ops.ssm_triton import ChunkConv, chunk_local_ssd

        hidden, state, heads = self.cfg.hidden, self.cfg.state_dim, self.cfg.heads
        xbc, dt = self._conv_and_dt_inputs(u)  # [b, L, S, conv_width], [b, L, S, heads]: views of one projection
        x, B, C = xbc.split([hidden, state, state], dim=-1)
        per_stream = (self.streams, self.conv_width)
        weights = self.conv_weight.unflatten(0, per_stream).split([hidden, state, state], dim=1)
        biases = self.conv_bias.unflatten(0, per_stream).split([hidden, state, state], dim=1)
        by_head = (heads, self.cfg.head_dim)  # x's channels [S, hidden] as [S*H, p]
        conv = ChunkConv(weights[0].unflatten(1, by_head).flatten(0, 1), biases[0].unflatten(1, by_head).flatten(0, 1),
                         weights[1], biases[1], weights[2], biases[2])
        with torch.autocast(u.device.type, enabled=False):
            return chunk_local_ssd(x.unflatten(-1, by_head), dt, -torch.exp(self.A_log.float()), B, C,
                                   self.D.float(), plan.tiles, conv=conv, dt_bias=self.dt_bias.float())

    def _output(self, normed: torch.Tensor) -> torch.Tensor:
        """out_proj per stream: [..., S, hidden] -> [..., S, d_out]"""
        return torch.einsum("...sh,soh->...so", normed, self.out_proj)

    def _gated_norm_of_input(self, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self._gated_norm(y, self._gate(u))

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """RMSNorm(y * silu(z)) per stream: [..., S, hidden]"""
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
        # Kept for the backward: u (which the caller keeps anyway), the scan's inputs and its output y.
        # The gated norm and its gate's projection rerun from y and u. The conv reruns inside the tiled
        # kernels when they take it (their inputs are the projection itself), else from u with the projection.
        b, L = u.shape[:2]
        if self._conv_fuses_into_scan(plan, return_state):
            y, final_state = self._fused_conv_scan(u, plan), None
        else:
            xbc, dt = _rerun_in_backward(self._conv_and_dt, u, plan.offset_in_chunk)
            x, dt, A, B, C = self._scan_inputs(xbc, dt)
            scanned = scan(x, dt, A, B, C, plan, D=self.D.float(), return_final_state=return_state)
            y, final_state = scanned if return_state else (scanned, None)
        y = y.reshape(b, L, self.streams, self.cfg.hidden)
        out = self._output(_rerun_in_backward(self._gated_norm_of_input, y, u))
        if not return_state:
            return out
        return out, SSMState(conv=self._conv_window(u, plan.offset_in_chunk), ssm=final_state)

    def _conv_window(self, u: torch.Tensor, offset_in_chunk: torch.Tensor) -> torch.Tensor | None:
        """The last conv-1 inputs of the chunk in progress (zeros where they precede its start)."""
        if self.cfg.conv == 0:
            return None
        width = self.cfg.conv - 1
        L = u.shape[1]
        raw_xbc, _ = self._conv_and_dt_inputs(u[:, max(0, L - width):])
        window = raw_xbc.flatten(-2).transpose(1, 2).float()  # [b, c, <=width]
        positions = torch.arange(max(0, L - width), L, device=u.device)
        current_start = L - 1 - offset_in_chunk[-1]
        window = window * (positions >= current_start).to(window.dtype)
        return F.pad(window, (width - window.shape[-1], 0)).contiguous()

    def step(self, u: torch.Tensor, state: SSMState, reset: torch.Tensor | None = None) -> torch.Tensor:
        """One token: ``u [b, d_in]`` or ``[b, streams, d_in]`` -> ``[b, streams, d_out]``; ``state`` advances in place.

        ``reset`` (float ``[1]``, 1 where this token ends a chunk) zeroes the state after the
        token by a multiply, not a branch, so the step stays one fixed graph.
        """
        b = u.shape[0]
        z, xbc, dt = self._project(u, slice(None)).split([self.cfg.hidden, self.conv_width, self.cfg.heads], dim=-1)
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
        return self._output(self._gated_norm(y.type_as(z).reshape(b, self.streams, self.cfg.hidden), z))


def _rerun_in_backward(fn, *args):
    """``fn(*args)``, whose backward keeps only ``args`` and runs ``fn`` again (mamba_ssm's checkpoint_lvl=1).

    For the input projection with the conv, and for the gate's projection with the gated norm:
    they rerun from tensors that are kept anyway (the block's input and the scan's output), one
    matmul and one fused pass each, so the backward keeps none of their outputs.
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
