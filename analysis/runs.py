"""Tracked runs as polars tables: one row per run, or one row per logged metric value.

Reads any MLflow tracking URI through :mod:`attamba.tracking`'s query functions; never imports
the trainer. MLflow stores every param as a string, so each param column is typed back from its
strings: ``"None"`` becomes null, and a column whose other values all read as booleans, integers
or numbers gets that dtype.

Columns of :func:`load_runs`:

* ``run_id``, ``run_name``, ``experiment``, ``status``, ``start_time`` (ms since epoch);
* ``parent_run_id`` and ``is_sweep_parent`` (a sweep's parent run carries no results);
* one column per param, under its dotted key (``model.family``, ``chunking.size``, ...);
* one ``tags.<name>`` column per tag;
* per metric ``<key>``: the final value (at the highest step), ``<key>:step`` its step,
  ``<key>:best`` the best value (lowest, or highest for ``speed/`` and accuracy metrics) and
  ``<key>:best_step``.
"""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from attamba.tracking import TAG_PARENT_RUN, TAG_SWEEP_PARENT, experiment_names, find_runs, metric_history

HIGHER_IS_BETTER_PREFIXES = ("speed/",)
HIGHER_IS_BETTER_SUFFIXES = ("/accuracy",)
BASE_SCHEMA = {"run_id": pl.String, "run_name": pl.String, "experiment": pl.String, "status": pl.String,
               "start_time": pl.Int64, "parent_run_id": pl.String, "is_sweep_parent": pl.Boolean}


# ----------------------------------------------------------------------------- params


def parse_param(text: str) -> Any:
    """The Python value an MLflow param string stands for: None, bool, int, float or the string."""
    if text == "None":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _param_column(name: str, texts: Sequence[str | None]) -> pl.Series:
    """A typed column: Boolean, Int64 or Float64 when every non-null value reads so, else String."""
    values = [None if text is None else parse_param(text) for text in texts]
    present = [value for value in values if value is not None]
    if present and all(isinstance(value, bool) for value in present):
        return pl.Series(name, values, dtype=pl.Boolean)
    if present and all(isinstance(value, int) and not isinstance(value, bool) for value in present):
        return pl.Series(name, values, dtype=pl.Int64)
    if present and all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in present):
        return pl.Series(name, [None if value is None else float(value) for value in values], dtype=pl.Float64)
    # Mixed or free text: keep MLflow's strings, with only "None" read as missing.
    return pl.Series(name, [None if text in (None, "None") else text for text in texts], dtype=pl.String)


# ----------------------------------------------------------------------------- metrics


def higher_is_better(key: str) -> bool:
    """Whether a larger value of metric ``key`` is better (throughput, accuracy); losses,
    perplexities, memory and everything else improve downwards."""
    return key.startswith(HIGHER_IS_BETTER_PREFIXES) or key.endswith(HIGHER_IS_BETTER_SUFFIXES)


def _summarise(key: str, history: Sequence[tuple[int, float]]) -> dict[str, Any]:
    """Final and best value (and their steps) of one metric's ``(step, value)`` history, sorted by step."""
    final_step, final = history[-1]
    pick = max if higher_is_better(key) else min
    best_step, best = pick(history, key=lambda point: point[1])  # ties: the earliest step
    return {key: final, f"{key}:step": final_step, f"{key}:best": best, f"{key}:best_step": best_step}


# ----------------------------------------------------------------------------- runs


def list_experiments(uri: str) -> list[str]:
    """Names of the active experiments in the store at ``uri`` that hold at least one run."""
    return experiment_names(uri, with_runs=True)


def load_runs(uri: str, experiments: str | Sequence[str]) -> pl.DataFrame:
    """Every run of ``experiments`` in the store at ``uri``: params typed, final and best metric values."""
    names = [experiments] if isinstance(experiments, str) else list(experiments)
    known = experiment_names(uri)
    for name in names:
        if name not in known:
            raise ValueError(f"--experiment: no experiment {name!r} in this store; it has {', '.join(known) or 'none'}")
    found = sorted(((run, name) for name in names for run in find_runs(uri, name)),
                   key=lambda pair: pair[0]["start_time"])
    rows: list[tuple[dict[str, Any], dict[str, str], dict[str, str]]] = []
    for run, experiment in found:
        tags = run["tags"]
        row: dict[str, Any] = {
            "run_id": run["run_id"], "run_name": run["run_name"], "experiment": experiment,
            "status": run["status"], "start_time": run["start_time"], "parent_run_id": tags.get(TAG_PARENT_RUN),
            "is_sweep_parent": tags.get(TAG_SWEEP_PARENT) == "true",
        }
        for key in sorted(run["metrics"]):
            history = metric_history(uri, run["run_id"], key)
            if history:
                row.update(_summarise(key, history))
        rows.append((row, run["params"], tags))
    return _frame(rows)


def _frame(rows: list[tuple[dict[str, Any], dict[str, str], dict[str, str]]]) -> pl.DataFrame:
    """Assemble base/metric values, typed params and tags into one frame with a stable column order."""
    base = [row for row, _, _ in rows]
    param_keys = sorted({key for _, params, _ in rows for key in params})
    tag_keys = sorted({key for _, _, tags in rows for key in tags})
    metric_keys = sorted({key for row in base for key in row} - set(BASE_SCHEMA))
    if not rows:
        return pl.DataFrame(schema=BASE_SCHEMA)
    columns = [pl.Series(name, [row[name] for row in base], dtype=dtype) for name, dtype in BASE_SCHEMA.items()]
    columns += [_param_column(key, [params.get(key) for _, params, _ in rows]) for key in param_keys]
    columns += [pl.Series(f"tags.{key}", [tags.get(key) for _, _, tags in rows], dtype=pl.String) for key in tag_keys]
    for key in metric_keys:
        dtype = pl.Int64 if key.endswith((":step", ":best_step")) else pl.Float64
        columns.append(pl.Series(key, [row.get(key) for row in base], dtype=dtype))
    return pl.DataFrame(columns)


def metric_histories(uri: str, run_ids: Sequence[str], keys: Sequence[str]) -> pl.DataFrame:
    """Long table ``run_id, key, step, value`` of every logged value of ``keys`` in ``run_ids``,
    sorted by run, key and step (one value per step: the last logged)."""
    records = [(run_id, key, step, value)
               for run_id in run_ids for key in keys
               for step, value in metric_history(uri, run_id, key)]
    return pl.DataFrame(records, schema={"run_id": pl.String, "key": pl.String, "step": pl.Int64,
                                         "value": pl.Float64}, orient="row")
