"""The numbers behind each figure: which runs fit, in which role, with which value.

Everything is derived from tracked params and tags (never from run names):

* ``role`` of a run: ``attamba`` / ``attamba-pseudo`` (chunking.strategy), and for
  transformers ``sliding-window`` (model.window), ``iso-kv`` / ``iso-flops`` /
  ``iso-params`` (model.match), ``full`` (full-width MHA), else ``transformer``;
  other families are their own role.
* the value plotted: the final value of the chosen metric and its step.
* seed replicates: runs whose params differ only in ``train.seed`` (and in params that do
  not define a configuration: the config hash's exclusions and ``INCIDENTAL_PARAMS``) form
  one group, plotted as ``mean``, ``std`` (sample standard deviation, null for one run) and
  ``n``; ``run_name``, ``run_id`` and ``seeds`` list the group's runs, by seed.

Each ``*_table`` function returns a :class:`FigureData`: the table of exactly the
numbers drawn (one row per group; per point for curves and heatmaps) and the runs left
out with the reason, so that nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import polars as pl

from attamba.tracking import hash_excluded

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
    "eval/mqar/accuracy": "MQAR recall accuracy (exact match per query)",
    "eval/passkey/accuracy": "passkey retrieval accuracy (exact match)",
}
RECALL_METRIC = "eval/mqar/accuracy"
PASSKEY_METRIC = "eval/passkey/accuracy"
PASSKEY_ARTIFACT = "passkey.csv"  # columns length, depth, accuracy, n: one row per context length and depth
PASSKEY_COLUMNS = ("length", "depth", "accuracy", "n")
ROLE_ORDER = ("attamba", "iso-kv", "iso-flops", "sliding-window", "full", "iso-params", "transformer",
              "attamba-pseudo", "mamba2")
STRATEGY_ORDER = ("uniform", "cyclic", "random", "pseudo")
# Params that say how fast or how often a run computes, not what: ignored, besides the config
# hash's exclusions (where a run executes and logs), when deciding whether two runs differ only
# in the setting a figure varies or only in their seed.
INCIDENTAL_PARAMS = ("train.compile", "train.compile_mode", "model.attn_impl", "model.ssm.impl", "chunking.seed",
                     "train.eval_every", "train.checkpoint_every", "train.log_every", "eval.wikitext2_every")
SETTING_PREFIXES = ("model.", "chunking.", "train.", "data.", "optim.", "eval.")
SEED_PARAM = "train.seed"
ROW_COLUMNS = ("run_name", "run_id", "family", "role", "strategy", "chunk_size", "leading_tokens",
               "attn_width", "kv_bytes_per_token", "step", "metric", "mean", "std", "n", "seeds")


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
    kv_bytes_per_token, tokens_per_step, sweep and seed."""
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
        _column(runs, SEED_PARAM, pl.Int64).alias("seed"),
    )


def defines_configuration(key: str) -> bool:
    """Whether param ``key`` is part of what a run computes (not where it ran or logged, nor how fast)."""
    return key.startswith(SETTING_PREFIXES) and not hash_excluded(key) and key not in INCIDENTAL_PARAMS


def settings_signature(row: dict, ignore: Sequence[str]) -> tuple:
    """What a run computes, as a hashable tuple of its setting params, minus ``ignore``: runs
    with equal signatures differ only in the ignored settings."""
    return tuple(sorted((key, value) for key, value in row.items()
                        if defines_configuration(key) and key not in ignore and value is not None))


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
        twin = latest.filter(pl.all_horizontal(pl.col(k).eq_missing(row[k]) for k in keys))["run_name"][0]
        excluded.append((row["run_name"], f"same settings as the later run {twin}"))
    return latest


# ----------------------------------------------------------------------------- seeds


def seed_groups(runs: pl.DataFrame, excluded: list[tuple[str, str]]) -> pl.DataFrame:
    """``runs`` with a ``group`` id shared by runs whose params differ only in ``train.seed``; of
    runs with the same seed too, only the latest started is kept (the others are listed)."""
    signatures = [settings_signature(row, (SEED_PARAM,)) for row in runs.to_dicts()]
    ids = {signature: index for index, signature in enumerate(dict.fromkeys(signatures))}
    runs = runs.with_columns(pl.Series("group", [ids[s] for s in signatures], dtype=pl.Int64))
    return _latest_per(runs, ["group", "seed"], excluded).sort("group", "seed", "start_time")


