"""Draw each figure from its :class:`~analysis.tables.FigureData` and write PNG, PDF, CSV and Markdown.

The drawing functions only read the figure's table, so the CSV and Markdown written
next to each image hold exactly the plotted numbers. Legends sit outside the axes
(saved with a tight bounding box), so they never cover data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import polars as pl  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from analysis.tables import FigureData  # noqa: E402

ROLE_STYLE = {
    "attamba": ("Attamba", "#1f77b4"),
    "iso-kv": ("Transformer, equal KV cache", "#ff7f0e"),
    "iso-flops": ("Transformer, equal FLOPs", "#2ca02c"),
    "sliding-window": ("Sliding-window transformer", "#9467bd"),
}
FAMILY_MARKERS = {"attamba": "o", "transformer": "s", "mamba2": "^"}
DPI = 200
MAX_NAMED_POINTS = 8  # Pareto points named on the plot; every name is in the table
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
         "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3}


def _plain_number(value: float, _position: float) -> str:
    """Tick labels on log axes as plain numbers (8, 64, 1024), not powers of ten."""
    return f"{value:g}"


def _token_count(value: float, _position: float) -> str:
    """Token counts as 500M, 1.5B instead of an offset exponent."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _legend_outside(ax: plt.Axes) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)


def _zoomed_bars(ax: plt.Axes, values: list[float]) -> None:
    """Bars of perplexities near each other: start the axis below the smallest, say so."""
    low, high = min(values), max(values)
    ax.set_ylim(max(0.0, low - 0.6 * (high - low) - 0.05 * low), high + 0.12 * (high - low) + 0.02 * high)


# ----------------------------------------------------------------------------- drawings


def draw_iso_kv(data: FigureData) -> Figure:
    """Grouped bars per chunk size; baselines annotated with Attamba's relative difference."""
    bars = data.table.filter(pl.col("role") != "full")
    fulls = data.table.filter(pl.col("role") == "full")
    sizes = sorted(bars["chunk_size"].unique().to_list())
    per_group = bars.group_by("chunk_size").len()["len"].max()
    width = 0.8 / per_group
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    seen: set[str] = set()
    for group, size in enumerate(sizes):
        rows = bars.filter(pl.col("chunk_size") == size).to_dicts()
        for index, row in enumerate(rows):
            x = group + (index - (len(rows) - 1) / 2) * width
            label, color = ROLE_STYLE[row["role"]]
            ax.bar(x, row["value"], width * 0.92, color=color, label=None if label in seen else label)
            seen.add(label)
            if row["rel_diff"] is not None:
                ax.annotate(f"{row['rel_diff']:+.1%}", (x, row["value"]), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7)
    for row, style in zip(fulls.to_dicts(), ("--", ":", "-.")):
        ax.axhline(row["value"], color="black", linestyle=style, linewidth=1,
                   label=f"Full transformer ({row['run_name']})")
    _zoomed_bars(ax, bars["value"].to_list() + fulls["value"].to_list())
    ax.set_xticks(range(len(sizes)), [f"P = {size}" for size in sizes])
    ax.set_xlabel("chunk size P (tokens per chunk)")
    ax.set_ylabel(data.metric.label)
    matched = [name for role, name in (("iso-kv", "KV cache"), ("iso-flops", "FLOPs"), ("iso-params", "parameters"))
               if role in bars["role"]]
    ax.set_title(f"Attamba vs. transformers at equal {' and '.join(matched) or 'settings'}\n"
                 "(labels: Attamba relative to that baseline; lower is better)")
    ax.grid(axis="x", visible=False)
    _legend_outside(ax)
    return fig


def draw_pareto(data: FigureData) -> Figure:
    """Metric against KV bytes per token (log x), one series per family, Pareto front marked."""
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for index, (family, rows) in enumerate(data.table.group_by("family", maintain_order=True)):
        ax.scatter(rows["kv_bytes_per_token"], rows["value"], s=22, color=f"C{index}",
                   marker=FAMILY_MARKERS.get(family[0], "D"), label=family[0], zorder=3)
    front = data.table.filter(pl.col("on_front")).sort("kv_bytes_per_token")
    ax.step(front["kv_bytes_per_token"], front["value"], where="post", color="gray", linewidth=1, zorder=2)
    ax.scatter(front["kv_bytes_per_token"], front["value"], s=90, facecolors="none", edgecolors="black",
               linewidths=1, label="Pareto front", zorder=4)
    for row in front.to_dicts() if front.height <= MAX_NAMED_POINTS else []:  # else they would collide
        ax.annotate(row["run_name"], (row["kv_bytes_per_token"], row["value"]), xytext=(4, 4),
                    textcoords="offset points", fontsize=6)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_plain_number))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("KV cache (bytes per token of context, bf16)")
    ax.set_ylabel(data.metric.label)
    ax.set_title("Quality against KV-cache size (lower left is better)")
    _legend_outside(ax)
    return fig


def draw_leading_tokens(data: FigureData) -> Figure:
    """Metric against leading tokens (log x), one line per chunk size; transformers as references."""
    lines = data.table.filter(pl.col("role") == "attamba")
    fulls = data.table.filter(pl.col("role") == "full")
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for label, rows in lines.group_by("series_label", maintain_order=True):
        ax.plot(rows["leading_tokens"], rows["value"], marker="o", markersize=4, label=label[0])
    for row, style in zip(fulls.to_dicts(), ("--", ":", "-.", (0, (5, 1)))):
        ax.axhline(row["value"], color="black", linestyle=style, linewidth=1,
                   label=f"Full transformer ({row['run_name']})")
    ticks = sorted(lines["leading_tokens"].unique().to_list())
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(tick) for tick in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("leading tokens (always-visible recent keys)")
    ax.set_ylabel(data.metric.label)
    ax.set_title("Attamba: effect of leading tokens per chunk size")
    _legend_outside(ax)
    return fig


