"""The numbers behind each figure: which runs fit, in which role, with which value.

Everything is derived from tracked params and tags (never from run names):

* ``role`` of a run: ``attamba`` / ``attamba-pseudo`` (chunking.strategy), and for
  transformers ``sliding-window`` (model.window), ``iso-kv`` / ``iso-flops`` /
  ``iso-params`` (model.match), ``full`` (full-width MHA), else ``transformer``;
  other families are their own role.
* the value plotted: the final value of the chosen metric and its step.

Each ``*_table`` function returns a :class:`FigureData`: the table of exactly the
numbers drawn (one row per run; per point for curves) and the runs left out with
the reason, so that nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import polars as pl

# WikiText-2 metrics a figure may plot when none is asked for: the one most runs of the selection
# logged, in this order on a tie (imported paper runs have only the paper's per-token perplexity).
PREFERRED_METRICS = ("eval/wikitext2/word_perplexity", "eval/wikitext2/paper_perplexity")
FALLBACK_METRIC = "eval/val/word_perplexity"
METRIC_LABELS = {
    "eval/wikitext2/word_perplexity": "WikiText-2 word perplexity (lm-eval)",
    "eval/wikitext2/paper_perplexity": "WikiText-2 perplexity as in the Attamba paper (per token)",
    "eval/wikitext2/byte_perplexity": "WikiText-2 byte perplexity",
    "eval/wikitext2/bits_per_byte": "WikiText-2 bits per byte",
    "eval/val/word_perplexity": "validation word perplexity",
    "eval/val/loss": "validation loss (nats/token)",
    "train/loss": "training loss (nats/token)",
    "speed/tokens_per_s": "throughput (tokens/s)",
    "mem/peak_gib": "peak memory (GiB)",
}
ROLE_ORDER = ("attamba", "iso-kv", "iso-flops", "sliding-window", "full", "iso-params", "transformer",
              "attamba-pseudo", "mamba2")
STRATEGY_ORDER = ("uniform", "cyclic", "random", "pseudo")
# Params that say where or how a run was executed, not what it computes: ignored when
# deciding whether two runs differ only in the setting a figure varies.
INCIDENTAL_PARAMS = ("train.output_dir", "train.device", "train.compile", "data.root", "model.attn_impl",
                     "model.ssm.impl", "chunking.seed", "train.eval_every", "train.checkpoint_every",
                     "train.log_every")
SETTING_PREFIXES = ("model.", "chunking.", "train.", "data.", "optim.")
ROW_COLUMNS = ("run_name", "run_id", "family", "role", "strategy", "chunk_size", "leading_tokens",
               "attn_width", "kv_bytes_per_token", "step", "metric", "value")


class NothingToPlot(Exception):
    """No run of the selection fits a figure (the reason says why)."""


@dataclass
class Metric:
    """The metric a figure plots; ``fallback`` says why it is not the one asked for."""

    key: str
    fallback: str | None = None

    @property
    def label(self) -> str:
        label = METRIC_LABELS.get(self.key, self.key)
        return f"{label} (fallback: {self.fallback})" if self.fallback else label


@dataclass
class FigureData:
    """Exactly the numbers one figure draws, and every run it leaves out with the reason."""

    name: str
    metric: Metric
    table: pl.DataFrame
    excluded: list[tuple[str, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------- derived columns


def _column(runs: pl.DataFrame, name: str, dtype: pl.DataType) -> pl.Expr:
    return pl.col(name).cast(dtype) if name in runs.columns else pl.lit(None, dtype=dtype)


def annotate(runs: pl.DataFrame) -> pl.DataFrame:
    """``runs`` (from :func:`analysis.runs.load_runs`) without sweep parents, plus the derived
    columns figures use: family, role, strategy, chunk_size, leading_tokens, attn_width,
    kv_bytes_per_token, tokens_per_step and sweep."""
    family = pl.coalesce(_column(runs, "model.family", pl.String), _column(runs, "tags.attamba.family", pl.String))
    dim = _column(runs, "model.dim", pl.Int64)
    attn_dim = _column(runs, "model.attn_dim", pl.Int64)
    heads, kv_heads = _column(runs, "model.n_heads", pl.Int64), _column(runs, "model.n_kv_heads", pl.Int64)
    strategy = _column(runs, "chunking.strategy", pl.String)
    match = _column(runs, "model.match", pl.String)
    width = pl.coalesce(attn_dim, dim)
    transformer_role = (
        pl.when(_column(runs, "model.window", pl.Int64).is_not_null()).then(pl.lit("sliding-window"))
        .when(match == "kv_cache").then(pl.lit("iso-kv"))
        .when(match == "flops").then(pl.lit("iso-flops"))
        .when((width == dim) & (kv_heads.is_null() | (kv_heads == heads))).then(pl.lit("full"))
        .when(match == "params").then(pl.lit("iso-params"))
        .otherwise(pl.lit("transformer"))
    )
    role = (pl.when(family == "attamba").then(pl.when(strategy == "pseudo").then(pl.lit("attamba-pseudo"))
                                              .otherwise(pl.lit("attamba")))
            .when(family == "transformer").then(transformer_role)
            .otherwise(family))
    parents = _column(runs, "is_sweep_parent", pl.Boolean).fill_null(False)
    return runs.filter(~parents).with_columns(
        family.alias("family"), role.alias("role"), strategy.alias("strategy"),
        _column(runs, "chunking.size", pl.Int64).alias("chunk_size"),
        _column(runs, "chunking.leading_tokens", pl.Int64).alias("leading_tokens"),
        pl.when(family == "transformer").then(width).when(family == "attamba").then(dim)
        .otherwise(None).alias("attn_width"),
        _column(runs, "model/kv_bytes_per_token", pl.Float64).alias("kv_bytes_per_token"),
        (_column(runs, "train.batch_size", pl.Int64) * _column(runs, "train.seq_len", pl.Int64))
        .alias("tokens_per_step"),
        _column(runs, "tags.attamba.sweep", pl.String).fill_null("").alias("sweep"),
    )


def settings_signature(row: dict, ignore: Sequence[str]) -> tuple:
    """What a run computes, as a hashable tuple of its setting params, minus ``ignore``: runs
    with equal signatures differ only in the ignored settings."""
    return tuple(sorted((key, value) for key, value in row.items()
                        if key.startswith(SETTING_PREFIXES) and key not in INCIDENTAL_PARAMS
                        and key not in ignore and value is not None))


# ----------------------------------------------------------------------------- metric choice


def choose_metric(runs: pl.DataFrame, requested: str | None) -> Metric:
    """The metric to plot: ``requested``, else the WikiText-2 metric of ``PREFERRED_METRICS`` that
    most runs logged, else (saying so) validation perplexity. ``ValueError`` if a requested metric
    was never logged."""
    logged = [column for column in runs.columns if "/" in column and ":" not in column]
    if requested is not None:
        if requested not in runs.columns or runs[requested].is_null().all():
            raise ValueError(f"--metric: no run here logged {requested!r}; logged metrics are "
                             f"{', '.join(sorted(logged)) or 'none'}")
        return Metric(requested)
    logged_by = {key: runs[key].is_not_null().sum() for key in PREFERRED_METRICS if key in runs.columns}
    if any(logged_by.values()):
        return Metric(max(logged_by, key=logged_by.__getitem__))  # max keeps the first of equals
    if FALLBACK_METRIC in runs.columns and not runs[FALLBACK_METRIC].is_null().all():
        return Metric(FALLBACK_METRIC, fallback="no WikiText-2 results")
    raise NothingToPlot(f"no run logged {' or '.join(PREFERRED_METRICS)} or {FALLBACK_METRIC}; pass --metric "
                        f"(logged: {', '.join(sorted(logged)) or 'none'})")


def _with_value(runs: pl.DataFrame, metric: Metric) -> pl.DataFrame:
    """``runs`` with ``metric``, ``value`` (final) and ``step`` columns."""
    return runs.with_columns(pl.lit(metric.key).alias("metric"), pl.col(metric.key).alias("value"),
                             pl.col(f"{metric.key}:step").alias("step"))


def _split(runs: pl.DataFrame, keep: pl.Expr, reason: str | pl.Expr,
           excluded: list[tuple[str, str]]) -> pl.DataFrame:
    """The rows where ``keep`` holds; the others are appended to ``excluded`` with ``reason``."""
    keep = keep.fill_null(False)
    reason_expr = pl.lit(reason) if isinstance(reason, str) else reason
    dropped = runs.filter(~keep).select("run_name", reason_expr.alias("reason"))
    excluded.extend(dropped.iter_rows())
    return runs.filter(keep)


def _usable(runs: pl.DataFrame, metric: Metric, excluded: list[tuple[str, str]]) -> pl.DataFrame:
    """Finished runs that logged ``metric``, with its value; the rest listed."""
    runs = _split(runs, pl.col("status") == "FINISHED", pl.format("status {}", pl.col("status")), excluded)
    runs = _split(runs, pl.col(metric.key).is_not_null(), f"no {metric.key}", excluded)
    return _with_value(runs, metric)


def _rows(runs: pl.DataFrame, *extra: str) -> pl.DataFrame:
    return runs.select(*ROW_COLUMNS, *extra)


def _order(column: str, order: Sequence[str]) -> pl.Expr:
    """Sort key: position of ``column``'s value in ``order``, unknown values after, alphabetically."""
    return pl.col(column).replace_strict(list(order), list(range(len(order))), default=len(order),
                                         return_dtype=pl.Int64)


