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


def _errors(rows: pl.DataFrame) -> list[float] | None:
    """Error bar lengths (one standard deviation over seeds); None when every group is one run,
    so single-seed figures carry no error bars; NaN (nothing drawn) for the single runs among groups."""
    if rows["std"].is_null().all():
        return None
    return [float("nan") if std is None else std for std in rows["std"]]


def _extent(rows: pl.DataFrame) -> list[float]:
    """Lowest and highest value drawn: means, and means +- std where there is one."""
    spread = rows["std"].fill_null(0.0)
    return (rows["mean"] - spread).to_list() + (rows["mean"] + spread).to_list()


def _band(ax: plt.Axes, x: pl.Series, rows: pl.DataFrame, color: str) -> None:
    """Shade mean +- std over seeds where groups have more than one run."""
    if not rows["std"].is_null().all():
        spread = rows["std"].fill_null(0.0)
        ax.fill_between(x, rows["mean"] - spread, rows["mean"] + spread, color=color, alpha=0.2, linewidth=0)


def group_label(row: dict) -> str:
    """A seed group's name on a figure: its run, or its runs' common name start and the seed count."""
    names = row["run_name"].split(", ")
    if row["n"] == 1:
        return names[0]
    common = names[0]
    for name in names[1:]:
        while not name.startswith(common):
            common = common[:-1]
    if " " in common:  # sweeps name runs "<model> <overrides>": keep the whole words they share
        common = common[:common.rindex(" ")]
    return f"{common.rstrip(' _-=') or names[0]} [{row['n']} seeds]"


def _rel_diff_text(row: dict) -> str:
    """``+3.1%``, ``+3.1% ± 1.2%`` with a known uncertainty, prefixed ``≈`` when within the seed spread."""
    text = f"{row['rel_diff']:+.1%}"
    if row["rel_diff_se"] is not None:
        text += f" ± {row['rel_diff_se']:.1%}"
    return ("≈" + text) if row["within_spread"] else text


# ----------------------------------------------------------------------------- drawings


def draw_iso_kv(data: FigureData) -> Figure:
    """Grouped bars per chunk size (error bars: std over seeds); baselines annotated with
    Attamba's relative difference, its standard error, and ≈ where it is within the seed spread."""
    bars = data.table.filter(pl.col("role") != "full")
    fulls = data.table.filter(pl.col("role") == "full")
    sizes = sorted(bars["chunk_size"].unique().to_list())
    per_group = bars.group_by("chunk_size").len()["len"].max()
    width = 0.8 / per_group
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    seen: set[str] = set()
    for group, size in enumerate(sizes):
        rows = bars.filter(pl.col("chunk_size") == size)
        xs = [group + (index - (rows.height - 1) / 2) * width for index in range(rows.height)]
        for x, row, error in zip(xs, rows.to_dicts(), _errors(rows) or [None] * rows.height):
            label, color = ROLE_STYLE[row["role"]]
            ax.bar(x, row["mean"], width * 0.92, color=color, label=None if label in seen else label,
                   yerr=error, capsize=2, error_kw={"linewidth": 0.8})
            seen.add(label)
            if row["rel_diff"] is not None:
                ax.annotate(_rel_diff_text(row), (x, row["mean"] + (row["std"] or 0.0)), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=6,
                            color="gray" if row["within_spread"] else "black")
    for row, style in zip(fulls.to_dicts(), ("--", ":", "-.")):
        ax.axhline(row["mean"], color="black", linestyle=style, linewidth=1,
                   label=f"Full transformer ({group_label(row)})")
        if row["std"] is not None:
            ax.axhspan(row["mean"] - row["std"], row["mean"] + row["std"], color="black", alpha=0.08, linewidth=0)
    _zoomed_bars(ax, _extent(bars) + _extent(fulls))
    ax.set_xticks(range(len(sizes)), [f"P = {size}" for size in sizes])
    ax.set_xlabel("chunk size P (tokens per chunk)")
    ax.set_ylabel(data.metric.label)
    matched = [name for role, name in (("iso-kv", "KV cache"), ("iso-flops", "FLOPs"), ("iso-params", "parameters"))
               if role in bars["role"]]
    seeds = "; bars: mean ± std over seeds, ≈: within the seed spread" if _errors(data.table) else ""
    ax.set_title(f"Attamba vs. transformers at equal {' and '.join(matched) or 'settings'}\n"
                 f"(labels: Attamba relative to that baseline; lower is better{seeds})")
    ax.grid(axis="x", visible=False)
    _legend_outside(ax)
    return fig


