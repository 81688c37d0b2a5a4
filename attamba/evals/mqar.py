"""MQAR recall accuracy: exact match of every query's answer on the held-out set (as Zoology scores it)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from attamba.evaluate import _model_device
from attamba.models.objective import IGNORE_INDEX, split_batch


def evaluate_mqar(model: nn.Module, examples: torch.Tensor, batch_size: int = 64,
                  device: Optional[torch.device | str] = None,
                  autocast_dtype: Optional[torch.dtype] = None) -> dict[str, float]:
    """``accuracy``: the share of queries whose most likely next token is the key's value (one forward
    pass, each query read in its example); ``loss``: mean NLL of those answers. ``examples`` are
    ``[N, 2, L]`` (inputs, targets) as :func:`attamba.data.mqar.heldout_set` gives them. The model
    runs in eval mode and gets its mode back."""
    device = torch.device(device) if device is not None else _model_device(model)
    correct, nll, queries = 0, 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                inputs, targets = (part.to(device) for part in split_batch(examples[start:start + batch_size]))
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = model(inputs)
                scored = targets != IGNORE_INDEX
                answers, answer_logits = targets[scored], logits[scored].float()
                correct += int((answer_logits.argmax(-1) == answers).sum())
                nll += float(F.cross_entropy(answer_logits, answers, reduction="sum"))
                queries += int(scored.sum())
    finally:
        model.train(was_training)
    if queries == 0:
        raise ValueError("examples: no scored query to evaluate")
    return {"accuracy": correct / queries, "loss": nll / queries}