def _latest_per(runs: pl.DataFrame, keys: list[str], excluded: list[tuple[str, str]]) -> pl.DataFrame:
    """One run per ``keys`` value (the latest started); the earlier duplicates are listed."""
    runs = runs.sort("start_time", descending=True)
    first = runs.select(pl.int_range(pl.len()).over(keys) == 0).to_series()
    latest = runs.filter(first)
    for row in runs.filter(~first).iter_rows(named=True):
        twin = latest.filter(pl.all_horizontal(pl.col(k) == row[k] for k in keys))["run_name"][0]
        excluded.append((row["run_name"], f"same settings as the later run {twin}"))
    return latest


# ----------------------------------------------------------------------------- figures


def iso_kv_table(runs: pl.DataFrame, requested: str | None = None) -> FigureData:
    """Per chunk size P: Attamba, its iso-KV and iso-FLOP transformers and sliding-window
    variants, from sweeps (``attamba.sweep`` tag) holding matched baselines; the full
    transformer as reference. ``rel_diff`` on a baseline row: Attamba's value relative to it."""
    runs = annotate(runs)
    metric, excluded = choose_metric(runs, requested), []
    runs = _usable(runs, metric, excluded)
    baselines = runs.filter(pl.col("role").is_in(["iso-kv", "iso-flops"]) & pl.col("chunk_size").is_not_null())
    if baselines.is_empty():
        raise NothingToPlot("no transformer matched to an Attamba chunk size (model.match kv_cache or flops "
                            "with chunking.size)")
    sweeps = baselines["sweep"].unique().to_list()
    fulls = runs.filter(pl.col("role") == "full")
    if not fulls.filter(pl.col("sweep").is_in(sweeps)).is_empty():
        fulls = fulls.filter(pl.col("sweep").is_in(sweeps))
    bar_roles = ["attamba", "iso-kv", "iso-flops", "sliding-window"]
    others = runs.filter(~pl.col("run_id").is_in(fulls["run_id"].to_list()))
    bars = _split(others, pl.col("role").is_in(bar_roles), pl.format("role {} has no place in this figure",
                                                                   pl.col("role")), excluded)
    bars = _split(bars, pl.col("sweep").is_in(sweeps), "not in a sweep with matched baselines", excluded)
    bars = _split(bars, pl.col("chunk_size").is_not_null(), "no chunking.size to group it by", excluded)
    attamba = (bars.filter(pl.col("role") == "attamba").group_by("sweep", "chunk_size")
               .agg(pl.col("value").first().alias("attamba_value"), pl.len().alias("attamba_runs")))
    bars = (bars.join(attamba, on=["sweep", "chunk_size"], how="left")
            .with_columns(pl.when((pl.col("role") != "attamba") & (pl.col("attamba_runs") == 1))
                          .then(pl.col("attamba_value") / pl.col("value") - 1).alias("rel_diff"))
            .sort("chunk_size", _order("role", ROLE_ORDER), "run_name"))
    fulls = fulls.with_columns(pl.lit(None, dtype=pl.Float64).alias("rel_diff")).sort("run_name")
    table = pl.concat([_rows(bars, "rel_diff"), _rows(fulls, "rel_diff")])
    return FigureData("iso-kv", metric, table, excluded)