def draw_chunk_strategy(data: FigureData) -> Figure:
    """Bars per chunking strategy, one colour per group of otherwise equal runs."""
    strategies = list(dict.fromkeys(data.table["strategy"].to_list()))
    groups = list(dict.fromkeys(data.table["series_label"].to_list()))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    for index, group in enumerate(groups):
        rows = data.table.filter(pl.col("series_label") == group)
        xs = [strategies.index(s) + (index - (len(groups) - 1) / 2) * width for s in rows["strategy"]]
        ax.bar(xs, rows["value"], width * 0.92, color=f"C{index}", label=group)
        for x, value in zip(xs, rows["value"]):
            ax.annotate(f"{value:.2f}", (x, value), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
    _zoomed_bars(ax, data.table["value"].to_list())
    ax.set_xticks(range(len(strategies)), strategies)
    ax.set_xlabel("chunking strategy")
    ax.set_ylabel(data.metric.label)
    ax.set_title("Attamba: chunk boundary strategies (lower is better)")
    ax.grid(axis="x", visible=False)
    _legend_outside(ax)
    return fig


def draw_curves(data: FigureData) -> Figure:
    """The metric against optimizer steps (left) and training tokens (right)."""
    fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(10.0, 3.8), sharey=True)
    for index, (name, rows) in enumerate(data.table.group_by("run_name", maintain_order=True)):
        color = f"C{index % 10}"
        style = "-" if index < 10 else "--"
        by_step.plot(rows["step"], rows["value"], color=color, linestyle=style, linewidth=1, label=name[0])
        with_tokens = rows.filter(pl.col("tokens").is_not_null())
        by_tokens.plot(with_tokens["tokens"], with_tokens["value"], color=color, linestyle=style, linewidth=1)
    if "perplexity" in data.metric.key:
        by_step.set_yscale("log")
        by_step.yaxis.set_major_formatter(FuncFormatter(_plain_number))
        by_step.yaxis.set_minor_formatter(FuncFormatter(_plain_number))
    by_step.set_xlabel("optimizer step")
    by_tokens.xaxis.set_major_formatter(FuncFormatter(_token_count))
    by_tokens.set_xlabel("training tokens")
    by_step.set_ylabel(data.metric.label)
    by_step.set_title("against steps")
    by_tokens.set_title("against tokens")
    by_tokens.legend(*by_step.get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                     fontsize=7 if data.table["run_name"].n_unique() > 12 else 8)
    return fig


DRAWERS: dict[str, Callable[[FigureData], Figure]] = {
    "iso-kv": draw_iso_kv,
    "pareto": draw_pareto,
    "leading-tokens": draw_leading_tokens,
    "chunk-strategy": draw_chunk_strategy,
    "curves": draw_curves,
}


# ----------------------------------------------------------------------------- files


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def markdown_table(table: pl.DataFrame) -> str:
    """A GitHub Markdown table of ``table`` (floats to 6 significant digits, nulls empty)."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in table.iter_rows()]
    return "\n".join(lines)


def _summary(data: FigureData) -> pl.DataFrame:
    """The Markdown view: the table itself, or for curves each run's last plotted point."""
    table = data.table if data.name != "curves" else data.table.group_by("run_name", maintain_order=True).last()
    if "role" not in table.columns:
        return table
    # A full transformer has no chunks: its chunking columns would show defaults that nobody chose.
    chunking = [column for column in ("strategy", "chunk_size", "leading_tokens") if column in table.columns]
    return table.with_columns(pl.when(pl.col("role") != "full").then(pl.col(column)).alias(column)
                              for column in chunking)


def markdown_report(data: FigureData) -> str:
    """Title, metric, the plotted numbers and the runs left out, as Markdown."""
    parts = [f"## {data.name}: {data.metric.label}", ""]
    if data.name == "curves":
        parts += ["Last plotted point of each run (every point is in curves.csv).", ""]
    parts.append(markdown_table(_summary(data)))
    if data.name == "iso-kv":
        parts += ["", "`rel_diff`: Attamba's value at the same P relative to that baseline's "
                      "(-0.05: 5% lower; lower is better)."]
    if data.excluded:
        parts += ["", f"Not plotted ({len(data.excluded)} runs):", ""]
        parts += [f"- {name}: {reason}" for name, reason in data.excluded]
    return "\n".join(parts) + "\n"


def write_figure(data: FigureData, out_dir: str | Path) -> dict[str, Path]:
    """Draw ``data`` and write ``<name>.png``, ``.pdf``, ``.csv`` and ``.md`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {suffix: out / f"{data.name}.{suffix}" for suffix in ("png", "pdf", "csv", "md")}
    with plt.rc_context(STYLE):
        fig = DRAWERS[data.name](data)
        fig.savefig(paths["png"], dpi=DPI, bbox_inches="tight")
        fig.savefig(paths["pdf"], bbox_inches="tight", metadata={"CreationDate": None})
        plt.close(fig)
    data.table.write_csv(paths["csv"])
    paths["md"].write_text(markdown_report(data))
    return paths
