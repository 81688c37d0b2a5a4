"""Attamba attention: keys and values are chunk-reset SSM summaries, attention sees boundaries only.

    q = RoPE(Wq x)
    k = RoPE(SSM_k(u) + u),  v = SSM_v(u) + u     (u = x, or Wkv x with kv_proj; "+ u" is kv_residual)
    out = Wo · Attn(q, k, v, boundary mask)

Query t sees key s iff (s < t and s is a boundary) or t - lead <= s <= t.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn

from attamba.config import ChunkingConfig, ModelConfig
from attamba.models.layers import apply_rope, merge_heads, split_heads, truncated_normal_
from attamba.models.mamba2 import SSMBlock, SSMState
from attamba.models.transformer import attend_cached
from attamba.ops.attention import ChunkMask, attend_chunks, causal_attention, chunk_mask
from attamba.ops.chunking import boundary_mask, chunk_starts, intrinsic_boundaries, is_boundary
from attamba.ops.ssm import ScanPlan, plan_scan

@dataclass
class AttambaCache:
    """Per layer: boundary keys/values, a ring of the last ``lead`` ones, and the running SSM state."""

    boundary_k: torch.Tensor  # [b, h, n_boundaries, d], post-RoPE
    boundary_v: torch.Tensor
    boundary_pos: list[int]  # positions of the cached boundaries, ascending (every position for pseudo)
    ring_k: torch.Tensor  # [b, h, <=lead, d]: the most recent tokens, oldest first
    ring_v: torch.Tensor
    ssm: SSMState


@dataclass(frozen=True)
class AttambaPlan:
    """One layer's layout for one sequence length, prepared on the host for its forward."""

    scan: ScanPlan  # where the K/V SSMs reset (and which scan kernel runs)
    mask: ChunkMask | None  # which keys each query sees (None: pseudo chunking attends causally)


class ChunkLayout:
    """The boundary layout of one layer (see :mod:`attamba.ops.chunking`)."""

    def __init__(self, chunking: ChunkingConfig, layer: int, n_layers: int, ssm_impl: str, attn_impl: str):
        self.pseudo = chunking.strategy == "pseudo"
        # pseudo chunking compresses like uniform but attends to every token
        self.strategy = "uniform" if self.pseudo else chunking.strategy
        self.args = (chunking.size, layer, n_layers, chunking.seed)
        self.lead = chunking.leading_tokens
        self.impls = (ssm_impl, attn_impl)

    @lru_cache(maxsize=16)
    def plan(self, length: int, device: torch.device) -> AttambaPlan:
        """The layout of a sequence of ``length`` tokens, made ready for the SSM and attention kernels."""
        boundary = boundary_mask(length, self.strategy, *self.args)
        ssm_impl, attn_impl = self.impls
        scan = plan_scan(chunk_starts(boundary), device, ssm_impl)
        return AttambaPlan(scan, None if self.pseudo else chunk_mask(boundary, self.lead, device, attn_impl))

    def intrinsic_positions(self, length: int) -> list[int]:
        return intrinsic_boundaries(length, self.strategy, *self.args).nonzero().flatten().tolist()

    def is_boundary(self, position: int) -> bool:
        return is_boundary(position, self.strategy, *self.args)