def pareto_front(kv: Sequence[float], value: Sequence[float]) -> list[bool]:
    """Whether each point is Pareto-optimal: no other point has both no more KV bytes and
    no higher value, with one of them strictly less."""
    points = list(zip(kv, value))
    return [not any(k2 <= k and v2 <= v and (k2 < k or v2 < v) for k2, v2 in points) for k, v in points]


def pareto_table(runs: pl.DataFrame, requested: str | None = None) -> FigureData:
    """Metric against KV-cache bytes per token for every run with a KV cache; ``on_front`` marks
    the Pareto front over all families."""
    runs = annotate(runs)
    metric, excluded = choose_metric(runs, requested), []
    runs = _usable(runs, metric, excluded)
    runs = _split(runs, pl.col("kv_bytes_per_token").is_not_null(), "no model/kv_bytes_per_token", excluded)
    runs = _split(runs, pl.col("kv_bytes_per_token") > 0,
                  "no KV cache (0 bytes/token) cannot sit on the log axis", excluded)
    if runs.is_empty():
        raise NothingToPlot("no run has both the metric and a KV cache size")
    runs = runs.sort("family", "kv_bytes_per_token", "run_name")
    front = pareto_front(runs["kv_bytes_per_token"].to_list(), runs["value"].to_list())
    table = _rows(runs.with_columns(pl.Series("on_front", front)), "on_front")
    return FigureData("pareto", metric, table, excluded)


