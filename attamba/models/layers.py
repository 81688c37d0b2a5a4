"""Llama-style building blocks shared by every family: norms, RoPE, SwiGLU, init, the LM shell."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from attamba.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [len(positions), head_dim // 2] for rotating (even, odd) feature pairs."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of ``x [b, h, L, d]`` by the per-position angles."""
    cos, sin = rope
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[b, L, h*d] -> [b, h, L, d]"""
    return x.unflatten(-1, (n_heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[b, h, L, d] -> [b, L, h*d]"""
    return x.transpose(1, 2).flatten(-2)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def reset_parameters(self, std: float, depth_factor: float) -> None:
        truncated_normal_(self.w1.weight, std)
        truncated_normal_(self.w3.weight, std)
        truncated_normal_(self.w2.weight, self.w2.in_features ** -0.5 / depth_factor)


def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-3 * std, b=3 * std)


def depth_factor(config: ModelConfig, layer: int) -> float:
    """Divisor of output-projection init std: keeps the residual stream's variance in check with depth."""
    if config.init_depth == "current":
        return math.sqrt(2 * (layer + 1))
    if config.init_depth == "global":
        return math.sqrt(2 * config.n_layers)
    return 1.0


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, mixer: nn.Module, layer: int):
        super().__init__()
        self.layer = layer
        self.mixer_norm = RMSNorm(config.dim, config.norm_eps)
        self.mixer = mixer
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = FeedForward(config.dim, config.ffn_dim)

    def forward(self, x: torch.Tensor, rope, plan: Any) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), rope, plan)
        return x + self.ffn(self.ffn_norm(x))

    def prefill(self, x: torch.Tensor, rope, capacity: int) -> tuple[torch.Tensor, Any]:
        mixed, cache = self.mixer.prefill(self.mixer_norm(x), rope, capacity)
        x = x + mixed
        return x + self.ffn(self.ffn_norm(x)), cache

    def step(self, x: torch.Tensor, rope, position: torch.Tensor, cache: Any) -> torch.Tensor:
        x = x + self.mixer.step(self.mixer_norm(x), rope, position, cache)
        return x + self.ffn(self.ffn_norm(x))


class LanguageModel(nn.Module):
    """Token embedding, a stack of blocks with a family-specific mixer, final norm, output head.

    ``forward(tokens[B, L]) -> logits[B, L, V]``. Cached decoding goes through
    ``prefill`` and ``step`` (driven by :class:`attamba.inference.Generator`).
    """

    def __init__(self, config: ModelConfig, make_mixer: Callable[[int], nn.Module], rope_dim: int | None):
        super().__init__()
        self.config = config
        self.rope_dim = rope_dim  # per-head width that RoPE rotates; None for RoPE-free families
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, make_mixer(layer), layer) for layer in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std if self.config.init_std is not None else self.config.dim ** -0.5
        truncated_normal_(self.tok_embeddings.weight, std)
        if not self.config.tie_embeddings:
            truncated_normal_(self.output.weight, std)
        self.norm.reset_parameters()
        for block in self.layers:
            factor = depth_factor(self.config, block.layer)
            block.mixer_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
            block.ffn.reset_parameters(std, factor)
            block.mixer.reset_parameters(std, factor)

    def _rope(self, positions: torch.Tensor):
        if self.rope_dim is None:
            return None
        return rope_tables(positions, self.rope_dim, self.config.rope_theta)

    @torch.compiler.disable  # host-side and cached: a compiled forward breaks its graph here only
    def plans(self, length: int, device: torch.device) -> list[Any]:
        """Each mixer's prepared layout for ``length`` tokens (chunk boundaries, masks, scan kernels)."""
        return [block.mixer.plan(length, device) for block in self.layers]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        plans = self.plans(tokens.shape[1], tokens.device)
        rope = self._rope(torch.arange(tokens.shape[1], device=tokens.device))
        x = self.tok_embeddings(tokens)
        for block, plan in zip(self.layers, plans):
            x = block(x, rope, plan)
        return self.output(self.norm(x))

    def prefill(self, tokens: torch.Tensor, capacity: int, all_logits: bool = True) -> tuple[torch.Tensor, list[Any]]:
        """Logits of every prompt position (or only the last: long prompts' logits are huge) and each
        layer's cache, allocated for ``capacity`` positions in all."""
        rope = self._rope(torch.arange(tokens.shape[1], device=tokens.device))
        x = self.tok_embeddings(tokens)
        caches = []
        for block in self.layers:
            x, cache = block.prefill(x, rope, capacity)
            caches.append(cache)
        return self.output(self.norm(x if all_logits else x[:, -1:])), caches

    def step(self, tokens: torch.Tensor, position: torch.Tensor, caches: list[Any]) -> torch.Tensor:
        """Logits for ``tokens [B, 1]`` at ``position`` (int64 ``[1]``, on their device); the caches advance in place.

        Nothing on the host depends on the position, so a CUDA graph of one step replays every later one.
        """
        rope = self._rope(position)
        x = self.tok_embeddings(tokens)
        for block, cache in zip(self.layers, caches):
            x = block.step(x, rope, position, cache)
        return self.output(self.norm(x))
