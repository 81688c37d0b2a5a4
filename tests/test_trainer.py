"""Training runs end to end on CPU: resume exactness, divergence handling, bad input, tracking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attamba
from attamba.tracking import find_runs, metric_history
from attamba.train import resolve_output_dir
from attamba.trainer import train

REPO = Path(__file__).resolve().parents[1]


def smoke_config(tmp_path: Path, *overrides: str):
    config = attamba.load_config(["experiment=smoke", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                  f"train.checkpoint_root={tmp_path}/checkpoints", "train.log_every=1", *overrides])
    return resolve_output_dir(config)


def losses(uri: str, experiment: str) -> dict[int, float]:
    (run,) = find_runs(uri, experiment)
    return dict(metric_history(uri, run["run_id"], "train/loss"))  # last value per step wins


def test_interrupted_run_resumes_to_the_same_losses(tmp_path):
    steps = ["train.steps=10", "train.checkpoint_every=4", "train.eval_every=100"]
    reference = smoke_config(tmp_path, *steps, "tracking.experiment=straight",
                             f"train.output_dir={tmp_path}/straight")
    train(reference)

    resumed = smoke_config(tmp_path, *steps, "tracking.experiment=crashed", f"train.output_dir={tmp_path}/crashed")
    calls = iter(range(100))

    def crash_at_step_6() -> bool:
        if next(calls) == 6:
            raise KeyboardInterrupt("simulated crash at step 6")
        return False

    with pytest.raises(KeyboardInterrupt):
        train(resumed, stop_requested=crash_at_step_6)
    (killed,) = find_runs(resumed.tracking.uri, "crashed")
    assert killed["status"] == "KILLED"
    train(resumed)  # same output dir: resumes from the step-4 checkpoint

    runs = find_runs(resumed.tracking.uri, "crashed")
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED"  # the same MLflow run, not a second one
    want, got = losses(reference.tracking.uri, "straight"), losses(resumed.tracking.uri, "crashed")
    assert sorted(got) == sorted(want) == list(range(1, 11))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_training_follows_eager_training(tmp_path):
    """``train.compile_mode=reduce-overhead``, the README's advice on GPUs, trains the eager curve (to bf16
    rounding) through a checkpoint, and finishes its run."""
    common = ["train.device=cuda", "train.steps=6", "train.checkpoint_every=3", "train.eval_every=100"]
    eager = smoke_config(tmp_path, *common, "tracking.experiment=eager", f"train.output_dir={tmp_path}/eager")
    graphs = smoke_config(tmp_path, *common, "train.compile=true", "train.compile_mode=reduce-overhead",
                          "tracking.experiment=graphs", f"train.output_dir={tmp_path}/graphs")
    train(eager)
    train(graphs)
    (run,) = find_runs(graphs.tracking.uri, "graphs")
    assert run["status"] == "FINISHED"
    want, got = losses(eager.tracking.uri, "eager"), losses(graphs.tracking.uri, "graphs")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=2e-2), step


def test_finished_run_is_not_trained_again(tmp_path, capsys):
    config = smoke_config(tmp_path, "train.steps=3", "train.eval_every=100")
    first = train(config)
    capsys.readouterr()
    again = train(config)
    assert again == first
    assert len(find_runs(config.tracking.uri, "smoke")) == 1
    assert f"already trained: {config.train.output_dir}" in capsys.readouterr().out  # said, not silent


def test_tokens_per_second_leave_out_evaluation_and_checkpoints(tmp_path, monkeypatch):
    """On an injected clock where each step takes 1 s, evaluations 100 s and checkpoints 50 s, every logging
    interval reports one step's tokens per second, and the first step (compilation, warm-up) is timed alone."""
    import attamba.checkpoint
    import attamba.evaluate

    now = [0.0]
    evaluate, save = attamba.evaluate.evaluate_validation, attamba.checkpoint.save

    def slow(call, seconds):
        def wrapped(*args, **kwargs):
            now[0] += seconds
            return call(*args, **kwargs)
        return wrapped

    def one_second_per_step() -> bool:
        now[0] += 1.0
        return False

    monkeypatch.setattr(attamba.evaluate, "evaluate_validation", slow(evaluate, 100.0))
    monkeypatch.setattr(attamba.checkpoint, "save", slow(save, 50.0))
    config = smoke_config(tmp_path, "train.steps=6", "train.log_every=2", "train.eval_every=1",
                          "train.checkpoint_every=1")
    train(config, stop_requested=one_second_per_step, clock=lambda: now[0])
    (run,) = find_runs(config.tracking.uri, "smoke")
    tokens_per_step = config.train.batch_size * config.train.seq_len
    speeds = metric_history(config.tracking.uri, run["run_id"], "speed/tokens_per_s")
    assert speeds == [(2, tokens_per_step), (4, tokens_per_step), (6, tokens_per_step)]
    assert metric_history(config.tracking.uri, run["run_id"], "speed/first_step_s") == [(1, 1.0)]


