"""Crash, interruption and damaged state: kill -9, SIGTERM, SIGINT, a second process, damaged checkpoints, a
full disk and bad input, against real processes, real signals and real sqlite stores."""

from __future__ import annotations

import fcntl
import gzip
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attamba
from attamba import CONF_DIR, checkpoint
from attamba.tracking import find_runs
from attamba.train import resolve
from attamba.trainer import train

REPO = Path(__file__).resolve().parents[1]
# A transformer of the smoke shape: its steps take milliseconds on a CPU, so a run is mostly start-up.
FAST = ["experiment=smoke", "model=transformer", "train.batch_size=2", "train.seq_len=32", "eval.val_batches=1",
        "train.log_every=1", "train.eval_every=1000"]


def config_of(tmp_path: Path, *overrides: str):
    """The config ``attamba-train`` resolves from these overrides (so the same output directory)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return resolve(compose(config_name="config", overrides=[
            *FAST, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"train.checkpoint_root={tmp_path}/checkpoints",
            *overrides]))


def history(config, key: str = "train/loss") -> list[int]:
    """Every logged step of ``key`` in the one run of ``config``'s experiment, repeats included."""
    from mlflow.tracking import MlflowClient

    (run,) = find_runs(config.tracking.uri, config.tracking.experiment)
    return sorted(m.step for m in MlflowClient(config.tracking.uri).get_metric_history(run["run_id"], key))


def the_run(config) -> dict:
    runs = find_runs(config.tracking.uri, config.tracking.experiment)
    assert len(runs) == 1, [(run["run_id"], run["status"]) for run in runs]
    return runs[0]


def stop_at_call(n: int):
    """A ``stop_requested`` that raises KeyboardInterrupt (what Ctrl-C raises) before step ``n``."""
    calls = iter(range(10**6))

    def check() -> bool:
        if next(calls) == n:
            raise KeyboardInterrupt("Ctrl-C")
        return False
    return check


# --------------------------------------------------------------------------- in process


def test_each_step_is_logged_once_across_an_interruption_and_the_reason_goes(tmp_path):
    """Ctrl-C at step 5 ends the run KILLED with steps 1-5 sent; the resume from checkpoint 4 retrains step 5
    without logging it again, and the finished run no longer carries the interruption as its failure reason."""
    config = config_of(tmp_path, "train.steps=6", "train.checkpoint_every=4")
    with pytest.raises(KeyboardInterrupt):
        train(config, stop_requested=stop_at_call(5))
    assert the_run(config)["status"] == "KILLED"
    assert history(config) == [1, 2, 3, 4, 5]
    train(config)
    run = the_run(config)
    assert run["status"] == "FINISHED" and "attamba.failure_reason" not in run["tags"]
    assert history(config) == [1, 2, 3, 4, 5, 6]
    assert history(config, "model/params") == [0]


def test_a_run_stopped_before_its_first_checkpoint_continues_its_mlflow_run(tmp_path):
    config = config_of(tmp_path, "train.steps=3", "train.checkpoint_every=100")
    with pytest.raises(KeyboardInterrupt):
        train(config, stop_requested=stop_at_call(2))
    assert not (Path(config.train.output_dir) / "checkpoints").exists()
    train(config)
    assert the_run(config)["status"] == "FINISHED"  # one run, not a KILLED one beside a second
    assert history(config) == [1, 2, 3]


@pytest.fixture
def trained(tmp_path):
    """A finished 6-step run with checkpoints at steps 4 and 6 (2 was pruned)."""
    config = config_of(tmp_path, "train.steps=6", "train.checkpoint_every=2")
    train(config)
    steps = sorted(p.name for p in (Path(config.train.output_dir) / "checkpoints").glob("step_*"))
    assert steps == ["step_00000004", "step_00000006"]
    return config


