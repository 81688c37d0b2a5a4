"""What a run's checkpoints keep of its tracking, and a finished run logged from its final checkpoint.

Checkpoints are keyed by config hash under ``train.checkpoint_root``, independent of
the tracking store, so a run can be finished on disk and absent from the store a
later command logs to (another ``tracking.uri`` or ``tracking.experiment``). The store
is the source of truth for what a researcher has, so such a run must end up there.
It is logged from its final checkpoint, not trained again: the checkpoint holds the
run's configuration, tokenizer, final metrics and every metric value it logged
(:class:`MetricRecord`), so the store gets exactly the numbers of the run whose
weights are on disk. Retraining would spend the run's compute again and, with GPU
kernels that are not bit-reproducible, put a different run beside those weights.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from attamba import checkpoint
from attamba.config import Config, flat_params, from_dict, to_dict

TAG_LOGGED_FROM = "attamba.logged_from_checkpoint"  # the checkpoint directory a run was logged from
TAG_ORIGINAL_RUN = "attamba.original_run"  # the run (id, store, experiment) that trained it
METRICS_PER_FLUSH = 1000


class MetricRecord:
    """Every metric value a run logged, once per (name, step): the last value logged wins.

    Kept in each checkpoint and restored on resume, so it holds each step exactly once
    whatever a crash did to the store's copy.
    """

    def __init__(self, values: Iterable[tuple[str, int, float]] = ()) -> None:
        self._values = {(name, step): value for name, step, value in values}

    def add(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self._values[(name, step)] = float(value)

    def state(self) -> list[tuple[str, int, float]]:
        """What a checkpoint stores: ``(name, step, value)``, by step then name."""
        return sorted(((name, step, value) for (name, step), value in self._values.items()),
                      key=lambda item: (item[1], item[0]))

    def by_step(self) -> Iterator[tuple[int, dict[str, float]]]:
        """``(step, {name: value})`` in step order, as a run logs them."""
        metrics: dict[int, dict[str, float]] = {}
        for name, step, value in self.state():
            metrics.setdefault(step, {})[name] = value
        yield from sorted(metrics.items())


def is_tracked(config: Config, run_id: str | None) -> bool:
    """Whether the store and experiment of ``config.tracking`` hold this run: a FINISHED run of its
    configuration, or ``run_id`` (the checkpoint's own run) in any state."""
    from attamba.tracking import config_hash, finished_config_hashes, run_status

    tracking = config.tracking
    if config_hash(flat_params(config)) in finished_config_hashes(tracking.uri, tracking.experiment):
        return True
    return run_id is not None and run_status(tracking.uri, run_id, tracking.experiment) is not None


def log_from_checkpoint(config: Config, path: Path, parent_run_id: str | None = None,
                        state: dict[str, Any] | None = None) -> str:
    """Log the run whose final checkpoint is ``path`` into ``config.tracking`` as one FINISHED run, with
    the params, tags, metric history and artifacts that training would have logged; return its id.

    Params are the trained configuration's with ``config``'s tracking settings (store, experiment,
    sweep, name): the config hash is the same, so sweeps and figures count it as that run.
    """
    from attamba.tracking import TAG_GIT_COMMIT, TAG_SWEEP, RunTracker, run_tags
    from attamba.trainer import run_name

    state = checkpoint.load(path) if state is None else state
    trained = from_dict(state["config"])
    logged = dataclasses.replace(trained, tracking=config.tracking)
    flat = flat_params(logged)
    original = trained.tracking
    # The tags training set (its commit, not this checkout's), for the sweep logging it now.
    stored_tags = state.get("tags") or {TAG_GIT_COMMIT: None}  # kept since MetricRecord; before, commit unknown
    tags = {**run_tags(flat), **stored_tags, TAG_SWEEP: flat.get("tracking.sweep"),
            TAG_LOGGED_FROM: str(Path(path).absolute()),
            TAG_ORIGINAL_RUN: f"{state['mlflow_run_id']} in {original.uri} (experiment {original.experiment!r})"}
    # Checkpoints from before MetricRecord hold the final values only.
    record = MetricRecord(state.get("metrics") or [(name, state["step"], value)
                                                   for name, value in state["final"].items()])
    with RunTracker(config.tracking.uri, config.tracking.experiment, run_name=run_name(logged),
                    parent_run_id=parent_run_id, tags=tags, flush_every=METRICS_PER_FLUSH) as tracker:
        tracker.log_params(flat)
        for step, metrics in record.by_step():
            tracker.log_metrics(metrics, step=step)
        with tempfile.TemporaryDirectory() as scratch:
            config_file = Path(scratch) / "config.yaml"
            config_file.write_text(yaml.safe_dump(to_dict(logged), sort_keys=False))
            tracker.log_artifact(config_file)
        for tokenizer_file in sorted((Path(path) / "tokenizer").iterdir()):
            tracker.log_artifact(tokenizer_file, artifact_path="tokenizer")
        tracker.log_dict(state["final"], "final_metrics.json")
    return tracker.run_id
