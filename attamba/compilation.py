"""How a training step is compiled: the defaults per device, the compiler's caches, the wrapper."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from attamba.config import TrainConfig


def resolve_compile(train: TrainConfig, device: torch.device) -> tuple[bool, str]:
    """``train.compile`` and ``train.compile_mode`` as they apply on ``device``.

    ``auto`` compiles on CUDA, in ``reduce-overhead`` mode (CUDA graphs): the paper's models issue
    about a thousand kernels per step, too many for the host to launch one by one in the time the
    GPU runs them (docs/performance.md has the measurements). On the CPU ``auto`` leaves the model
    eager: compiling costs minutes there and gains little.
    """
    enabled = device.type == "cuda" if train.compile == "auto" else train.compile == "true"
    mode = train.compile_mode
    if mode == "auto":
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    return enabled, mode


def use_compile_cache(directory: str | Path) -> None:
    """Keep Inductor's and Triton's caches in ``directory`` (``train.compile_cache``), so that the
    runs of a sweep reuse each other's compiled graphs and kernels instead of compiling from scratch.
    Caches the user chose through the environment are left alone."""
    root = Path(directory).resolve()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))


def compile_for_training(model: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """``torch.compile`` a model, or its DDP wrapper (wrap first, then compile), for training.

    A compiled DDP module is split at its gradient buckets so that each bucket's all-reduce
    overlaps the rest of the backward, also under CUDA graphs (``reduce-overhead``): there the
    split costs a graph launch per bucket, but the host has time to spare, and keeping the graph
    whole made the all-reduce follow the backward.
    """
    return torch.compile(model, mode=None if mode == "default" else mode)