def _spread(value: str) -> list[pl.Expr]:
    """Mean, sample standard deviation (null for one value) and count of ``value``."""
    return [pl.col(value).mean().alias("mean"), pl.col(value).std(ddof=1).alias("std"),
            pl.len().cast(pl.Int64).alias("n")]


def collapse_seeds(groups: pl.DataFrame) -> pl.DataFrame:
    """One row per ``group`` of :func:`seed_groups`: ``mean``/``std``/``n`` of ``value``, the runs'
    names, ids and seeds joined with ", " (by seed), the latest start time, and every other column
    as in the group's first run. ``train.seed`` becomes null: the group stands for all its seeds."""
    listed = {"value", "run_name", "run_id", "seed", "start_time", "step", SEED_PARAM}
    return (groups.sort("group", "seed", "start_time")
            .group_by("group", maintain_order=True)
            .agg(*_spread("value"),
                 pl.col("run_name").str.join(", "), pl.col("run_id").str.join(", "),
                 pl.col("seed").cast(pl.String).str.join(", ").alias("seeds"),
                 pl.col("start_time").max(), pl.col("step").max(),
                 *(pl.col(column).first() for column in groups.columns if column not in listed | {"group"}))
            .with_columns(pl.lit(None, dtype=pl.Int64).alias(SEED_PARAM)))


def _grouped(runs: pl.DataFrame, excluded: list[tuple[str, str]]) -> pl.DataFrame:
    return collapse_seeds(seed_groups(runs, excluded))


# ----------------------------------------------------------------------------- figures


def relative_difference(table: pl.DataFrame, reference: str) -> pl.DataFrame:
    """``rel_diff`` = reference mean / row mean - 1 (``reference`` prefixes the reference group's
    ``_mean``/``_std``/``_n`` columns), its standard error ``rel_diff_se`` by first-order
    propagation through the ratio of two independent means (each mean's standard error
    std/sqrt(n)), and ``within_spread``: whether the two means differ by less than the seed
    spread of a single-run difference, sqrt(std_a^2 + std_b^2). Both are null unless both
    groups have n >= 2."""
    a, sa, na = pl.col(f"{reference}_mean"), pl.col(f"{reference}_std"), pl.col(f"{reference}_n")
    b, sb, nb = pl.col("mean"), pl.col("std"), pl.col("n")
    ratio = a / b
    known = (na >= 2) & (nb >= 2)
    relative_se = (((sa / na.sqrt()) / a) ** 2 + ((sb / nb.sqrt()) / b) ** 2).sqrt()
    return table.with_columns(
        (ratio - 1).alias("rel_diff"),
        pl.when(known).then(ratio.abs() * relative_se).alias("rel_diff_se"),
        pl.when(known).then((a - b).abs() < (sa ** 2 + sb ** 2).sqrt()).alias("within_spread"))


def iso_kv_table(runs: pl.DataFrame, requested: str | None = None) -> FigureData:
    """Per chunk size P: Attamba, its iso-KV and iso-FLOP transformers and sliding-window
    variants, from sweeps (``attamba.sweep`` tag) holding matched baselines; the full
    transformer as reference. One row per seed group. ``rel_diff`` on a baseline row:
    Attamba's mean relative to it, with ``rel_diff_se`` and ``within_spread``
    (:func:`relative_difference`)."""
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
    bars = _grouped(bars, excluded)
    attamba = (bars.filter(pl.col("role") == "attamba").group_by("sweep", "chunk_size")
               .agg(pl.col("mean").first().alias("attamba_mean"), pl.col("std").first().alias("attamba_std"),
                    pl.col("n").first().alias("attamba_n"), pl.len().alias("attamba_groups")))
    bars = relative_difference(bars.join(attamba, on=["sweep", "chunk_size"], how="left"), "attamba")
    # a rel_diff needs exactly one Attamba configuration to compare with, and is about baselines only
    compared = (pl.col("role") != "attamba") & (pl.col("attamba_groups") == 1)
    bars = (bars.with_columns(pl.when(compared).then(pl.col(column)).alias(column)
                              for column in ("rel_diff", "rel_diff_se", "within_spread"))
            .sort("chunk_size", _order("role", ROLE_ORDER), "run_name"))
    fulls = _grouped(fulls, excluded).with_columns(
        pl.lit(None, dtype=pl.Float64).alias("rel_diff"), pl.lit(None, dtype=pl.Float64).alias("rel_diff_se"),
        pl.lit(None, dtype=pl.Boolean).alias("within_spread")).sort("run_name")
    extra = ("rel_diff", "rel_diff_se", "within_spread")
    table = pl.concat([_rows(bars, *extra), _rows(fulls, *extra)])
    return FigureData("iso-kv", metric, table, excluded)