class AttambaAttention(nn.Module):
    def __init__(self, config: ModelConfig, chunking: ChunkingConfig, layer: int):
        super().__init__()
        self.config = config
        self.lead = chunking.leading_tokens
        self.pseudo = chunking.strategy == "pseudo"
        self.ring = 0 if self.pseudo else self.lead  # pseudo caches every key, so needs no ring
        self.layout = ChunkLayout(chunking, layer, config.n_layers, config.ssm.impl, config.attn_impl)
        self.n_heads = config.n_heads
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.kv_proj = nn.Linear(config.dim, 2 * config.dim, bias=False) if config.kv_proj else None
        self.kv_ssm = SSMBlock(config.ssm, config.dim, config.dim, streams=2, per_stream_input=config.kv_proj,
                               norm_eps=config.norm_eps)

    def reset_parameters(self, std: float, depth_factor: float) -> None:
        truncated_normal_(self.wq.weight, std)
        truncated_normal_(self.wo.weight, std / depth_factor)
        if self.kv_proj is not None:
            truncated_normal_(self.kv_proj.weight, std)
        self.kv_ssm.reset_parameters(std, depth_factor)

    def _ssm_input(self, x: torch.Tensor) -> torch.Tensor:
        """x itself (shared by K and V), or per-stream projections [..., 2, dim]."""
        if self.kv_proj is None:
            return x
        return self.kv_proj(x).unflatten(-1, (2, self.config.dim))

    def _keys_values(self, u: torch.Tensor, kv: torch.Tensor, rope):
        """SSM outputs [b, L, 2, dim] (+ residual) -> RoPE'd keys and values [b, h, L, d]."""
        if self.config.kv_residual:
            kv = kv + (u if u.dim() == kv.dim() else u.unsqueeze(-2))
        k, v = kv.unbind(-2)
        return apply_rope(split_heads(k, self.n_heads), rope), split_heads(v, self.n_heads)

    def _attend(self, q, k, v, plan: AttambaPlan):
        if plan.mask is None:
            return causal_attention(q, k, v, impl=self.config.attn_impl)
        return attend_chunks(q, k, v, plan.mask)

    def plan(self, length: int, device: torch.device) -> AttambaPlan:
        return self.layout.plan(length, device)

    def forward(self, x: torch.Tensor, rope, plan: AttambaPlan) -> torch.Tensor:
        q = apply_rope(split_heads(self.wq(x), self.n_heads), rope)
        u = self._ssm_input(x)
        k, v = self._keys_values(u, self.kv_ssm(u, plan.scan), rope)
        return self.wo(merge_heads(self._attend(q, k, v, plan)))

    def prefill(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, AttambaCache]:
        length = x.shape[1]
        plan = self.plan(length, x.device)
        q = apply_rope(split_heads(self.wq(x), self.n_heads), rope)
        u = self._ssm_input(x)
        kv, ssm_state = self.kv_ssm(u, plan.scan, return_state=True)
        k, v = self._keys_values(u, kv, rope)
        out = self.wo(merge_heads(self._attend(q, k, v, plan)))
        if self.layout.is_boundary(length - 1):  # the next token opens a new chunk
            ssm_state.reset_()
        cache = self._initial_cache(k, v, length, ssm_state)
        return out, cache

    def _initial_cache(self, k, v, length, ssm_state) -> AttambaCache:
        if self.pseudo:  # attends to every past token: the cache is the whole sequence
            positions = list(range(length))
        else:
            positions = self.layout.intrinsic_positions(length)
        index = torch.tensor(positions, device=k.device, dtype=torch.long)
        ring_start = length - min(self.ring, length)
        return AttambaCache(
            boundary_k=k.index_select(2, index), boundary_v=v.index_select(2, index), boundary_pos=positions,
            ring_k=k[:, :, ring_start:].clone(), ring_v=v[:, :, ring_start:].clone(), ssm=ssm_state,
        )

    def step(self, x: torch.Tensor, rope, position: int, cache: AttambaCache) -> tuple[torch.Tensor, AttambaCache]:
        q = apply_rope(split_heads(self.wq(x), self.n_heads), rope)
        u = self._ssm_input(x)
        kv, ssm_state = self.kv_ssm.step(u[:, 0], cache.ssm)
        k, v = self._keys_values(u, kv.unsqueeze(1), rope)
        if self.pseudo:
            keys, values = torch.cat([cache.boundary_k, k], 2), torch.cat([cache.boundary_v, v], 2)
        else:
            # boundaries inside the leading window are already in the ring: count them once
            visible = bisect_left(cache.boundary_pos, position - self.lead)
            keys = torch.cat([cache.boundary_k[:, :, :visible], cache.ring_k, k], 2)
            values = torch.cat([cache.boundary_v[:, :, :visible], cache.ring_v, v], 2)
        out = self.wo(merge_heads(attend_cached(q, keys, values)))
        return out, self._advance(cache, k, v, position, ssm_state)

    def _advance(self, cache: AttambaCache, k, v, position: int, ssm_state: SSMState) -> AttambaCache:
        boundary_k, boundary_v, boundary_pos = cache.boundary_k, cache.boundary_v, cache.boundary_pos
        is_boundary = self.layout.is_boundary(position)
        if self.pseudo or is_boundary:
            boundary_k, boundary_v = torch.cat([boundary_k, k], 2), torch.cat([boundary_v, v], 2)
            boundary_pos = boundary_pos + [position]
        if is_boundary:
            ssm_state.reset_()
        ring_k, ring_v = cache.ring_k, cache.ring_v
        if self.ring:
            ring_k = torch.cat([ring_k, k], 2)[:, :, -self.ring:]
            ring_v = torch.cat([ring_v, v], 2)[:, :, -self.ring:]
        return AttambaCache(boundary_k, boundary_v, boundary_pos, ring_k, ring_v, ssm_state)