def test_run_is_tracked_with_params_tags_metrics_and_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient

    pages = tmp_path / "wiki.raw"  # two WikiText-style pages
    pages.write_text(" = First = \n \n Some text , with a comma . \n = Second = \n \n More text here . \n")
    config = smoke_config(tmp_path, "train.steps=4", "train.eval_every=2", f"eval.wikitext2_path={pages}")
    final = train(config)
    (run,) = find_runs(config.tracking.uri, "smoke")
    client = MlflowClient(config.tracking.uri)
    data = client.get_run(run["run_id"]).data
    assert data.params["model.family"] == "attamba" and data.params["chunking.size"] == "4"
    assert data.tags["attamba.family"] == "attamba" and len(data.tags["attamba.config_hash"]) >= 8
    for key in ("model/params", "model/kv_bytes_per_token", "model/attn_flops_per_token", "train/loss",
                "train/lr", "train/grad_norm", "speed/tokens_per_s", "speed/mfu", "mem/peak_gib",
                "eval/val/loss", "eval/val/word_perplexity", "eval/wikitext2/word_perplexity",
                "eval/wikitext2/byte_perplexity", "eval/wikitext2/bits_per_byte", "eval/wikitext2/paper_perplexity"):
        assert key in data.metrics, key
    assert [step for step, _ in metric_history(config.tracking.uri, run["run_id"], "eval/val/loss")] == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"config.yaml", "tokenizer", "final_metrics.json"} <= artifacts
    local = client.download_artifacts(run["run_id"], "final_metrics.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["eval/val/loss"] == pytest.approx(final["eval/val/loss"])


def test_non_finite_loss_fails_the_run_with_the_reason(tmp_path):
    from attamba.trainer import TrainingDiverged

    config = smoke_config(tmp_path, "train.steps=20", "train.lr=1e12", "train.warmup=0", "optim.clip=0",
                          "train.eval_every=100")
    with pytest.raises(TrainingDiverged, match=r"non-finite training loss at step \d+ \(seen at the logging step"):
        train(config)
    (run,) = find_runs(config.tracking.uri, "smoke")
    assert run["status"] == "FAILED"
    assert "non-finite" in run["tags"]["attamba.failure_reason"]


def cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "attamba.train", "experiment=smoke", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
         f"hydra.run.dir={tmp_path}/hydra", f"train.checkpoint_root={tmp_path}/checkpoints", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_help_shows_how_to_run_plan_and_sweep():
    result = subprocess.run([sys.executable, "-m", "attamba.train", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "attamba-train -m experiment=paper_iso_kv +plan=true" in result.stdout
    assert "experiment: chunk_strategy, demo, leading_tokens, paper_iso_kv, smoke" in result.stdout


def test_plan_of_a_single_run_trains_nothing(tmp_path):
    result = cli(tmp_path, "train.steps=60000", "+plan=true")
    assert result.returncode == 0, result.stderr
    assert "plan only" in result.stdout and "| attamba-cyclic-P4-lead4 |" in result.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("overrides,setting", [
    (["data=jsonl", "data.paths=[/nonexistent/shard.jsonl]"], "data.paths"),
    (["data=jsonl", "data.paths=[{empty}]"], "data.paths"),
    (["data.tokenizer={broken}"], "data.tokenizer"),
    (["data.tokenizer="], "data.tokenizer: empty"),
    (["train.seq_len=2", "chunking.size=4"], "train.seq_len"),
    (["train.output_dir={blocked}/run"], "train.output_dir"),
    (["tracking.uri=http://127.0.0.1:9"], "tracking.uri"),
    (["+model.chunk_sise=8"], "model.chunk_sise"),  # Hydra's hint for a key the schema lacks: a typo stays one
    (["+plan=true", "+model.ssm.hiden=8"], "did you mean model.ssm.hidden"),
])
def test_bad_input_stops_before_training_and_changes_nothing_tracked(tmp_path, overrides, setting):
    store = tmp_path / "mlflow.db"
    train(smoke_config(tmp_path, "train.steps=2", "train.eval_every=100"))
    before = store.read_bytes()
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.model").write_bytes(b"\x00not a tokenizer")
    (tmp_path / "blocked").write_text("a file, not a directory")
    values = {"empty": tmp_path / "empty.jsonl", "broken": tmp_path / "broken.model", "blocked": tmp_path / "blocked"}
    result = cli(tmp_path, *(o.format(**values) for o in overrides))
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert setting in message, result.stderr
    assert "Traceback" not in result.stderr
    assert store.read_bytes() == before


def test_two_process_ddp_run_tracks_once_from_rank_zero(tmp_path):
    """torchrun with 2 CPU processes (gloo): both train, rank 0 alone creates and finishes the MLflow run.

    The training script is run through a probe that also fails if a DDP wrapper is still alive when the
    process group is destroyed (a hang at exit, otherwise seen only by chance).
    """
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "ddp_shutdown_probe.py"),
         "experiment=smoke", "train.steps=4", "train.log_every=1", "train.eval_every=100",
         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={tmp_path}/hydra",
         f"train.checkpoint_root={tmp_path}/checkpoints"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = find_runs(f"sqlite:///{tmp_path}/mlflow.db", "smoke")
    assert run["status"] == "FINISHED" and run["tags"]["attamba.world_size"] == "2"
    history = metric_history(f"sqlite:///{tmp_path}/mlflow.db", run["run_id"], "train/loss")
    assert [step for step, _ in history] == [1, 2, 3, 4]


def test_mqar_trains_and_logs_recall_at_each_evaluation(tmp_path):
    config = smoke_config(tmp_path, "data=mqar", "data.vocab_size=128", "data.mqar_kv_pairs=4",
                          "data.mqar_val_examples=64", "train.steps=6", "train.eval_every=3")
    train(config)
    (run,) = find_runs(config.tracking.uri, "smoke")
    assert [s for s, _ in metric_history(config.tracking.uri, run["run_id"], "eval/mqar/accuracy")] == [3, 6]
