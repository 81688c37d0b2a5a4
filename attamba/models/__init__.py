"""Model families behind one constructor: ``build_model(config) -> nn.Module``."""

from __future__ import annotations

from attamba.config import ChunkingConfig, Config, ModelConfig
from attamba.models.attamba import AttambaAttention
from attamba.models.layers import LanguageModel
from attamba.models.mamba2 import Mamba2Mixer
from attamba.models.objective import IGNORE_INDEX, NextTokenLoss, split_batch
from attamba.models.transformer import Attention


def build_model(config: Config | ModelConfig, chunking: ChunkingConfig | None = None) -> LanguageModel:
    """The language model of ``config`` (a full :class:`Config`, or a model config plus chunking)."""
    if isinstance(config, Config):
        model, chunking = config.model, config.chunking
    else:
        model, chunking = config, chunking or ChunkingConfig()
    if model.family == "attamba":
        return LanguageModel(model, lambda layer: AttambaAttention(model, chunking, layer), rope_dim=model.head_dim)
    if model.family == "transformer":
        return LanguageModel(model, lambda layer: Attention(model), rope_dim=model.head_dim)
    if model.family == "mamba2":
        return LanguageModel(model, lambda layer: Mamba2Mixer(model), rope_dim=None)
    raise ValueError(f"model.family: got {model.family!r}, allowed values are attamba, transformer, mamba2")


__all__ = ["IGNORE_INDEX", "build_model", "LanguageModel", "NextTokenLoss", "split_batch"]
