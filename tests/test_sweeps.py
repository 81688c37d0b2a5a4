"""Hydra multirun through our launcher: validation before submission, one MLflow parent, skip-finished."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

import attamba
from attamba import CONF_DIR
from attamba.tracking import RunTracker, find_runs, metric_history
from attamba.config import from_dictconfig
from attamba.train import resolve
from launchers.sweep import SweepError, forward_problem, model_shape, prepare_points

REPO = Path(__file__).resolve().parents[1]


def sweep(tmp_path: Path, *overrides: str, store: str = "mlflow.db", timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "attamba.train", "-m", "experiment=smoke",
         f"tracking.uri=sqlite:///{tmp_path}/{store}", f"hydra.sweep.dir={tmp_path}/sweep",
         f"train.checkpoint_root={tmp_path}/checkpoints", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("overrides,expected", [
    (["chunking=diagonal"], "diagonal"),  # an unknown group option
    (["chunking.size=4,eight"], "chunking.size"),  # a sweep value of the wrong type
    (["variant=transformer_iso_kv", "chunking.size=64", "model.n_heads=32", "model.dim=64"], "model.match"),
    (["chunking.size=4,4"], "duplicate"),
    (["hydra.launcher.max_parallel=0"], "hydra.launcher.max_parallel"),
])
def test_bad_sweeps_fail_before_anything_is_submitted(tmp_path, overrides, expected):
    result = sweep(tmp_path, *overrides)
    assert result.returncode != 0
    assert expected in result.stderr + result.stdout, result.stderr
    assert not (tmp_path / "mlflow.db").exists() or find_runs(f"sqlite:///{tmp_path}/mlflow.db", "smoke") == []
    assert not list((tmp_path / "sweep").glob(".submitit/*"))


def test_plan_prints_the_matrix_and_submits_nothing(tmp_path):
    result = sweep(tmp_path, "variant=attamba,transformer,transformer_iso_kv", "chunking.size=2,4", "+plan=true")
    assert result.returncode == 0, result.stderr
    assert "plan only" in result.stdout and "GPU-hours" in result.stdout
    assert "is the same run as" in result.stdout  # the full transformer appears once, not per chunk size
    assert result.stdout.count("| transformer-w") == 3  # full + iso-KV at P=2 and P=4
    assert not (tmp_path / "mlflow.db").exists()


def test_runs_that_would_share_a_name_are_named_by_what_sets_them_apart():
    import attamba
    from launchers.sweep import named_apart, prepare_points

    sweep_points = [["experiment=smoke", f"train.lr={lr}", "chunking.size=4"] for lr in ("0.001", "0.003")]
    points = prepare_points([*sweep_points, ["experiment=smoke", "chunking.size=2"]], attamba.load_config)
    named = named_apart(points)
    assert [point.name for point in named] == ["attamba-cyclic-P4-lead4 train.lr=0.001",
                                               "attamba-cyclic-P4-lead4 train.lr=0.003", points[2].name]
    assert [point.config_hash for point in named] == [point.config_hash for point in points]


VARIANTS = sorted(path.stem for path in (CONF_DIR / "variant").glob("*.yaml"))
PRESETS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))
PRESET_GRID = ("chunking.size",)  # what each preset sweeps that its matched widths depend on


@pytest.fixture(scope="module")
def variant_points() -> list:
    """Every variant composed onto every preset's model shape, at each chunk size the preset sweeps, resolved
    as a sweep resolves it: ``(overrides, config)`` of one point per model shape (see ``model_shape``)."""
    from hydra import compose, initialize_config_dir

    points: dict[str, tuple[list[str], Any]] = {}
    presets = set()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for preset in PRESETS:
            swept = compose(config_name="config", overrides=[f"experiment={preset}"], return_hydra_config=True)
            grid = {key: str(values).split(",") for key, values in (swept.hydra.sweeper.params or {}).items()
                    if key in PRESET_GRID}
            base = from_dictconfig(swept)
            shell = json.dumps([dataclasses.asdict(base.model), base.train.seq_len])
            if shell in presets:  # a study on another preset's model (chunk_strategy, leading_tokens: paper_iso_kv's)
                continue
            presets.add(shell)
            for values in itertools.product(*grid.values()):
                for variant in VARIANTS:
                    # The vocabulary cancels out of every match: both sides have the same embedding and head.
                    overrides = [f"experiment={preset}", f"variant={variant}", "data.vocab_size=256",
                                 *(f"{key}={value}" for key, value in zip(grid, values))]
                    config = resolve(compose(config_name="config", overrides=overrides))
                    points.setdefault(model_shape(config), (overrides, config))
    return list(points.values())


def test_every_variant_runs_on_every_presets_model_shape(variant_points):
    """One forward step on CPU of each (the check a sweep makes before submitting): matched widths
    have heads RoPE can rotate, and every model builds and runs."""
    assert {config.model.family for _, config in variant_points} == {"attamba", "transformer"}
    assert {config.model.match for _, config in variant_points} == {None, "kv_cache", "flops", "params"}
    for overrides, config in variant_points:
        if config.model.match is not None:
            assert config.model.head_dim % 2 == 0, overrides
        assert forward_problem(config) is None, overrides


def test_a_point_whose_model_cannot_run_fails_the_sweep_naming_the_point_and_setting():
    """Before any job: a head width RoPE cannot rotate names its setting; anything else the model chokes
    on in a forward pass names the point and the model's settings."""
    def compose(overrides: list[str]):
        config = attamba.load_config(["experiment=smoke", *overrides])
        if "chunking.size=3" in overrides:
            config.chunking.size = 0  # past the config's checks: a layout the model cannot build
        return config

    with pytest.raises(SweepError) as failure:
        prepare_points([["model=attamba"], ["model=transformer", "model.attn_dim=20"], ["chunking.size=3"]],
                       compose)
    lines = str(failure.value).splitlines()[1:]
    assert lines[0] == ("  point 1 (model=transformer model.attn_dim=20): model.attn_dim: heads of 5 features "
                        "(20 / 4 heads): RoPE needs an even head width")
    assert lines[1].startswith("  point 2 (chunking.size=3): model: does not run a forward pass with ")
    assert "chunking.size=0" in lines[1] and len(lines) == 2


