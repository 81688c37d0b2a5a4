"""The SLURM launcher against the real single-node cluster of ``make slurm-up``.

Sweeps into MLflow under one parent run, a job array larger than the node, preemption
by ``scancel --signal`` and by the time limit (each resuming into the same MLflow run
with the metrics of an uninterrupted run), cancellation, and bad input caught before
anything is submitted. Every test submits real jobs; none mocks SLURM.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Callable

import pytest
import torch

import attamba
from attamba.config import Config
from attamba.tracking import find_runs, metric_history
from attamba.trainer import train
from launchers.slurm import (Node, Partition, SlurmSettings, parse_gpus, parse_time_min, partitions, preflight,
                             run_points, sized)
from launchers.sweep import SweepPoint

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO / "runs" / "data"  # prepared by `make install`; jobs read it from any directory
LEAN = {"cpus_per_task": 1, "mem_gb_per_task": 1}  # so that the two-CPU CI node runs two jobs at once
QUIET = ["train.eval_every=100000", "train.checkpoint_every=100000"]  # the only mid-run checkpoint: preemption's


def cluster_problem() -> str | None:
    """Why the tests cannot run here, or None when a cluster with accounting answers."""
    if shutil.which("sinfo") is None:
        return "no SLURM client (sinfo) on this machine: run `make slurm-up`"
    for command in (["sinfo", "--noheader"], ["sacct", "--noheader", "--starttime=now"]):
        try:
            probe = subprocess.run(command, capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(command)}` got no answer within 20 s: is the cluster up? (`make slurm-up`)"
        if probe.returncode != 0:
            said = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            return f"no SLURM cluster is up (`{' '.join(command)}`: {said}): run `make slurm-up`"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(autouse=True)
def empty_queue():
    """Each test starts and ends with an empty queue (a job whose result is in exits within seconds)."""
    assert queued() == [], "jobs left in the queue by something else"
    yield
    deadline = time.monotonic() + 30
    while (leftover := queued()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if leftover:
        subprocess.run(["scancel", *leftover], check=False)
    assert leftover == [], f"jobs left in the queue: {leftover}"


def queued() -> list[str]:
    return subprocess.run(["squeue", "--noheader", "--format=%i"], capture_output=True, text=True,
                          check=True).stdout.split()


def smoke(tmp_path: Path, name: str, *overrides: str) -> Config:
    """The smoke experiment, tracked in ``tmp_path``, writing its checkpoints to ``tmp_path/name``."""
    return attamba.load_config(["experiment=smoke", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                f"tracking.experiment={name}", f"train.output_dir={tmp_path}/{name}",
                                f"data.root={DATA_ROOT}", *overrides])


def as_point(config: Config, index: int = 0) -> SweepPoint:
    return SweepPoint(index, (), config)


def train_here(config: Config) -> dict:
    """An uninterrupted run in this process, on one thread like the jobs (so results match bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(config)
    finally:
        torch.set_num_threads(threads)


def wait_for(condition: Callable[[], object], seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {seconds:.0f}s waiting for {what}")


def training_job(folder: Path) -> str | None:
    """The id of the job whose log in ``folder`` shows training steps, once one does."""
    for log in folder.glob("*_0_log.out"):
        if "step " in log.read_text(errors="replace"):
            return log.name.removesuffix("_0_log.out")
    return None


def in_background(*args) -> Future:
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(run_points, *args)
    pool.shutdown(wait=False)
    return future


def sacct(job_id: str, *fields: str, duplicates: bool = False) -> list[list[str]]:
    """sacct rows of the job's allocations (steps left out); with ``duplicates``, every attempt."""
    command = ["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={job_id}",
               f"--format={','.join(fields)}"] + (["--duplicates"] if duplicates else [])
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [line.split("|") for line in out.splitlines() if line]


UNSETTLED = {"PENDING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def settled(job_id: str) -> None:
    """Wait until the queue is empty and accounting (slurmdbd records asynchronously) has a final
    state for every allocation of ``job_id``: sacct can still say RUNNING after squeue is empty."""
    wait_for(lambda: not queued(), 30, "the job to leave the queue")
    wait_for(lambda: all(row[0] not in UNSETTLED for row in sacct(job_id, "State")), 60,
             f"accounting to record a final state for job {job_id}")


def assert_resumed_like(uri: str, experiment: str, reference: dict, reference_experiment: str,
                        result: dict) -> None:
    """One MLflow run, resumed after its preemption (the caller checks SLURM's requeue), finished with the
    losses and metrics of the reference, and without the reason its interrupted attempt ended with."""
    runs = find_runs(uri, experiment)
    assert len(runs) == 1, [run["status"] for run in runs]  # resumed into the same run, not a second one
    run = runs[0]
    assert run["status"] == "FINISHED"
    assert "attamba.failure_reason" not in run["tags"]
    (straight,) = find_runs(uri, reference_experiment)
    want = dict(metric_history(uri, straight["run_id"], "train/loss"))
    got = dict(metric_history(uri, run["run_id"], "train/loss"))
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    for key in ("train/loss", "eval/val/loss", "eval/val/word_perplexity"):
        assert result[key] == pytest.approx(reference[key], rel=1e-5), key


@pytest.mark.parametrize("text, minutes", [("UNLIMITED", None), ("45", 45), ("45:30", 45.5), ("2:00:00", 120),
                                           ("3-0", 4320), ("1-02:30", 1590), ("1-00:00:30", 1440.5)])
def test_slurm_time_formats(text, minutes):
    assert parse_time_min(text) == minutes


@pytest.mark.parametrize("gres, gpus", [("(null)", 0), ("gpu:8", 8), ("gpu:h200:4(S:0-1)", 4),
                                        ("gpu:a100:2,gpu:v100:2", 4), ("shard:8", 0), ("gpu:h200:4(S:0),shard:8", 4)])
def test_gpus_are_counted_from_a_nodes_gres(gres, gpus):
    assert parse_gpus(gres) == gpus


def partition_of(*nodes: Node, max_mem_mb: int | None = None) -> Partition:
    return Partition("p", "UP", True, None, max_mem_mb, nodes)


@pytest.mark.parametrize("settings, partition, cpus, mem_gb", [
    # make slurm-up's node: both CPUs, all the memory
    ({}, partition_of(Node("a", 2, 9216, 0)), 2, 9.0),
    # one task per GPU on an 8-GPU node: 12 CPUs each, capped at 8; memory in proportion, capped at 32 GB
    ({"gpus_per_node": 8}, partition_of(Node("g", 96, 1024 * 1024, 8)), 8, 32.0),
    # from the largest node that has the GPUs asked for, not from the partition's largest
    ({"gpus_per_node": 2}, partition_of(Node("cpu", 64, 262144, 0), Node("gpu", 8, 32768, 2)), 4, 16.0),
    # a setting given is kept; the other is sized around it
    ({"cpus_per_task": 1}, partition_of(Node("a", 4, 8192, 0)), 1, 2.0),
    ({"mem_gb_per_task": 3}, partition_of(Node("a", 4, 8192, 0)), 4, 3.0),
    # the partition's memory limit per node bounds the share
    ({}, partition_of(Node("a", 4, 65536, 0), max_mem_mb=4096), 4, 4.0),
])
def test_unset_cpu_and_memory_requests_are_sized_from_the_partition(settings, partition, cpus, mem_gb):
    got = sized(SlurmSettings.from_mapping(settings), partition)
    assert (got.cpus_per_task, got.mem_gb_per_task) == (cpus, pytest.approx(mem_gb))


def test_a_sweep_with_the_presets_defaults_runs_on_this_cluster(tmp_path):
    """The README's command on `make slurm-up`'s node: no CPU or memory setting, and it fits."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [str(REPO / ".venv/bin/attamba-train"), "-m", "experiment=smoke", "hydra/launcher=submitit_slurm",
               "train.steps=3", f"tracking.uri={uri}", f"data.root={DATA_ROOT}", f"hydra.sweep.dir={tmp_path}/sweep",
               f"train.checkpoint_root={tmp_path}/checkpoints"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = [run for run in find_runs(uri, "smoke") if "mlflow.parentRunId" in run["tags"]]
    assert run["status"] == "FINISHED"
    (job_id,) = {log.name.split("_")[0] for log in (tmp_path / "sweep/.submitit").glob("*_0_log.out")}
    settled(job_id)
    (default,) = [p for p in partitions().values() if p.default]
    want = sized(SlurmSettings(), default)
    ((cpus, memory),) = sacct(job_id, "AllocCPUS", "ReqMem")
    assert int(cpus) == want.cpus_per_task == min(8, max(node.cpus for node in default.nodes))
    assert memory == f"{want.mem_mb_per_node}M"


def test_preflight_reads_this_clusters_default_partition_and_limits():
    (default,) = [p for p in partitions().values() if p.default]
    settings, partition = preflight({"cpus_per_task": 1, "mem_gb_per_task": 1}, 10)
    assert partition == default.name and settings.tasks_per_node == 1
    limit = subprocess.run(["sinfo", "--noheader", f"--partition={partition}", "--format=%l"],
                           capture_output=True, text=True, check=True).stdout.split()[0]
    assert default.max_time_min == parse_time_min(limit)


def test_two_point_sweep_runs_through_slurm_into_mlflow_under_one_parent(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [str(REPO / ".venv/bin/attamba-train"), "-m", "experiment=smoke", "hydra/launcher=submitit_slurm",
               "chunking.size=2,4", "train.steps=5", f"tracking.uri={uri}", f"data.root={DATA_ROOT}",
               f"hydra.sweep.dir={tmp_path}/sweep", "hydra.launcher.slurm.cpus_per_task=1",
               "hydra.launcher.slurm.mem_gb_per_task=1"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 finished" in done.stderr and "0 failed" in done.stderr  # the progress line

    runs = find_runs(uri, "smoke")
    (parent,) = [run for run in runs if run["tags"].get("attamba.sweep_parent") == "true"]
    children = [run for run in runs if run is not parent]
    assert parent["status"] == "FINISHED"
    assert len(children) == 2
    assert {run["tags"]["mlflow.parentRunId"] for run in children} == {parent["run_id"]}
    assert sorted(run["params"]["chunking.size"] for run in children) == ["2", "4"]
    for run in children:
        assert run["status"] == "FINISHED"
        assert run["metrics"]["eval/val/loss"] > 0
    # Both ran as tasks of one SLURM job array, in the submitting directory.
    logs = sorted(p.name for p in (tmp_path / "sweep/.submitit").glob("*_0_log.out"))
    assert len(logs) == 2 and len({name.split("_")[0] for name in logs}) == 1, logs


def test_job_array_larger_than_the_node_runs_every_point(tmp_path):
    cpus = max(node.cpus for partition in partitions().values() for node in partition.nodes)
    points = [as_point(smoke(tmp_path, f"seed{seed}", "train.steps=3", f"train.seed={seed}", *QUIET), seed)
              for seed in range(cpus + 1)]
    folder = tmp_path / "submitit"

    outcomes = run_points(points, None, folder, LEAN, 10)

    assert [o.status for o in outcomes] == ["finished"] * len(points)
    assert [o.point.index for o in outcomes] == list(range(len(points)))
    (array_id,) = {log.name.split("_")[0] for log in folder.glob("*_0_log.out")}
    settled(array_id)
    tasks = sacct(array_id, "JobID", "State", "Start", "End")
    assert sorted(row[0] for row in tasks) == sorted(f"{array_id}_{i}" for i in range(len(points)))
    assert {row[1] for row in tasks} == {"COMPLETED"}
    # One CPU per job: never more jobs at once than the node has CPUs, so some had to wait.
    spans = [(datetime.fromisoformat(row[2]), datetime.fromisoformat(row[3])) for row in tasks]
    most_at_once = max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)
    assert most_at_once <= cpus


def test_preemption_signal_checkpoints_requeues_and_resumes_into_the_same_run(tmp_path):
    steps = ["train.steps=300", "train.log_every=1", *QUIET]
    config = smoke(tmp_path, "preempted", *steps)
    folder = tmp_path / "submitit"
    # timeout_min >= 60: below ~50 submitit counts every signal as a time-out (FACTS.md).
    sweep = in_background([as_point(config)], None, folder, LEAN, 60)

    job_id = wait_for(lambda: training_job(folder), 120, "the job to start training")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    reference = train_here(smoke(tmp_path, "straight", *steps))
    (outcome,) = sweep.result(timeout=300)

    assert outcome.status == "finished", outcome.result
    assert_resumed_like(config.tracking.uri, "preempted", reference, "straight", outcome.result)
    settled(job_id)
    attempts = sacct(job_id, "State", duplicates=True)
    assert [row[0] for row in attempts] == ["REQUEUED", "COMPLETED"]


def test_time_limit_checkpoints_requeues_and_resumes_into_the_same_run(tmp_path):
    # Longer than a one-minute job's first signal can come (SLURM checks time limits every 30 s).
    steps = ["train.steps=1800", "train.log_every=1", *QUIET]
    config = smoke(tmp_path, "timed", *steps)
    folder = tmp_path / "submitit"
    sweep = in_background([as_point(config)], None, folder, {**LEAN, "signal_delay_s": 5, "max_num_timeout": 6}, 1)

    reference = train_here(smoke(tmp_path, "straight", *steps))  # meanwhile, on the other CPU
    (outcome,) = sweep.result(timeout=480)

    assert outcome.status == "finished", outcome.result
    assert_resumed_like(config.tracking.uri, "timed", reference, "straight", outcome.result)
    job_id = training_job(folder)
    settled(job_id)
    states = [row[0] for row in sacct(job_id, "State", duplicates=True)]
    assert states[-1] == "COMPLETED" and set(states[:-1]) == {"REQUEUED"} and len(states) >= 2, states


def test_multi_gpu_run_is_one_task_per_gpu_with_rank_0_tracking_and_resumes_after_preemption(tmp_path):
    if max(node.gpus for partition in partitions().values() for node in partition.nodes) < 2:
        pytest.skip("needs a node with 2 GPUs (placeholders do: ATTAMBA_SLURM_GPUS=2 make slurm-up)")
    # Placeholder GPUs have no CUDA behind them: the two tasks train on CPU, DDP over gloo.
    config = smoke(tmp_path, "ddp", "train.steps=300", "train.log_every=1", "train.device=cpu", *QUIET)
    folder = tmp_path / "submitit"
    sweep = in_background([as_point(config)], None, folder, {**LEAN, "gpus_per_node": 2}, 60)

    job_id = wait_for(lambda: training_job(folder), 120, "the job to start training")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    (outcome,) = sweep.result(timeout=300)

    assert outcome.status == "finished", outcome.result
    (run,) = find_runs(config.tracking.uri, "ddp")  # rank 0 alone tracks, into one run across requeues
    assert run["status"] == "FINISHED"
    assert "preempted at step" in run["tags"]["attamba.failure_reason"]
    assert sorted(dict(metric_history(config.tracking.uri, run["run_id"], "train/loss"))) == list(range(1, 301))
    settled(job_id)
    assert [row[0] for row in sacct(job_id, "State", duplicates=True)] == ["REQUEUED", "COMPLETED"]
    steps = subprocess.run(["sacct", "--noheader", "--parsable2", f"--jobs={job_id}", "--format=JobID,NTasks"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert f"{job_id}.0|2" in steps  # srun started one task per GPU


def test_cancelled_job_is_reported_cancelled_and_its_run_closed(tmp_path):
    config = smoke(tmp_path, "cancelled", "train.steps=100000", "train.log_every=1", *QUIET)
    folder = tmp_path / "submitit"
    sweep = in_background([as_point(config)], None, folder, LEAN, 60)

    job_id = wait_for(lambda: training_job(folder), 120, "the job to start training")
    subprocess.run(["scancel", job_id], check=True)
    (outcome,) = sweep.result(timeout=60)  # reported, not waited on forever

    assert outcome.status == "cancelled"
    assert "CANCELLED" in str(outcome.result)
    (run,) = find_runs(config.tracking.uri, "cancelled")
    assert run["status"] == "KILLED"
    assert "CANCELLED" in run["tags"]["attamba.failure_reason"]


def bad_settings() -> list:
    return [
        pytest.param({"partition": "no-such-partition"}, 10, "hydra.launcher.slurm.partition", id="partition"),
        pytest.param({}, 60 * 24 * 400, "hydra.launcher.timeout_min", id="time-limit"),
        pytest.param({"mem_gb_per_task": 1e6}, 10, "hydra.launcher.slurm.mem_gb_per_task", id="memory"),
        pytest.param({"gpus_per_node": 64}, 10, "hydra.launcher.slurm.gpus_per_node", id="gpus"),
        pytest.param({"cpus_per_task": 4096}, 10, "hydra.launcher.slurm.cpus_per_task", id="cpus"),
        pytest.param({"signal_delay_s": 600}, 10, "hydra.launcher.slurm.signal_delay_s", id="signal-delay"),
        pytest.param({"gpu_count": 1}, 10, "hydra.launcher.slurm: unknown setting", id="unknown-key"),
    ]


@pytest.mark.parametrize("settings, timeout_min, setting", bad_settings())
def test_bad_input_is_refused_before_anything_is_submitted(tmp_path, settings, timeout_min, setting):
    folder = tmp_path / "submitit"
    with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
        run_points([as_point(smoke(tmp_path, "bad"))], None, folder, {**LEAN, **settings}, timeout_min)
    assert not folder.exists()  # not even a submission file was written


def test_gpus_on_a_node_without_them_fail_the_sweep_before_any_run_is_opened(tmp_path):
    if any(node.gpus for partition in partitions().values() for node in partition.nodes):
        pytest.skip("this cluster's nodes have GPUs")
    with pytest.raises(ValueError, match="gpus_per_node: 1 GPUs per node asked for.*at most 0"):
        preflight({"gpus_per_node": 1}, 10)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [str(REPO / ".venv/bin/attamba-train"), "-m", "experiment=smoke", "hydra/launcher=submitit_slurm",
               "chunking.size=2,4", f"tracking.uri={uri}", f"data.root={DATA_ROOT}",
               f"hydra.sweep.dir={tmp_path}/sweep", "hydra.launcher.slurm.gpus_per_node=1"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "hydra.launcher.slurm.gpus_per_node" in done.stderr
    assert find_runs(uri, "smoke") == []  # no parent run was opened, so none is left open
    assert not (tmp_path / "sweep/.submitit").exists()