def _series_labels(runs: pl.DataFrame, varied: str, ignore: Sequence[str]) -> pl.DataFrame:
    """Group runs that differ only in ``varied`` (and ``ignore``) into series; label each
    series by its chunk size, plus the settings that tell apart series sharing one."""
    rows = runs.to_dicts()
    signatures = [settings_signature(row, (varied, *ignore)) for row in rows]
    ids = {signature: index for index, signature in enumerate(dict.fromkeys(signatures))}
    labels = []
    for row, signature in zip(rows, signatures):
        same_size = {s for r, s in zip(rows, signatures) if r["chunk_size"] == row["chunk_size"]}
        differing = sorted({key for other in same_size for key, value in set(other) ^ set(signature)})
        mine = dict(signature)
        details = ", ".join(f"{key.split('.', 1)[1]}={mine.get(key)}" for key in differing)
        labels.append(f"P={row['chunk_size']}" + (f" ({details})" if details else ""))
    return runs.with_columns(pl.Series("series", [ids[s] for s in signatures], dtype=pl.Int64),
                             pl.Series("series_label", labels, dtype=pl.String))


def leading_tokens_table(runs: pl.DataFrame, requested: str | None = None) -> FigureData:
    """Attamba runs that differ only in leading tokens, one series per chunk size (and other
    settings), plus full transformers as reference lines."""
    runs = annotate(runs)
    metric, excluded = choose_metric(runs, requested), []
    runs = _usable(runs, metric, excluded)
    fulls = runs.filter(pl.col("role") == "full")
    attamba = _split(runs.filter(pl.col("role") != "full"), pl.col("role") == "attamba",
                     pl.format("role {} has no leading-tokens axis", pl.col("role")), excluded)
    attamba = _split(attamba, pl.col("leading_tokens") > 0, "0 leading tokens cannot sit on the log axis", excluded)
    attamba = _series_labels(attamba, "chunking.leading_tokens", ())
    attamba = _latest_per(attamba, ["series", "leading_tokens"], excluded)
    varied = attamba.group_by("series").agg(pl.col("leading_tokens").n_unique().alias("settings"))
    attamba = attamba.join(varied, on="series")
    attamba = _split(attamba, pl.col("settings") >= 2,
                     "no run differing only in leading tokens to compare with", excluded)
    if attamba.is_empty():
        raise NothingToPlot("no Attamba runs that differ only in leading tokens")
    attamba = _series_labels(attamba, "chunking.leading_tokens", ()).sort("chunk_size", "series", "leading_tokens")
    fulls = fulls.with_columns(pl.lit(None, dtype=pl.String).alias("series_label")).sort("run_name")
    table = pl.concat([_rows(attamba, "series_label"), _rows(fulls, "series_label")])
    return FigureData("leading-tokens", metric, table, excluded)


