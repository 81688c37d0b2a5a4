"""The training loop: one typed :class:`Config` in, one tracked, resumable run out.

Everything about MLflow goes through :mod:`attamba.tracking`; checkpoints through
:mod:`attamba.checkpoint`; data through :mod:`attamba.data`. A run restarted with
the same ``train.output_dir`` resumes from its latest checkpoint into the same
MLflow run.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from attamba import accounting, checkpoint, distributed
from attamba.config import Config, flat_params, to_dict
from attamba.models import NextTokenLoss, build_model

StopCheck = Callable[[], bool]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run is marked FAILED with this reason."""


# Dense bf16 tensor-core peaks (FLOP/s) of the accelerators we meet; MFU is relative to these.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A6000": 154.8e12, "L40S": 362e12,
                  "A10": 125e12, "L4": 121e12, "V100": 125e12, "4090": 165e12}


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device: 'cuda' requested but no CUDA device is visible")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def compile_for_training(model: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """``torch.compile`` a model, or its DDP wrapper (wrap first, then compile), for training.

    A compiled DDP module is split at its gradient buckets so that each bucket's all-reduce
    overlaps the rest of the backward, also under CUDA graphs (``reduce-overhead``): there the
    split costs a graph launch per bucket, but the host has time to spare, and keeping the graph
    whole made the ~250 MB all-reduce follow the backward (two H200s, 1K context: 1.84x one
    GPU's tokens/s split, 1.78x whole).
    """
    return torch.compile(model, mode=None if mode == "default" else mode)


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s at the training precision (bf16 on GPU, fp32 on CPU); None if unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in name), None)
    return _cpu_peak_flops()


def _cpu_peak_flops() -> float:
    """Cores × clock × fp32 FLOPs per cycle (FMA: 2 × vector lanes × 2 units)."""
    flags, mhz = "", 2000.0
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("flags") and not flags:
                flags = line
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":")[1])
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    per_cycle = lanes * 2 * 2 if "fma" in flags else lanes * 2
    return (os.cpu_count() or 1) * mhz * 1e6 * per_cycle


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


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """One line per log interval: step, loss, tokens/s and ETA (a live line on a terminal)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.live = enabled and sys.stdout.isatty()

    def update(self, step: int, loss: float, tokens_per_s: float, seconds_per_step: float) -> None:
        if not self.enabled:
            return
        eta = _format_eta((self.total - step) * seconds_per_step)
        line = f"step {step:>6}/{self.total} | loss {loss:7.4f} | {tokens_per_s:,.0f} tok/s | ETA {eta}"
        print(("\r" + line) if self.live else line, end="" if self.live else "\n", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.live else "") + text, flush=True)


def preflight(config: Config) -> None:
    """Every check that can fail without training, each naming its setting; changes nothing tracked."""
    from attamba.tracking import check_tracking_uri

    output = Path(config.train.output_dir)
    probe = output
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ValueError(f"train.output_dir: {output} is not writable (checked {probe})")
    if config.eval.wikitext2_path is not None and not Path(config.eval.wikitext2_path).is_file():
        raise ValueError(f"eval.wikitext2_path: no such file {config.eval.wikitext2_path}")
    check_tracking_uri(config.tracking.uri)


def run_name(config: Config) -> str:
    model, chunking = config.model, config.chunking
    if config.tracking.run_name:
        return config.tracking.run_name
    if model.family == "attamba":
        return f"attamba-{chunking.strategy}-P{chunking.size}-lead{chunking.leading_tokens}"
    if model.family == "transformer":
        parts = ["transformer", f"w{model.width}"]
        if model.match:
            parts.append(f"iso-{model.match}")
        if model.window:
            parts.append(f"swa{model.window}")
        return "-".join(parts)
    return f"mamba2-h{model.ssm.hidden}"


