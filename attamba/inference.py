"""Cached decoding: ``prefill`` a prompt once, then ``step`` one token at a time.

The caches are whatever each layer's mixer keeps (see the ``*Cache``/``SSMState``
dataclasses of :mod:`attamba.models`); :meth:`Generator.cache_bytes` measures the
tensors actually held, so the L/P growth of Attamba's cache is observed, not assumed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from attamba.models.layers import LanguageModel


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable through dataclasses, lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(item) for item in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(item) for item in obj.values())
    return 0


class Generator:
    """Incremental decoding for any model built by :func:`attamba.build_model`.

    >>> gen = Generator(model)
    >>> logits = gen.prefill(prompt)          # [B, L, V]
    >>> logits = gen.step(next_tokens)        # [B, 1, V]
    """

    def __init__(self, model: LanguageModel):
        self.model = model
        self.caches: list[Any] | None = None
        self.position = 0

    @torch.no_grad()  # not inference_mode: cached layout tensors must stay usable by autograd later
    def prefill(self, tokens: torch.Tensor, all_logits: bool = True) -> torch.Tensor:
        """Logits ``[B, L, V]`` of the prompt (``[B, 1, V]`` for its last token only with ``all_logits=False``)."""
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"prefill expects tokens [batch, length >= 1], got shape {tuple(tokens.shape)}")
        logits, self.caches = self.model.prefill(tokens, all_logits=all_logits)
        self.position = tokens.shape[1]
        return logits

    @torch.no_grad()  # not inference_mode: cached layout tensors must stay usable by autograd later
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.caches is None:
            raise RuntimeError("call prefill() before step()")
        if tokens.dim() != 2 or tokens.shape[1] != 1:
            raise ValueError(f"step expects tokens [batch, 1], got shape {tuple(tokens.shape)}")
        logits, self.caches = self.model.step(tokens, self.position, self.caches)
        self.position += 1
        return logits

    @torch.no_grad()  # not inference_mode: cached layout tensors must stay usable by autograd later
    def generate(self, prompt: torch.Tensor, new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation: returns ``[B, new_tokens]``."""
        logits = self.prefill(prompt, all_logits=False)[:, -1]
        out = []
        for _ in range(new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
            else:
                token = logits.argmax(-1, keepdim=True)
            out.append(token)
            logits = self.step(token)[:, -1]
        return torch.cat(out, dim=1)

    def cache_bytes(self) -> int:
        """Bytes of every tensor the decoder holds for the sequence so far (all layers)."""
        return tensor_bytes(self.caches)
