"""One optimizer step of a run, and the state it updates: the trainer's and ``attamba-bench``'s alike.

The bench times this same step (model wrapping, loss, autocast, clipping, optimizer, schedule),
so what it reports is what a run gets.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from attamba import distributed
from attamba.compilation import compile_for_training, resolve_compile, use_compile_cache
from attamba.config import Config
from attamba.models import NextTokenLoss, build_model, split_batch


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases and the SSM's A_log/D/dt_bias are not weights to shrink."""
    decay, keep = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.dim() >= 2 and "conv_weight" not in name
        (decay if is_matrix else keep).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


@dataclass
class Training:
    """What a checkpoint saves of a run's learning: the model, its optimizer and its LR schedule."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def build_training(config: Config, device: torch.device) -> Training:
    """The run's model (seeded by ``train.seed``), fused AdamW on decayed matrices, warmup + cosine."""
    torch.manual_seed(config.train.seed)
    model = build_model(config).to(device)
    optim, train = config.optim, config.train
    # Fused on every device: one kernel per parameter group, and no step counter read back to the host.
    optimizer = torch.optim.AdamW(
        param_groups(model, optim.weight_decay), lr=train.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
        fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train.warmup, train.steps, optim.lr_min_ratio))
    return Training(model, optimizer, scheduler)


@dataclass
class StepOutput:
    loss: torch.Tensor  # the step's mean loss over its micro-batches and ranks, still on the device
    grad_norm: torch.Tensor  # before clipping, on the device
    lr: float  # the rate the step used


class TrainStep:
    """Forward and backward over ``train.grad_accum`` micro-batches, clipping, the optimizer, the schedule.

    Nothing in a step waits for the device: the loss and gradient norm stay there until a logging
    step reads them, and the first step whose loss was not finite is recorded on the device too
    (:meth:`first_nonfinite_step`), so the host can queue the next step while this one runs. The
    model is wrapped for data parallelism, then compiled as ``train.compile``/``compile_mode``
    resolve on the device (:attr:`compiled`, :attr:`compile_mode`).
    """

    def __init__(self, training: Training, config: Config, device: torch.device,
                 dist_info: distributed.DistInfo = distributed.DistInfo()):
        self.training, self.dist_info = training, dist_info
        self.grad_accum, self.clip = config.train.grad_accum, config.optim.clip
        self.compiled, self.compile_mode = resolve_compile(config.train, device)
        loss_model = distributed.data_parallel(NextTokenLoss(training.model), dist_info, device)
        self.loss_model = loss_model
        if self.compiled:
            use_compile_cache(config.train.compile_cache)
            self.loss_model = compile_for_training(loss_model, self.compile_mode)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else contextlib.nullcontext())
        self._first_nonfinite = torch.zeros((), dtype=torch.long, device=device)  # 0: none so far

    def __call__(self, windows: list[torch.Tensor], step: int) -> StepOutput:
        """Train on ``windows`` (``grad_accum`` micro-batches on the device, as :func:`split_batch` reads them)
        as step ``step``."""
        if len(windows) != self.grad_accum:
            raise ValueError(f"train.grad_accum: the step takes {self.grad_accum} micro-batches, got {len(windows)}")
        model, optimizer, scheduler = self.training.model, self.training.optimizer, self.training.scheduler
        # A fresh buffer: under CUDA graphs each loss lives in the graph's output, which the next replay overwrites.
        loss_sum = torch.zeros((), device=self._first_nonfinite.device)
        for micro, window in enumerate(windows):
            sync = micro == self.grad_accum - 1 or not self.dist_info.enabled
            with (contextlib.nullcontext() if sync else self.loss_model.no_sync()), self.autocast:
                loss = self.loss_model(*split_batch(window))
            (loss / self.grad_accum).backward()
            loss_sum += loss.detach()
        loss = distributed.all_reduce_mean(loss_sum / self.grad_accum, self.dist_info)
        nonfinite = (self._first_nonfinite == 0) & ~torch.isfinite(loss)
        self._first_nonfinite = torch.where(nonfinite, step, self._first_nonfinite)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip if self.clip > 0 else math.inf)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return StepOutput(loss, grad_norm, lr)

    def first_nonfinite_step(self) -> int | None:
        """The first step whose loss was NaN or infinite, or None. Waits for the device: call it at logging steps."""
        return int(self._first_nonfinite) or None