def _kv_axis(ax: plt.Axes) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_plain_number))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("KV cache (bytes per token of context, bf16)")


def _draw_front(data: FigureData, title: str) -> Figure:
    """Group means against KV bytes per token (log x), error bars over seeds, one series per
    family, the Pareto front marked and, when it is short, named."""
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for index, (family, rows) in enumerate(data.table.group_by("family", maintain_order=True)):
        ax.errorbar(rows["kv_bytes_per_token"], rows["mean"], yerr=_errors(rows),
                    fmt=FAMILY_MARKERS.get(family[0], "D"), markersize=4.5, color=f"C{index}", capsize=2,
                    elinewidth=0.8, label=family[0], zorder=3)
    front = data.table.filter(pl.col("on_front")).sort("kv_bytes_per_token")
    ax.step(front["kv_bytes_per_token"], front["mean"], where="post", color="gray", linewidth=1, zorder=2)
    ax.scatter(front["kv_bytes_per_token"], front["mean"], s=90, facecolors="none", edgecolors="black",
               linewidths=1, label="Pareto front", zorder=4)
    for row in front.to_dicts() if front.height <= MAX_NAMED_POINTS else []:  # else they would collide
        ax.annotate(group_label(row), (row["kv_bytes_per_token"], row["mean"]), xytext=(4, 4),
                    textcoords="offset points", fontsize=6)
    _kv_axis(ax)
    ax.set_ylabel(data.metric.label)
    ax.set_title(title + ("\n(mean ± std over seeds)" if _errors(data.table) else ""))
    _legend_outside(ax)
    return fig


def draw_pareto(data: FigureData) -> Figure:
    """Metric against KV bytes per token, lower left is better."""
    return _draw_front(data, "Quality against KV-cache size (lower left is better)")


def draw_recall(data: FigureData) -> Figure:
    """MQAR recall accuracy against KV bytes per token, upper left is better."""
    fig = _draw_front(data, "Associative recall against KV-cache size (upper left is better)")
    fig.axes[0].set_ylim(-0.02, 1.02)
    return fig


def draw_passkey(data: FigureData) -> Figure:
    """One heatmap per seed group: mean passkey accuracy by needle depth (rows) and context
    length (columns), on one colour scale from 0 to 1; cells say the mean (and ± std over seeds)."""
    groups = list(data.table.group_by("run_name", maintain_order=True))
    columns = min(3, len(groups))
    rows_of_plots = -(-len(groups) // columns)
    fig, axes = plt.subplots(rows_of_plots, columns, figsize=(3.6 * columns + 0.8, 3.0 * rows_of_plots),
                             squeeze=False, layout="constrained")
    image = None
    for index, (ax, (_, cells)) in enumerate(zip(axes.flat, groups)):
        lengths = sorted(cells["length"].unique().to_list())
        depths = sorted(cells["depth"].unique().to_list())
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for cell in cells.to_dicts():
            row, column = depths.index(cell["depth"]), lengths.index(cell["length"])
            grid[row][column] = cell["mean"]
            text = f"{cell['mean']:.2f}" + (f"\n±{cell['std']:.2f}" if cell["std"] is not None else "")
            ax.text(column, row, text, ha="center", va="center", fontsize=6,
                    color="white" if cell["mean"] < 0.5 else "black")
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
        ax.set_yticks(range(len(depths)), [f"{depth:g}" for depth in depths])
        ax.set_xlabel("context length (tokens)")
        if index % columns == 0:
            ax.set_ylabel("needle depth (fraction of context)")
        ax.set_title(group_label(cells.row(0, named=True)), fontsize=8)
        ax.grid(False)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes, label=data.metric.label, shrink=0.8)
    fig.suptitle("Passkey retrieval by context length and needle depth"
                 + (" (mean ± std over seeds)" if _errors(data.table) else ""))
    return fig


def draw_leading_tokens(data: FigureData) -> Figure:
    """Metric against leading tokens (log x), one line per chunk size (bands: std over seeds);
    transformers as references."""
    lines = data.table.filter(pl.col("role") == "attamba")
    fulls = data.table.filter(pl.col("role") == "full")
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for index, (label, rows) in enumerate(lines.group_by("series_label", maintain_order=True)):
        ax.plot(rows["leading_tokens"], rows["mean"], marker="o", markersize=4, color=f"C{index}", label=label[0])
        _band(ax, rows["leading_tokens"], rows, f"C{index}")
    for row, style in zip(fulls.to_dicts(), ("--", ":", "-.", (0, (5, 1)))):
        ax.axhline(row["mean"], color="black", linestyle=style, linewidth=1,
                   label=f"Full transformer ({group_label(row)})")
        if row["std"] is not None:
            ax.axhspan(row["mean"] - row["std"], row["mean"] + row["std"], color="black", alpha=0.08, linewidth=0)
    ticks = sorted(lines["leading_tokens"].unique().to_list())
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(tick) for tick in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("leading tokens (always-visible recent keys)")
    ax.set_ylabel(data.metric.label)
    ax.set_title("Attamba: effect of leading tokens per chunk size"
                 + ("\n(bands: ± std over seeds)" if _errors(data.table) else ""))
    _legend_outside(ax)
    return fig


