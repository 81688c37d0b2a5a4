"""Run sweep points on a SLURM cluster: one job array through submitit's SLURM executor.

Before the first ``sbatch``, :func:`preflight` asks the cluster (``scontrol show
partition``, ``sinfo``) whether it can run the jobs at all: the partition exists and
is up, the time limit fits the partition's, and some node of it has the GPUs, CPUs
and memory asked for. SLURM itself would accept many such jobs and leave them
pending forever. A failed check is a ``ValueError`` naming the launcher setting.

Each run is one job of ``gpus_per_node`` tasks (one per GPU; one task on CPU), which
the trainer turns into DDP from the SLURM environment. Preempted or timed-out runs
are requeued by :class:`launchers.job.TrainJob` and resume from their checkpoints.
Jobs that end without a result (cancelled, killed at the time limit, node failure)
are reported with SLURM's state, read through ``sacct``, and their MLflow runs are
closed with that state as the reason.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import submitit

from launchers.job import TrainJob, close_run
from launchers.local import Outcome
from launchers.sweep import SweepPoint, failure_reason, require_int

# Unset CPU and memory requests are sized from the partition's largest node (see ``sized``), up to these.
MAX_CPUS_PER_TASK = 8  # data loading and host work; more only waits on the GPU
MAX_MEM_GB_PER_TASK = 32.0
POLL_SECONDS = 1.0  # how often result files are looked for
STATUS_SECONDS = 5.0  # how often sacct is asked for job states
QUERY_TIMEOUT_S = 30
QUEUED_STATES = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED")
RUNNING_STATES = ("RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "PREEMPTED")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SlurmSettings:
    """The ``slurm:`` mapping of ``conf/hydra/launcher/submitit_slurm.yaml``, validated."""

    partition: str | None = None  # None: the cluster's default partition
    gpus_per_node: int = 0
    cpus_per_task: int | None = None  # None: sized from the partition (``sized``)
    mem_gb_per_task: float | None = None  # None: sized from the partition
    array_parallelism: int = 64
    signal_delay_s: int = 120
    max_num_timeout: int = 20
    additional_parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, minimum in (("gpus_per_node", 0), ("cpus_per_task", 1), ("array_parallelism", 1),
                              ("signal_delay_s", 1), ("max_num_timeout", 0)):
            if name != "cpus_per_task" or self.cpus_per_task is not None:
                require_int(f"hydra.launcher.slurm.{name}", getattr(self, name), minimum)
        memory = self.mem_gb_per_task
        if memory is not None and (not isinstance(memory, (int, float)) or isinstance(memory, bool) or memory <= 0):
            raise ValueError(f"hydra.launcher.slurm.mem_gb_per_task: must be a number > 0, "
                             f"got {self.mem_gb_per_task!r}")
        if self.partition is not None and not re.fullmatch(r"[\w.-]+", str(self.partition)):
            raise ValueError(f"hydra.launcher.slurm.partition: not a partition name: {self.partition!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> SlurmSettings:
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(mapping or {}) - set(allowed))
        if unknown:
            raise ValueError(f"hydra.launcher.slurm: unknown setting(s) {', '.join(unknown)}; "
                             f"allowed settings are {', '.join(allowed)}")
        return cls(**dict(mapping or {}))

    @property
    def tasks_per_node(self) -> int:
        """One task per GPU (DDP), one task for a CPU run."""
        return max(1, self.gpus_per_node)

    @property
    def mem_mb_per_node(self) -> int:
        return int(self.mem_gb_per_task * 1024) * self.tasks_per_node


# --------------------------------------------------------------------------- what the cluster offers


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    memory_mb: int
    gpus: int


@dataclass(frozen=True)
class Partition:
    name: str
    state: str
    default: bool
    max_time_min: float | None  # None: no limit
    max_mem_per_node_mb: int | None  # None: no limit
    nodes: tuple[Node, ...]


def _query(*command: str) -> str:
    """Run a SLURM client command; a missing or unreachable cluster is a ``ValueError``."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except FileNotFoundError:
        raise ValueError(f"hydra.launcher.cluster: 'slurm', but {command[0]} is not installed on this "
                         "machine; submit from a SLURM login node, or start one with `make slurm-up`") from None
    except subprocess.TimeoutExpired:
        raise ValueError(f"hydra.launcher.cluster: 'slurm', but `{' '.join(command)}` got no answer "
                         f"within {QUERY_TIMEOUT_S}s") from None
    if result.returncode != 0:
        raise ValueError(f"hydra.launcher.cluster: 'slurm', but `{' '.join(command)}` failed: "
                         f"{result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def parse_time_min(text: str) -> float | None:
    """Minutes of a SLURM time (``UNLIMITED``, ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``)."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return int(days) * 1440 + hours * 60 + minutes + seconds / 60
    if len(parts) == 3:
        return parts[0] * 60 + parts[1] + parts[2] / 60
    if len(parts) == 2:
        return parts[0] + parts[1] / 60
    return float(parts[0])


def parse_gpus(gres: str) -> int:
    """GPUs in a node's GRES string, e.g. ``gpu:8``, ``gpu:h200:4(S:0-1),shard:8`` or ``(null)``."""
    return sum(int(count) for count in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def _nodes(partition: str) -> tuple[Node, ...]:
    out = _query("sinfo", "--noheader", "--Node", f"--partition={partition}", "--format=%N|%c|%m|%G")
    nodes = {}
    for line in out.splitlines():
        name, cpus, memory, gres = line.strip().split("|")
        nodes[name] = Node(name, int(cpus), int(memory), parse_gpus(gres))
    return tuple(nodes.values())


def partitions() -> dict[str, Partition]:
    """Every partition of the cluster, with its limits and nodes."""
    found = {}
    for line in _query("scontrol", "show", "partition", "--oneliner").splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "PartitionName" not in fields:
            continue
        name = fields["PartitionName"]
        max_mem = fields.get("MaxMemPerNode", "UNLIMITED")
        found[name] = Partition(
            name=name, state=fields.get("State", "UNKNOWN"), default=fields.get("Default") == "YES",
            max_time_min=parse_time_min(fields.get("MaxTime", "UNLIMITED")),
            max_mem_per_node_mb=None if max_mem == "UNLIMITED" else int(max_mem),
            nodes=_nodes(name))
    return found


# --------------------------------------------------------------------------- preflight


def sized(settings: SlurmSettings, partition: Partition) -> SlurmSettings:
    """``settings`` with an unset ``cpus_per_task`` or ``mem_gb_per_task`` sized from the partition.

    From its largest node with the GPUs asked for: its CPUs shared among the tasks (at most
    ``MAX_CPUS_PER_TASK`` each), and memory in proportion to the CPUs taken (at most
    ``MAX_MEM_GB_PER_TASK``, and within the partition's per-node limit). So a default sweep runs on
    the two-CPU node of ``make slurm-up`` as on a GPU cluster; settings given are kept as they are.
    """
    if settings.cpus_per_task is not None and settings.mem_gb_per_task is not None:
        return settings
    if not partition.nodes:
        raise ValueError(f"hydra.launcher.slurm.partition: partition {partition.name!r} has no nodes")
    tasks = settings.tasks_per_node
    nodes = [n for n in partition.nodes if n.gpus >= settings.gpus_per_node] or list(partition.nodes)
    node = max(nodes, key=lambda n: (n.cpus, n.memory_mb))
    cpus = settings.cpus_per_task or max(1, min(MAX_CPUS_PER_TASK, node.cpus // tasks))
    node_memory_mb = min(node.memory_mb, partition.max_mem_per_node_mb or node.memory_mb)
    share_mb = node_memory_mb * min(1.0, cpus * tasks / node.cpus) / tasks
    memory = settings.mem_gb_per_task or max(1, int(min(share_mb, MAX_MEM_GB_PER_TASK * 1024))) / 1024
    return dataclasses.replace(settings, cpus_per_task=cpus, mem_gb_per_task=memory)


def _pick_partition(settings: SlurmSettings, available: dict[str, Partition]) -> Partition:
    names = ", ".join(sorted(available)) or "none"
    if settings.partition is None:
        defaults = [p for p in available.values() if p.default]
        if not defaults:
            raise ValueError(f"hydra.launcher.slurm.partition: the cluster has no default partition; "
                             f"choose one of {names}")
        return defaults[0]
    if settings.partition not in available:
        raise ValueError(f"hydra.launcher.slurm.partition: no partition {settings.partition!r} on this "
                         f"cluster; partitions are {names}")
    return available[settings.partition]


def _check_limits(settings: SlurmSettings, timeout_min: int, partition: Partition) -> None:
    """Each request against the most the partition's nodes offer, naming the setting that cannot be met."""
    name = partition.name
    if partition.state != "UP":
        raise ValueError(f"hydra.launcher.slurm.partition: partition {name!r} is {partition.state}, not UP")
    if partition.max_time_min is not None and timeout_min > partition.max_time_min:
        raise ValueError(f"hydra.launcher.timeout_min: {timeout_min} min is more than partition {name!r} "
                         f"allows ({partition.max_time_min:g} min)")
    if settings.signal_delay_s >= timeout_min * 60:
        raise ValueError(f"hydra.launcher.slurm.signal_delay_s: {settings.signal_delay_s} s must be shorter "
                         f"than the time limit (hydra.launcher.timeout_min={timeout_min} min)")
    nodes = partition.nodes
    most_gpus = max((n.gpus for n in nodes), default=0)
    if settings.gpus_per_node > most_gpus:
        raise ValueError(f"hydra.launcher.slurm.gpus_per_node: {settings.gpus_per_node} GPUs per node asked for, "
                         f"but the nodes of partition {name!r} have at most {most_gpus}")
    cpus = settings.cpus_per_task * settings.tasks_per_node
    most_cpus = max((n.cpus for n in nodes), default=0)
    if cpus > most_cpus:
        raise ValueError(f"hydra.launcher.slurm.cpus_per_task: {settings.cpus_per_task} CPUs × "
                         f"{settings.tasks_per_node} tasks is more than the {most_cpus} CPUs of any node "
                         f"of partition {name!r}")
    memory = settings.mem_mb_per_node
    most_memory = max((n.memory_mb for n in nodes), default=0)
    if partition.max_mem_per_node_mb is not None:
        most_memory = min(most_memory, partition.max_mem_per_node_mb)
    if memory > most_memory:
        raise ValueError(f"hydra.launcher.slurm.mem_gb_per_task: {settings.mem_gb_per_task:g} GB × "
                         f"{settings.tasks_per_node} tasks is more than partition {name!r} gives a node "
                         f"({most_memory / 1024:.1f} GB)")
    if not any(n.gpus >= settings.gpus_per_node and n.cpus >= cpus and n.memory_mb >= memory for n in nodes):
        raise ValueError(f"hydra.launcher.slurm: no single node of partition {name!r} has {settings.gpus_per_node} "
                         f"GPUs, {cpus} CPUs and {memory / 1024:.1f} GB at once")


def preflight(slurm: Mapping[str, Any] | SlurmSettings | None, timeout_min: int) -> tuple[SlurmSettings, str]:
    """Validate the settings against the cluster; return them, unset requests sized (``sized``), and the
    partition jobs go to.

    Raises ``ValueError`` naming the offending setting; submits nothing.
    """
    settings = slurm if isinstance(slurm, SlurmSettings) else SlurmSettings.from_mapping(slurm)
    require_int("hydra.launcher.timeout_min", timeout_min, 1)
    partition = _pick_partition(settings, partitions())
    settings = sized(settings, partition)
    _check_limits(settings, timeout_min, partition)
    return settings, partition.name


# --------------------------------------------------------------------------- submission


def make_executor(folder: Path, settings: SlurmSettings, partition: str, timeout_min: int) -> submitit.SlurmExecutor:
    """submitit's SLURM executor (never the auto-detecting one) with our sbatch parameters."""
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=settings.max_num_timeout)
    parameters: dict[str, Any] = {
        "job_name": "attamba", "partition": partition, "time": timeout_min, "nodes": 1,
        "ntasks_per_node": settings.tasks_per_node, "cpus_per_task": settings.cpus_per_task,
        "mem": f"{settings.mem_mb_per_node}M", "signal_delay_s": settings.signal_delay_s,
        "array_parallelism": settings.array_parallelism,
    }
    if settings.gpus_per_node:
        parameters["gpus_per_node"] = settings.gpus_per_node
    if settings.additional_parameters:
        parameters["additional_parameters"] = dict(settings.additional_parameters)
    executor.update_parameters(**parameters)
    return executor


def submit(executor: submitit.SlurmExecutor, points: Sequence[SweepPoint], parent_run_id: str | None,
           threads: int) -> list[submitit.SlurmJob]:
    """All points as one job array (a single point as one job)."""
    with executor.batch():
        jobs = [executor.submit(TrainJob(point.config, parent_run_id, threads)) for point in points]
    return jobs


# --------------------------------------------------------------------------- monitoring


@dataclass
class SlurmProgress:
    """One status line: queued, running, finished, failed, cancelled, skipped, with an ETA."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("queued", "running", "finished", "failed", "cancelled", "skipped"), 0))
    started: float = field(default_factory=time.monotonic)
    last_line: str = ""

    def eta(self) -> str:
        """Time left at the rate runs have ended so far (queueing included, as on a shared cluster)."""
        c = self.counts
        ended = c["finished"] + c["failed"] + c["cancelled"]
        if not ended:
            return "?"
        return f"{(time.monotonic() - self.started) / ended * (c['queued'] + c['running']) / 60:.1f} min"

    def show(self, force: bool = False) -> None:
        c = self.counts
        line = (f"[sweep] {c['queued']} queued | {c['running']} running | {c['finished']} finished | "
                f"{c['failed']} failed | {c['cancelled']} cancelled | {c['skipped']} skipped (already done) "
                f"| ETA {self.eta()}")
        if force or line != self.last_line:
            print(line, file=sys.stderr, flush=True)
            self.last_line = line


def job_state(job: submitit.SlurmJob) -> str:
    """SLURM's state of ``job`` as last read from sacct (``CANCELLED by 0`` → ``CANCELLED``)."""
    return job.watcher.get_state(job.job_id, mode="cache").split()[0].upper()


def collect(job: submitit.SlurmJob, point: SweepPoint, parent_run_id: str | None) -> Outcome | None:
    """The outcome of a job that is over, or None while it is not."""
    lead = job.task(0)  # rank 0 trains, evaluates and tracks; its result is the run's
    state = job_state(job)
    if lead.paths.result_pickle.exists() or state == "COMPLETED":
        try:
            return Outcome(point, "finished", lead.result())  # waits a little for a result file in flight
        except Exception as error:  # noqa: BLE001 - a failed run is reported, the sweep goes on
            close_run(point, parent_run_id, "FAILED", f"SLURM job {job.job_id} failed")
            return Outcome(point, "failed", error)
    if state in QUEUED_STATES or state in RUNNING_STATES or state == "UNKNOWN":
        return None
    status = "cancelled" if state == "CANCELLED" else "failed"
    reason = f"SLURM job {job.job_id} ended {state} without a result (log: {lead.paths.stderr})"
    close_run(point, parent_run_id, "KILLED" if status == "cancelled" else "FAILED", reason)
    return Outcome(point, status, RuntimeError(reason))


def run_points(points: Sequence[SweepPoint], parent_run_id: str | None, folder: Path, slurm: Mapping[str, Any],
               timeout_min: int, skip: frozenset[str] = frozenset()) -> list[Outcome]:
    """Run ``points`` as one SLURM job array and wait for every outcome (those whose config hash
    is in ``skip`` finished earlier and are not run again)."""
    settings, partition = preflight(slurm, timeout_min)
    progress = SlurmProgress()
    outcomes = [Outcome(point, "skipped") for point in points if point.config_hash in skip]
    progress.counts["skipped"] = len(outcomes)
    todo = [point for point in points if point.config_hash not in skip]
    jobs = {}
    if todo:
        executor = make_executor(folder, settings, partition, timeout_min)
        jobs = dict(zip(submit(executor, todo, parent_run_id, settings.cpus_per_task), todo))
        print(f"[sweep] submitted {len(todo)} run(s) to partition {partition!r} as SLURM job "
              f"{next(iter(jobs)).job_id.split('_')[0]} ({settings.tasks_per_node} task(s) of "
              f"{settings.cpus_per_task} CPU(s) and {settings.mem_gb_per_task:.3g} GB); logs in {folder}",
              file=sys.stderr, flush=True)
    progress.counts["queued"] = len(jobs)
    progress.show(force=True)
    last_status = float("-inf")
    while jobs:
        if time.monotonic() - last_status >= STATUS_SECONDS:
            submitit.SlurmJob.watcher.update()  # one sacct call for every job of the sweep
            last_status = time.monotonic()
        for job, point in list(jobs.items()):
            outcome = collect(job, point, parent_run_id)
            if outcome is None:
                continue
            del jobs[job]
            outcome.seconds = time.monotonic() - progress.started  # since submission: queueing included
            outcomes.append(outcome)
            progress.counts[outcome.status] += 1
            if outcome.status != "finished":
                print(f"[sweep] {point.name} {outcome.status}: {failure_reason(outcome.result)}",
                      file=sys.stderr, flush=True)
        states = [job_state(job) for job in jobs]
        progress.counts["running"] = sum(state in RUNNING_STATES for state in states)
        progress.counts["queued"] = len(states) - progress.counts["running"]
        progress.show()
        if jobs:
            time.sleep(POLL_SECONDS)
    return sorted(outcomes, key=lambda outcome: outcome.point.index)