def pareto_front(kv: Sequence[float], value: Sequence[float], higher_is_better: bool = False) -> list[bool]:
    """Whether each point is Pareto-optimal: no other point has both no more KV bytes and
    no worse value (no higher; no lower if ``higher_is_better``), with one of them strictly better."""
    sign = -1.0 if higher_is_better else 1.0
    points = [(k, sign * v) for k, v in zip(kv, value)]
    return [not any(k2 <= k and v2 <= v and (k2 < k or v2 < v) for k2, v2 in points) for k, v in points]


def _kv_front(runs: pl.DataFrame, metric: Metric, name: str, higher_is_better: bool) -> FigureData:
    """Seed groups of ``runs`` (usable for ``metric``) against KV-cache bytes per token; ``on_front``
    marks the Pareto front of the group means over all families."""
    excluded: list[tuple[str, str]] = []
    runs = _usable(runs, metric, excluded)
    runs = _split(runs, pl.col("kv_bytes_per_token").is_not_null(), "no model/kv_bytes_per_token", excluded)
    runs = _split(runs, pl.col("kv_bytes_per_token") > 0,
                  "no KV cache (0 bytes/token) cannot sit on the log axis", excluded)
    if runs.is_empty():
        raise NothingToPlot(f"no run has both {metric.key} and a KV cache size")
    runs = _grouped(runs, excluded).sort("family", "kv_bytes_per_token", "run_name")
    front = pareto_front(runs["kv_bytes_per_token"].to_list(), runs["mean"].to_list(), higher_is_better)
    table = _rows(runs.with_columns(pl.Series("on_front", front)), "on_front")
    return FigureData(name, metric, table, excluded)


def pareto_table(runs: pl.DataFrame, requested: str | None = None) -> FigureData:
    """Metric against KV-cache bytes per token for every seed group with a KV cache; ``on_front``
    marks the Pareto front over all families."""
    runs = annotate(runs)
    return _kv_front(runs, choose_metric(runs, requested), "pareto", higher_is_better=False)


def recall_table(runs: pl.DataFrame) -> FigureData:
    """MQAR recall accuracy (final value) against KV-cache bytes per token, one point per seed
    group; ``on_front``: the groups no other beats with both fewer bytes and higher accuracy."""
    runs = annotate(runs)
    if RECALL_METRIC not in runs.columns or runs[RECALL_METRIC].is_null().all():
        raise NothingToPlot(f"no run logged {RECALL_METRIC}")
    return _kv_front(runs, Metric(RECALL_METRIC), "recall", higher_is_better=True)


def _passkey_cells(text: str | None) -> pl.DataFrame | str:
    """The ``length, depth, accuracy, n`` rows of one run's passkey.csv, or why there are none."""
    if text is None:
        return f"no {PASSKEY_ARTIFACT} artifact"
    try:
        cells = pl.read_csv(text.encode())
        missing = [column for column in PASSKEY_COLUMNS if column not in cells.columns]
        if missing or cells.is_empty():
            return f"{PASSKEY_ARTIFACT} lacks {', '.join(missing)}" if missing else f"{PASSKEY_ARTIFACT} is empty"
        return cells.select(pl.col("length").cast(pl.Int64), pl.col("depth").cast(pl.Float64),
                            pl.col("accuracy").cast(pl.Float64), pl.col("n").cast(pl.Int64).alias("trials"))
    except (pl.exceptions.PolarsError, ValueError) as error:
        return f"{PASSKEY_ARTIFACT} unreadable: {str(error).splitlines()[0]}"


