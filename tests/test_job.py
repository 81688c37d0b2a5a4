"""The submitit job callable, run in a process of its own as a job's would be."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A time limit's signal that comes once the run is over: right after training returns,
# and again while Python shuts down (where CI's SLURM job died of it, FAILED).
LATE_SIGNALS = textwrap.dedent("""
    import atexit, os, sys
    import attamba
    from launchers.job import TrainJob, preemption_signal

    config = attamba.load_config(["experiment=smoke", "train.steps=2", *sys.argv[1:]])
    result = TrainJob(config)()
    os.kill(os.getpid(), preemption_signal())
    atexit.register(os.kill, os.getpid(), preemption_signal())
    print("finished", "eval/val/loss" in result)
""")


def test_a_preemption_signal_after_the_run_finished_neither_kills_nor_requeues_the_job(tmp_path):
    overrides = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"train.output_dir={tmp_path}/run"]
    job = subprocess.run([sys.executable, "-c", LATE_SIGNALS, *overrides], cwd=REPO, capture_output=True,
                         text=True, timeout=300)

    assert job.returncode == 0, (job.returncode, job.stderr[-2000:])
    assert job.stdout.split()[-2:] == ["finished", "True"]