def train(config: Config, stop_requested: StopCheck | None = None, parent_run_id: str | None = None) -> dict:
    """Train (or resume) the run described by ``config``; returns its final metrics."""
    from attamba.data import PackedBatches, build_tokenizer, validation_documents
    from attamba.evaluate import evaluate_validation, evaluate_wikitext2
    import yaml

    from attamba.record import MetricRecord, is_tracked, log_from_checkpoint
    from attamba.tracking import RunTracker, run_tags

    dist_info = distributed.detect()
    preflight(config)
    device = resolve_device(config.train.device, dist_info.local_rank)
    distributed.init(dist_info, device)
    output = Path(config.train.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(config.data)
    config = replace(config, model=replace(config.model, vocab_size=tokenizer.vocab_size))
    flat = flat_params(config)
    torch.manual_seed(config.train.seed)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(
        param_groups(model, config.optim.weight_decay), lr=config.train.lr,
        betas=(config.optim.beta1, config.optim.beta2), eps=config.optim.eps, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.train.warmup, config.train.steps, config.optim.lr_min_ratio))
    micro_batch = config.train.batch_size // config.train.grad_accum // dist_info.world_size
    if micro_batch < 1:
        raise ValueError(f"train.batch_size: {config.train.batch_size} is too small for grad_accum="
                         f"{config.train.grad_accum} × {dist_info.world_size} ranks")
    batches = PackedBatches(config.data, tokenizer, micro_batch, config.train.seq_len,
                            rank=dist_info.rank, world_size=dist_info.world_size, seed=config.train.seed)

    step, run_id = 0, None
    record = MetricRecord()  # what the checkpoints keep of the tracking (attamba.record)
    resume_from = checkpoint.latest(output)
    if resume_from is not None:
        state = checkpoint.load(resume_from, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["data"][dist_info.rank])
        checkpoint.set_rng_state(state["rng"])
        step, run_id = state["step"], state["mlflow_run_id"]
        record = MetricRecord(state.get("metrics", ()))
        if step >= config.train.steps:  # finished earlier: nothing to train
            if dist_info.is_main:
                done = f"already trained: {output} holds the final checkpoint (step {step} of {config.train.steps})"
                if is_tracked(config, run_id):
                    print(f"{done} of MLflow run {run_id}; nothing to do", flush=True)
                else:  # trained into another store or experiment: logged into this one, not trained again
                    logged = log_from_checkpoint(config, resume_from, parent_run_id, state)
                    print(f"{done}; {config.tracking.uri} (experiment {config.tracking.experiment!r}) did not hold "
                          f"the run, so it was logged there from the checkpoint as MLflow run {logged}", flush=True)
            distributed.shutdown()
            return state["final"]

    # compiled with the model: see NextTokenLoss
    train_model = distributed.data_parallel(NextTokenLoss(model), dist_info, device)
    if config.train.compile:
        train_model = compile_for_training(train_model, config.train.compile_mode)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    tracker = None

    def log_metrics(metrics: dict[str, float], step: int) -> None:  # rank 0: to the store and the record
        record.add(metrics, step)
        tracker.log_metrics(metrics, step=step)

    if dist_info.is_main:
        tags = run_tags(flat)
        if "CUDA_VISIBLE_DEVICES" in os.environ:  # which GPU a local sweep gave this run
            tags["attamba.cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
        if dist_info.enabled:
            tags["attamba.world_size"] = str(dist_info.world_size)
        tracker = RunTracker(config.tracking.uri, config.tracking.experiment, run_name=run_name(config),
                             run_id=run_id, parent_run_id=parent_run_id, tags=tags)
        run_id = tracker.run_id
        tracker.log_params(flat)
        seq_len = config.train.seq_len
        log_metrics({
            "model/params": float(sum(p.numel() for p in model.parameters())),
            "model/kv_bytes_per_token": accounting.kv_bytes_per_token(config.model, config.chunking, seq_len),
            "model/attn_flops_per_token": accounting.attention_flops_per_token(config.model, config.chunking, seq_len),
        }, step=0)
        config_file = output / "config.yaml"
        config_file.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        tracker.log_artifact(config_file)
        tracker.log_artifact(tokenizer.save(output / "tokenizer"), artifact_path="tokenizer")

    progress = Progress(config.train.steps, dist_info.is_main)
    tokens_per_step = config.train.batch_size * config.train.seq_len
    flops_per_step = accounting.flops_per_token(config.model, config.chunking, config.train.seq_len,
                                                training=True) * tokens_per_step
    device_peak = peak_flops(device)
    val_docs = validation_documents(config.data, limit=config.eval.val_batches) if dist_info.is_main else []
    eval_context = config.eval.context or config.train.seq_len
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    final: dict[str, float] = {}

    def evaluate(at_step: int, wikitext: bool) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if dist_info.is_main:
            val = evaluate_validation(model, tokenizer, val_docs, eval_context, device=device, autocast_dtype=amp_dtype)
            metrics.update({"eval/val/loss": val["loss"], "eval/val/word_perplexity": val["word_perplexity"]})
            if wikitext and config.eval.wikitext2_path:
                wt = evaluate_wikitext2(model, tokenizer, config.eval.wikitext2_path, eval_context,
                                        device=device, autocast_dtype=amp_dtype)
                metrics.update({f"eval/wikitext2/{key}": wt[key]
                                for key in ("word_perplexity", "byte_perplexity", "bits_per_byte")})
            log_metrics(metrics, step=at_step)
            progress.message(f"eval @ {at_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        distributed.barrier(dist_info)
        return metrics

    def save_checkpoint(at_step: int) -> None:
        data_states = distributed.gather_objects(batches.state_dict(), dist_info)  # each rank's own position
        if dist_info.is_main:
            checkpoint.save(output, at_step, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "data": data_states, "rng": checkpoint.rng_state(),
                "step": at_step, "mlflow_run_id": run_id, "config": to_dict(config), "final": final,
                "metrics": record.state(), "tags": tags},
                tokenizer=tokenizer)
        distributed.barrier(dist_info)

    try:
        model.train()
        interval_start, interval_steps = time.perf_counter(), 0
        while step < config.train.steps:
            if stop_requested is not None and stop_requested():
                save_checkpoint(step)
                if tracker:
                    tracker.finish("KILLED", reason=f"preempted at step {step}; resumes from its checkpoint")
                return {"preempted_at_step": float(step)}
            loss_sum = torch.zeros((), device=device)
            for micro in range(config.train.grad_accum):
                window = next(batches).to(device, non_blocking=True)
                inputs, targets = window[:, :-1], window[:, 1:]
                sync = micro == config.train.grad_accum - 1 or not dist_info.enabled
                with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast:
                    loss = train_model(inputs, targets)
                (loss / config.train.grad_accum).backward()
                loss_sum += loss.detach()
            loss_value = distributed.all_reduce_mean(loss_sum / config.train.grad_accum, dist_info)
            if not torch.isfinite(loss_value):
                raise TrainingDiverged(f"non-finite training loss ({loss_value.item()}) at step {step + 1}")
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), config.optim.clip if config.optim.clip > 0 else float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            interval_steps += 1

            if step % config.train.log_every == 0 or step == config.train.steps:
                elapsed = time.perf_counter() - interval_start
                tokens_per_s = interval_steps * tokens_per_step / elapsed
                metrics = {"train/loss": loss_value.item(), "train/lr": lr, "train/grad_norm": grad_norm.item(),
                           "speed/tokens_per_s": tokens_per_s,
                           "mem/peak_gib": peak_memory_gib(device)}
                if device_peak:
                    achieved = flops_per_step * interval_steps / elapsed
                    metrics["speed/mfu"] = achieved / (device_peak * dist_info.world_size)
                final.update(metrics)
                if tracker:
                    log_metrics(metrics, step=step)
                progress.update(step, metrics["train/loss"], tokens_per_s, elapsed / interval_steps)
                interval_start, interval_steps = time.perf_counter(), 0
            paused = time.perf_counter()  # evaluation and checkpoints are not training throughput
            if step % config.train.eval_every == 0 and step < config.train.steps:
                every = config.eval.wikitext2_every
                final.update(evaluate(step, wikitext=bool(every) and step % every == 0))
                model.train()
            if step % config.train.checkpoint_every == 0 and step < config.train.steps:
                save_checkpoint(step)
            interval_start += time.perf_counter() - paused

        final.update(evaluate(step, wikitext=True))
        save_checkpoint(step)
        if tracker:
            tracker.log_dict(final, "final_metrics.json")
            tracker.finish("FINISHED")
        progress.message(f"done: {step} steps; checkpoints and config in {output}")
        return final
    except BaseException as error:
        if tracker:
            reason = f"{type(error).__name__}: {error}"
            tracker.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED", reason=reason)
        raise
    finally:
        train_model = None  # the DDP wrapper goes before its process group (see distributed.shutdown)
        distributed.shutdown()