DAMAGES = {
    "truncated": lambda state: state.write_bytes(state.read_bytes()[: state.stat().st_size // 2]),
    "random": lambda state: state.write_bytes(os.urandom(state.stat().st_size)),
    "empty": lambda state: state.write_bytes(b""),
    "deleted": lambda state: shutil.rmtree(state.parent),  # ``latest`` then names nothing
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_that_loads(trained, damage, capsys):
    config = trained
    capsys.readouterr()
    root = Path(config.train.output_dir) / "checkpoints"
    DAMAGES[damage](root / "step_00000006" / "state.pt")
    train(config)
    err = capsys.readouterr().err
    assert "step_00000006" in err and f"resuming from the newest checkpoint that loads: {root / 'step_00000004'}" in err
    run = the_run(config)  # the same MLflow run, not a second one from step 0
    assert run["status"] == "FINISHED"
    assert history(config) == [1, 2, 3, 4, 5, 6]
    assert checkpoint.load(root / "step_00000006")["step"] == 6
    assert (root / "step_00000004" / "state.pt").is_file()  # kept: only a newer, verified checkpoint prunes it


def test_no_checkpoint_that_loads_stops_before_anything_is_overwritten(trained):
    config = trained
    root = Path(config.train.output_dir) / "checkpoints"
    for name in ("step_00000004", "step_00000006"):
        (root / name / "state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"train.output_dir: no checkpoint in .* loads: step_00000006 .*step_00000004"):
        train(config)
    assert the_run(config)["status"] == "FINISHED"


def test_sigint_during_a_checkpoint_write_is_held_until_the_checkpoint_is_complete(tmp_path, monkeypatch):
    """A real SIGINT delivered from inside the file write of checkpoint 2: the checkpoint is completed, then the
    interrupt ends the run KILLED (raised inside ``torch.save`` it came out as a RuntimeError: FAILED)."""
    real_save = torch.save

    class InterruptingFile:
        def __init__(self, handle):
            self.handle, self.writes = handle, 0

        def flush(self):
            self.handle.flush()

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                signal.raise_signal(signal.SIGINT)
            return self.handle.write(data)

    def save_interrupted(state, handle, *args, **kwargs):
        monkeypatch.setattr(torch, "save", real_save)  # the first write only
        return real_save(state, InterruptingFile(handle), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_interrupted)
    config = config_of(tmp_path, "train.steps=4", "train.checkpoint_every=2")
    with pytest.raises(KeyboardInterrupt):
        train(config)
    run = the_run(config)
    assert run["status"] == "KILLED" and run["tags"]["attamba.failure_reason"].startswith("KeyboardInterrupt")
    root = Path(config.train.output_dir) / "checkpoints"
    assert checkpoint.load(root / "step_00000002")["step"] == 2
    assert not list(root.glob(".*partial"))
    train(config)
    assert the_run(config)["status"] == "FINISHED" and history(config) == [1, 2, 3, 4]


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (needs root, or CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to fill ({done.stderr.strip() or done.returncode})")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_names_the_setting_leaves_no_partial_files_and_the_rerun_succeeds(tmp_path, small_disk):
    from attamba.checkpoint import NoSpaceLeft

    config = config_of(tmp_path, "train.steps=4", "train.checkpoint_every=2", f"train.checkpoint_root={small_disk}")
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (15 * 2**20))  # a checkpoint of this model is ~5 MB
    with pytest.raises(NoSpaceLeft, match=rf"train.checkpoint_root: no space left on {small_disk}/\w+/checkpoints "
                                          "to write checkpoint step 2"):
        train(config)
    assert not [p for p in small_disk.rglob("*") if "partial" in p.name]
    run = the_run(config)
    assert run["status"] == "FAILED" and "no space left" in run["tags"]["attamba.failure_reason"]
    filler.unlink()
    train(config)
    assert the_run(config)["status"] == "FINISHED" and history(config) == [1, 2, 3, 4]


@pytest.mark.parametrize("override, message", [
    ("eval.val_batches=0", "eval.val_batches: must be an integer >= 1, got 0"),
    ("eval.val_batches=-1", "eval.val_batches: must be an integer >= 1, got -1"),
    ("eval.context=0", "eval.context: must be an integer >= 1, got 0"),
    ("eval.context=-5", "eval.context: must be an integer >= 1, got -5"),
])
def test_evaluation_settings_are_checked_with_the_rest(override, message):
    with pytest.raises(ValueError, match=message):
        attamba.load_config(["experiment=smoke", override])


def test_unreadable_shards_are_named(tmp_path):
    from attamba.data.jsonl import read_texts

    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"text": "fine"}\n' + bytes(range(128, 256)))
    with pytest.raises(ValueError, match=rf"data.paths: {binary} is not UTF-8 text"):
        list(read_texts(binary))
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=rf"data.paths: {corrupt} is not a readable gzip file"):
        list(read_texts(corrupt))
    cut = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress("".join(f'{{"text": "{os.urandom(8).hex()}"}}\n' for _ in range(1000)).encode())
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=rf"data.paths: {cut} is not a readable gzip file"):
        list(read_texts(cut))


def test_a_failed_sweep_job_is_reported_by_its_reason(tmp_path):
    import submitit

    from launchers.sweep import failure_reason

    executor = submitit.LocalExecutor(folder=tmp_path)
    executor.update_parameters(timeout_min=5)
    job = executor.submit(checkpoint.load, tmp_path / "nowhere")
    with pytest.raises(Exception) as failed:
        job.result()
    assert failure_reason(failed.value).startswith("FileNotFoundError: [Errno 2] No such file or directory")


# --------------------------------------------------------------------------- real processes


def command(tmp_path: Path, *overrides: str, program: list[str] | None = None) -> list[str]:
    return [*(program or [sys.executable, "-m", "attamba.train"]), *FAST, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"hydra.run.dir={tmp_path}/hydra", f"train.checkpoint_root={tmp_path}/checkpoints", *overrides]


def run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **env})


