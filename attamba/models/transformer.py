"""The transformer baseline's attention: GQA, optional narrower ``attn_dim``, optional sliding window."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from attamba.config import ModelConfig
from attamba.models.layers import apply_rope, merge_heads, split_heads, truncated_normal_
from attamba.ops.attention import causal_attention


@dataclass
class KVCache:
    """Keys/values of past tokens, post-RoPE: all of them, or the last ``window - 1`` with a window."""

    k: torch.Tensor  # [b, kv_heads, S, head_dim]
    v: torch.Tensor


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query ``[b, h, 1, d]`` against every cached key (GQA-aware); no mask needed."""
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])


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

    def _keep(self, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """What the next query needs: everything, or the last window-1 keys."""
        if self.config.window is not None:
            start = max(0, k.shape[2] - (self.config.window - 1))
            k, v = k[:, :, start:], v[:, :, start:]
        return KVCache(k.contiguous(), v.contiguous())

    def prefill(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, KVCache]:
        q, k, v = self._qkv(x, rope)
        out = causal_attention(q, k, v, window=self.config.window, impl=self.config.attn_impl)
        return self.wo(merge_heads(out)), self._keep(k, v)

    def step(self, x: torch.Tensor, rope, position: int, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        q, k, v = self._qkv(x, rope)
        k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        out = attend_cached(q, k, v)
        return self.wo(merge_heads(out)), self._keep(k, v)