def passkey_table(runs: pl.DataFrame, artifacts: dict[str, str | None]) -> FigureData:
    """Passkey accuracy per context length and needle depth, one heatmap per seed group, from
    each run's ``passkey.csv`` (``artifacts``: run id -> its text). One row per group, length and
    depth: ``mean``/``std``/``n`` of the runs' accuracies, ``trials`` the needles scored in all."""
    runs = annotate(runs)
    if PASSKEY_METRIC not in runs.columns or runs[PASSKEY_METRIC].is_null().all():
        raise NothingToPlot(f"no run logged {PASSKEY_METRIC}")
    metric, excluded = Metric(PASSKEY_METRIC), []
    runs = _usable(runs, metric, excluded)
    cells: list[pl.DataFrame] = []
    for run_id, run_name in runs.select("run_id", "run_name").iter_rows():
        found = _passkey_cells(artifacts.get(run_id))
        if isinstance(found, str):
            excluded.append((run_name, found))
        else:
            cells.append(found.with_columns(pl.lit(run_id).alias("run_id")))
    runs = runs.filter(pl.col("run_id").is_in([frame["run_id"][0] for frame in cells]))
    if runs.is_empty():
        raise NothingToPlot(f"no run with {PASSKEY_METRIC} has a readable {PASSKEY_ARTIFACT}")
    groups = seed_groups(runs, excluded)
    per_cell = (pl.concat(cells).join(groups.select("run_id", "group"), on="run_id")
                .group_by("group", "length", "depth")
                .agg(*_spread("accuracy"), pl.col("trials").sum()))
    table = (collapse_seeds(groups).drop("mean", "std", "n").join(per_cell, on="group")
             .sort("family", "run_name", "length", "depth"))
    return FigureData("passkey", metric, _rows(table, "length", "depth", "trials"), excluded)


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
    attamba = _series_labels(_grouped(attamba, excluded), "chunking.leading_tokens", ())
    attamba = _latest_per(attamba, ["series", "leading_tokens"], excluded)
    varied = attamba.group_by("series").agg(pl.col("leading_tokens").n_unique().alias("settings"))
    attamba = attamba.join(varied, on="series")
    attamba = _split(attamba, pl.col("settings") >= 2,
                     "no run differing only in leading tokens to compare with", excluded)
    if attamba.is_empty():
        raise NothingToPlot("no Attamba runs that differ only in leading tokens")
    attamba = _series_labels(attamba, "chunking.leading_tokens", ()).sort("chunk_size", "series", "leading_tokens")
    fulls = _grouped(fulls, excluded).with_columns(pl.lit(None, dtype=pl.String).alias("series_label"))
    table = pl.concat([_rows(attamba, "series_label"), _rows(fulls.sort("run_name"), "series_label")])
    return FigureData("leading-tokens", metric, table, excluded)


def chunk_strategy_table(runs: pl.DataFrame, requested: str | None = None) -> FigureData:
    """Attamba runs that differ only in chunking strategy: one bar per strategy and group."""
    runs = annotate(runs)
    metric, excluded = choose_metric(runs, requested), []
    runs = _usable(runs, metric, excluded)
    runs = _split(runs, pl.col("family") == "attamba", pl.format("family {} has no chunking",
                                                                 pl.col("family")), excluded)
    runs = _series_labels(_grouped(runs, excluded), "chunking.strategy", ())
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
    step and tokens (step x train.batch_size x train.seq_len). One row per seed group and step:
    ``mean``/``std``/``n`` over the group's runs that logged that step."""
    runs = annotate(runs)
    metric, excluded = choose_metric(runs, requested), []
    if names:
        unknown = sorted(set(names) - set(runs["run_name"]))
        if unknown:
            raise ValueError(f"--runs: no run named {', '.join(unknown)}; runs are "
                             f"{', '.join(sorted(runs['run_name']))}")
        runs = runs.filter(pl.col("run_name").is_in(list(names)))
    runs = _usable(runs, metric, excluded)
    points = histories.filter(pl.col("key") == metric.key).select("run_id", "step", "value")
    runs = _split(runs, pl.col("run_id").is_in(points["run_id"].to_list()), "no history", excluded)
    if runs.is_empty():
        raise NothingToPlot(f"no selected run has a history of {metric.key}")
    excluded.extend((name, "no train.batch_size/train.seq_len: drawn against steps only")
                    for name in runs.filter(pl.col("tokens_per_step").is_null())["run_name"])
    groups = seed_groups(runs, excluded)
    per_step = (points.join(groups.select("run_id", "group"), on="run_id")
                .group_by("group", "step").agg(*_spread("value")))
    table = (collapse_seeds(groups).drop("step", "mean", "std", "n").join(per_step, on="group")
             .with_columns((pl.col("step") * pl.col("tokens_per_step")).alias("tokens"))
             .sort("run_name", "step"))
    return FigureData("curves", metric, _rows(table, "tokens"), excluded)