def chunk_strategy_table(runs: pl.DataFrame, requested: str | None = None) -> FigureData:
    """Attamba runs that differ only in chunking strategy: one bar per strategy and group."""
    runs = annotate(runs)
    metric, excluded = choose_metric(runs, requested), []
    runs = _usable(runs, metric, excluded)
    runs = _split(runs, pl.col("family") == "attamba", pl.format("family {} has no chunking",
                                                                 pl.col("family")), excluded)
    runs = _series_labels(runs, "chunking.strategy", ())
    runs = _latest_per(runs, ["series", "strategy"], excluded)
    varied = runs.group_by("series").agg(pl.col("strategy").n_unique().alias("strategies"))
    runs = _split(runs.join(varied, on="series"), pl.col("strategies") >= 2,
                  "no run differing only in chunking strategy to compare with", excluded)
    if runs.is_empty():
        raise NothingToPlot("no Attamba runs that differ only in chunking strategy")
    runs = _series_labels(runs, "chunking.strategy", ())  # labels tell apart only the series drawn
    runs = runs.sort("chunk_size", "series", _order("strategy", STRATEGY_ORDER), "strategy")
    return FigureData("chunk-strategy", metric, _rows(runs, "series_label"), excluded)


def curves_table(runs: pl.DataFrame, histories: pl.DataFrame, requested: str | None = None,
                 names: Sequence[str] | None = None) -> FigureData:
    """Every logged point of the metric for the selected runs (``names``; default all), against
    step and tokens (step x train.batch_size x train.seq_len). One row per point."""
    runs = annotate(runs)
    metric, excluded = choose_metric(runs, requested), []
    if names:
        unknown = sorted(set(names) - set(runs["run_name"]))
        if unknown:
            raise ValueError(f"--runs: no run named {', '.join(unknown)}; runs are "
                             f"{', '.join(sorted(runs['run_name']))}")
        runs = runs.filter(pl.col("run_name").is_in(list(names)))
    runs = _usable(runs, metric, excluded)
    points = (histories.filter(pl.col("key") == metric.key)
              .select("run_id", pl.col("step").alias("point_step"), pl.col("value").alias("point_value")))
    runs = _split(runs, pl.col("run_id").is_in(points["run_id"].to_list()), "no history", excluded)
    if runs.is_empty():
        raise NothingToPlot(f"no selected run has a history of {metric.key}")
    excluded.extend((name, "no train.batch_size/train.seq_len: drawn against steps only")
                    for name in runs.filter(pl.col("tokens_per_step").is_null())["run_name"])
    table = (_with_value(runs, metric).drop("step", "value").join(points, on="run_id")
             .with_columns(pl.col("point_step").alias("step"), pl.col("point_value").alias("value"),
                           (pl.col("point_step") * pl.col("tokens_per_step")).alias("tokens"))
             .sort("run_name", "step"))
    return FigureData("curves", metric, _rows(table, "tokens"), excluded)
