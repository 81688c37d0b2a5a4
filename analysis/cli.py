"""``attamba-analyze``: import Lingua dumps, and turn tracked runs into figures and tables.

    attamba-analyze import-lingua DIR... --experiment NAME [--tracking-uri URI]
    attamba-analyze iso-kv|pareto|leading-tokens|chunk-strategy|curves --experiment NAME... \
        [--tracking-uri URI] [--metric KEY] [--runs NAME...] --out DIR
    attamba-analyze recall|passkey --experiment NAME... [--tracking-uri URI] --out DIR
    attamba-analyze all [--experiment NAME...] [--tracking-uri URI] [--metric KEY] --out DIR

A figure command writes ``DIR/<figure>.{png,pdf,csv,md}`` and prints the Markdown
table and the runs left out. ``all`` builds every figure each experiment supports
into ``DIR/<experiment>/`` and says why it skips the others. ``recall`` and
``passkey`` plot their own metrics (``eval/mqar/accuracy``, ``eval/passkey/accuracy``
and each run's ``passkey.csv``); ``--metric`` chooses the others'.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

import polars as pl

from analysis import lingua, tables
from analysis.figures import markdown_report, write_figure
from analysis.runs import list_experiments, load_runs, metric_histories
from attamba.tracking import artifact_texts

DEFAULT_URI = "sqlite:///runs/mlflow.db"
TABLES: dict[str, Callable[..., tables.FigureData]] = {
    "iso-kv": tables.iso_kv_table,
    "pareto": tables.pareto_table,
    "leading-tokens": tables.leading_tokens_table,
    "chunk-strategy": tables.chunk_strategy_table,
}
OWN_METRIC = ("recall", "passkey")  # figures of one fixed metric: --metric does not apply
FIGURES = (*TABLES, "curves", *OWN_METRIC)


def build(name: str, uri: str, runs: pl.DataFrame, metric: str | None,
          run_names: Sequence[str] | None = None) -> tables.FigureData:
    """The :class:`FigureData` of figure ``name`` for ``runs`` (histories fetched for curves)."""
    if name in TABLES:
        return TABLES[name](runs, metric)
    if name == "recall":
        return tables.recall_table(runs)
    if name == "passkey":
        logged = tables.PASSKEY_METRIC in runs.columns
        scored = runs.filter(pl.col(tables.PASSKEY_METRIC).is_not_null())["run_id"].to_list() if logged else []
        return tables.passkey_table(runs, artifact_texts(uri, scored, tables.PASSKEY_ARTIFACT))
    chosen = tables.choose_metric(runs, metric)
    selected = runs.filter(pl.col("run_name").is_in(list(run_names))) if run_names else runs
    histories = metric_histories(uri, selected["run_id"].to_list(), [chosen.key])
    return tables.curves_table(runs, histories, metric, run_names)


def _figure(args: argparse.Namespace) -> int:
    runs = load_runs(args.tracking_uri, args.experiment)
    try:
        data = build(args.command, args.tracking_uri, runs, args.metric, args.runs)
    except tables.NothingToPlot as reason:
        print(f"{args.command}: nothing to plot: {reason}", file=sys.stderr)
        return 1
    paths = write_figure(data, args.out)
    print(markdown_report(data))
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0


def _all(args: argparse.Namespace) -> int:
    experiments = args.experiment or list_experiments(args.tracking_uri)
    if not experiments:
        print(f"no runs in {args.tracking_uri}: nothing to plot", file=sys.stderr)
        return 1
    for experiment in experiments:
        runs = load_runs(args.tracking_uri, experiment)
        for name in FIGURES:
            try:
                data = build(name, args.tracking_uri, runs, args.metric)
            except tables.NothingToPlot as reason:
                print(f"[{experiment}] {name}: skipped: {reason}\n")
                continue
            paths = write_figure(data, Path(args.out) / experiment)
            print(f"[{experiment}] " + markdown_report(data))
            print(f"wrote {paths['png'].with_suffix('.*')}\n")
    return 0


def _import(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", lingua.LinguaImportWarning)
        results = lingua.import_dumps(args.directories, args.tracking_uri, args.experiment)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    for result in results:
        print(f"{result.action:9s} {result.run_name} -> run {result.run_id}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="attamba-analyze", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--tracking-uri", default=DEFAULT_URI, help=f"MLflow store (default {DEFAULT_URI})")

    importer = commands.add_parser("import-lingua", help="import Meta Lingua dump directories as MLflow runs")
    importer.add_argument("directories", nargs="+", metavar="DIR")
    importer.add_argument("--experiment", required=True)
    common(importer)
    for name in FIGURES:
        sub = commands.add_parser(name, help=f"draw the {name} figure and its table")
        sub.add_argument("--experiment", nargs="+", required=True)
        if name not in OWN_METRIC:
            sub.add_argument("--metric", help="metric key (default: WikiText-2 word perplexity, "
                                              "else validation word perplexity)")
        sub.add_argument("--out", required=True, type=Path)
        if name == "curves":
            sub.add_argument("--runs", nargs="+", metavar="NAME", help="run names to draw (default: all)")
        common(sub)
    every = commands.add_parser("all", help="every figure each experiment supports")
    every.add_argument("--experiment", nargs="+", help="default: every experiment with runs")
    every.add_argument("--metric", help="metric key of the figures that take one (not recall, passkey)")
    every.add_argument("--out", required=True, type=Path)
    common(every)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in FIGURES:
        args.runs = getattr(args, "runs", None)
        args.metric = getattr(args, "metric", None)
        handler = _figure
    else:
        handler = {"import-lingua": _import, "all": _all}[args.command]
    try:
        return handler(args)
    except ValueError as error:
        print(f"attamba-analyze {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
