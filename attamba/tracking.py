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

When the store stops taking writes (the server is down, the disk under a local store
is full), training goes on: see :class:`RunTracker` for the policy.

Stores: ``sqlite:///path.db`` (artifacts in ``mlartifacts/`` next to the
database), ``http(s)://`` MLflow servers, and ``file:`` or plain directory
paths (MLflow 3 accepts those only with ``MLFLOW_ALLOW_FILE_STORE=true``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import random
import re
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import closing, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator, Sequence, TypeVar
from urllib.parse import urlparse

import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.environment_variables import (
    MLFLOW_ALLOW_FILE_STORE,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from attamba.config import TrackingConfig
from attamba.locking import exclusive_lock

TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_PARENT_RUN = "mlflow.parentRunId"
TAG_CONFIG_HASH = "attamba.config_hash"
TAG_FAMILY = "attamba.family"
TAG_SWEEP = "attamba.sweep"
TAG_SWEEP_KEY = "attamba.sweep_key"
TAG_SWEEP_PARENT = "attamba.sweep_parent"  # "true" on a sweep's parent run, absent on its children
TAG_FAILURE_REASON = "attamba.failure_reason"
TAG_EVALUATIONS = "attamba.evaluations"  # what attamba-eval added to a run, comma-separated
TAG_SWEEP_ATTEMPTS = "attamba.sweep_attempts"  # on a sweep's parent: how many commands ran the sweep

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
SCHEMES = ("sqlite", "file", "http", "https")

# Settings that do not change what a run computes, only where it runs or where its
# outputs land; the config hash ignores them so that a re-launched sweep recognises
# its finished runs. Kernel choices (model.*.impl) stay in: they are benchmarked against
# each other, so runs differing in them are different runs.
HASH_EXCLUDED_PREFIXES = ("tracking.",)
# Where a run is kept and how its step executes, not what it trains: the same run on any device,
# compiled or not, resumes from the same checkpoints.
HASH_EXCLUDED_KEYS = frozenset({"train.output_dir", "train.checkpoint_root", "train.device", "data.root",
                                "train.compile", "train.compile_mode", "train.compile_cache"})
# How long to wait for the store says nothing about a run, and a rerun may change it: logged as a
# param, a changed value would be refused (MLflow params cannot change).
UNLOGGED_PARAMS = frozenset({"tracking.unavailable_timeout_s"})
CONFIG_HASH_LENGTH = 12

HEALTH_TIMEOUT_S = 3.0  # an unreachable server must stop a launch within seconds
SQLITE_LOCKED_RETRIES = 8  # on top of MLflow's own 20 s sqlite busy timeout

# A store that refuses writes is tried again after 1, 2, 4, ... s, at most RETRY_MAX_S apart. Each
# try is one HTTP request with a short timeout: MLflow's own retries (7, up to 120 s each) are what
# used to hang training for minutes inside one flush.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
REQUEST_TIMEOUT_S = 15
SPILL_FILE = "unlogged_metrics.jsonl"  # in the run's output directory: values the store has not taken yet

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


def hash_excluded(key: str) -> bool:
    """Whether param ``key`` only says where a run executes or logs (``HASH_EXCLUDED_*``), not what it computes."""
    return key in HASH_EXCLUDED_KEYS or key.startswith(HASH_EXCLUDED_PREFIXES)


def config_hash(flat_params: dict[str, Any]) -> str:
    """A short, order-independent sha256 of a flattened config, ignoring ``HASH_EXCLUDED_*`` keys."""
    kept = {key: value for key, value in flat_params.items() if not hash_excluded(key)}
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
    """The id of experiment ``name``, created on first use (safe when processes race to create it;
    repeating the whole call is safe too)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri))
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
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


class TrackingUnavailable(RuntimeError):
    """The store refused writes for longer than ``tracking.unavailable_timeout_s``.

    Its message is one line that starts with ``tracking.uri:`` and says where the values that
    were not logged are kept.
    """


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or while handling."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        suppressed = current.__cause__ is None and current.__suppress_context__  # ``raise ... from None``
        current = None if suppressed else current.__cause__ or current.__context__


def _store_failure(uri: str, error: Exception) -> str | None:
    """Why the store did not take a write, when it is a state of the store that may pass (a server
    that does not answer or answers 5xx, a full disk, a sqlite database that fails a write: locked
    for too long, an I/O error); None for an error in the request itself, which waiting cannot cure."""
    store = _local_store_path(uri)
    for cause in _causes(error):
        if isinstance(cause, requests.exceptions.Timeout):
            return f"the MLflow server at {uri} did not answer within {REQUEST_TIMEOUT_S} s"
        if isinstance(cause, requests.exceptions.ConnectionError):
            detail = "connection refused" if "Connection refused" in str(cause) else "connection failed"
            return f"the MLflow server at {uri} does not answer ({detail})"
        if isinstance(cause, requests.exceptions.RetryError):  # 5xx, after our single try
            status = re.search(r"too many (\d+) error responses", str(cause))
            return f"the MLflow server at {uri} answers HTTP {status.group(1) if status else '5xx'}"
        if isinstance(cause, requests.exceptions.HTTPError) and cause.response is not None \
                and cause.response.status_code >= 500:  # an artifact upload
            return f"the MLflow server at {uri} answers HTTP {cause.response.status_code}"
        disk_full = (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) or (
            isinstance(cause, sqlite3.OperationalError) and "disk is full" in str(cause))
        if disk_full and store is not None:
            return f"no space left on {(store if store.is_dir() else store.parent).absolute()} (the store {uri})"
        if isinstance(cause, sqlite3.OperationalError) and store is not None:
            return f"the store at {store.absolute()} refuses writes ({cause})"
    return None


@contextmanager
def _one_try(uri: str) -> Iterator[None]:
    """One request per store call, no retries inside MLflow (the tracker decides when to try again);
    MLflow's logged traceback of a failed sqlite write is left out (the tracker reports it once)."""
    saved = {name: os.environ.get(name) for name in (MLFLOW_HTTP_REQUEST_MAX_RETRIES.name,
                                                      MLFLOW_HTTP_REQUEST_TIMEOUT.name)}
    os.environ[MLFLOW_HTTP_REQUEST_MAX_RETRIES.name] = "0"
    os.environ[MLFLOW_HTTP_REQUEST_TIMEOUT.name] = str(REQUEST_TIMEOUT_S)
    db_logger = logging.getLogger("mlflow.store.db.utils")
    level = db_logger.level
    db_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        db_logger.setLevel(level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --------------------------------------------------------------------------- runs


class RunTracker:
    """One MLflow run: params, tags, batched metrics, artifacts and a terminal status.

    ``run_id`` given: continue that run (a resumed training run) — its status goes
    back to RUNNING, the previous attempt's ``attamba.failure_reason`` is cleared, no
    second run is created, and a metric value at a step the run already has is not
    sent again (a resumed run retrains the steps after its checkpoint: each step is
    logged exactly once). Metrics are buffered and sent
    with one ``log_batch`` call per ``flush_every`` values, or at the first
    ``log_metrics`` call after ``flush_seconds``; ``flush``/``finish`` send the rest.
    As a context manager, an escaping exception marks the run FAILED (KILLED for
    Ctrl-C) with the exception as ``attamba.failure_reason``; a clean exit FINISHED.

    A store that refuses writes (a server that does not answer, a full disk) does not stop
    training. Metric values stay in the buffer, and in ``spill_path`` when given (appended as
    they are logged, deleted once the store has them all, so a killed process loses none); the
    tracker tries again after 1, 2, 4, ... s (at most ``RETRY_MAX_S`` apart), at log points,
    never blocking them. Once the store has refused writes for ``unavailable_timeout_s``,
    :meth:`store_lost` returns the :class:`TrackingUnavailable` to stop the run with. Calls the
    run cannot go on without (params, tags, artifacts, the final flush and status) wait for the
    store on the same schedule and raise it. A value sent again keeps its timestamp, and MLflow
    stores a value with the same key, step, value and timestamp once, so nothing is doubled.

    A tracker of the same run with the same ``spill_path`` sends what the file holds for it up
    to ``replay_through_step``: a resumed run passes the step of its checkpoint, since training
    the steps after it logs their values again.
    """

    def __init__(self, uri: str, experiment: str, run_name: str | None = None, run_id: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, Any] | None = None,
                 flush_every: int = 200, flush_seconds: float = 10.0, spill_path: str | Path | None = None,
                 replay_through_step: int | None = None,
                 unavailable_timeout_s: float = TrackingConfig.unavailable_timeout_s,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every: must be an integer >= 1, got {flush_every!r}")
        if flush_seconds < 0:
            raise ValueError(f"flush_seconds: must be >= 0, got {flush_seconds!r}")
        if unavailable_timeout_s < 0:
            raise ValueError(f"tracking.unavailable_timeout_s: must be >= 0 seconds, got {unavailable_timeout_s!r}")
        # A stray MLFLOW_RUN_ID would hijack any fluent-API logging here or in child processes.
        os.environ.pop("MLFLOW_RUN_ID", None)
        ensure_store(uri)
        self.uri = uri
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.unavailable_timeout_s = unavailable_timeout_s
        self.spill_path = Path(spill_path) if spill_path is not None else None
        self._clock, self._sleep = clock, sleep
        self._client = MlflowClient(tracking_uri=uri)
        self._buffer: list[Metric] = []
        self._logged: set[tuple[str, int]] = set()  # (key, step) already in the store of a resumed run
        self._last_flush = clock()
        self._failing_since: float | None = None  # when the store began refusing writes
        self._retry_delay = 0.0
        self._next_try = 0.0
        self._failure = ""
        self._finished = False
        initial_tags = {**(tags or {}), **({TAG_PARENT_RUN: parent_run_id} if parent_run_id else {})}
        if run_id is None:
            self.run_id = self._create(experiment, run_name, initial_tags)
        else:
            self.run_id = run_id
            self._resume(initial_tags)
        self._replay_spill(replay_through_step)

    def _create(self, experiment: str, run_name: str | None, tags: dict[str, Any]) -> str:
        experiment_id = self._call(_experiment_id, self._client, self.uri, experiment)
        run = self._call(self._client.create_run, experiment_id, tags=_tag_values(tags), run_name=run_name)
        return run.info.run_id

    def _resume(self, tags: dict[str, Any]) -> None:
        try:
            run = self._call(self._client.get_run, self.run_id)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise ValueError(f"run_id: no run {self.run_id!r} to resume in tracking.uri={self.uri}") from None
        self._logged = {(key, metric.step) for key in run.data.metrics
                        for metric in self._call(self._client.get_metric_history, self.run_id, key)}
        self._call(self._client.update_run, self.run_id, status="RUNNING")
        if TAG_FAILURE_REASON in run.data.tags:  # it told why the previous attempt ended, not this one
            self._call(self._client.delete_tag, self.run_id, TAG_FAILURE_REASON)
        self.set_tags(tags)

    def log_params(self, flat: dict[str, Any]) -> None:
        """Log a flattened config (but ``UNLOGGED_PARAMS``), at most 100 params a call; keys already
        logged with the same value are skipped (a resumed run), a changed value is a ``ValueError``
        naming the key."""
        logged = self._call(self._client.get_run, self.run_id).data.params
        new: dict[str, str] = {}
        for key, value in flat.items():
            if key in UNLOGGED_PARAMS:
                continue
            text = _truncate(str(value), MAX_PARAM_VAL_LENGTH)
            if key not in logged:
                new[key] = text
            elif logged[key] != text:
                raise ValueError(f"{key}: run {self.run_id} already logged it as {logged[key]!r}, now "
                                 f"{text!r}; MLflow params cannot change, so start a new run")
        for chunk in _chunks(list(new.items()), MAX_PARAMS_TAGS_PER_BATCH):
            params = [Param(key, value) for key, value in chunk]
            self._call(self._client.log_batch, self.run_id, params=params, synchronous=True)

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set (or overwrite) tags, at most 100 a call; tags whose value is None are left out."""
        items = list(_tag_values(tags).items())
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            run_tags_ = [RunTag(key, value) for key, value in chunk]
            self._call(self._client.log_batch, self.run_id, tags=run_tags_, synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer (and spill) ``metrics`` at ``step`` (those a resumed run has at ``step`` already are left
        out); send the buffer when it is full or ``flush_seconds`` old. Never waits for a store that
        refuses writes."""
        timestamp = _now_ms()
        new = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()
               if (key, step) not in self._logged]
        self._buffer.extend(new)
        self._spill(new)
        if len(self._buffer) >= self.flush_every or self._clock() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> bool:
        """Send every buffered value, at most 1000 per ``log_batch`` call; whether all were sent.

        While the store refuses writes, it tries only once the next try is due."""
        if self._failing_since is not None and self._clock() < self._next_try:
            return False
        return self._send_buffer()

    def store_lost(self) -> TrackingUnavailable | None:
        """The error to stop the run with, once the store has refused writes for
        ``unavailable_timeout_s`` and a last try to send the buffer failed; else None."""
        if self._failing_since is None or self._clock() - self._failing_since < self.unavailable_timeout_s:
            return None
        return None if self._send_buffer() else self._unavailable()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file (or directory) into the run's artifacts, under ``artifact_path``."""
        self._call(self._client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, obj: dict[str, Any], artifact_file: str) -> None:
        """Store ``obj`` as an artifact: YAML for ``.yaml``/``.yml`` names, JSON otherwise."""
        self._call(self._client.log_dict, self.run_id, obj, artifact_file)

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Flush, record ``reason`` as ``attamba.failure_reason`` if given, and end the run; a store
        that refuses writes is waited for (see the class), then :class:`TrackingUnavailable`."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status: got {status!r}, allowed values are {', '.join(TERMINAL_STATUSES)}")
        while not self._send_buffer():
            self._wait_or_give_up()
        if reason is not None:
            self.set_tags({TAG_FAILURE_REASON: reason})
        self._call(self._client.set_terminated, self.run_id, status)
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

    # ----------------------------------------------------------------- store failures

    def _try(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[bool, T | None]:
        """One try of a store call: ``(True, result)``, or ``(False, None)`` with the next try
        scheduled when the store refused it (:func:`_store_failure`); other errors are raised."""
        try:
            with _one_try(self.uri):
                result = _retry_locked(call, *args, **kwargs)
        except Exception as error:
            reason = _store_failure(self.uri, error)
            if reason is None:
                raise
            now = self._clock()
            if self._failing_since is None:
                self._failing_since, self._retry_delay = now, RETRY_FIRST_S
            else:
                self._retry_delay = min(2 * self._retry_delay, RETRY_MAX_S)
            self._next_try, self._failure = now + self._retry_delay, reason
            return False, None
        self._failing_since = None
        return True, result

    def _call(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A store call the run cannot go on without, tried until it succeeds or the store has
        refused writes for ``unavailable_timeout_s`` (then :class:`TrackingUnavailable`)."""
        while True:
            done, result = self._try(call, *args, **kwargs)
            if done:
                return result
            self._wait_or_give_up()

    def _wait_or_give_up(self) -> None:
        """Sleep until the next try is due, or raise once the store has refused writes too long; the
        last try comes at the deadline, not up to ``RETRY_MAX_S`` after it."""
        deadline = self._failing_since + self.unavailable_timeout_s
        now = self._clock()
        if now >= deadline:
            raise self._unavailable()
        self._sleep(min(self._next_try, deadline) - now)

    def _send_buffer(self) -> bool:
        while self._buffer:
            chunk = self._buffer[:MAX_METRICS_PER_BATCH]
            if not self._try(self._client.log_batch, self.run_id, metrics=chunk, synchronous=True)[0]:
                return False
            del self._buffer[:len(chunk)]  # only once sent: a failed call keeps its values
        if self.spill_path is not None:
            self.spill_path.unlink(missing_ok=True)
        self._last_flush = self._clock()
        return True

    def _unavailable(self) -> TrackingUnavailable:
        rerun = "rerun the same command once the store takes writes"
        if not self._buffer:
            then = rerun
        elif self.spill_path is None:
            then = f"the {len(self._buffer)} metric values it did not take are lost"
        else:
            then = (f"the {len(self._buffer)} metric values it did not take are kept in {self.spill_path}; "
                    f"{rerun}: it resumes the run and logs them")
        return TrackingUnavailable(
            f"tracking.uri: {self._failure}, for {self._clock() - self._failing_since:.0f} s "
            f"(tracking.unavailable_timeout_s={self.unavailable_timeout_s:g}); {then}")

    def _spill(self, metrics: list[Metric]) -> None:
        if self.spill_path is None or not metrics:
            return
        with open(self.spill_path, "a") as file:
            file.writelines(json.dumps({"run_id": self.run_id, "key": metric.key, "value": metric.value,
                                        "timestamp": metric.timestamp, "step": metric.step}) + "\n"
                            for metric in metrics)

    def _replay_spill(self, through_step: int | None) -> None:
        """Buffer and send what an earlier tracker of this run logged and the store never took."""
        if self.spill_path is None or not self.spill_path.exists():
            return
        kept = []
        for line in self.spill_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the last line of a process killed while writing it
                continue
            if entry["run_id"] == self.run_id and (through_step is None or entry["step"] <= through_step):
                kept.append(Metric(entry["key"], entry["value"], entry["timestamp"], entry["step"]))
        self.spill_path.unlink()
        self._buffer.extend(kept)
        self._spill(kept)
        self.flush()


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


def experiment_names(uri: str, with_runs: bool = False) -> list[str]:
    """Names of the active experiments in the store at ``uri`` (only those holding a run, if ``with_runs``)."""
    client = reading_client(uri)
    return sorted(experiment.name for experiment in _retry_locked(client.search_experiments)
                  if not with_runs or _retry_locked(client.search_runs, [experiment.experiment_id], max_results=1))


def find_runs(uri: str, experiment: str, filter_string: str = "") -> list[dict[str, Any]]:
    """Runs of ``experiment`` matching an MLflow ``filter_string``, newest first, as plain dicts
    (run_id, run_name, status, start_time in ms, tags, params, metrics with their latest values)."""
    client = reading_client(uri)
    found = _retry_locked(client.get_experiment_by_name, experiment)
    if found is None:
        return []
    runs: list[dict[str, Any]] = []
    page_token = None
    while True:
        page = _retry_locked(client.search_runs, [found.experiment_id], filter_string,
                             order_by=["attributes.start_time DESC"], page_token=page_token)
        runs.extend(_run_dict(run) for run in page)
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


def run_status(uri: str, run_id: str, experiment: str | None = None) -> str | None:
    """The status of run ``run_id`` (RUNNING, FINISHED, ...) if the store at ``uri`` holds it (in
    ``experiment``, when given), else None."""
    client = reading_client(uri)
    try:
        run = _retry_locked(client.get_run, run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    if experiment is None:
        return run.info.status
    found = _retry_locked(client.get_experiment_by_name, experiment)
    return run.info.status if found is not None and run.info.experiment_id == found.experiment_id else None


def _run_dict(run: Any) -> dict[str, Any]:
    return {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
            "start_time": run.info.start_time, "tags": dict(run.data.tags), "params": dict(run.data.params),
            "metrics": dict(run.data.metrics)}


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of metric ``key`` in run ``run_id``, by step; of values logged twice at one
    step (a resumed run repeating steps), the one logged last."""
    history = _retry_locked(reading_client(uri).get_metric_history, run_id, key)
    latest = {metric.step: metric for metric in sorted(history, key=lambda metric: metric.timestamp)}
    return [(step, latest[step].value) for step in sorted(latest)]


def artifact_texts(uri: str, run_ids: Sequence[str], path: str) -> dict[str, str | None]:
    """The text of artifact ``path`` (e.g. ``passkey.csv``) of each run in ``run_ids``; None for a run
    without one."""
    client = reading_client(uri)
    folder = posixpath.dirname(path) or None
    texts: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, run_id in enumerate(run_ids):
            listed = {item.path for item in _retry_locked(client.list_artifacts, run_id, folder)}
            if path not in listed:
                texts[run_id] = None
                continue
            target = Path(scratch) / str(index)
            target.mkdir()
            local = _retry_locked(client.download_artifacts, run_id, path, str(target))
            texts[run_id] = Path(local).read_text()
    return texts


def start_parent_run(uri: str, experiment: str, sweep_name: str, tags: dict[str, Any]) -> str:
    """The run id of sweep ``sweep_name``'s parent run: started if no parent with that name (and the
    same ``attamba.sweep_key`` tag, if given) exists, else reused (the newest), whatever its status.

    Rerunning an interrupted (KILLED) or failed sweep resumes its runs, so it goes on under the same
    parent and reads as one sweep: the parent is RUNNING again, its ``attamba.failure_reason`` from
    the attempt before is cleared (as :class:`RunTracker` clears it on every resumed run) and
    ``attamba.sweep_attempts`` counts the commands that ran it.
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
    return tracker.run_id


def find_run(uri: str, run: str) -> dict[str, Any] | None:
    """The run whose id, or else whose name, is ``run``, in any experiment of the store at ``uri``, as
    :func:`find_runs` describes runs; None if there is none. A name shared by several runs is a
    ``ValueError`` listing their ids. A local store that does not exist is not created."""
    store = _local_store_path(uri)
    if store is not None and not _store_created(uri, store.absolute()):
        return None
    client = reading_client(uri)
    try:
        found = [_retry_locked(client.get_run, run)]
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        if "'" in run:
            raise ValueError(f"RUN: a run name must not contain a single quote, got {run!r}") from None
        experiments = [experiment.experiment_id for experiment in _retry_locked(client.search_experiments)]
        found = list(_retry_locked(client.search_runs, experiments, f"attributes.run_name = '{run}'"))
    if len(found) > 1:
        raise ValueError(f"RUN: {len(found)} runs are named {run!r} ({', '.join(r.info.run_id for r in found)}); "
                         "give a run id")
    if not found:
        return None
    (match,) = found
    return _run_dict(match)


def log_evaluation(uri: str, run_id: str, metrics: dict[str, float], step: int, evaluations: Sequence[str],
                   artifacts: Sequence[Path] = ()) -> None:
    """Add evaluations of a trained run to it: ``metrics`` at ``step``, ``artifacts`` at the top of its
    artifacts, and their names in ``attamba.evaluations`` (joined with those added before). Its
    status and end time are left as they are."""
    client = MlflowClient(tracking_uri=uri)
    logged = _retry_locked(client.get_run, run_id).data.tags.get(TAG_EVALUATIONS, "")
    names = sorted({*filter(None, logged.split(",")), *evaluations})
    timestamp = _now_ms()
    entries = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
    for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
        _retry_locked(client.log_batch, run_id, metrics=list(chunk), synchronous=True)
    for path in artifacts:
        _retry_locked(client.log_artifact, run_id, str(path))
    tag = RunTag(TAG_EVALUATIONS, _truncate(",".join(names), MAX_TAG_VAL_LENGTH))
    _retry_locked(client.log_batch, run_id, tags=[tag], synchronous=True)
