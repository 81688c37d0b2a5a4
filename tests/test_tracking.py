"""attamba.tracking against real MLflow stores: a sqlite file and a live ``mlflow server``.

Each check reads back through a plain ``MlflowClient`` (or the server's HTTP
traffic), never through the tracker under test. The store and the server are
shared per module (creating either takes seconds); every test logs into its
own experiment.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import re
import subprocess
import time
import uuid
from pathlib import Path

import mlflow.utils.rest_utils
import pytest
import yaml
from mlflow.tracking import MlflowClient

from attamba.config import Config, flat_params, to_dict
from attamba.tracking import (
    TAG_CONFIG_HASH,
    TAG_FAILURE_REASON,
    TAG_FAMILY,
    TAG_GIT_COMMIT,
    TAG_PARENT_RUN,
    TAG_SWEEP,
    TAG_SWEEP_KEY,
    RunTracker,
    check_tracking_uri,
    config_hash,
    ensure_store,
    find_runs,
    git_commit,
    metric_history,
    run_tags,
    start_parent_run,
)
from mlflow_server import free_port, start_mlflow_server, stop_mlflow_server

PARALLEL_JOBS = 8
VALUES_PER_JOB = 100


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    ensure_store(uri)
    return uri


@pytest.fixture(scope="module")
def server_uri(tmp_path_factory: pytest.TempPathFactory):
    url, process = start_mlflow_server(tmp_path_factory.mktemp("server"))
    yield url
    stop_mlflow_server(process)


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


def test_config_hash_is_stable_and_ignores_only_where_a_run_goes():
    flat = flat_params(Config())
    digest = config_hash(flat)
    assert re.fullmatch(r"[0-9a-f]{12}", digest)
    assert config_hash(dict(reversed(list(flat.items())))) == digest
    relocated = {**flat, "tracking.uri": "http://127.0.0.1:1", "tracking.experiment": "other",
                 "tracking.run_name": "renamed", "tracking.sweep": "s", "train.output_dir": "/elsewhere",
                 "train.device": "cuda", "data.root": "/data"}
    assert config_hash(relocated) == digest
    for key, value in [("model.dim", 256), ("chunking.size", 16), ("train.seed", 1), ("train.compile", True)]:
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
    assert run.data.params == {key: str(value) for key, value in flat.items()}
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


def test_unreachable_server_stops_fast_and_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"^tracking\.uri: no MLflow server answers"):
        RunTracker(uri, "attamba")
    assert time.monotonic() - start < 5
    assert _tree(tmp_path) == []


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
