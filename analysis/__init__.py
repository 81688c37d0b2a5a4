"""Tracked runs → polars tables → publication figures; Meta Lingua dump import.

Reads MLflow (any tracking URI) and Lingua dump directories, never the trainer.

* :func:`analysis.runs.load_runs`, :func:`analysis.runs.metric_histories`: runs as polars.
* :func:`analysis.lingua.import_dumps`: Lingua dumps as MLflow runs, idempotently.
* :mod:`analysis.tables`: which runs fit each figure, in which role, with which value.
* :func:`analysis.figures.write_figure`: PNG, PDF, CSV and Markdown of one figure.
* :mod:`analysis.cli`: the ``attamba-analyze`` command.
"""

from analysis.figures import write_figure
from analysis.lingua import import_dumps
from analysis.runs import load_runs, metric_histories

__all__ = ["import_dumps", "load_runs", "metric_histories", "write_figure"]
