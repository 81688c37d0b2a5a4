"""Attamba attention: keys and values are chunk-reset SSM summaries, attention sees boundaries only.

    q = RoPE(Wq x)
    k = RoPE(SSM_k(u) + u),  v = SSM_v(u) + u     (u = x, or Wkv x with kv_proj; "+ u" is kv_residual)
    out = Wo · Attn(q, k, v, boundary mask)

Query t sees key s iff (s < t and s is a boundary) or t - lead <= s <= t.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn

from attamba.config import ChunkingConfig, ModelConfig
from attamba.models.layers import apply_rope, merge_heads, split_heads, truncated_normal_
from attamba.models.mamba2 import SSMBlock, SSMState
from attamba.models.transformer import NEVER, KVCache, attend_cached
from attamba.ops.attention import ChunkMask, attend_chunks, causal_attention, chunk_mask
from attamba.ops.chunking import boundary_mask, chunk_starts, intrinsic_boundaries, is_boundary
from attamba.ops.ssm import ScanPlan, plan_scan

@dataclass
class AttambaCache:
    """Per layer: the key/value slots, where chunks end, and the K/V SSMs' state of the chunk in progress.

    Slots (see :class:`KVCache`): one per boundary of the capacity, visible from ``lead + 1``
    tokens after it (earlier it is in the ring); a scratch slot; a ring of ``lead + 1``
    holding the leading tokens and the current one. A token is written to the slot of the
    next boundary at or after it: a boundary stays there, any other token is overwritten
    before a query reads that slot (the last chunk of the capacity writes to the scratch).
    ``pseudo`` chunking keeps one slot per position, each visible at once, and no ring.
    """

    kv: KVCache
    ends_chunk: torch.Tensor  # float32 [capacity]: 1 where a chunk ends, so the SSM state resets after it
    ssm: SSMState

    def held_bytes(self, length: int) -> int:
        return self.kv.held_bytes(length) + self.ssm.held_bytes(length)

    def allocated_bytes(self) -> int:
        return self.kv.allocated_bytes() + self.ssm.allocated_bytes()


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
        self.layout = ChunkLayout(chunking, layer, config.n_layers, config.ssm.impl, config.attn_impl)
        self.ring = 0 if self.layout.pseudo else self.layout.lead  # pseudo caches every key, so needs no ring
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

    def prefill(self, x: torch.Tensor, rope, capacity: int) -> tuple[torch.Tensor, AttambaCache]:
        length = x.shape[1]
        plan = self.plan(length, x.device)
        q = apply_rope(split_heads(self.wq(x), self.n_heads), rope)
        u = self._ssm_input(x)
        kv, ssm_state = self.kv_ssm(u, plan.scan, return_state=True)
        k, v = self._keys_values(u, kv, rope)
        out = self.wo(merge_heads(self._attend(q, k, v, plan)))
        if self.layout.is_boundary(length - 1):  # the next token opens a new chunk
            ssm_state.reset_()
        return out, self._initial_cache(k, v, ssm_state, capacity)

    def _initial_cache(self, k: torch.Tensor, v: torch.Tensor, ssm_state: SSMState, capacity: int) -> AttambaCache:
        """The slot tables of ``capacity`` positions (see :class:`AttambaCache`), holding the prompt's keys/values."""
        ends_chunk = torch.zeros(capacity)
        ends_chunk[self.layout.intrinsic_positions(capacity)] = 1
        positions = torch.arange(capacity)
        cached = positions if self.layout.pseudo else ends_chunk.nonzero().flatten()
        ring_slots = 0 if self.layout.pseudo else self.ring + 1  # the last `lead` tokens and the current one
        scratch = len(cached)
        # a cached key's slot becomes visible when the ring lets go of its token
        first_visible = torch.cat([cached + ring_slots, torch.tensor([NEVER]), torch.arange(ring_slots)])
        writes = [torch.searchsorted(cached, positions)]  # the slot of the next cached position
        if ring_slots:
            writes.append(scratch + 1 + positions % ring_slots)
        lengths = torch.arange(capacity + 1)
        held = torch.searchsorted(cached, lengths) + lengths.clamp(max=self.ring)
        kv = KVCache.allocate(k, torch.stack(writes, 1), first_visible, held)
        length = k.shape[2]
        prompt_cached = cached[cached < length]
        kv.fill(torch.arange(len(prompt_cached)), prompt_cached, k, v)
        if ring_slots:
            recent = torch.arange(max(0, length - self.ring), length)
            kv.fill(scratch + 1 + recent % ring_slots, recent, k, v)
        return AttambaCache(kv, ends_chunk.to(k.device), ssm_state)

    def step(self, x: torch.Tensor, rope, position: torch.Tensor, cache: AttambaCache) -> torch.Tensor:
        q = apply_rope(split_heads(self.wq(x), self.n_heads), rope)
        u = self._ssm_input(x)
        kv = self.kv_ssm.step(u[:, 0], cache.ssm, reset=cache.ends_chunk[position])
        k, v = self._keys_values(u, kv.unsqueeze(1), rope)
        visible = cache.kv.write(position, k, v)
        return self.wo(merge_heads(attend_cached(q, cache.kv.k, cache.kv.v, visible)))