def test_local_sweep_tracks_one_parent_and_reruns_skip_finished(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = sweep(tmp_path, "chunking.size=2,4", "train.steps=6", "hydra.launcher.max_parallel=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 finished" in first.stderr
    runs = find_runs(uri, "smoke")
    parents = [r for r in runs if r["tags"].get("attamba.sweep_parent") == "true"]
    children = [r for r in runs if r not in parents]
    assert len(parents) == 1 and len(children) == 2
    assert parents[0]["tags"]["attamba.planned_runs"] == "2"
    assert {c["tags"]["mlflow.parentRunId"] for c in children} == {parents[0]["run_id"]}
    assert all(c["status"] == "FINISHED" and "train/loss" in c["metrics"] for c in children)

    again = sweep(tmp_path, "chunking.size=2,4", "train.steps=6", "hydra.launcher.max_parallel=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 skipped" in again.stderr
    assert len(find_runs(uri, "smoke")) == 3  # nothing trained twice, the parent reused

    assert_make_ui_serves_the_sweep(tmp_path, uri)


def plan_statuses(output: str) -> list[str]:
    """The status column of the plan a sweep printed."""
    return [line.rstrip(" |").rsplit("|", 1)[-1].strip() for line in output.splitlines()
            if line.startswith("| ") and not line.startswith("| # ")]


def test_a_sweep_into_a_fresh_store_logs_the_runs_its_checkpoints_finished_and_reuses_its_parent(tmp_path):
    """Checkpoints are keyed by configuration, not by store. A store that lacks runs finished on disk gets
    them logged from their final checkpoints (nothing retrained), as the plan says; a run finished in the
    store whose checkpoints were deleted stays skipped; an interrupted sweep run again keeps its parent."""
    command = ["model=attamba,transformer", "train.steps=5", "hydra.launcher.max_parallel=2"]
    first = sweep(tmp_path, *command)
    assert first.returncode == 0, first.stderr[-3000:]
    assert plan_statuses(first.stdout) == ["to run", "to run"]
    trained_uri, fresh_uri = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/fresh.db"
    jobs = sorted((tmp_path / "sweep/.submitit").rglob("*_log.out"))
    checkpoints = {path: path.stat().st_mtime_ns for path in (tmp_path / "checkpoints").rglob("state.pt")}

    fresh = sweep(tmp_path, *command, store="fresh.db")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert plan_statuses(fresh.stdout) == ["log from checkpoint", "log from checkpoint"]
    assert "logged from their final checkpoints, not trained again" in fresh.stderr
    assert sorted((tmp_path / "sweep/.submitit").rglob("*_log.out")) == jobs  # no job ran
    assert {path: path.stat().st_mtime_ns for path in checkpoints} == checkpoints
    trained = {run["tags"].get("attamba.config_hash"): run for run in find_runs(trained_uri, "smoke")}
    logged = find_runs(fresh_uri, "smoke")
    (parent,) = [run for run in logged if run["tags"].get("attamba.sweep_parent") == "true"]
    children = [run for run in logged if run is not parent]
    assert parent["status"] == "FINISHED" and len(children) == 2
    for child in children:
        original = trained[child["tags"]["attamba.config_hash"]]
        assert child["status"] == "FINISHED" and child["tags"]["mlflow.parentRunId"] == parent["run_id"]
        assert child["run_name"] == original["run_name"]
        assert child["params"] == {**original["params"], "tracking.uri": fresh_uri,
                                   "tracking.sweep": parent["run_name"]}
        for key in ("train/loss", "eval/val/loss", "model/params"):
            want = metric_history(trained_uri, original["run_id"], key)
            assert metric_history(fresh_uri, child["run_id"], key) == want
        artifacts = MlflowClient(tracking_uri=fresh_uri).list_artifacts(child["run_id"])
        assert {item.path for item in artifacts} == {"config.yaml", "final_metrics.json", "tokenizer"}

    # The first sweep, as an interrupted one leaves it; then its checkpoints deleted.
    (first_parent,) = [run for run in trained.values() if run["tags"].get("attamba.sweep_parent") == "true"]
    RunTracker(trained_uri, "smoke", run_id=first_parent["run_id"]).finish("KILLED", reason="interrupted")
    shutil.rmtree(tmp_path / "checkpoints")
    again = sweep(tmp_path, *command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert plan_statuses(again.stdout) == ["finished", "finished"]
    assert "2 skipped" in again.stderr and not (tmp_path / "checkpoints").exists()  # the store says done
    runs = find_runs(trained_uri, "smoke")
    assert len(runs) == 3  # one parent, two children: the sweep reads as one
    (parent,) = [run for run in runs if run["tags"].get("attamba.sweep_parent") == "true"]
    assert parent["run_id"] == first_parent["run_id"] and parent["status"] == "FINISHED"
    assert "attamba.failure_reason" not in parent["tags"] and parent["tags"]["attamba.sweep_attempts"] == "2"


def test_interrupted_local_sweep_cancels_its_jobs_and_ends_every_run_killed(tmp_path):
    """SIGTERM to the sweep (Ctrl-C goes the same way): no job keeps training, no run stays RUNNING."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    log = open(tmp_path / "sweep.log", "w")
    command = [sys.executable, "-m", "attamba.train", "-m", "experiment=smoke", f"tracking.uri={uri}",
               f"hydra.sweep.dir={tmp_path}/sweep", f"train.checkpoint_root={tmp_path}/checkpoints",
               "chunking.size=2,4", "train.steps=100000", "hydra.launcher.max_parallel=2"]
    sweep_process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len([r for r in find_runs(uri, "smoke") if "train/loss" in r["metrics"]]) < 2:
            assert sweep_process.poll() is None and time.monotonic() < deadline, (tmp_path / "sweep.log").read_text()
            time.sleep(1)
        sweep_process.send_signal(signal.SIGTERM)
        assert sweep_process.wait(timeout=120) == 130
    finally:
        if sweep_process.poll() is None:
            os.killpg(sweep_process.pid, signal.SIGKILL)
        log.close()
        left = processes_naming(tmp_path / "sweep")
        for pid in left:  # a job the sweep failed to cancel
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, "jobs still running after the sweep ended"
    output = (tmp_path / "sweep.log").read_text()
    assert "interrupted: cancelled 2 running job(s)" in output, output
    runs = find_runs(uri, "smoke")
    assert len(runs) == 3 and {run["status"] for run in runs} == {"KILLED"}, runs
    assert all("interrupted" in run["tags"]["attamba.failure_reason"] for run in runs)


def processes_naming(folder: Path) -> list[int]:
    """Live processes whose command line names ``folder`` (submitit's job controllers and tasks do)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            named = str(folder).encode() in cmdline.read_bytes()
        except OSError:  # the process ended meanwhile
            continue
        if named:
            found.append(int(cmdline.parent.name))
    return found


def assert_make_ui_serves_the_sweep(tmp_path: Path, uri: str) -> None:
    """`make ui` on loopback; the sweep's runs, params and metrics through the REST API the UI uses."""
    from mlflow_server import _healthy, free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "ui.log", "wb")
    ui = subprocess.Popen(["make", "-s", "ui", f"TRACKING_URI={uri}", f"UI_PORT={port}"], cwd=REPO,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _healthy(url):
            assert ui.poll() is None and time.monotonic() < deadline, (tmp_path / "ui.log").read_text()
            time.sleep(0.5)

        def post(path: str, body: dict) -> dict:
            request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(request, timeout=30).read())

        experiments = post("experiments/search", {"max_results": 100})["experiments"]
        (smoke,) = [e for e in experiments if e["name"] == "smoke"]
        runs = post("runs/search", {"experiment_ids": [smoke["experiment_id"]], "max_results": 100})["runs"]
        children = [r for r in runs if any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", []))]
        assert len(children) == 2
        for run in children:
            params = {p["key"]: p["value"] for p in run["data"]["params"]}
            metrics = {m["key"] for m in run["data"]["metrics"]}
            assert params["chunking.size"] in {"2", "4"} and "eval/val/loss" in metrics
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
        log.close()


def test_local_launcher_gives_each_job_one_gpu_and_never_shares_one(tmp_path):
    """With two GPUs declared, four jobs run two at a time, each seeing exactly one device of its own."""
    env_gpus = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}
    result = subprocess.run(
        [sys.executable, "-m", "attamba.train", "-m", "experiment=smoke", "train.device=cpu", "train.steps=3",
         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.sweep.dir={tmp_path}/sweep",
         f"train.checkpoint_root={tmp_path}/checkpoints", "chunking.size=1,2,4,8"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env_gpus)
    assert result.returncode == 0, result.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    children = [r for r in find_runs(f"sqlite:///{tmp_path}/mlflow.db", "smoke") if "mlflow.parentRunId" in r["tags"]]
    assert len(children) == 4
    assert {r["tags"]["attamba.cuda_visible_devices"] for r in children} <= {"0", "1"}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    spans = {}
    for run in children:
        info = client.get_run(run["run_id"]).info
        spans.setdefault(run["tags"]["attamba.cuda_visible_devices"], []).append((info.start_time, info.end_time))
    for gpu, intervals in spans.items():
        intervals.sort()
        assert all(end <= next_start for (_, end), (next_start, _) in zip(intervals, intervals[1:])), gpu
