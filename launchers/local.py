"""Run sweep points on this machine through submitit: one GPU per job, the rest queued.

On a machine with GPUs, ``N`` GPUs give ``N`` concurrent jobs, each seeing exactly
one device through ``CUDA_VISIBLE_DEVICES``; on a CPU-only machine ``max_parallel``
jobs run at once. Local means local: we ask submitit for its local executor by
name, so the presence of ``srun`` never sends a job to SLURM.

The jobs live as long as the sweep: when it is interrupted (Ctrl-C, or SIGTERM) it
cancels them, and every run they had open ends KILLED, resumable from its last
checkpoint by running the same command again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import submitit

from launchers.job import TrainJob, close_run
from launchers.sweep import SweepPoint, failure_reason, require_int

# How long the jobs of an interrupted sweep get to end their runs before we end them from here.
CANCEL_GRACE_SECONDS = 60.0


@dataclass
class Outcome:
    point: SweepPoint
    status: str  # finished | failed | skipped
    result: Any = None
    seconds: float = 0.0


def visible_gpus() -> list[int]:
    """GPU indices this process may hand out (respecting an existing CUDA_VISIBLE_DEVICES)."""
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        return [int(g) for g in declared.split(",") if g.strip().isdigit()]
    import torch

    return list(range(torch.cuda.device_count()))


@dataclass
class SweepProgress:
    """A one-line status: queued, running, finished, failed, with an ETA from finished jobs' durations."""

    slots: int
    counts: dict[str, int] = field(default_factory=lambda: {"queued": 0, "running": 0, "finished": 0,
                                                             "failed": 0, "skipped": 0})
    durations: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    last_line: str = ""

    def show(self, force: bool = False) -> None:
        c = self.counts
        eta = "?"
        if self.durations:
            mean = sum(self.durations) / len(self.durations)
            waves = (c["queued"] + c["running"]) / max(1, self.slots)
            eta = f"{max(0.0, waves * mean) / 60:.1f} min"
        line = (f"[sweep] {c['queued']} queued | {c['running']} running | {c['finished']} finished | "
                f"{c['failed']} failed | {c['skipped']} skipped (already done) | ETA {eta}")
        if force or line != self.last_line:
            print(line, file=sys.stderr, flush=True)
            self.last_line = line


def check_settings(max_parallel: int, timeout_min: int) -> None:
    """The local launcher's settings, each error naming its setting."""
    require_int("hydra.launcher.max_parallel", max_parallel, 1)
    require_int("hydra.launcher.timeout_min", timeout_min, 1)


def run_points(points: Sequence[SweepPoint], parent_run_id: str | None, folder: Path, max_parallel: int,
               timeout_min: int, skip: frozenset[str] = frozenset(), poll_seconds: float = 1.0) -> list[Outcome]:
    """Run ``points`` (those whose config hash is in ``skip`` finished earlier and are not run again)."""
    check_settings(max_parallel, timeout_min)
    gpus = visible_gpus()
    slots = len(gpus) if gpus else max(1, max_parallel)
    threads = None if gpus else max(1, (os.cpu_count() or 1) // slots)
    executor = submitit.LocalExecutor(folder=folder)
    outcomes: list[Outcome] = []
    queue = deque()
    progress = SweepProgress(slots=slots)
    for point in points:
        if point.config_hash in skip:
            outcomes.append(Outcome(point, "skipped"))
            progress.counts["skipped"] += 1
        else:
            queue.append(point)
    progress.counts["queued"] = len(queue)
    free = list(gpus)
    running: dict[Any, tuple[SweepPoint, int | None, float]] = {}
    progress.show(force=True)
    with _cancelled_on_interrupt(running, parent_run_id):
        while queue or running:
            while queue and len(running) < slots:
                point = queue.popleft()
                gpu = free.pop(0) if gpus else None
                executor.update_parameters(timeout_min=timeout_min, gpus_per_node=0 if gpu is None else 1,
                                           visible_gpus=() if gpu is None else (gpu,))
                job = executor.submit(TrainJob(point.config, parent_run_id, threads))
                running[job] = (point, gpu, time.monotonic())
                progress.counts["queued"] -= 1
                progress.counts["running"] += 1
            for job in [job for job in running if job.done()]:
                point, gpu, start = running.pop(job)
                seconds = time.monotonic() - start
                if gpu is not None:
                    free.append(gpu)
                outcomes.append(collect(job, point, seconds))
                progress.counts["running"] -= 1
                progress.counts[outcomes[-1].status] += 1
                if outcomes[-1].status == "finished":
                    progress.durations.append(seconds)
            progress.show()
            if running:
                time.sleep(poll_seconds)
    return sorted(outcomes, key=lambda outcome: outcome.point.index)


def collect(job: submitit.Job, point: SweepPoint, seconds: float) -> Outcome:
    """The outcome of a job that is done (a failed run is reported; the sweep goes on)."""
    try:
        return Outcome(point, "finished", job.result(), seconds)
    except Exception as error:  # noqa: BLE001
        print(f"[sweep] {point.name} failed: {failure_reason(error)} (log: {job.paths.stderr})", file=sys.stderr)
        return Outcome(point, "failed", error, seconds)


def cancel(running: dict, parent_run_id: str | None) -> None:
    """Stop the jobs of an interrupted sweep and end their runs KILLED.

    submitit's cancel sends SIGINT, on which the trainer ends its run itself; one that has not
    within the grace time (or was killed before it could) is ended from here.
    """
    for job in running:
        job.cancel(check=False)
    deadline = time.monotonic() + CANCEL_GRACE_SECONDS
    while not all(job.done() for job in running) and time.monotonic() < deadline:
        time.sleep(0.2)
    for point, _, _ in running.values():
        close_run(point, parent_run_id, "KILLED", "the sweep was interrupted; run its command again to resume")
    print(f"[sweep] interrupted: cancelled {len(running)} running job(s); their runs are KILLED and resume "
          "from their last checkpoint when the same command runs again", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _cancelled_on_interrupt(running: dict, parent_run_id: str | None):
    """On Ctrl-C, or SIGTERM (``kill``, a job scheduler), which interrupts the sweep the same way,
    cancel the ``running`` jobs rather than leave them training with nobody waiting for them."""
    previous = None
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
        def interrupt(signum: int, frame) -> None:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        try:
            yield
        finally:  # the handler goes before the cancelling: a second SIGTERM then ends the sweep at once
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    except KeyboardInterrupt:
        cancel(running, parent_run_id)
        raise
