"""The training loop: one typed :class:`Config` in, one tracked, resumable run out.

Everything about MLflow goes through :mod:`attamba.tracking`; checkpoints through
:mod:`attamba.checkpoint`; data through :mod:`attamba.data`. A run restarted with
the same ``train.output_dir`` resumes from its latest checkpoint into the same
MLflow run.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from attamba import accounting, checkpoint, distributed, hardware
from attamba.compilation import resolve_compile
from attamba.config import Config, flat_params, to_dict
from attamba.locking import LockBusy, exclusive_lock
from attamba.progress import Progress
from attamba.step import StepOutput, TrainStep, build_training

StopCheck = Callable[[], bool]
Clock = Callable[[], float]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run is marked FAILED with this reason."""


class RunFailed(ValueError):
    """A setting found wrong only once its run was training (a corrupt shard reached late, say):
    unlike a refused configuration, the run exists and is marked FAILED with this reason."""


def output_setting(config: Config) -> str:
    """The setting a user changes to move ``train.output_dir``: itself, or the root it defaults under."""
    output, root = Path(config.train.output_dir).absolute(), Path(config.train.checkpoint_root).absolute()
    return "train.checkpoint_root" if output.parent == root else "train.output_dir"


def preflight(config: Config) -> None:
    """Every check that can fail without training, each naming its setting; changes nothing tracked."""
    from attamba.tracking import check_tracking_uri

    output = Path(config.train.output_dir)
    probe = output
    while not probe.exists():
        probe = probe.parent
    try:  # by creating a file: permission bits do not tell (root passes them; /proc and read-only mounts refuse)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        raise ValueError(f"{output_setting(config)}: {output} is not writable (checked {probe}: "
                         f"{error.strerror or error})") from None
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


def train(config: Config, stop_requested: StopCheck | None = None, parent_run_id: str | None = None,
          clock: Clock = time.perf_counter) -> dict:
    """Train (or resume) the run described by ``config``; returns its final metrics.

    ``clock`` times the run (seconds, monotonic): tokens/s and the time to the first step. One
    process at a time trains an output directory: a second one started on it (the same command
    twice) raises a ``ValueError`` saying so, and changes nothing.
    """
    preflight(config)
    if not distributed.detect().is_main:  # rank 0 holds the lock for every rank
        return _train(config, stop_requested, parent_run_id, clock)
    output = Path(config.train.output_dir)
    try:
        with exclusive_lock(output / ".lock", wait=False):
            return _train(config, stop_requested, parent_run_id, clock)
    except LockBusy as busy:
        raise ValueError(f"{output_setting(config)}: {output} is being trained by another process "
                         f"({busy.holder and 'pid ' + busy.holder or 'still running'}); this run is in "
                         "progress there: run the command again once it has ended") from None


def open_run(config: Config, flat: dict, run_id: str | None, parent_run_id: str | None, tokenizer,
             world_size: int, replay_through_step: int):
    """The run's tracker, created or resumed, with its params and artifacts logged
    (on a resumed run only those it lacks are added), and the metric values an earlier attempt kept
    on disk (``replay_through_step``) sent."""
    import yaml

    from attamba.tracking import SPILL_FILE, RunTracker

    output = Path(config.train.output_dir)
    tracker = RunTracker(config.tracking.uri, config.tracking.experiment, run_name=run_name(config),
                         run_id=run_id, parent_run_id=parent_run_id, tags=training_tags(flat, world_size),
                         spill_path=output / SPILL_FILE, replay_through_step=replay_through_step,
                         unavailable_timeout_s=config.tracking.unavailable_timeout_s)
    checkpoint.record_run_id(output, tracker.run_id)
    tracker.log_params(flat)
    config_file = output / "config.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    tracker.log_artifact(config_file)
    tracker.log_artifact(tokenizer.save(output / "tokenizer"), artifact_path="tokenizer")
    return tracker


