"""attamba.tracking against real MLflow stores: a sqlite file and a live ``mlflow server``.

Each check reads back through a plain ``MlflowClient`` (or the server's HTTP
traffic), never through the tracker under test. The store and the server are
shared per module (creating either takes seconds); every test logs into its
own experiment. Outage tests kill the server (SIGKILL) and start it again on the
same port and store, fill a small tmpfs under a sqlite store, and move the
tracker's clock by hand, so that no outcome depends on how fast the machine is.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import mlflow.utils.rest_utils
import pytest
import yaml
from mlflow.tracking import MlflowClient

from attamba import checkpoint
from attamba.config import Config, TrackingConfig, flat_params, to_dict
from attamba.tracking import (
    TAG_CONFIG_HASH,
    TAG_FAILURE_REASON,
    TAG_FAMILY,
    TAG_GIT_COMMIT,
    TAG_PARENT_RUN,
    TAG_SWEEP,
    TAG_SWEEP_KEY,
    RETRY_MAX_S,
    SPILL_FILE,
    UNLOGGED_PARAMS,
    RunTracker,
    TrackingUnavailable,
    check_tracking_uri,
    config_hash,
    ensure_store,
    find_runs,
    git_commit,
    metric_history,
    run_tags,
    start_parent_run,
)
from attamba.trainer import train
from mlflow_server import RestartableServer, free_port, start_mlflow_server, stop_mlflow_server
from test_trainer import smoke_config

PARALLEL_JOBS = 8
VALUES_PER_JOB = 100


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    ensure_store(uri)
    return uri


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableServer]:
    server = RestartableServer(tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


@pytest.fixture
def server_uri(server: RestartableServer) -> str:
    return server.url


@pytest.fixture
def killable_server(server: RestartableServer) -> Iterator[RestartableServer]:
    """The module's server, for a test that kills it; running again afterwards, whatever the test did."""
    yield server
    server.restart()


