"""The callable that submitit pickles and runs: one training run of a sweep point; and the closing of
a run that its job could not end itself.

Preemption follows submitit's checkpoint-and-requeue protocol, with one change that
a training loop needs. SLURM sends the preemption signal (``USR2``: ``signal_delay_s``
before the time limit, or ``scancel --signal=USR2``). submitit's own handler would
checkpoint and exit at once, in the middle of a step; instead we only raise a flag.
The trainer sees it before its next step, saves a checkpoint and marks its MLflow
run KILLED; then we hand over to submitit's handler, which calls
:meth:`TrainJob.checkpoint`, runs ``scontrol requeue`` and exits without a result.
The requeued job runs this same callable again, and the trainer resumes from its
checkpoint into the same MLflow run. Once a run has finished, the signal is ignored:
the job is done and must end COMPLETED, even if its time runs out while it exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import submitit
from submitit.helpers import Checkpointable

from attamba.config import Config
from launchers.sweep import SweepPoint


def preemption_signal() -> signal.Signals:
    """The signal submitit asks SLURM to send before the time limit (``SUBMITIT_PREEMPT_SIGNAL``, USR2)."""
    return signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]


def any_rank(flag: bool) -> bool:
    """``flag`` OR-ed over the ranks of the process group (just ``flag`` without one).

    SLURM signals every task, but each may notice it one step apart; stopping before
    different steps would leave the ranks waiting in different collectives.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    on_gpu = dist.get_backend() == "nccl"
    vote = torch.tensor([float(flag)], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())


@dataclass
class TrainJob(Checkpointable):
    """Train (or resume) one run; requeued through submitit when preempted.

    ``checkpoint`` (inherited) resubmits this same job: the training state lives in
    the run's checkpoint directory, not in the pickled callable.
    """

    config: Config
    parent_run_id: str | None = None
    threads: int | None = None  # CPU threads for torch, so parallel CPU jobs don't oversubscribe

    def __call__(self) -> dict:
        import torch

        from attamba.trainer import train

        if self.threads:
            torch.set_num_threads(self.threads)
        os.environ.pop("MLFLOW_RUN_ID", None)  # a stray one would override the parent (FACTS.md)
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            return train(self.config, parent_run_id=self.parent_run_id)
        preempted = threading.Event()
        signum = preemption_signal()
        submitit_handler = signal.signal(signum, lambda *_: preempted.set())
        try:
            result = train(self.config, stop_requested=lambda: any_rank(preempted.is_set()),
                           parent_run_id=self.parent_run_id)
        except BaseException:
            signal.signal(signum, submitit_handler)
            raise
        if "preempted_at_step" in result:
            signal.signal(signum, submitit_handler)
            if callable(submitit_handler):
                # Rank 0: submitit calls self.checkpoint(), requeues and exits (or raises once out of requeues).
                submitit_handler(signum, None)
            # Other ranks: leave no result file; the requeued job runs every rank again.
            raise SystemExit(f"preempted at step {int(result['preempted_at_step'])}; the job was requeued")
        # The run is over, so a signal from here on has nothing to save. A time limit's signal
        # can still come while submitit writes the result, or while Python shuts down and puts
        # back the default action (terminate), which would requeue the job or end it FAILED
        # with its run finished. An ignored signal stays ignored through shutdown.
        signal.signal(signum, signal.SIG_IGN)
        return result


def close_run(point: SweepPoint, parent_run_id: str | None, status: str, reason: str) -> None:
    """End the MLflow run of ``point`` that its job left open (it was killed before it could)."""
    from attamba.tracking import RunTracker, find_runs

    tracking = point.config.tracking
    runs = find_runs(tracking.uri, tracking.experiment,
                     f"tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id else "")
    for run in runs:
        mine = run["params"].get("train.output_dir") == str(point.config.train.output_dir)
        if mine and run["status"] in ("RUNNING", "KILLED"):
            RunTracker(tracking.uri, tracking.experiment, run_id=run["run_id"]).finish(status, reason=reason)


def log_from_checkpoints(points: Sequence[SweepPoint],
                         parent_run_id: str) -> tuple[frozenset[str], dict[str, Exception]]:
    """Log each of ``points`` (trained to the end by an earlier command, no FINISHED run in the sweep's
    store) from its final checkpoint as a child of ``parent_run_id``; return the config hashes logged
    and, by config hash, the error of each point that could not be (reported; the sweep goes on).

    A point whose checkpoint's own run is in the store, unfinished, is neither: its job runs, and
    the trainer settles that run from the checkpoint rather than a second run being logged here.
    """
    from attamba import checkpoint
    from attamba.record import is_tracked, log_from_checkpoint

    logged, errors = set(), {}
    for point in points:
        try:
            path = checkpoint.latest(Path(point.config.train.output_dir))
            state = checkpoint.load(path)
            if not is_tracked(point.config, state["mlflow_run_id"]):
                log_from_checkpoint(point.config, path, parent_run_id, state)
                logged.add(point.config_hash)
        except Exception as error:  # noqa: BLE001 - reported with its point, like a failed job
            print(f"[sweep] {point.name}: not logged from its final checkpoint: {error}", file=sys.stderr)
            errors[point.config_hash] = error
    if logged:
        print(f"[sweep] {len(logged)} run(s) trained to the end by an earlier command but absent from this "
              "store: logged from their final checkpoints, not trained again", file=sys.stderr, flush=True)
    return frozenset(logged), errors
