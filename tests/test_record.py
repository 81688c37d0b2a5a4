"""A run's checkpoints keep what it logged; a run finished on disk but absent from a store is logged there
from its final checkpoint (real training on CPU, real sqlite stores)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import attamba
from attamba import checkpoint
from attamba.record import MetricRecord
from attamba.tracking import find_runs, metric_history
from attamba.train import resolve_output_dir
from attamba.trainer import train

STEPS = ["train.steps=6", "train.log_every=1", "train.eval_every=3", "train.checkpoint_every=4"]


def smoke(tmp_path: Path, store: str, *overrides: str):
    return resolve_output_dir(attamba.load_config(
        ["experiment=smoke", f"tracking.uri=sqlite:///{tmp_path}/{store}", f"train.checkpoint_root={tmp_path}/ck",
         *STEPS, *overrides]))


def history(uri: str, run_id: str) -> dict[str, dict[int, float]]:
    """Every metric of the run by step (the last value logged at a step wins, as in the analysis)."""
    keys = MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics
    return {key: dict(metric_history(uri, run_id, key)) for key in keys}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One finished run in store A, interrupted after its step-4 checkpoint and resumed."""
    tmp_path = tmp_path_factory.mktemp("trained")
    config = smoke(tmp_path, "A.db")
    calls = iter(range(100))

    def crash_at_step_5() -> bool:
        if next(calls) == 5:
            raise KeyboardInterrupt("simulated crash at step 5")
        return False

    with pytest.raises(KeyboardInterrupt):
        train(config, stop_requested=crash_at_step_5)
    final = train(config)
    return tmp_path, config, final


def test_the_final_checkpoint_records_every_step_once_across_a_resume(trained):
    _, config, final = trained
    state = checkpoint.load(checkpoint.latest(Path(config.train.output_dir)))
    record = MetricRecord(state["metrics"])
    steps = {name: [step for step, metrics in record.by_step() if name in metrics]
             for name in ("train/loss", "eval/val/loss", "model/params")}
    assert steps == {"train/loss": [1, 2, 3, 4, 5, 6], "eval/val/loss": [3, 6], "model/params": [0]}
    (run,) = find_runs(config.tracking.uri, "smoke")
    store = history(config.tracking.uri, run["run_id"])
    assert store["train/loss"] == {step: metrics["train/loss"] for step, metrics in record.by_step()
                                        if "train/loss" in metrics}
    assert state["tags"]["attamba.config_hash"] == run["tags"]["attamba.config_hash"]
    assert final == state["final"] and final["eval/val/loss"] == dict(record.by_step())[6]["eval/val/loss"]


def test_a_finished_run_is_logged_into_a_store_that_lacks_it_not_trained_again(trained, capsys):
    tmp_path, config, final = trained
    ckpt = Path(config.train.output_dir) / "checkpoints"
    before = {path: path.stat().st_mtime_ns for path in ckpt.rglob("*")}
    other = dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, uri=f"sqlite:///{tmp_path}/B.db"))
    capsys.readouterr()

    assert train(other) == final
    assert "did not hold the run, so it was logged there from the checkpoint" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in ckpt.rglob("*")} == before  # nothing trained or saved
    (original,) = find_runs(config.tracking.uri, "smoke")
    (logged,) = find_runs(other.tracking.uri, "smoke")
    assert logged["status"] == "FINISHED"
    assert logged["tags"]["attamba.config_hash"] == original["tags"]["attamba.config_hash"]
    assert logged["tags"].get("mlflow.source.git.commit") == original["tags"].get("mlflow.source.git.commit")
    assert original["run_id"] in logged["tags"]["attamba.original_run"]
    assert logged["params"] == {**original["params"], "tracking.uri": other.tracking.uri}
    recorded: dict[str, dict[int, float]] = {}
    for name, step, value in checkpoint.load(checkpoint.latest(ckpt.parent))["metrics"]:
        recorded.setdefault(name, {})[step] = value
    assert history(other.tracking.uri, logged["run_id"]) == recorded  # every metric, every step, once
    trained_history = history(config.tracking.uri, original["run_id"])
    for name in ("train/loss", "train/grad_norm", "eval/val/loss", "model/params"):  # the same numbers as training
        assert recorded[name] == trained_history[name]
    artifacts = {item.path for item in MlflowClient(tracking_uri=other.tracking.uri).list_artifacts(logged["run_id"])}
    assert artifacts == {"config.yaml", "final_metrics.json", "tokenizer"}

    capsys.readouterr()
    train(other)  # now the store holds it: nothing to do, nothing logged twice
    assert "nothing to do" in capsys.readouterr().out
    assert len(find_runs(other.tracking.uri, "smoke")) == 1


def test_another_experiment_of_the_same_store_is_another_store(trained):
    _, config, _ = trained
    other = dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, experiment="elsewhere"))
    train(other)
    (logged,) = find_runs(other.tracking.uri, "elsewhere")
    assert logged["status"] == "FINISHED" and "train/loss" in logged["metrics"]
    assert len(find_runs(config.tracking.uri, "smoke")) == 1


def test_a_sweep_logs_no_second_run_beside_an_unfinished_one_of_the_same_checkpoint(trained):
    """A run left RUNNING in the store (killed before its tracking ended) is its job's to settle."""
    from launchers.job import log_from_checkpoints
    from launchers.sweep import SweepPoint

    _, config, _ = trained
    (run,) = find_runs(config.tracking.uri, "smoke")
    client = MlflowClient(tracking_uri=config.tracking.uri)
    client.update_run(run["run_id"], status="RUNNING")
    try:
        assert log_from_checkpoints([SweepPoint(0, (), config)], None) == (frozenset(), {})
        assert len(find_runs(config.tracking.uri, "smoke")) == 1
    finally:
        client.set_terminated(run["run_id"], "FINISHED")
