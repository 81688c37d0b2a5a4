"""The named evaluations of a trained model, under the metric names that training and ``attamba-eval`` log.

``val``: held-out loss and word perplexity (text runs); ``wikitext2``: lm-eval's WikiText-2 metrics;
``passkey``: passkey retrieval accuracy, with its table as artifacts; ``mqar``: recall accuracy on
MQAR's held-out set (MQAR runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from attamba.config import Config
from attamba.data import Tokenizer, validation_documents
from attamba.data.mqar import heldout_set
from attamba.evals.mqar import evaluate_mqar
from attamba.evals.passkey import evaluate_passkey
from attamba import evaluate as scoring  # looked up at each call, so that tests can slow one down

EVALUATIONS = ("val", "wikitext2", "passkey", "mqar")
TEXT_EVALUATIONS = ("val", "wikitext2", "passkey")  # they read text: not for data=mqar's integers
WIKITEXT2_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte", "paper_perplexity")


def eval_context(config: Config) -> int:
    return config.eval.context or config.train.seq_len


def validation(model: nn.Module, tokenizer: Tokenizer, config: Config, device: torch.device,
               autocast_dtype: Optional[torch.dtype], documents: Optional[Sequence[str]] = None) -> dict[str, float]:
    """``eval/val/*`` on ``documents`` (default: the first ``eval.val_batches`` held-out documents)."""
    if documents is None:
        documents = validation_documents(config.data, limit=config.eval.val_batches)
    val = scoring.evaluate_validation(model, tokenizer, documents, eval_context(config), device=device,
                              autocast_dtype=autocast_dtype)
    return {"eval/val/loss": val["loss"], "eval/val/word_perplexity": val["word_perplexity"]}


def wikitext2(model: nn.Module, tokenizer: Tokenizer, config: Config, device: torch.device,
              autocast_dtype: Optional[torch.dtype]) -> dict[str, float]:
    """``eval/wikitext2/*`` on ``eval.wikitext2_path``."""
    scores = scoring.evaluate_wikitext2(model, tokenizer, config.eval.wikitext2_path, eval_context(config),
                                        device=device, autocast_dtype=autocast_dtype)
    return {f"eval/wikitext2/{key}": scores[key] for key in WIKITEXT2_METRICS}


def mqar(model: nn.Module, config: Config, device: torch.device, autocast_dtype: Optional[torch.dtype],
         examples: Optional[torch.Tensor] = None) -> dict[str, float]:
    """``eval/mqar/accuracy`` and ``eval/mqar/loss`` on ``examples`` (default: the held-out set)."""
    if examples is None:
        examples = heldout_set(config.data, config.train.seq_len)
    recall = evaluate_mqar(model, examples, device=device, autocast_dtype=autocast_dtype)
    return {f"eval/mqar/{key}": value for key, value in recall.items()}


def passkey(model: nn.Module, tokenizer: Tokenizer, config: Config, device: torch.device,
            autocast_dtype: Optional[torch.dtype], directory: Path) -> tuple[dict[str, float], list[Path]]:
    """``eval/passkey/accuracy`` with the ``eval.passkey_*`` settings, and its table written into
    ``directory`` (``passkey.csv``, ``passkey.md``), to be logged as artifacts."""
    result = evaluate_passkey(model, tokenizer, validation_documents(config.data), config.passkey_lengths,
                              config.eval.passkey_depths, config.eval.passkey_trials,
                              max_length=config.model.max_length, device=device, autocast_dtype=autocast_dtype)
    return {"eval/passkey/accuracy": result.accuracy}, result.write(directory)
