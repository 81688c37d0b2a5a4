"""The transformer baseline's attention: GQA, optional narrower ``attn_dim``, optional sliding window."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from attamba.config import ModelConfig
from attamba.models.layers import apply_rope, merge_heads, split_heads, truncated_normal_
from attamba.ops.attention import causal_attention


# first_visible of a slot that no query reads (padding, or a scratch slot)
NEVER = torch.iinfo(torch.int64).max

# SDPA's fused kernels want the mask's key dim aligned to this; an unaligned one is copied every call.
_SLOT_ALIGN = 16


@dataclass
class KVCache:
    """One attention layer's keys/values in preallocated slots, written in place.

    The token at position ``t`` is written to the slots ``slots[t]``, and query ``t``
    reads every slot ``s`` with ``first_visible[s] <= t``. Both tables follow from the
    layer's layout alone, so a decode step has fixed shapes, no host sync and no Python
    branch on the position: one CUDA graph of a step replays every later one.
    """

    k: torch.Tensor  # [b, kv_heads, n_slots, head_dim], post-RoPE
    v: torch.Tensor
    slots: torch.Tensor  # int64 [capacity, writes]: where each position's key/value goes
    first_visible: torch.Tensor  # int64 [n_slots]: the first query position that reads each slot
    held: torch.Tensor  # int64 [capacity + 1] on the CPU: entries later queries still need, after each length

    @classmethod
    def allocate(cls, like: torch.Tensor, slots: torch.Tensor, first_visible: torch.Tensor,
                 held: torch.Tensor) -> KVCache:
        """Zeroed slots for keys shaped like ``like [b, h, L, d]``, padded with never-read ones to an aligned count."""
        b, h, _, d = like.shape
        padding = -len(first_visible) % _SLOT_ALIGN
        first_visible = torch.cat([first_visible, torch.full((padding,), NEVER)])
        buffer = like.new_zeros(b, h, len(first_visible), d)
        return cls(k=buffer, v=buffer.clone(), slots=slots.to(like.device),
                   first_visible=first_visible.to(like.device), held=held)

    def fill(self, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the prefilled ``k[:, :, positions]`` (and ``v``) in ``slots`` (distinct)."""
        slots, positions = slots.to(self.k.device), positions.to(self.k.device)
        self.k[:, :, slots] = k[:, :, positions]
        self.v[:, :, slots] = v[:, :, positions]

    def write(self, position: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the key/value ``[b, h, 1, d]`` of ``position`` (int64 ``[1]``); return the slots its query sees."""
        slots = self.slots[position].flatten()
        self.k[:, :, slots] = k
        self.v[:, :, slots] = v
        return self.first_visible <= position

    def held_bytes(self, length: int) -> int:
        """Bytes of the entries held for a sequence of ``length`` tokens (not the free or stale slots)."""
        entry = (self.k.nbytes + self.v.nbytes) // self.k.shape[2]
        return int(self.held[length]) * entry

    def allocated_bytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """One query ``[b, h, 1, d]`` against the ``visible`` (bool ``[S]``) slots of ``k``/``v`` ``[b, h_kv, S, d]``.

    With GQA, the query heads that share a key head go in as that many query rows, so no
    key is repeated and every SDPA backend applies.
    """
    b, h, _, d = q.shape
    grouped = q.reshape(b, k.shape[1], h // k.shape[1], d)
    return F.scaled_dot_product_attention(grouped, k, v, attn_mask=visible[None]).reshape(b, h, 1, d)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.n_heads, self.kv_heads, head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.width, bias=False)
        self.wk = nn.Linear(config.dim, self.kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(config.width, config.dim, bias=False)

    def reset_parameters(self, std: float, depth_factor: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            truncated_normal_(linear.weight, std)
        truncated_normal_(self.wo.weight, std / depth_factor)

    def _qkv(self, x: torch.Tensor, rope):
        q = apply_rope(split_heads(self.wq(x), self.n_heads), rope)
        k = apply_rope(split_heads(self.wk(x), self.kv_heads), rope)
        v = split_heads(self.wv(x), self.kv_heads)
        return q, k, v

    def plan(self, length: int, device: torch.device) -> None:
        """Full and sliding-window attention need no prepared layout."""
        return None

    def forward(self, x: torch.Tensor, rope, plan: None = None) -> torch.Tensor:
        q, k, v = self._qkv(x, rope)
        out = causal_attention(q, k, v, window=self.config.window, impl=self.config.attn_impl)
        return self.wo(merge_heads(out))

    def _cache(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> KVCache:
        """Slots for ``capacity`` positions holding the prompt's ``k``/``v``.

        One slot per position, or with a window a ring of ``window`` slots: position ``t``
        goes to slot ``t % window``, so after it is written the ring holds exactly the
        keys query ``t`` sees; slot ``i`` is empty until query ``i``.
        """
        window = self.config.window
        ring = capacity if window is None else min(window, capacity)
        lengths = torch.arange(capacity + 1)
        cache = KVCache.allocate(k, slots=(torch.arange(capacity) % ring)[:, None], first_visible=torch.arange(ring),
                                 held=lengths if window is None else lengths.clamp(max=window - 1))
        length = k.shape[2]
        kept = torch.arange(max(0, length - ring), length)
        cache.fill(kept % ring, kept, k, v)
        return cache

    def prefill(self, x: torch.Tensor, rope, capacity: int) -> tuple[torch.Tensor, KVCache]:
        q, k, v = self._qkv(x, rope)
        out = causal_attention(q, k, v, window=self.config.window, impl=self.config.attn_impl)
        return self.wo(merge_heads(out)), self._cache(k, v, capacity)

    def step(self, x: torch.Tensor, rope, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        q, k, v = self._qkv(x, rope)
        visible = cache.write(position, k, v)
        return self.wo(merge_heads(attend_cached(q, cache.k, cache.v, visible)))
