"""Cached decoding: ``prefill`` a prompt once, then ``step`` one token at a time.

``prefill`` allocates every layer's cache (:class:`~attamba.models.transformer.KVCache`,
:class:`~attamba.models.attamba.AttambaCache`, :class:`~attamba.models.mamba2.SSMState`) for a
fixed number of positions, and each step writes it in place at a position kept on the device.
A step therefore has fixed shapes and never waits on the host, so on CUDA one step can be
captured into a CUDA graph and replayed for every later token (``cuda_graph=True``): at small
batch, decoding is otherwise bound by the launch cost of its hundreds of small kernels.
Every family runs the same machinery, so their decoding speeds compare fairly.

:meth:`Generator.cache_bytes` counts the entries actually held for the sequence so far, so the
L/P growth of Attamba's cache is observed, not assumed; :meth:`Generator.allocated_bytes` is
what the capacity reserves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from attamba.models.layers import LanguageModel
from attamba.models.mamba2 import SSMState

DEFAULT_MARGIN = 256  # positions a prefill reserves for decoding when no capacity is given
_WARMUP_STEPS = 3  # eager runs before a capture: cuBLAS handles, autotuning and compilation happen here


def _recurrent_tensors(obj: Any) -> list[torch.Tensor]:
    """The cache tensors a step computes from their own previous value: the SSM states."""
    if isinstance(obj, SSMState):
        return obj.tensors()
    if dataclasses.is_dataclass(obj):
        return [t for field in dataclasses.fields(obj) for t in _recurrent_tensors(getattr(obj, field.name))]
    if isinstance(obj, list):
        return [t for item in obj for t in _recurrent_tensors(item)]
    return []


class Generator:
    """Incremental decoding for any model built by :func:`attamba.build_model`.

    >>> gen = Generator(model)                # or Generator(model, cuda_graph=True) on CUDA
    >>> logits = gen.prefill(prompt)          # [B, L, V]
    >>> logits = gen.step(next_tokens)        # [B, 1, V]

    ``capacity``: the most positions (prompt and decoded tokens) the caches hold; by default
    a prefill reserves its prompt plus ``DEFAULT_MARGIN``, and ``generate`` what it needs.
    ``cuda_graph``: after each prefill, capture one step into a CUDA graph and replay it.
    ``compile_step``: run the step through ``torch.compile`` (True, or a mode without CUDA
    graphs of its own such as ``"max-autotune-no-cudagraphs"``); shapes are static and the
    position is a tensor, so it compiles once.
    """

    def __init__(self, model: LanguageModel, capacity: int | None = None, cuda_graph: bool = False,
                 compile_step: bool | str = False):
        self.model = model
        self.capacity = capacity
        self.cuda_graph = cuda_graph
        self._step = model.step
        if compile_step:
            mode = None if compile_step is True else compile_step
            self._step = torch.compile(model.step, mode=mode, fullgraph=True, dynamic=False)
        self.caches: list[Any] | None = None
        self.length = 0  # positions held: the prompt and every decoded token
        self._limit = 0  # positions the current caches were allocated for
        self._tokens: torch.Tensor | None = None  # [B, 1]: the step's input, at a fixed address
        self._position: torch.Tensor | None = None  # int64 [1]: ``length`` on the device
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: torch.Tensor | None = None  # the captured step's output buffer

    @torch.no_grad()  # not inference_mode: cached layout tensors must stay usable by autograd later
    def prefill(self, tokens: torch.Tensor, all_logits: bool = True, capacity: int | None = None) -> torch.Tensor:
        """Logits ``[B, L, V]`` of the prompt (``[B, 1, V]`` for its last token only with ``all_logits=False``).

        Allocates the caches for ``capacity`` positions (default: the Generator's, else the
        prompt plus ``DEFAULT_MARGIN``) and, with ``cuda_graph``, captures the step.
        """
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"prefill expects tokens [batch, length >= 1], got shape {tuple(tokens.shape)}")
        length = tokens.shape[1]
        capacity = capacity or self.capacity or length + DEFAULT_MARGIN
        if capacity < length:
            raise ValueError(f"capacity: {capacity} positions cannot hold a prompt of {length} tokens")
        if self.cuda_graph and tokens.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model and tokens on a CUDA device, got {tokens.device}")
        self.caches = self._graph = self._graph_logits = None  # free the previous sequence's memory first
        logits, self.caches = self.model.prefill(tokens, capacity, all_logits=all_logits)
        self.length, self._limit = length, capacity
        self._tokens = torch.zeros_like(tokens[:, :1])
        self._position = torch.tensor([length], device=tokens.device)
        if self.cuda_graph:
            self._capture()
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1, V]`` of the next tokens ``[B, 1]``, which join the caches."""
        if self.caches is None:
            raise RuntimeError("call prefill() before step()")
        if tokens.shape != self._tokens.shape:
            raise ValueError(f"step expects tokens of shape {tuple(self._tokens.shape)}, got {tuple(tokens.shape)}")
        if self.length >= self._limit:
            raise ValueError(f"capacity: the caches hold {self._limit} positions and all are used; "
                             f"pass a larger capacity to Generator (or prefill)")
        self._tokens.copy_(tokens)
        if self._graph is None:
            logits = self._decode()
        else:
            self._graph.replay()
            logits = self._graph_logits.clone()  # the buffer is overwritten by the next replay
        self.length += 1
        return logits

    def _decode(self) -> torch.Tensor:
        """One step on the device: the logits of ``_tokens`` at ``_position``, which then advances."""
        logits = self._step(self._tokens, self._position, self.caches)
        self._position.add_(1)
        return logits

    def _capture(self) -> None:
        """Record ``_decode`` into a CUDA graph; every ``step`` then replays it.

        Capture must follow a few eager runs (lazy library set-up, compilation). They run at
        the current position without advancing it: they write that position's cache slots,
        which the first real step rewrites before any query reads them, and advance the SSM
        states, which are saved before and restored after.
        """
        states = _recurrent_tensors(self.caches)
        saved = [state.clone() for state in states]
        with torch.cuda.device(self._tokens.device):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(_WARMUP_STEPS):
                    self._step(self._tokens, self._position, self.caches)
            torch.cuda.current_stream().wait_stream(stream)
            for state, value in zip(states, saved):
                state.copy_(value)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._graph_logits = self._decode()

    @torch.no_grad()  # not inference_mode: cached layout tensors must stay usable by autograd later
    def generate(self, prompt: torch.Tensor, new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation: returns ``[B, new_tokens]``."""
        capacity = self.capacity or prompt.shape[1] + new_tokens
        logits = self.prefill(prompt, all_logits=False, capacity=capacity)[:, -1]
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
        """Bytes of the cache entries held for the sequence so far, all layers (not free or stale slots)."""
        return sum(cache.held_bytes(self.length) for cache in self.caches or [])

    def allocated_bytes(self) -> int:
        """Bytes the caches reserve for their full capacity, all layers."""
        return sum(cache.allocated_bytes() for cache in self.caches or [])
