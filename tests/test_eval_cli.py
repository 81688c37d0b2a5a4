"""``attamba-eval RUN``: evaluations of a finished run's checkpoint land in that same MLflow run; bad input is
one line naming its setting, and nothing is written to the store."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import attamba
from attamba import checkpoint
from attamba.config import to_dict
from attamba.data import build_tokenizer
from attamba.evals.cli import main
from attamba.tracking import RunTracker, find_runs, metric_history
from attamba.train import resolve_output_dir, resolve_vocab
from attamba.trainer import train

from test_trainer import smoke_config

REPO = Path(__file__).resolve().parents[1]
PASSKEY = ["eval.passkey_lengths=[128]", "eval.passkey_depths=[1.0]", "eval.passkey_trials=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-step smoke run: its config and its run."""
    root = tmp_path_factory.mktemp("finished")
    config = smoke_config(root, "train.steps=2", "train.eval_every=100")
    train(config)
    (run,) = find_runs(config.tracking.uri, "smoke")
    return config, run


@pytest.fixture
def store(finished, tmp_path):
    """A copy of the finished run's store for one test to write into."""
    config, _ = finished
    copy = tmp_path / "mlflow.db"
    shutil.copy(config.tracking.uri.removeprefix("sqlite:///"), copy)
    return f"sqlite:///{copy}"


def test_evaluations_are_logged_into_the_run_they_evaluate(finished, store, capsys):
    config, run = finished
    main([run["run_id"], "--evals", "val,passkey", *PASSKEY, "--tracking-uri", store])
    assert "eval/passkey/accuracy" in capsys.readouterr().out
    (after,) = find_runs(store, "smoke")
    assert after["run_id"] == run["run_id"] and after["status"] == "FINISHED"
    assert after["tags"]["attamba.evaluations"] == "passkey,val"
    assert [step for step, _ in metric_history(store, run["run_id"], "eval/passkey/accuracy")] == [2]
    val = [(m.step, m.value) for m in MlflowClient(store).get_metric_history(run["run_id"], "eval/val/loss")]
    assert [step for step, _ in val] == [2, 2] and val[0][1] == pytest.approx(val[1][1], rel=1e-6)
    assert {"passkey.csv", "passkey.md"} <= {a.path for a in MlflowClient(store).list_artifacts(run["run_id"])}

    main([run["run_name"], "--evals", "val", "--tracking-uri", store])  # by name; the tag keeps both
    main([config.train.output_dir, "--evals", "val", "--tracking-uri", store])  # by the run's directory
    (after,) = find_runs(store, "smoke")
    assert after["tags"]["attamba.evaluations"] == "passkey,val"
    assert len(MlflowClient(store).get_metric_history(run["run_id"], "eval/val/loss")) == 4


def test_lm_eval_tasks_run_through_the_harness_module(finished, store, monkeypatch):
    _, run = finished
    calls = []
    harness = types.ModuleType("attamba.evals.harness")

    def run_tasks(model, tokenizer, tasks, device):
        calls.append((type(model).__name__, tokenizer.vocab_size, tasks, str(device)))
        return {"eval/niah_single_1/score": 0.25}

    harness.run_tasks = run_tasks
    monkeypatch.setitem(sys.modules, "attamba.evals.harness", harness)
    main([run["run_id"], "--lm-eval", "niah_single_1", "--tracking-uri", store, "--device", "cpu"])
    assert calls == [("LanguageModel", 2048, ["niah_single_1"], "cpu")]
    (after,) = find_runs(store, "smoke")
    assert after["metrics"]["eval/niah_single_1/score"] == 0.25
    assert after["tags"]["attamba.evaluations"] == "lm-eval:niah_single_1"


def test_an_mqar_run_is_scored_on_recall(tmp_path):
    config = resolve_output_dir(resolve_vocab(attamba.load_config([
        "experiment=smoke", "data=mqar", "data.vocab_size=128", "data.mqar_val_examples=8",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"train.checkpoint_root={tmp_path}/checkpoints"])))
    tracker = RunTracker(config.tracking.uri, "mqar", run_name="mqar-run")
    tracker.finish()
    model = attamba.build_model(config)
    state = {"model": model.state_dict(), "config": to_dict(config), "mlflow_run_id": tracker.run_id, "step": 3,
             "optimizer": {}, "scheduler": {}, "data": [], "rng": {}, "final": {}}  # what evaluation reads is real
    checkpoint.save(Path(config.train.output_dir), 3, state, tokenizer=build_tokenizer(config.data))
    main([config.train.output_dir, "--evals", "mqar"])
    (run,) = find_runs(config.tracking.uri, "mqar")
    assert [step for step, _ in metric_history(config.tracking.uri, run["run_id"], "eval/mqar/accuracy")] == [3]
    assert run["tags"]["attamba.evaluations"] == "mqar"


def missing_harness(monkeypatch):
    monkeypatch.setitem(sys.modules, "attamba.evals.harness", None)  # importing it fails, as when it is absent


@pytest.mark.parametrize("arguments,setting", [
    (["--evals", "val,perplexity"], "--evals: unknown evaluation 'perplexity'"),
    ([], "--evals: nothing to run"),
    (["--evals", "mqar"], "--evals: mqar scores runs trained on data=mqar"),
    (["--evals", "wikitext2"], "eval.wikitext2_path"),
    (["--evals", "passkey", "eval.passkey_lengths=[16777217]"], "eval.passkey_lengths: 16777217 is beyond"),
    (["--evals", "passkey", "eval.passkey_lengths=[16]"], "eval.passkey_lengths: 16 tokens cannot hold"),
    (["--evals", "val", "train.steps=5"], "eval.KEY=VALUE: only eval settings"),
    (["--lm-eval", "niah_single_1"], "--lm-eval: lm-evaluation-harness support is not installed"),
])
def test_bad_input_is_one_line_naming_it_and_writes_nothing(finished, store, capsys, monkeypatch, arguments,
                                                            setting):
    _, run = finished
    missing_harness(monkeypatch)
    before = Path(store.removeprefix("sqlite:///")).read_bytes()
    with pytest.raises(SystemExit) as exit_:
        main([run["run_id"], *arguments, "--tracking-uri", store])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and setting in error[0], error
    assert Path(store.removeprefix("sqlite:///")).read_bytes() == before


def test_a_run_without_a_checkpoint_is_refused(finished, store, tmp_path, capsys):
    tracker = RunTracker(store, "smoke", run_name="no-checkpoint")
    tracker.log_params({"train.output_dir": str(tmp_path / "never-trained")})
    tracker.finish("KILLED")
    before = Path(store.removeprefix("sqlite:///")).read_bytes()
    for run, message in [
        ("no-checkpoint", f"RUN: run {tracker.run_id} (no-checkpoint) has no checkpoint in its train.output_dir="),
        (str(tmp_path), f"RUN: {tmp_path} holds no checkpoint"),
        ("nosuchrun", "RUN: no run with the id or name 'nosuchrun'"),
    ]:
        with pytest.raises(SystemExit):
            main([run, "--evals", "val", "--tracking-uri", store])
        assert capsys.readouterr().err.startswith(f"attamba-eval: error: {message}")
    assert Path(store.removeprefix("sqlite:///")).read_bytes() == before


def test_the_command_line_errors_without_creating_a_store(tmp_path):
    result = subprocess.run([sys.executable, "-m", "attamba.evals.cli", "some-run", "--evals", "val",
                             "--tracking-uri", f"sqlite:///{tmp_path}/absent.db"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("attamba-eval: error: RUN: no run with the id or name")
    assert not (tmp_path / "absent.db").exists()
