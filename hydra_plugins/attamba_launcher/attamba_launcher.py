"""The Hydra launcher behind ``hydra/launcher=submitit_local`` (and ``submitit_slurm``).

One ``attamba-train -m …`` becomes: compose and validate every point, print the
plan (and stop there with ``+plan=true``), open one MLflow parent run for the
sweep, skip points that already finished, and run the rest through submitit.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class AttambaLauncher(Launcher):
    def __init__(self, cluster: str = "local", max_parallel: int = 1, timeout_min: int = 4320,
                 slurm: Any = None) -> None:
        if cluster not in ("local", "slurm"):
            raise ValueError(f"hydra.launcher.cluster: got {cluster!r}, allowed values are local, slurm")
        self.cluster = cluster
        self.max_parallel = max_parallel
        self.timeout_min = timeout_min
        self.slurm = OmegaConf.to_container(slurm, resolve=True) if isinstance(slurm, DictConfig) else (slurm or {})
        self.config: DictConfig | None = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config

    def _compose(self, overrides: list[str]):
        from attamba.train import resolve

        return resolve(self.hydra_context.config_loader.load_sweep_config(self.config, overrides))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from attamba.train import EXIT_REFUSED

        try:
            return self._launch(job_overrides)
        except ValueError as error:  # a bad sweep: its message names the settings; no traceback
            print(f"attamba-train: error: {error}", file=sys.stderr)
            raise SystemExit(EXIT_REFUSED) from None

    def _launch(self, job_overrides: Sequence[Sequence[str]]) -> Sequence[JobReturn]:
        from attamba.tracking import RunTracker, ensure_store, finished_config_hashes, git_commit, start_parent_run
        from attamba.train import EXIT_FAILED, EXIT_SIGINT
        from launchers.job import log_from_checkpoints
        from launchers.local import Outcome
        from launchers.sweep import (FINISHED, LOG_FROM_CHECKPOINT, SweepPoint, named_apart, plan_table,
                                     prepare_points, status, sweep_key, unique, with_tracking)

        points = prepare_points(job_overrides, self._compose)
        distinct, merged = unique(points)
        distinct = named_apart(distinct)
        same_as: dict[int, tuple[SweepPoint, list[str]]] = {}
        for duplicate, kept in merged:
            same_as.setdefault(kept.index, (kept, []))[1].append(str(duplicate.index))
        for kept, duplicates in same_as.values():
            print(f"[sweep] point{'s' if len(duplicates) > 1 else ''} {', '.join(duplicates)} "
                  f"{'are' if len(duplicates) > 1 else 'is'} the same run as point {kept.index} "
                  f"({' '.join(kept.overrides)}): it runs once")
        tracking = distinct[0].config.tracking
        tracked = finished_config_hashes(tracking.uri, tracking.experiment)
        statuses = {point.index: status(point, tracked) for point in distinct}
        print(plan_table(distinct, tracked))
        if self.config.get("plan"):
            print("[sweep] plan only (+plan=true): nothing submitted")
            return [JobReturn(overrides=list(p.overrides), status=JobStatus.COMPLETED, _return_value=None)
                    for p in points]

        command = list(self.config.hydra.overrides.task)
        experiment = self.config.hydra.runtime.choices.get("experiment") or "sweep"
        key = sweep_key(command)
        sweep_name = f"{experiment}-{key}"
        # settings (and a cluster) that cannot run the sweep fail it before any run is opened
        if self.cluster == "slurm":
            from launchers.slurm import preflight
            preflight(self.slurm, self.timeout_min)
        else:
            from launchers.local import check_settings
            check_settings(self.max_parallel, self.timeout_min)
        ensure_store(tracking.uri)
        parent = start_parent_run(tracking.uri, tracking.experiment, sweep_name, tags={
            "attamba.sweep_key": key, "attamba.sweep_overrides": " ".join(command),
            "attamba.planned_runs": len(distinct), "mlflow.source.git.commit": git_commit() or "unknown"})
        distinct = [dataclasses.replace(p, config=with_tracking(p.config, sweep=sweep_name)) for p in distinct]
        unlogged = [p for p in distinct if statuses[p.index] == LOG_FROM_CHECKPOINT]
        logged, errors = log_from_checkpoints(unlogged, parent)
        not_logged = {p.config_hash: Outcome(p, "failed", errors[p.config_hash]) for p in unlogged
                      if p.config_hash in errors}
        skip = frozenset(p.config_hash for p in distinct if statuses[p.index] == FINISHED) | logged
        folder = Path(self.config.hydra.sweep.dir) / ".submitit"
        try:
            outcomes = self._run([p for p in distinct if p.config_hash not in not_logged], parent, folder, skip)
        except KeyboardInterrupt:
            reason = ("interrupted: its jobs were cancelled; the same command resumes them" if self.cluster == "local"
                      else "interrupted: the launcher stopped waiting; its SLURM jobs go on (scancel stops them)")
            with RunTracker(tracking.uri, tracking.experiment, run_id=parent) as parent_run:
                parent_run.finish("KILLED", reason=reason)
            print(f"[sweep] {sweep_name} {reason}", file=sys.stderr)
            raise SystemExit(EXIT_SIGINT) from None

        outcomes = sorted([*outcomes, *not_logged.values()], key=lambda outcome: outcome.point.index)
        failed = [o for o in outcomes if o.status in ("failed", "cancelled")]
        with RunTracker(tracking.uri, tracking.experiment, run_id=parent) as parent_run:
            parent_run.finish("FAILED" if failed else "FINISHED",
                              reason=f"{len(failed)} of {len(distinct)} runs failed" if failed else None)
        print(f"[sweep] {sweep_name}: {len(outcomes) - len(failed)} of {len(outcomes)} runs done; "
              f"MLflow experiment {tracking.experiment!r} at {tracking.uri} (parent run {parent})")
        if failed:  # each failure was reported in one line as it came; Hydra would add their tracebacks
            raise SystemExit(EXIT_FAILED)
        by_hash = {o.point.config_hash: o for o in outcomes}
        return [JobReturn(overrides=list(point.overrides), status=JobStatus.COMPLETED,
                          _return_value=by_hash[point.config_hash].result) for point in points]

    def _run(self, points, parent_run_id: str, folder: Path, skip: frozenset[str]):
        if self.cluster == "slurm":
            from launchers.slurm import run_points
            return run_points(points, parent_run_id, folder, self.slurm, self.timeout_min, skip=skip)
        from launchers.local import run_points
        return run_points(points, parent_run_id, folder, self.max_parallel, self.timeout_min, skip=skip)