def test_kill_9_after_a_checkpoint_and_after_the_final_one_loses_and_doubles_nothing(tmp_path):
    """kill -9 right after checkpoint 3, then (resumed) right after the final checkpoint 6: the next run
    finishes the MLflow run left RUNNING, and every step is in it once."""
    overrides = ["train.steps=6", "train.checkpoint_every=3"]
    probe = [sys.executable, str(REPO / "tests" / "kill_probe.py")]
    for step in (3, 6):
        killed = run(command(tmp_path, *overrides, program=probe), ATTAMBA_KILL_AFTER_CHECKPOINT=str(step))
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    config = config_of(tmp_path, *overrides)
    assert the_run(config)["status"] == "RUNNING"
    assert history(config) == [1, 2, 3, 4, 5, 6]  # flushed before each checkpoint, none twice
    done = run(command(tmp_path, *overrides))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "left RUNNING" in done.stderr
    run_ = the_run(config)
    assert run_["status"] == "FINISHED" and "eval/val/loss" in run_["metrics"]
    assert history(config) == [1, 2, 3, 4, 5, 6] and history(config, "eval/val/loss") == [6]
    from mlflow.tracking import MlflowClient
    assert "final_metrics.json" in {a.path for a in MlflowClient(config.tracking.uri).list_artifacts(run_["run_id"])}


def blocked_run(args: list[str]) -> subprocess.Popen:
    """A run whose stdout is a one-page pipe that nobody reads: once its progress lines fill it, the run
    stops in the middle of training (holding its output directory) until the pipe is read. Returns once
    the first step is printed."""
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    fcntl.fcntl(process.stdout, 1031, 4096)  # F_SETPIPE_SZ
    line = b""
    while b"step " not in line:
        line = process.stdout.readline()
        assert line, process.stderr.read().decode()[-3000:]
    return process


def signal_args(tmp_path: Path) -> tuple[list[str], object]:
    overrides = ["train.steps=300", "train.checkpoint_every=20"]
    return command(tmp_path, *overrides), config_of(tmp_path, *overrides)


def test_sigterm_checkpoints_and_a_second_process_is_refused(tmp_path):
    """SIGTERM in the middle of training; before it, the same command is started while the run trains: it
    refuses. The next run resumes to the end; one MLflow run holds each step once."""
    args, config = signal_args(tmp_path)
    first = blocked_run(args)
    second = run(args)
    assert second.returncode == 2, second.stderr[-3000:]
    assert "is being trained by another process" in second.stderr.strip().splitlines()[-1]
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 143, err.decode()[-3000:]
    assert "stopped by SIGTERM at step" in err.decode() and "Traceback" not in err.decode()
    run_ = the_run(config)
    assert run_["status"] == "KILLED" and "SIGTERM" in run_["tags"]["attamba.failure_reason"]
    stopped_at = checkpoint.latest_step(Path(config.train.output_dir))
    assert 0 < stopped_at < 300 and history(config) == list(range(1, stopped_at + 1))

    last = run(args)
    assert last.returncode == 0, last.stderr[-3000:]
    run_ = the_run(config)
    assert run_["status"] == "FINISHED" and "attamba.failure_reason" not in run_["tags"]
    assert history(config) == list(range(1, 301))


@pytest.mark.slow  # test_each_step_is_logged_once_across_an_interruption_and_the_reason_goes covers it in process
def test_ctrl_c_in_the_middle_of_training_and_the_resume_log_each_step_once(tmp_path):
    args, config = signal_args(tmp_path)
    first = blocked_run(args)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 130, err.decode()[-3000:]
    assert err.decode().strip().splitlines()[-1].startswith("attamba-train: interrupted")
    assert the_run(config)["status"] == "KILLED"
    interrupted_at = history(config)[-1]
    assert history(config) == list(range(1, interrupted_at + 1)) and interrupted_at < 300
    last = run(args)
    assert last.returncode == 0, last.stderr[-3000:]
    run_ = the_run(config)
    assert run_["status"] == "FINISHED" and "attamba.failure_reason" not in run_["tags"]
    assert history(config) == list(range(1, 301))


@pytest.mark.parametrize("overrides, code, message", [
    (["eval.context=0"], 2, "attamba-train: error: eval.context: must be an integer >= 1, got 0"),
    (["model.dim=abc"], 2, "HYDRA_FULL_ERROR"),  # Hydra's own message; our exit status
    (["train.output_dir=/proc/attamba"], 2, "attamba-train: error: train.output_dir: /proc/attamba is not writable"),
    (["train.lr=1e6", "train.warmup=0", "optim.clip=0", "train.steps=4"], 1,
     "attamba-train: error: non-finite training loss"),
])
def test_one_exit_status_convention_and_one_line_per_error(tmp_path, overrides, code, message):
    done = run(command(tmp_path, *overrides))
    assert done.returncode == code, done.stderr[-3000:]
    assert message in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr


def test_a_sweep_whose_run_fails_exits_1_with_the_reason_and_no_traceback(tmp_path):
    """The exit status convention holds for sweeps too: a run that failed (here: diverged) is exit 1."""
    result = run([sys.executable, "-m", "attamba.train", "-m", *FAST, "train.steps=3", "train.lr=1e12",
                  "train.warmup=0", "optim.clip=0", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                  f"hydra.sweep.dir={tmp_path}/sweep", f"train.checkpoint_root={tmp_path}/checkpoints"])
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    assert "failed: TrainingDiverged: non-finite training loss at step" in output