def training_tags(flat: dict, world_size: int) -> dict[str, str]:
    """A training run's tags: :func:`attamba.tracking.run_tags`, the GPU a local sweep gave it, its ranks."""
    from attamba.tracking import run_tags

    tags = run_tags(flat)
    if "CUDA_VISIBLE_DEVICES" in os.environ:  # which GPU a local sweep gave this run
        tags["attamba.cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    if world_size > 1:
        tags["attamba.world_size"] = str(world_size)
    return tags


def model_metrics(config: Config, model: torch.nn.Module) -> dict[str, float]:
    """The run-level metrics of its model, logged at step 0."""
    seq_len = config.train.seq_len
    return {
        "model/params": float(sum(p.numel() for p in model.parameters())),
        "model/kv_bytes_per_token": accounting.kv_bytes_per_token(config.model, config.chunking, seq_len),
        "model/attn_flops_per_token": accounting.attention_flops_per_token(config.model, config.chunking, seq_len),
    }


def finish_run(tracker, final: dict[str, float]) -> None:
    """Store the final metrics as an artifact and mark the run FINISHED."""
    tracker.log_dict(final, "final_metrics.json")
    tracker.finish("FINISHED")


def settle_finished_run(config: Config, flat: dict, path: Path, state: dict, parent_run_id: str | None, tokenizer,
                        world_size: int, say: Callable[[str], None]) -> None:
    """Bring the store in line with the final checkpoint ``path`` (``state``): finish its run if the
    process ended before its store did, log it from the checkpoint if this store or experiment lacks
    it, else say there is nothing to do."""
    from attamba.record import is_tracked, log_from_checkpoint
    from attamba.tracking import run_status

    step, run_id = state["step"], state["mlflow_run_id"]
    done = (f"already trained: {config.train.output_dir} holds the final checkpoint "
            f"(step {step} of {config.train.steps})")
    status = run_status(config.tracking.uri, run_id, config.tracking.experiment)
    if status not in ("FINISHED", None):
        tracker = open_run(config, flat, run_id, parent_run_id, tokenizer, world_size, step)
        tracker.log_metrics(state["final"], step=step)  # those the store lacks
        finish_run(tracker, state["final"])
        say(f"finished MLflow run {run_id}, left {status} by a process that ended after its final "
            "checkpoint, with the results that checkpoint holds")
    elif is_tracked(config, run_id):
        print(f"{done} of MLflow run {run_id}; nothing to do", flush=True)
    else:  # trained into another store or experiment: logged into this one, not trained again
        logged = log_from_checkpoint(config, path, parent_run_id, state)
        print(f"{done}; {config.tracking.uri} (experiment {config.tracking.experiment!r}) did not hold "
              f"the run, so it was logged there from the checkpoint as MLflow run {logged}", flush=True)


def _train(config: Config, stop_requested: StopCheck | None, parent_run_id: str | None, clock: Clock) -> dict:
    from attamba.data import build_batches, build_tokenizer, validation_documents
    from attamba.data.mqar import heldout_set
    from attamba.data.prefetch import Prefetcher
    from attamba.evals import suite
    from attamba.evals.passkey import check_lengths
    from attamba.record import MetricRecord
    from attamba.tracking import TrackingUnavailable, run_status

    started = clock()
    dist_info = distributed.detect()
    device = hardware.resolve_device(config.train.device, dist_info.local_rank)
    distributed.init(dist_info, device)
    output = Path(config.train.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(config.data)
    if config.eval.passkey:  # it runs after training: refuse lengths it cannot use now
        check_lengths(config.passkey_lengths, config.eval.passkey_depths, config.eval.passkey_trials, tokenizer,
                      config.model.max_length)
    compiled, compile_mode = resolve_compile(config.train, device)
    config = replace(config, model=replace(config.model, vocab_size=tokenizer.vocab_size),
                     train=replace(config.train, compile=str(compiled).lower(), compile_mode=compile_mode))
    flat = flat_params(config)
    training = build_training(config, device)
    model = training.model
    micro_batch = config.train.batch_size // config.train.grad_accum // dist_info.world_size
    if micro_batch < 1:
        raise ValueError(f"train.batch_size: {config.train.batch_size} is too small for grad_accum="
                         f"{config.train.grad_accum} × {dist_info.world_size} ranks")
    batches = build_batches(config.data, tokenizer, micro_batch, config.train.seq_len,
                            rank=dist_info.rank, world_size=dist_info.world_size, seed=config.train.seed)

    step, run_id = 0, None
    record = MetricRecord()  # what the checkpoints keep of the tracking (attamba.record)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if dist_info.is_main else (lambda text: None)
    resumed = checkpoint.load_latest(output, map_location=device, say=say)
    if resumed is None:  # stopped before its first checkpoint: the same MLflow run starts over
        run_id = checkpoint.recorded_run_id(output)
        if run_id is not None and dist_info.is_main and run_status(config.tracking.uri, run_id) is None:
            run_id = None  # recorded in another store: this one gets its own run
    else:
        state = resumed[1]
        model.load_state_dict(state["model"])
        training.optimizer.load_state_dict(state["optimizer"])
        training.scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["data"][dist_info.rank])
        checkpoint.set_rng_state(state["rng"])
        step, run_id = state["step"], state["mlflow_run_id"]
        record = MetricRecord(state.get("metrics", ()))
        if step >= config.train.steps:  # finished earlier: nothing to train
            if dist_info.is_main:
                settle_finished_run(config, flat, resumed[0], state, parent_run_id, tokenizer, dist_info.world_size,
                                    say)
            distributed.shutdown()
            return state["final"]
    feed = Prefetcher(batches, pin=device.type == "cuda")
    train_step = TrainStep(training, config, device, dist_info)

    tracker = None

    def log_metrics(metrics: dict[str, float], step: int) -> None:  # rank 0: to the store and the record
        record.add(metrics, step)
        tracker.log_metrics(metrics, step=step)

    if dist_info.is_main:
        tracker = open_run(config, flat, run_id, parent_run_id, tokenizer, dist_info.world_size, step)
        run_id = tracker.run_id
        log_metrics(model_metrics(config, model), step=0)

    progress = Progress(config.train.steps, dist_info.is_main)
    tokens_per_step = config.train.batch_size * config.train.seq_len
    flops_per_step = accounting.flops_per_token(config.model, config.chunking, config.train.seq_len,
                                                training=True) * tokens_per_step
    device_peak = hardware.peak_flops(device)
    mqar = config.data.source == "mqar"  # scored on recall of its held-out set, not on text
    val_docs = [] if mqar or not dist_info.is_main else validation_documents(config.data, limit=config.eval.val_batches)
    mqar_heldout = heldout_set(config.data, config.train.seq_len) if dist_info.is_main and mqar else None
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    final: dict[str, float] = {}

    def evaluate(at_step: int, wikitext: bool) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if dist_info.is_main:
            if mqar:
                metrics.update(suite.mqar(model, config, device, amp_dtype, examples=mqar_heldout))
            else:
                metrics.update(suite.validation(model, tokenizer, config, device, amp_dtype, documents=val_docs))
            if wikitext and config.eval.wikitext2_path:
                metrics.update(suite.wikitext2(model, tokenizer, config, device, amp_dtype))
            log_metrics(metrics, step=at_step)
            progress.message(f"eval @ {at_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        distributed.barrier(dist_info)
        return metrics

    def evaluate_passkey(at_step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if dist_info.is_main:
            metrics, tables = suite.passkey(model, tokenizer, config, device, amp_dtype, output)
            log_metrics(metrics, step=at_step)
            for path in tables:
                tracker.log_artifact(path)
            progress.message(f"passkey @ {at_step}: accuracy {metrics['eval/passkey/accuracy']:.4f} "
                             f"({tables[-1]} has the table)")
        distributed.barrier(dist_info)
        return metrics

    def save_checkpoint(at_step: int) -> None:
        data_states = distributed.gather_objects(feed.state_dict(), dist_info)  # each rank's own position
        if dist_info.is_main:
            # The store holds every step up to a checkpoint before it exists, if it takes writes (never waits).
            tracker.flush()
            try:
                checkpoint.save(output, at_step, {
                    "model": model.state_dict(), "optimizer": training.optimizer.state_dict(),
                    "scheduler": training.scheduler.state_dict(), "data": data_states,
                    "rng": checkpoint.rng_state(), "step": at_step, "mlflow_run_id": run_id,
                    "config": to_dict(config), "final": final, "metrics": record.state(),
                    "tags": training_tags(flat, dist_info.world_size)},
                    tokenizer=tokenizer)
            except checkpoint.NoSpaceLeft as full:
                raise checkpoint.NoSpaceLeft(full.path, at_step, setting=output_setting(config)) from None
        distributed.barrier(dist_info)

    def log_interval(out: StepOutput, elapsed: float, steps: int) -> None:
        """Read the step's results off the device (the only wait in a steady state) and log them."""
        metrics = {"train/loss": out.loss.item(), "train/lr": out.lr, "train/grad_norm": out.grad_norm.item(),
                   "mem/peak_gib": hardware.peak_memory_gib(device)}
        diverged_at = train_step.first_nonfinite_step()
        if diverged_at is not None:
            raise TrainingDiverged(f"non-finite training loss at step {diverged_at} (seen at the logging step {step})")
        if steps:
            metrics["speed/tokens_per_s"] = steps * tokens_per_step / elapsed
            if device_peak:
                metrics["speed/mfu"] = flops_per_step * steps / elapsed / (device_peak * dist_info.world_size)
        final.update(metrics)
        if tracker:
            log_metrics(metrics, step=step)
        progress.update(step, metrics["train/loss"], metrics.get("speed/tokens_per_s", 0.0), elapsed / max(steps, 1))

    try:
        model.train()
        first_step = step + 1
        interval = Interval(clock, device)
        while step < config.train.steps:
            if stop_requested is not None and stop_requested():
                save_checkpoint(step)
                if tracker:
                    tracker.finish("KILLED", reason=f"stopped at step {step} (SIGTERM or preemption); "
                                                    "resumes from its checkpoint")
                return {"preempted_at_step": float(step)}
            if tracker and (lost := tracker.store_lost()):
                # A checkpoint needs every rank: with several, a rerun resumes from the last one.
                if not dist_info.enabled and checkpoint.latest_step(output) != step:
                    save_checkpoint(step)
                raise lost
            windows = [next(feed).to(device, non_blocking=True) for _ in range(config.train.grad_accum)]
            out = train_step(windows, step + 1)
            step += 1
            interval.steps += 1
            if step == first_step:  # compilation and warm-up: timed on their own, not as throughput
                hardware.synchronize(device)
                if tracker:
                    log_metrics({"speed/first_step_s": clock() - started}, step=step)
                interval.restart()
            if step % config.train.log_every == 0 or step == config.train.steps:
                log_interval(out, *interval.read())
                interval.restart()
            evaluating = step % config.train.eval_every == 0 and step < config.train.steps
            saving = step % config.train.checkpoint_every == 0 and step < config.train.steps
            if evaluating or saving:
                with interval.paused():  # evaluation and checkpoints are not training throughput
                    if evaluating:
                        every = config.eval.wikitext2_every
                        final.update(evaluate(step, wikitext=bool(every) and step % every == 0))
                        model.train()
                    if saving:
                        save_checkpoint(step)

        final.update(evaluate(step, wikitext=True))
        if config.eval.passkey:
            final.update(evaluate_passkey(step))
        save_checkpoint(step)
        if tracker:
            finish_run(tracker, final)
        progress.message(f"done: {step} steps; checkpoints and config in {output}")
        return final
    except BaseException as error:
        if tracker and not isinstance(error, TrackingUnavailable):  # that store takes no status
            reason = f"{type(error).__name__}: {error}"
            try:
                tracker.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED", reason=reason)
            except Exception as store_error:  # noqa: BLE001 - the run's own error is the one to raise
                say(f"could not end MLflow run {run_id} in {config.tracking.uri} ({type(store_error).__name__}: "
                    f"{store_error}); the same command brings it in line")
        if tracker and isinstance(error, ValueError) and not isinstance(error, RunFailed):
            raise RunFailed(str(error)) from error
        raise
    finally:
        feed.close()
        train_step = None  # the DDP wrapper goes before its process group (see distributed.shutdown)
        distributed.shutdown()


class Interval:
    """Training time since the last logging step: ``clock`` time, less what :meth:`paused` spans.

    The device is synchronised where an interval's time is read or a pause starts, so that queued
    steps are counted as training and their work never hides in a pause.
    """

    def __init__(self, clock: Clock, device: torch.device):
        self.clock, self.device = clock, device
        self.restart()

    def restart(self) -> None:
        self.start, self.excluded, self.steps = self.clock(), 0.0, 0

    def read(self) -> tuple[float, int]:
        """Seconds of training and steps in the interval so far."""
        hardware.synchronize(self.device)
        return self.clock() - self.start - self.excluded, self.steps

    @contextlib.contextmanager
    def paused(self):
        hardware.synchronize(self.device)
        began = self.clock()
        try:
            yield
        finally:
            self.excluded += self.clock() - began
