"""The project's single door to MLflow: one tracked run per training run.

Everything goes through :class:`mlflow.tracking.MlflowClient` with explicit run
ids, never the fluent ``mlflow.start_run`` API: its process-global active run
(and the ``MLFLOW_RUN_ID`` environment variable that overrides it) would let
threads, sweep workers and nested runs log into each other.

A training run uses it like this::

    flat = flat_params(config)
    check_tracking_uri(config.tracking.uri)          # fail before any training
    with RunTracker(config.tracking.uri, config.tracking.experiment,
                    run_name=config.tracking.run_name, run_id=resumed_run_id,
                    tags=run_tags(flat)) as tracker:
        tracker.log_params(flat)
        tracker.log_metrics({"train/loss": loss}, step)  # buffered, sent in batches
    # leaving the block marks the run FINISHED, or FAILED with the exception

Stores: ``sqlite:///path.db`` (artifacts in ``mlartifacts/`` next to the
database), ``http(s)://`` MLflow servers, and ``file:`` or plain directory
paths (MLflow 3 accepts those only with ``MLFLOW_ALLOW_FILE_STORE=true``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator, Sequence, TypeVar
from urllib.parse import urlparse

from mlflow.entities import Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from attamba.locking import exclusive_lock

TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_PARENT_RUN = "mlflow.parentRunId"
TAG_CONFIG_HASH = "attamba.config_hash"
TAG_FAMILY = "attamba.family"
TAG_SWEEP = "attamba.sweep"
TAG_SWEEP_KEY = "attamba.sweep_key"
TAG_SWEEP_PARENT = "attamba.sweep_parent"  # "true" on a sweep's parent run, absent on its children
TAG_FAILURE_REASON = "attamba.failure_reason"
TAG_SWEEP_ATTEMPTS = "attamba.sweep_attempts"  # on a sweep's parent: how many commands ran the sweep

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
SCHEMES = ("sqlite", "file", "http", "https")

# Settings that do not change what a run computes, only where it runs or where its
# outputs land; the config hash ignores them so that a re-launched sweep recognises
# its finished runs. Kernel choices (model.*.impl, train.compile) stay in: they are
# benchmarked against each other, so runs differing in them are different runs.
HASH_EXCLUDED_PREFIXES = ("tracking.",)
HASH_EXCLUDED_KEYS = frozenset({"train.output_dir", "train.checkpoint_root", "train.device", "data.root"})
CONFIG_HASH_LENGTH = 12

HEALTH_TIMEOUT_S = 3.0  # an unreachable server must stop a launch within seconds
SQLITE_LOCKED_RETRIES = 8  # on top of MLflow's own 20 s sqlite busy timeout

T = TypeVar("T")


def git_commit(repo_dir: str | Path | None = None) -> str | None:
    """The HEAD commit of ``repo_dir`` (default: the checkout holding this package), or None."""
    repo = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parents[1]
    try:
        result = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):  # no git, not a repository, no commit yet
        return None
    return result.stdout.strip() or None


def config_hash(flat_params: dict[str, Any]) -> str:
    """A short, order-independent sha256 of a flattened config, ignoring ``HASH_EXCLUDED_*`` keys."""
    kept = {key: value for key, value in flat_params.items()
            if key not in HASH_EXCLUDED_KEYS and not key.startswith(HASH_EXCLUDED_PREFIXES)}
    canonical = json.dumps(sorted(kept.items()), default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:CONFIG_HASH_LENGTH]


def run_tags(flat_params: dict[str, Any], repo_dir: str | Path | None = None) -> dict[str, str]:
    """The tags every training run carries: config hash, model family, git commit and sweep when known."""
    tags = {TAG_CONFIG_HASH: config_hash(flat_params), TAG_FAMILY: str(flat_params["model.family"])}
    commit = git_commit(repo_dir)
    if commit is not None:
        tags[TAG_GIT_COMMIT] = commit
    sweep = flat_params.get("tracking.sweep")
    if sweep:
        tags[TAG_SWEEP] = str(sweep)
    return tags


# --------------------------------------------------------------------------- stores


def _fail(uri: str, message: str) -> ValueError:
    return ValueError(f"tracking.uri: {message} (got {uri!r})")


def _scheme(uri: str) -> str:
    """The store kind of ``uri``; a plain path is a file store, as in MLflow."""
    scheme = urlparse(uri).scheme
    if scheme == "":
        return "file"
    if scheme not in SCHEMES:
        raise _fail(uri, f"unsupported scheme {scheme!r}, allowed schemes are {', '.join(SCHEMES)}")
    return scheme


def _sqlite_path(uri: str) -> Path:
    """The database file of a ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` URI."""
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not uri.startswith("sqlite:///") or path in ("", ":memory:"):
        raise _fail(uri, "a sqlite store needs a database file: sqlite:///relative/path.db "
                         "or sqlite:////absolute/path.db")
    return Path(path)


def _file_store_path(uri: str) -> Path:
    return Path(urllib.request.url2pathname(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)


def _local_store_path(uri: str) -> Path | None:
    """The database file or directory of a local store; None for a server."""
    scheme = _scheme(uri)
    if scheme == "sqlite":
        return _sqlite_path(uri)
    if scheme == "file":
        return _file_store_path(uri)
    return None


def _check_creatable(uri: str, target: Path, is_dir: bool) -> None:
    """``target`` exists with the right type and is writable, or its nearest existing ancestor
    is a writable directory, so that it can be created there."""
    target = target.absolute()
    kind = "directory" if is_dir else "file"
    if target.exists():
        if target.is_dir() != is_dir:
            raise _fail(uri, f"{target} exists but is not a {kind}")
        if not os.access(target, os.W_OK):
            raise _fail(uri, f"{target} is not writable")
        return
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise _fail(uri, f"{ancestor} is not a directory, so {target} cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise _fail(uri, f"{ancestor} is not writable, so {target} cannot be created")


def _check_server(uri: str) -> None:
    """An MLflow server answers ``/health`` at ``uri`` within ``HEALTH_TIMEOUT_S``."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise _fail(uri, f"no MLflow server answers at {url} ({reason}); start one (make ui) "
                         "or log to a local store such as sqlite:///runs/mlflow.db") from None
    if status != 200:
        raise _fail(uri, f"{url} answered HTTP {status}, not an MLflow server's 200")


def check_tracking_uri(uri: str) -> None:
    """Raise ``ValueError("tracking.uri: ...")`` if runs cannot be logged to ``uri``. Changes nothing."""
    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        _check_server(uri)
    elif scheme == "sqlite":
        database = _sqlite_path(uri)
        _check_creatable(uri, database.parent, is_dir=True)  # sqlite writes its journal beside the file
        _check_creatable(uri, database, is_dir=False)
    else:
        if not MLFLOW_ALLOW_FILE_STORE.get():
            raise _fail(uri, "MLflow 3 refuses file stores unless MLFLOW_ALLOW_FILE_STORE=true; "
                             "use a database file instead, e.g. sqlite:///runs/mlflow.db")
        _check_creatable(uri, _file_store_path(uri), is_dir=True)


def _store_created(uri: str, store: Path) -> bool:
    """Whether a local store exists; for sqlite, whether MLflow has recorded its schema version
    (it does so while migrating, which ``ensure_store`` only lets one process do at a time)."""
    if _scheme(uri) == "file":
        return store.is_dir()
    if not store.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)) as connection:
            return connection.execute("SELECT count(*) FROM alembic_version").fetchone()[0] > 0
    except sqlite3.Error:  # no such table yet: the file was created but never migrated
        return False


def ensure_store(uri: str) -> None:
    """Check ``uri`` and create a local store if there is none yet, one process at a time.

    Processes racing on a fresh sqlite file break MLflow's schema migration, so
    the creation runs under a file lock beside the store. Existing stores are
    left alone (opening one only reads its schema version), and servers need
    nothing.
    """
    check_tracking_uri(uri)
    store = _local_store_path(uri)
    if store is None:
        return
    store = store.absolute()
    store.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(store.with_name(store.name + ".lock")):
        if not _store_created(uri, store):
            _retry_locked(MlflowClient(tracking_uri=uri).search_experiments, max_results=1)


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go next to the database, never into the CWD's ``./mlruns``.

    File stores keep artifacts inside the store and servers decide for themselves (None).
    """
    if _scheme(uri) != "sqlite":
        return None
    return (_sqlite_path(uri).absolute().parent / "mlartifacts").as_uri()


def _retry_locked(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, retried with jittered backoff while sqlite says "database is locked".

    A locked sqlite write is rolled back whole, so repeating it neither loses nor doubles data.
    """
    attempt = 0
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as error:
            attempt += 1
            if "database is locked" not in str(error) or attempt == SQLITE_LOCKED_RETRIES:
                raise
            time.sleep(min(0.05 * 2**attempt, 2.0) * (1 + random.random()))


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment ``name``, created on first use (safe when processes race to create it)."""
    experiment = _retry_locked(client.get_experiment_by_name, name)
    if experiment is None:
        try:
            return _retry_locked(client.create_experiment, name, artifact_location=_artifact_location(uri))
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = _retry_locked(client.get_experiment_by_name, name)
    if experiment.lifecycle_stage != "active":
        raise ValueError(f"tracking.experiment: experiment {name!r} is deleted in {uri}; "
                         "restore it or choose another name")
    return experiment.experiment_id


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------- runs


class RunTracker:
    """One MLflow run: params, tags, batched metrics, artifacts and a terminal status.

    ``run_id`` given: continue that run (a resumed training run) — its status goes
    back to RUNNING and no second run is created. Metrics are buffered and sent
    with one ``log_batch`` call per ``flush_every`` values, or at the first
    ``log_metrics`` call after ``flush_seconds``; ``flush``/``finish`` send the rest.
    As a context manager, an escaping exception marks the run FAILED (KILLED for
    Ctrl-C) with the exception as ``attamba.failure_reason``; a clean exit FINISHED.
    """

    def __init__(self, uri: str, experiment: str, run_name: str | None = None, run_id: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, Any] | None = None,
                 flush_every: int = 200, flush_seconds: float = 10.0) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every: must be an integer >= 1, got {flush_every!r}")
        if flush_seconds < 0:
            raise ValueError(f"flush_seconds: must be >= 0, got {flush_seconds!r}")
        # A stray MLFLOW_RUN_ID would hijack any fluent-API logging here or in child processes.
        os.environ.pop("MLFLOW_RUN_ID", None)
        ensure_store(uri)
        self.uri = uri
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._client = MlflowClient(tracking_uri=uri)
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()
        self._finished = False
        initial_tags = {**(tags or {}), **({TAG_PARENT_RUN: parent_run_id} if parent_run_id else {})}
        if run_id is None:
            self.run_id = self._create(experiment, run_name, initial_tags)
        else:
            self.run_id = run_id
            self._resume(initial_tags)

    def _create(self, experiment: str, run_name: str | None, tags: dict[str, Any]) -> str:
        experiment_id = _experiment_id(self._client, self.uri, experiment)
        run = _retry_locked(self._client.create_run, experiment_id, tags=_tag_values(tags), run_name=run_name)
        return run.info.run_id

    def _resume(self, tags: dict[str, Any]) -> None:
        try:
            _retry_locked(self._client.get_run, self.run_id)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise ValueError(f"run_id: no run {self.run_id!r} to resume in tracking.uri={self.uri}") from None
        _retry_locked(self._client.update_run, self.run_id, status="RUNNING")
        self.set_tags(tags)

    def log_params(self, flat: dict[str, Any]) -> None:
        """Log a flattened config, at most 100 params a call; keys already logged with the same
        value are skipped (a resumed run), a changed value is a ``ValueError`` naming the key."""
        logged = _retry_locked(self._client.get_run, self.run_id).data.params
        new: dict[str, str] = {}
        for key, value in flat.items():
            text = _truncate(str(value), MAX_PARAM_VAL_LENGTH)
            if key not in logged:
                new[key] = text
            elif logged[key] != text:
                raise ValueError(f"{key}: run {self.run_id} already logged it as {logged[key]!r}, now "
                                 f"{text!r}; MLflow params cannot change, so start a new run")
        for chunk in _chunks(list(new.items()), MAX_PARAMS_TAGS_PER_BATCH):
            params = [Param(key, value) for key, value in chunk]
            _retry_locked(self._client.log_batch, self.run_id, params=params, synchronous=True)

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set (or overwrite) tags, at most 100 a call; tags whose value is None are left out."""
        items = list(_tag_values(tags).items())
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            run_tags_ = [RunTag(key, value) for key, value in chunk]
            _retry_locked(self._client.log_batch, self.run_id, tags=run_tags_, synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer ``metrics`` at ``step``; send the buffer when it is full or ``flush_seconds`` old."""
        timestamp = _now_ms()
        self._buffer.extend(Metric(key, float(value), timestamp, step) for key, value in metrics.items())
        if (len(self._buffer) >= self.flush_every
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        """Send every buffered metric value, at most 1000 per ``log_batch`` call."""
        while self._buffer:
            chunk = self._buffer[:MAX_METRICS_PER_BATCH]
            _retry_locked(self._client.log_batch, self.run_id, metrics=chunk, synchronous=True)
            del self._buffer[:len(chunk)]  # only once sent: a failed call keeps its values
        self._last_flush = time.monotonic()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file (or directory) into the run's artifacts, under ``artifact_path``."""
        _retry_locked(self._client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, obj: dict[str, Any], artifact_file: str) -> None:
        """Store ``obj`` as an artifact: YAML for ``.yaml``/``.yml`` names, JSON otherwise."""
        _retry_locked(self._client.log_dict, self.run_id, obj, artifact_file)

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Flush, record ``reason`` as ``attamba.failure_reason`` if given, and end the run."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status: got {status!r}, allowed values are {', '.join(TERMINAL_STATUSES)}")
        self.flush()
        if reason is not None:
            self.set_tags({TAG_FAILURE_REASON: reason})
        _retry_locked(self._client.set_terminated, self.run_id, status)
        self._finished = True

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> bool:
        if exc is None:
            if not self._finished:
                self.finish()
        else:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            self.finish(status, reason=f"{type(exc).__name__}: {exc}")
        return False  # never swallow the exception


def _tag_values(tags: dict[str, Any]) -> dict[str, str]:
    return {key: _truncate(str(value), MAX_TAG_VAL_LENGTH) for key, value in tags.items() if value is not None}


# --------------------------------------------------------------------------- queries


def reading_client(uri: str) -> MlflowClient:
    """A client to read the store at ``uri``. Opening a fresh sqlite file migrates its schema, and a
    reader doing that while a training run creates the store breaks both: until the store exists,
    readers go through :func:`ensure_store`'s lock like writers. An existing store is only read (it
    may be read-only)."""
    store = _local_store_path(uri)
    if store is not None and not _store_created(uri, store.absolute()):
        ensure_store(uri)
    return MlflowClient(tracking_uri=uri)


def find_runs(uri: str, experiment: str, filter_string: str = "") -> list[dict[str, Any]]:
    """Runs of ``experiment`` matching an MLflow ``filter_string``, newest first, as plain dicts
    (run_id, run_name, status, tags, params, metrics with their latest values)."""
    client = reading_client(uri)
    found = _retry_locked(client.get_experiment_by_name, experiment)
    if found is None:
        return []
    runs: list[dict[str, Any]] = []
    page_token = None
    while True:
        page = _retry_locked(client.search_runs, [found.experiment_id], filter_string,
                             order_by=["attributes.start_time DESC"], page_token=page_token)
        runs.extend({"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
                     "tags": dict(run.data.tags), "params": dict(run.data.params),
                     "metrics": dict(run.data.metrics)} for run in page)
        page_token = page.token
        if not page_token:
            return runs


def finished_config_hashes(uri: str, experiment: str) -> set[str]:
    """The config hashes of the FINISHED runs of ``experiment``: the configurations it holds results of.

    A local store not created yet holds none, and is left uncreated (a sweep's plan creates nothing).
    """
    store = _local_store_path(uri)
    if store is None:
        _check_server(uri)  # seconds, not the client's minutes of retries, for a server that is down
    elif not _store_created(uri, store.absolute()):
        return set()
    runs = find_runs(uri, experiment, "attributes.status = 'FINISHED'")
    return {run["tags"][TAG_CONFIG_HASH] for run in runs if TAG_CONFIG_HASH in run["tags"]}


def run_status(uri: str, experiment: str, run_id: str) -> str | None:
    """The status of run ``run_id`` if experiment ``experiment`` at ``uri`` holds it, else None."""
    client = reading_client(uri)
    try:
        run = _retry_locked(client.get_run, run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    found = _retry_locked(client.get_experiment_by_name, experiment)
    return run.info.status if found is not None and run.info.experiment_id == found.experiment_id else None


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """Every logged ``(step, value)`` of metric ``key`` in run ``run_id``, by step."""
    history = _retry_locked(reading_client(uri).get_metric_history, run_id, key)
    return sorted((metric.step, metric.value) for metric in history)


def start_parent_run(uri: str, experiment: str, sweep_name: str, tags: dict[str, Any]) -> str:
    """The run id of sweep ``sweep_name``'s parent run: started if no parent with that name (and the
    same ``attamba.sweep_key`` tag, if given) exists, else reused (the newest), whatever its status.

    Rerunning an interrupted (KILLED) or failed sweep resumes its runs, so it goes on under the same
    parent and reads as one sweep: the parent is RUNNING again, its ``attamba.failure_reason`` from
    the attempt before is cleared and ``attamba.sweep_attempts`` counts the commands that ran it.
    """
    identity = {TAG_SWEEP: sweep_name, TAG_SWEEP_PARENT: "true"}
    if tags.get(TAG_SWEEP_KEY) is not None:
        identity[TAG_SWEEP_KEY] = str(tags[TAG_SWEEP_KEY])
    for key, value in identity.items():
        if "'" in value:  # it would end the literal of the MLflow filter below
            raise ValueError(f"{key}: must not contain a single quote, got {value!r}")
    filter_string = " and ".join(f"tags.`{key}` = '{value}'" for key, value in identity.items())
    earlier = find_runs(uri, experiment, filter_string)[:1]
    attempts = int(earlier[0]["tags"].get(TAG_SWEEP_ATTEMPTS, 1)) + 1 if earlier else 1
    tracker = RunTracker(uri, experiment, run_name=sweep_name, run_id=earlier[0]["run_id"] if earlier else None,
                         tags={**tags, **identity, TAG_SWEEP_ATTEMPTS: attempts})
    if earlier and TAG_FAILURE_REASON in earlier[0]["tags"]:
        _retry_locked(MlflowClient(tracking_uri=uri).delete_tag, tracker.run_id, TAG_FAILURE_REASON)
    return tracker.run_id