def draw_chunk_strategy(data: FigureData) -> Figure:
    """Bars per chunking strategy (error bars: std over seeds), one colour per group of otherwise equal runs."""
    strategies = list(dict.fromkeys(data.table["strategy"].to_list()))
    groups = list(dict.fromkeys(data.table["series_label"].to_list()))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    for index, group in enumerate(groups):
        rows = data.table.filter(pl.col("series_label") == group)
        xs = [strategies.index(s) + (index - (len(groups) - 1) / 2) * width for s in rows["strategy"]]
        ax.bar(xs, rows["mean"], width * 0.92, color=f"C{index}", label=group, yerr=_errors(rows), capsize=2,
               error_kw={"linewidth": 0.8})
        for x, row in zip(xs, rows.to_dicts()):
            text = f"{row['mean']:.2f}" + (f"±{row['std']:.2f}" if row["std"] is not None else "")
            ax.annotate(text, (x, row["mean"] + (row["std"] or 0.0)), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
    _zoomed_bars(ax, _extent(data.table))
    ax.set_xticks(range(len(strategies)), strategies)
    ax.set_xlabel("chunking strategy")
    ax.set_ylabel(data.metric.label)
    ax.set_title("Attamba: chunk boundary strategies (lower is better)"
                 + ("\n(mean ± std over seeds)" if _errors(data.table) else ""))
    ax.grid(axis="x", visible=False)
    _legend_outside(ax)
    return fig


def draw_curves(data: FigureData) -> Figure:
    """The metric against optimizer steps (left) and training tokens (right); bands: std over seeds."""
    fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(10.0, 3.8), sharey=True)
    for index, (_, rows) in enumerate(data.table.group_by("run_name", maintain_order=True)):
        color = f"C{index % 10}"
        style = "-" if index < 10 else "--"
        by_step.plot(rows["step"], rows["mean"], color=color, linestyle=style, linewidth=1,
                     label=group_label(rows.row(-1, named=True)))
        _band(by_step, rows["step"], rows, color)
        with_tokens = rows.filter(pl.col("tokens").is_not_null())
        by_tokens.plot(with_tokens["tokens"], with_tokens["mean"], color=color, linestyle=style, linewidth=1)
        _band(by_tokens, with_tokens["tokens"], with_tokens, color)
    if "perplexity" in data.metric.key:
        by_step.set_yscale("log")
        by_step.yaxis.set_major_formatter(FuncFormatter(_plain_number))
        by_step.yaxis.set_minor_formatter(FuncFormatter(_plain_number))
    by_step.set_xlabel("optimizer step")
    by_tokens.xaxis.set_major_formatter(FuncFormatter(_token_count))
    by_tokens.set_xlabel("training tokens")
    by_step.set_ylabel(data.metric.label)
    by_step.set_title("against steps" + (" (bands: ± std over seeds)" if _errors(data.table) else ""))
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
    "recall": draw_recall,
    "passkey": draw_passkey,
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
    parts += ["", "`mean`, `std`, `n`: over the n runs whose params differ only in `train.seed` (listed in "
                  "`run_name`, `seeds`); `std` is the sample standard deviation, empty for one run."]
    if data.name == "iso-kv":
        parts += ["", "`rel_diff`: Attamba's mean at the same P relative to that baseline's "
                      "(-0.05: 5% lower; lower is better). `rel_diff_se`: its standard error, propagated to "
                      "first order through the ratio of the two means (each mean's standard error std/sqrt(n), "
                      "groups independent). `within_spread`: the two means differ by less than "
                      "sqrt(std_attamba^2 + std_baseline^2), the seed spread of a one-run comparison, so "
                      "this difference is not resolved by these seeds (≈ on the figure). Both are empty "
                      "unless both groups have n >= 2."]
    if data.name == "passkey":
        parts += ["", "One row per model (seed group), context length and needle depth: `mean` over the "
                      "group's runs of each run's accuracy; `trials`: needles scored in all."]
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