@pytest.fixture(params=["sqlite", "server"])
def store_uri(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_uri")


@pytest.fixture
def experiment() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def git_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    git = ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "first"], check=True)
    return repo


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def _runs(uri: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


# --------------------------------------------------------------------------- identity


def test_git_commit_reads_head_of_the_given_repository(git_repo: Path, tmp_path: Path):
    head = (git_repo / ".git" / "HEAD").read_text().split()[1]  # "ref: refs/heads/main"
    assert git_commit(git_repo) == (git_repo / ".git" / head).read_text().strip()
    assert git_commit(tmp_path) is None


def test_config_hash_is_stable_and_ignores_only_where_and_how_a_run_executes():
    flat = flat_params(Config())
    digest = config_hash(flat)
    assert re.fullmatch(r"[0-9a-f]{12}", digest)
    assert config_hash(dict(reversed(list(flat.items())))) == digest
    relocated = {**flat, "tracking.uri": "http://127.0.0.1:1", "tracking.experiment": "other",
                 "tracking.run_name": "renamed", "tracking.sweep": "s", "train.output_dir": "/elsewhere",
                 "train.device": "cuda", "data.root": "/data", "train.compile": "true",
                 "train.compile_mode": "reduce-overhead", "train.compile_cache": "/cache"}
    assert config_hash(relocated) == digest
    for key, value in [("model.dim", 256), ("chunking.size", 16), ("train.seed", 1)]:
        assert config_hash({**flat, key: value}) != digest, key
    # Pinned: a hash that changed between versions would make sweeps re-run finished work.
    expected = hashlib.sha256(b'[["model.dim",512]]').hexdigest()[:12]
    assert config_hash({"model.dim": 512, "tracking.uri": "x"}) == expected


def test_run_tags_name_commit_hash_family_and_sweep(git_repo: Path):
    flat = flat_params(Config())
    assert run_tags(flat, git_repo) == {TAG_CONFIG_HASH: config_hash(flat), TAG_FAMILY: "attamba",
                                        TAG_GIT_COMMIT: git_commit(git_repo)}
    swept = run_tags({**flat, "tracking.sweep": "iso-kv", "model.family": "transformer"}, git_repo)
    assert swept[TAG_SWEEP] == "iso-kv" and swept[TAG_FAMILY] == "transformer"


# --------------------------------------------------------------------------- round trip


def test_round_trip(store_uri: str, experiment: str, git_repo: Path, tmp_path: Path):
    config = Config()
    flat = flat_params(config)
    tags = run_tags(flat, git_repo)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": {"type": "BPE"}}')
    losses = [(step, 10.0 - step / 4) for step in range(20)]
    with RunTracker(store_uri, experiment, run_name="round-trip", tags=tags, flush_every=7) as tracker:
        tracker.log_params(flat)
        tracker.log_metrics({"model/params": 1234, "model/kv_bytes_per_token": 64.0,
                             "model/attn_flops_per_token": 1.5e6}, step=0)
        for step, loss in losses:
            tracker.log_metrics({"train/loss": loss, "train/lr": step * 1e-4}, step)
        tracker.log_dict(to_dict(config), "config.yaml")
        tracker.log_artifact(tokenizer)
        tracker.log_dict({"eval/val/loss": 2.5}, "metrics.json")

    client = MlflowClient(tracking_uri=store_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "round-trip"
    assert run.data.params == {key: str(value) for key, value in flat.items() if key not in UNLOGGED_PARAMS}
    assert {key: run.data.tags.get(key) for key in tags} == tags
    assert {key: run.data.metrics[key] for key in ("model/params", "model/kv_bytes_per_token",
                                                   "model/attn_flops_per_token")} == {
        "model/params": 1234, "model/kv_bytes_per_token": 64.0, "model/attn_flops_per_token": 1.5e6}
    assert _history(store_uri, tracker.run_id, "train/loss") == losses
    assert metric_history(store_uri, tracker.run_id, "train/lr") == _history(store_uri, tracker.run_id, "train/lr")
    assert {artifact.path for artifact in client.list_artifacts(tracker.run_id)} == {
        "config.yaml", "tokenizer.json", "metrics.json"}
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    assert yaml.safe_load(Path(client.download_artifacts(tracker.run_id, "config.yaml", str(downloads)))
                          .read_text()) == to_dict(config)
    assert Path(client.download_artifacts(tracker.run_id, "tokenizer.json", str(downloads))).read_text() == \
        tokenizer.read_text()


def test_sqlite_artifacts_live_next_to_the_database(sqlite_uri: str, experiment: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    with RunTracker(sqlite_uri, experiment) as tracker:
        tracker.log_dict({"a": 1}, "metrics.json")
    database = Path(sqlite_uri.removeprefix("sqlite:///"))
    assert (database.parent / "mlartifacts" / tracker.run_id / "artifacts" / "metrics.json").is_file()
    assert list(tmp_path.iterdir()) == []  # no ./mlruns, no ./mlflow.db


def test_long_param_values_are_truncated_to_mlflows_limit(sqlite_uri: str, experiment: str):
    with RunTracker(sqlite_uri, experiment) as tracker:
        tracker.log_params({"data.paths": "x" * 7000})
    stored = MlflowClient(tracking_uri=sqlite_uri).get_run(tracker.run_id).data.params["data.paths"]
    assert len(stored) == 6000 and stored.endswith("...")


# --------------------------------------------------------------------------- batching


def test_metrics_wait_in_the_buffer_until_flush(sqlite_uri: str, experiment: str):
    with RunTracker(sqlite_uri, experiment, flush_every=1000, flush_seconds=3600) as tracker:
        tracker.log_metrics({"train/loss": 1.0}, step=0)
        assert _history(sqlite_uri, tracker.run_id, "train/loss") == []
        tracker.flush()
        assert _history(sqlite_uri, tracker.run_id, "train/loss") == [(0, 1.0)]
    with RunTracker(sqlite_uri, experiment, flush_every=1000, flush_seconds=0) as eager:
        eager.log_metrics({"train/loss": 2.0}, step=3)
        assert _history(sqlite_uri, eager.run_id, "train/loss") == [(3, 2.0)]


def test_server_sees_batches_not_one_request_per_value(server_uri: str, experiment: str,
                                                       monkeypatch: pytest.MonkeyPatch):
    requests: list[str] = []
    real_request = mlflow.utils.rest_utils.http_request

    def counting_request(host_creds, endpoint, method, *args, **kwargs):
        requests.append(endpoint)
        return real_request(host_creds, endpoint, method, *args, **kwargs)

    monkeypatch.setattr(mlflow.utils.rest_utils, "http_request", counting_request)
    with RunTracker(server_uri, experiment, flush_every=200) as tracker:
        start = len(requests)
        for step in range(250):  # 500 values: batches of 200, 200 and 100 at the end
            tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": step * 1e-3}, step)
        tracker.flush()
        assert [endpoint.rsplit("/", 1)[-1] for endpoint in requests[start:]] == ["log-batch"] * 3
        start = len(requests)
        tracker.flush_every = 10_000
        for step in range(250, 1500):  # 2500 values in one flush: MLflow takes <= 1000 a call
            tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": step * 1e-3}, step)
        tracker.flush()
        assert len(requests) - start == 3
        start = len(requests)
        tracker.log_params({f"p{i}": i for i in range(250)})  # <= 100 params a call
        assert [endpoint.rsplit("/", 1)[-1] for endpoint in requests[start:]] == ["get"] + ["log-batch"] * 3
    assert _history(server_uri, tracker.run_id, "train/loss") == [(step, 1.0 / (step + 1)) for step in range(1500)]


# --------------------------------------------------------------------------- lifecycle


def test_resume_continues_the_same_run(sqlite_uri: str, experiment: str):
    flat = flat_params(Config())
    first = RunTracker(sqlite_uri, experiment, run_name="resumable")
    first.log_params(flat)
    for step in range(5):
        first.log_metrics({"train/loss": float(step)}, step)
    first.finish("KILLED")  # preempted

    with RunTracker(sqlite_uri, experiment, run_id=first.run_id) as second:
        assert MlflowClient(tracking_uri=sqlite_uri).get_run(first.run_id).info.status == "RUNNING"
        second.log_params(flat)  # the same config again: nothing to log, no error
        second.log_params({**flat, "tracking.unavailable_timeout_s": 900.0})  # not a param: a rerun may change it
        with pytest.raises(ValueError, match=r"^train\.steps: .*already logged"):
            second.log_params({**flat, "train.steps": 2000})
        for step in range(5, 10):
            second.log_metrics({"train/loss": float(step)}, step)

    runs = _runs(sqlite_uri, experiment)
    assert [run.info.run_id for run in runs] == [first.run_id]
    assert runs[0].info.status == "FINISHED"
    assert _history(sqlite_uri, first.run_id, "train/loss") == [(step, float(step)) for step in range(10)]


def test_resuming_an_unknown_run_is_an_error(sqlite_uri: str, experiment: str):
    with pytest.raises(ValueError, match="^run_id: no run"):
        RunTracker(sqlite_uri, experiment, run_id=uuid.uuid4().hex)


@pytest.mark.parametrize("error, status", [(RuntimeError("loss is nan"), "FAILED"),
                                           (KeyboardInterrupt(), "KILLED")])
def test_escaping_exception_ends_the_run_with_its_reason(sqlite_uri: str, experiment: str,
                                                         error: BaseException, status: str):
    with pytest.raises(type(error)):
        with RunTracker(sqlite_uri, experiment, flush_every=1000) as tracker:
            tracker.log_metrics({"train/loss": math.nan}, step=0)
            raise error
    run = MlflowClient(tracking_uri=sqlite_uri).get_run(tracker.run_id)
    assert run.info.status == status
    assert run.data.tags[TAG_FAILURE_REASON] == f"{type(error).__name__}: {error}"
    assert len(_history(sqlite_uri, tracker.run_id, "train/loss")) == 1  # the buffer was flushed


def test_finish_rejects_unknown_status(sqlite_uri: str, experiment: str):
    tracker = RunTracker(sqlite_uri, experiment)
    with pytest.raises(ValueError, match="^status: got 'DONE', allowed values are FINISHED, FAILED, KILLED"):
        tracker.finish("DONE")
    tracker.finish()


def test_deleted_experiment_is_named(sqlite_uri: str, experiment: str):
    client = MlflowClient(tracking_uri=sqlite_uri)
    client.delete_experiment(client.create_experiment(experiment))
    with pytest.raises(ValueError, match=f"^tracking\\.experiment: experiment '{experiment}' is deleted"):
        RunTracker(sqlite_uri, experiment)


def test_stray_mlflow_run_id_is_ignored(sqlite_uri: str, experiment: str, monkeypatch: pytest.MonkeyPatch):
    with RunTracker(sqlite_uri, experiment, run_name="bystander") as bystander:
        pass
    monkeypatch.setenv("MLFLOW_RUN_ID", bystander.run_id)
    with RunTracker(sqlite_uri, experiment, run_name="mine") as tracker:
        tracker.log_metrics({"train/loss": 1.0}, step=0)
    assert tracker.run_id != bystander.run_id
    assert MlflowClient(tracking_uri=sqlite_uri).get_run(bystander.run_id).data.metrics == {}


# --------------------------------------------------------------------------- sweeps


def test_parent_run_is_reused_per_sweep_and_key(sqlite_uri: str, experiment: str):
    parent = start_parent_run(sqlite_uri, experiment, "iso-kv", tags={TAG_SWEEP_KEY: "k1"})
    assert start_parent_run(sqlite_uri, experiment, "iso-kv", tags={TAG_SWEEP_KEY: "k1"}) == parent
    other_key = start_parent_run(sqlite_uri, experiment, "iso-kv", tags={TAG_SWEEP_KEY: "k2"})
    assert other_key != parent

    with RunTracker(sqlite_uri, experiment, parent_run_id=parent, tags={TAG_SWEEP: "iso-kv"}) as child:
        pass
    assert MlflowClient(tracking_uri=sqlite_uri).get_run(child.run_id).data.tags[TAG_PARENT_RUN] == parent
    assert start_parent_run(sqlite_uri, experiment, "iso-kv", tags={TAG_SWEEP_KEY: "k1"}) == parent

    # An interrupted sweep, run again, goes on under the same parent: one sweep, not two.
    RunTracker(sqlite_uri, experiment, run_id=parent).finish("KILLED", reason="the sweep was interrupted")
    assert start_parent_run(sqlite_uri, experiment, "iso-kv", tags={TAG_SWEEP_KEY: "k1"}) == parent
    reopened = MlflowClient(tracking_uri=sqlite_uri).get_run(parent)
    assert reopened.info.status == "RUNNING" and TAG_FAILURE_REASON not in reopened.data.tags
    assert reopened.data.tags["attamba.sweep_attempts"] == "4"
    assert len(_runs(sqlite_uri, experiment)) == 3  # two parents and one child


def test_find_runs_returns_plain_records(sqlite_uri: str, experiment: str):
    assert find_runs(sqlite_uri, experiment, "") == []  # no experiment yet
    for digest in ("aaa", "bbb"):
        with RunTracker(sqlite_uri, experiment, tags={TAG_CONFIG_HASH: digest}) as tracker:
            tracker.log_params({"model.dim": 64})
            tracker.log_metrics({"eval/val/loss": 3.0}, step=10)
    [found] = find_runs(sqlite_uri, experiment, f"tags.`{TAG_CONFIG_HASH}` = 'bbb'")
    assert found["run_id"] == tracker.run_id and found["status"] == "FINISHED"
    assert found["params"] == {"model.dim": "64"} and found["metrics"] == {"eval/val/loss": 3.0}
    assert found["tags"][TAG_CONFIG_HASH] == "bbb"


# --------------------------------------------------------------------------- bad stores


def _tree(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def test_unreachable_server_stops_and_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match=r"^tracking\.uri: no MLflow server answers"):
        RunTracker(uri, "attamba")
    assert _tree(tmp_path) == []


def test_a_server_that_never_answers_is_given_up_after_the_health_timeout(monkeypatch: pytest.MonkeyPatch):
    """A port that accepts connections and never replies: without the health check's timeout the
    check would wait out MLflow's minutes of retries (and the test its own timeout)."""
    import socket

    import attamba.tracking

    monkeypatch.setattr(attamba.tracking, "HEALTH_TIMEOUT_S", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(ValueError, match=r"^tracking\.uri: no MLflow server answers .*timed out"):
            attamba.tracking.check_tracking_uri(f"http://127.0.0.1:{silent.getsockname()[1]}")


def test_unusable_sqlite_location_stops_and_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's directory should be")
    for uri in (f"sqlite:///{blocker}/mlflow.db", f"sqlite:///{blocker}/runs/mlflow.db"):
        with pytest.raises(ValueError, match=r"^tracking\.uri: .*not-a-directory"):
            RunTracker(uri, "attamba")
    assert _tree(tmp_path) == [blocker]


@pytest.mark.parametrize("uri, message", [
    ("postgresql://localhost/mlflow", "unsupported scheme 'postgresql', allowed schemes are sqlite, file, http"),
    ("sqlite://", "a sqlite store needs a database file"),
    ("sqlite:///:memory:", "a sqlite store needs a database file"),
])
def test_unsupported_uris_are_named(uri: str, message: str):
    with pytest.raises(ValueError, match=f"^tracking\\.uri: {re.escape(message)}"):
        check_tracking_uri(uri)


def test_checking_a_uri_changes_nothing(sqlite_uri: str, tmp_path: Path):
    database = Path(sqlite_uri.removeprefix("sqlite:///"))
    before = database.read_bytes()
    check_tracking_uri(sqlite_uri)
    check_tracking_uri(f"sqlite:///{tmp_path}/new/mlflow.db")
    assert database.read_bytes() == before
    assert _tree(tmp_path) == []


def test_file_store_needs_mlflows_opt_in(tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch):
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ValueError, match=r"^tracking\.uri: MLflow 3 refuses file stores"):
        check_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with RunTracker(uri, experiment) as tracker:
        tracker.log_metrics({"train/loss": 1.5}, step=2)
    assert _history(uri, tracker.run_id, "train/loss") == [(2, 1.5)]


# --------------------------------------------------------------------------- outages


class FakeClock:
    """The tracker's monotonic clock, moved by the test and by the tracker's sleeps (recorded)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _spilled_steps(spill: Path, key: str = "train/loss") -> list[int]:
    lines = spill.read_text().splitlines() if spill.exists() else []
    return sorted(entry["step"] for entry in map(json.loads, lines) if entry["key"] == key)


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    return [step for step, _ in _history(uri, run_id, key)]


def test_tracking_timeout_is_checked():
    with pytest.raises(ValueError, match=r"^tracking\.unavailable_timeout_s: must be >= 0 seconds, got -1"):
        TrackingConfig(unavailable_timeout_s=-1)


def test_a_killed_server_holds_nothing_up_and_gets_every_value_once_back(killable_server: RestartableServer,
                                                                          experiment: str, tmp_path: Path):
    clock, spill = FakeClock(), tmp_path / SPILL_FILE
    tracker = RunTracker(killable_server.url, experiment, flush_every=4, spill_path=spill, clock=clock,
                         sleep=clock.sleep)

    def log(step: int) -> None:
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": step * 1e-3}, step)
        clock.now += 1.0  # a second of training per step

    for step in range(4):
        log(step)
    assert _steps(killable_server.url, tracker.run_id, "train/loss") == [0, 1, 2, 3]
    assert not spill.exists()  # the store has every value

    killable_server.kill()
    for step in range(4, 10):  # its tries are refused at once; the values wait in memory and on disk
        log(step)
    assert _spilled_steps(spill) == [4, 5, 6, 7, 8, 9]
    assert tracker.store_lost() is None  # 6 s out of 300

    killable_server.restart()
    clock.now += RETRY_MAX_S  # the next try is due by now, whatever the backoff had reached
    log(10)
    assert not spill.exists()
    tracker.finish()
    assert clock.sleeps == []  # logging never waited for the store
    for key in ("train/loss", "train/lr"):
        assert _steps(killable_server.url, tracker.run_id, key) == list(range(11))
    assert MlflowClient(tracking_uri=killable_server.url).get_run(tracker.run_id).info.status == "FINISHED"


def test_a_server_down_past_the_bound_is_one_line_and_a_rerun_logs_the_rest(killable_server: RestartableServer,
                                                                             experiment: str, tmp_path: Path):
    clock, spill, url = FakeClock(), tmp_path / SPILL_FILE, killable_server.url
    tracker = RunTracker(url, experiment, flush_every=2, spill_path=spill, unavailable_timeout_s=100, clock=clock,
                         sleep=clock.sleep)
    for step in range(2):
        tracker.log_metrics({"train/loss": float(step)}, step)
    killable_server.kill()
    down = clock.now
    for step in range(2, 6):  # the first refused try, at step 3, starts the outage
        tracker.log_metrics({"train/loss": float(step)}, step)

    clock.now = down + 5
    assert tracker.store_lost() is None  # within the bound: train on
    clock.now = down + 10
    with pytest.raises(TrackingUnavailable):  # a call the run cannot go on without waits, up to the bound
        tracker.set_tags({"note": "needs the store"})
    assert clock.sleeps == [2, 4, 8, 16, 32, 28]  # tries at 10, 12, 16, 24, 40, 72 and, last, 100 s
    assert clock.now == down + 100
    lost = tracker.store_lost()
    assert isinstance(lost, TrackingUnavailable)
    message = str(lost)
    assert "\n" not in message
    assert message.startswith(f"tracking.uri: the MLflow server at {url} does not answer (connection refused), "
                              "for 100 s (tracking.unavailable_timeout_s=100); the 4 metric values it did not take "
                              f"are kept in {spill}; rerun the same command")
    assert _spilled_steps(spill) == [2, 3, 4, 5]

    killable_server.restart()
    assert MlflowClient(tracking_uri=url).get_run(tracker.run_id).info.status == "RUNNING"  # it took no status
    rerun = RunTracker(url, experiment, run_id=tracker.run_id, spill_path=spill, replay_through_step=5)
    rerun.finish()
    assert _history(url, tracker.run_id, "train/loss") == [(step, float(step)) for step in range(6)]
    assert MlflowClient(tracking_uri=url).get_run(tracker.run_id).info.status == "FINISHED"
    assert not spill.exists()


def test_a_rerun_sends_its_runs_spilled_values_up_to_its_checkpoint_once(sqlite_uri: str, experiment: str,
                                                                         tmp_path: Path):
    spill = tmp_path / SPILL_FILE
    tracker = RunTracker(sqlite_uri, experiment, flush_every=1000, spill_path=spill)
    for step in range(1, 7):
        tracker.log_metrics({"train/loss": float(step)}, step)
    taken_but_still_on_disk = spill.read_text()
    assert tracker.flush() and not spill.exists()
    spill.write_text(taken_but_still_on_disk)  # as if killed after the store took them, before the file went
    for step in range(7, 10):  # never sent: the process is killed
        tracker.log_metrics({"train/loss": float(step)}, step)
    with spill.open("a") as file:
        file.write(json.dumps({"run_id": uuid.uuid4().hex, "key": "train/loss", "value": 0.0, "timestamp": 1,
                               "step": 1}) + "\n")  # another run's value: not this run's to send
        file.write('{"run_id": "' + tracker.run_id + '", "key": "train/lo')  # killed in the middle of a line

    rerun = RunTracker(sqlite_uri, experiment, run_id=tracker.run_id, spill_path=spill, replay_through_step=8)
    assert not spill.exists()
    # step 9 comes after the checkpoint the run resumes from: training it again logs it again
    assert _history(sqlite_uri, tracker.run_id, "train/loss") == [(step, float(step)) for step in range(1, 9)]
    rerun.finish()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs to fill up under a store; the test is skipped where mounting one is not allowed."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                                 capture_output=True, text=True)
    except OSError as error:
        pytest.skip(f"needs a small tmpfs to fill, and there is no mount command here ({error})")
    if mounted.returncode != 0:
        pytest.skip(f"needs a small tmpfs to fill, and mounting one failed here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)  # MLflow keeps the database open


def _fill(directory: Path) -> Path:
    """Take every free byte of ``directory``'s file system."""
    filler = directory / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(descriptor, b"\0" * 65536)
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(descriptor)
    return filler


def test_a_full_disk_under_a_sqlite_store_is_named_and_loses_no_value(small_disk: Path, experiment: str,
                                                                       tmp_path: Path):
    uri = f"sqlite:///{small_disk}/mlflow.db"
    clock, spill = FakeClock(), tmp_path / SPILL_FILE  # the run's output directory is on another disk
    tracker = RunTracker(uri, experiment, flush_every=10_000, spill_path=spill, unavailable_timeout_s=60,
                         clock=clock, sleep=clock.sleep)
    tracker.log_metrics({"train/loss": 1.0}, 0)
    assert tracker.flush()
    filler = _fill(small_disk)
    values = [(step, 1.0 / (step + 1)) for step in range(1, 1001)]
    for step, value in values:
        tracker.log_metrics({"train/loss": value, "train/lr": value}, step)
    assert not tracker.flush()  # refused and kept, nothing raised: training goes on

    clock.now += 60
    lost = tracker.store_lost()
    assert isinstance(lost, TrackingUnavailable)
    assert str(lost).startswith(f"tracking.uri: no space left on {small_disk} (the store {uri}), for 60 s "
                                f"(tracking.unavailable_timeout_s=60); the 2000 metric values it did not take are "
                                f"kept in {spill}")
    with pytest.raises(TrackingUnavailable, match="^tracking.uri: no space left on"):
        tracker.finish("FAILED", reason="no space")
    assert MlflowClient(tracking_uri=uri).get_run(tracker.run_id).info.status == "RUNNING"  # it cannot be written

    filler.unlink()  # space freed: the rerun logs what the full disk refused
    RunTracker(uri, experiment, run_id=tracker.run_id, spill_path=spill, replay_through_step=1000).finish()
    assert _history(uri, tracker.run_id, "train/loss") == [(0, 1.0), *values]
    assert _history(uri, tracker.run_id, "train/lr") == values
    assert MlflowClient(tracking_uri=uri).get_run(tracker.run_id).info.status == "FINISHED"


def test_a_server_on_a_full_disk_is_tried_again_and_gets_every_value_once_there_is_space(small_disk: Path,
                                                                                          experiment: str):
    url, process = start_mlflow_server(small_disk)
    try:
        clock = FakeClock()
        tracker = RunTracker(url, experiment, flush_every=10_000, unavailable_timeout_s=60, clock=clock,
                             sleep=clock.sleep)
        filler = _fill(small_disk)
        values = [(step, 1.0 / (step + 1)) for step in range(1000)]
        for step, value in values:
            tracker.log_metrics({"train/loss": value, "train/lr": value}, step)
        assert not tracker.flush()  # the server's store cannot grow: it answers 503, and the values stay
        clock.now += 60
        assert str(tracker.store_lost()).startswith(f"tracking.uri: the MLflow server at {url} answers HTTP 503, "
                                                    "for 60 s (tracking.unavailable_timeout_s=60); the 2000 metric "
                                                    "values it did not take are lost")  # no spill file given
        filler.unlink()
        tracker.finish()
        assert _history(url, tracker.run_id, "train/loss") == values
        assert MlflowClient(tracking_uri=url).get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        stop_mlflow_server(process)


def test_attamba_train_on_a_full_store_disk_stops_with_one_line(small_disk: Path, tmp_path: Path):
    uri = f"sqlite:///{small_disk}/mlflow.db"
    ensure_store(uri)  # the store exists, then its disk fills up
    _fill(small_disk)
    result = subprocess.run(
        [sys.executable, "-m", "attamba.train", "experiment=smoke", "train.steps=2", f"tracking.uri={uri}",
         "tracking.unavailable_timeout_s=0", f"hydra.run.dir={tmp_path}/hydra",
         f"train.checkpoint_root={tmp_path}/checkpoints"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"attamba-train: error: tracking.uri: no space left on {small_disk} (the store {uri})"), result.stderr


def _smoke_on_server(url: str, tmp_path: Path, experiment: str, *overrides: str, timeout_s: float = 300.0):
    config = smoke_config(tmp_path, "train.steps=6", "train.checkpoint_every=2", "train.eval_every=100", *overrides)
    tracking = dataclasses.replace(config.tracking, uri=url, experiment=experiment, unavailable_timeout_s=timeout_s)
    return dataclasses.replace(config, tracking=tracking)


def _run_of(url: str, experiment: str):
    (run,) = _runs(url, experiment)
    return run


TRAIN_KEYS = ("train/loss", "train/lr", "train/grad_norm")


def test_training_goes_on_while_the_server_is_down_and_logs_every_step_once(killable_server: RestartableServer,
                                                                            tmp_path: Path, experiment: str):
    config = _smoke_on_server(killable_server.url, tmp_path, experiment)
    spill = Path(config.train.output_dir) / SPILL_FILE
    calls = iter(range(100))
    spilled_while_down: list[list[int]] = []

    def outage() -> bool:  # called before each step
        call = next(calls)
        if call == 2:  # before step 3: the flush at the step-4 checkpoint is refused
            killable_server.kill()
        if call == 4:  # before step 5
            spilled_while_down.append(_spilled_steps(spill))
            killable_server.restart()
        return False

    train(config, stop_requested=outage)
    assert spilled_while_down == [[3, 4]]  # trained on, kept on disk
    run = _run_of(killable_server.url, experiment)
    assert run.info.status == "FINISHED"
    for key in TRAIN_KEYS:
        assert _steps(killable_server.url, run.info.run_id, key) == list(range(1, 7)), key
    assert not spill.exists()


def test_a_server_down_past_the_bound_stops_training_at_a_checkpoint_and_a_rerun_logs_every_step_once(
        killable_server: RestartableServer, tmp_path: Path, experiment: str):
    config = _smoke_on_server(killable_server.url, tmp_path, experiment, timeout_s=0)
    output = Path(config.train.output_dir)
    calls = iter(range(100))

    def outage() -> bool:
        if next(calls) == 2:  # before step 3; the flush at the step-4 checkpoint is refused
            killable_server.kill()
        return False

    with pytest.raises(TrackingUnavailable) as stopped:
        train(config, stop_requested=outage)
    assert str(stopped.value).startswith(f"tracking.uri: the MLflow server at {killable_server.url} does not answer")
    # At the step-4 checkpoint, or at step 3 if that step took longer than the tracker's time-based flush
    # (flush_seconds) and its try was refused first. Either way the checkpoint covers every value on disk.
    stopped_at = checkpoint.latest_step(output)
    assert stopped_at in (3, 4)
    assert _spilled_steps(output / SPILL_FILE) == list(range(3, stopped_at + 1))

    killable_server.restart()
    assert _run_of(killable_server.url, experiment).info.status == "RUNNING"
    train(config)  # the same run again: resumes at step 4 and logs what the dead server did not take
    run = _run_of(killable_server.url, experiment)
    assert run.info.status == "FINISHED"
    for key in TRAIN_KEYS:
        assert _steps(killable_server.url, run.info.run_id, key) == list(range(1, 7)), key
    assert not (output / SPILL_FILE).exists()


# --------------------------------------------------------------------------- concurrency


def _log_from_process(uri: str, experiment: str, job: int) -> None:
    """One sweep job: its own run, metrics in batches of 10 (many small concurrent writes)."""
    with RunTracker(uri, experiment, run_name=f"job-{job}", flush_every=10) as tracker:
        tracker.log_params({"train.seed": job})
        for step in range(VALUES_PER_JOB):
            tracker.log_metrics({"train/loss": job + step / VALUES_PER_JOB}, step)


def _run_parallel_jobs(uri: str, experiment: str, start_method: str) -> None:
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # Fresh processes forked from one server that imported torch, MLflow and this module
        # once, instead of 8 interpreters each spending seconds on imports (as spawn does).
        context.set_forkserver_preload([__name__, "mlflow.store.tracking.sqlalchemy_store"])
    jobs = [context.Process(target=_log_from_process, args=(uri, experiment, job))
            for job in range(PARALLEL_JOBS)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=180)
    assert [job.exitcode for job in jobs] == [0] * PARALLEL_JOBS


def _assert_every_job_landed(uri: str, experiment: str) -> None:
    runs = {run.data.params["train.seed"]: run for run in _runs(uri, experiment)}
    assert sorted(runs) == sorted(str(job) for job in range(PARALLEL_JOBS))
    for job in range(PARALLEL_JOBS):
        run = runs[str(job)]
        assert run.info.status == "FINISHED"
        assert _history(uri, run.info.run_id, "train/loss") == [
            (step, job + step / VALUES_PER_JOB) for step in range(VALUES_PER_JOB)]


def test_parallel_processes_lose_no_run_and_no_value(sqlite_uri: str, experiment: str):
    _run_parallel_jobs(sqlite_uri, experiment, "forkserver")
    _assert_every_job_landed(sqlite_uri, experiment)


def test_a_reader_waits_while_another_process_creates_the_store(tmp_path: Path, experiment: str):
    """A reader polling a store that a sweep is creating must not migrate the fresh file alongside it
    (both then fail: "Online migration expected to match one row")."""
    import threading

    from attamba.locking import exclusive_lock

    find_runs(f"sqlite:///{tmp_path / 'other.db'}", experiment)  # MLflow's lazy imports done: a reader is quick
    store = tmp_path / "mlflow.db"
    found: list = []
    with exclusive_lock(store.with_name(store.name + ".lock")):  # as ensure_store holds it while creating
        reader = threading.Thread(target=lambda: found.append(find_runs(f"sqlite:///{store}", experiment)))
        reader.start()
        reader.join(timeout=2.0)
        assert reader.is_alive() and not store.exists()
    reader.join(timeout=60)
    assert found == [[]]


@pytest.mark.slow
def test_parallel_processes_on_a_fresh_store_lose_nothing(tmp_path: Path, experiment: str):
    """Spawned like sweep jobs, with no ensure_store beforehand: they race to create the database
    and the experiment."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    _run_parallel_jobs(uri, experiment, "spawn")
    _assert_every_job_landed(uri, experiment)
