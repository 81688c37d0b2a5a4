"""analysis/: MLflow → polars, Lingua import, and every figure command on real MLflow stores.

One sqlite store per module (creating one costs seconds): a synthetic experiment
written through ``attamba.tracking.RunTracker`` exactly as the trainer logs, with
runs of every role, and the paper's published Lingua runs imported from the
shared tarball. The oracles are the values logged or the numbers in the dump files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import tarfile
import warnings
from pathlib import Path

import matplotlib.image
import polars as pl
import pytest

from analysis import cli, lingua, tables
from analysis.figures import DRAWERS, markdown_report, write_figure
from analysis.runs import load_runs, metric_histories, parse_param
from attamba import accounting, tracking
from attamba.config import ChunkingConfig, Config, ModelConfig, SSMConfig, TrainConfig, flat_params
from attamba.tracking import RunTracker, run_tags, start_parent_run
from conftest import PAPER_RUNS, require_shared

WT2 = "eval/wikitext2/word_perplexity"
PAPER_WT2 = "eval/wikitext2/paper_perplexity"  # what the paper's Lingua runs report (attamba.evaluate)
VAL = "eval/val/word_perplexity"
FIGURE_NAMES = ("iso-kv", "pareto", "leading-tokens", "chunk-strategy", "curves")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- synthetic store


def _config(family: str, strategy: str = "cyclic", size: int = 8, lead: int = 8, **model: object) -> Config:
    return Config(model=ModelConfig(family=family, **model),
                  chunking=ChunkingConfig(strategy=strategy, size=size, leading_tokens=lead),
                  train=TrainConfig(steps=100, batch_size=4, seq_len=256))


# name -> (config, sweep, final WikiText-2 perplexity or None, status)
SYNTHETIC = {
    "att-p4": (_config("attamba", size=4), "iso", 30.0, "FINISHED"),
    "att-p8": (_config("attamba", size=8), "iso", 31.0, "FINISHED"),
    "kv-p4": (_config("transformer", size=4, attn_dim=128, match="kv_cache"), "iso", 33.0, "FINISHED"),
    "kv-p8": (_config("transformer", size=8, attn_dim=64, match="kv_cache"), "iso", 34.0, "FINISHED"),
    "flops-p4": (_config("transformer", size=4, attn_dim=480, match="flops"), "iso", 32.0, "FINISHED"),
    "window-p8": (_config("transformer", size=8, window=64), "iso", 36.0, "FINISHED"),
    "full": (_config("transformer"), "iso", 29.0, "FINISHED"),
    "att-p8-l1": (_config("attamba", size=8, lead=1), None, 35.0, "FINISHED"),
    "att-p8-l32": (_config("attamba", size=8, lead=32), None, 30.5, "FINISHED"),
    "att-p8-uniform": (_config("attamba", "uniform", size=8), None, 31.5, "FINISHED"),
    "att-p8-random": (_config("attamba", "random", size=8), None, 32.5, "FINISHED"),
    "att-p8-pseudo": (_config("attamba", "pseudo", size=8), None, 28.5, "FINISHED"),
    "ssm": (_config("mamba2", ssm=SSMConfig(state_dim=16, hidden=1024, heads=16)), None, 33.3, "FINISHED"),
    "crashed": (_config("attamba", size=16), None, 40.0, "FAILED"),
    "no-eval": (_config("attamba", size=16, lead=4), None, None, "FINISHED"),
}


def _log_run(uri: str, experiment: str, name: str, config: Config, sweep: str | None, final: float | None,
             status: str, metric: str, final_metrics: dict[str, float] | None = None,
             artifact: Path | None = None) -> dict[int, float]:
    """Log one run the way the trainer does (``final_metrics`` and ``artifact`` as its final
    evaluations log them); return the history of ``metric`` written."""
    config.tracking.sweep = sweep
    flat = flat_params(config)
    history = {50: final + 2.0, 100: final} if final is not None else {}
    with RunTracker(uri, experiment, run_name=name, tags=run_tags(flat)) as tracker:
        tracker.log_params(flat)
        tracker.log_metrics({"model/kv_bytes_per_token": accounting.kv_bytes_per_token(
            config.model, config.chunking, config.train.seq_len)}, step=0)
        for step in (25, 50, 75, 100):
            tracker.log_metrics({"train/loss": 5.0 - step / 100}, step=step)
        for step, value in history.items():
            tracker.log_metrics({metric: value}, step=step)
        tracker.log_metrics(final_metrics or {}, step=100)
        if artifact is not None:
            tracker.log_artifact(artifact)
        if status != "FINISHED":
            tracker.finish(status, reason="synthetic failure")
    return history


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def synthetic(store: str) -> dict[str, dict[int, float]]:
    """The synthetic experiment: run name -> logged WikiText-2 history (step -> value)."""
    start_parent_run(store, "synthetic", "iso", tags={})
    return {name: _log_run(store, "synthetic", name, config, sweep, final, status, WT2)
            for name, (config, sweep, final, status) in SYNTHETIC.items()}


@pytest.fixture(scope="module")
def validation_only(store: str) -> str:
    """An experiment without WikiText-2 results: figures must fall back to validation perplexity."""
    for name in ("att-p4", "att-p8", "kv-p4", "kv-p8", "full"):
        config, sweep, final, status = SYNTHETIC[name]
        _log_run(store, "val-only", name, config, sweep, final, status, VAL)
    return "val-only"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _check_images(paths: dict[str, Path]) -> None:
    png, pdf = paths["png"].read_bytes(), paths["pdf"].read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert pdf.startswith(b"%PDF-") and b"%%EOF" in pdf[-1024:]
    pixels = matplotlib.image.imread(paths["png"])
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 500
    assert pixels.std() > 0.05  # not a blank canvas


# ----------------------------------------------------------------------------- runs → polars


def test_parse_param_reads_mlflow_strings() -> None:
    assert parse_param("None") is None
    assert parse_param("True") is True and parse_param("False") is False
    assert parse_param("8") == 8 and isinstance(parse_param("8"), int)
    assert parse_param("0.003") == 0.003
    assert parse_param("cyclic") == "cyclic"


def test_load_runs_types_params_and_summarises_metrics(store: str, synthetic: dict) -> None:
    runs = load_runs(store, "synthetic")
    assert set(runs["run_name"]) == set(SYNTHETIC) | {"iso"}  # the sweep parent is a run too
    assert runs.schema["chunking.size"] == pl.Int64
    assert runs.schema["model.attn_dim"] == pl.Int64
    assert runs.schema["model.kv_residual"] == pl.Boolean
    assert runs.schema["train.lr"] == pl.Float64
    assert runs.schema["model.family"] == pl.String
    row = runs.filter(pl.col("run_name") == "kv-p8").row(0, named=True)
    assert row["model.attn_dim"] == 64 and row["model.match"] == "kv_cache"
    assert runs.filter(pl.col("run_name") == "full")["model.attn_dim"][0] is None
    # final = value at the last step, best = lowest: the synthetic histories improve, train/loss too
    assert row[WT2] == synthetic["kv-p8"][100] and row[f"{WT2}:step"] == 100
    assert row[f"{WT2}:best"] == min(synthetic["kv-p8"].values())
    assert row["train/loss"] == pytest.approx(4.0) and row["train/loss:step"] == 100
    assert row["tags.attamba.sweep"] == "iso"


def test_metric_histories_hold_every_point(store: str, synthetic: dict) -> None:
    runs = load_runs(store, "synthetic").filter(pl.col("run_name") == "att-p4")
    history = metric_histories(store, runs["run_id"].to_list(), [WT2, "train/loss"])
    assert history.filter(pl.col("key") == WT2).select("step", "value").rows() == sorted(synthetic["att-p4"].items())
    assert history.filter(pl.col("key") == "train/loss")["step"].to_list() == [25, 50, 75, 100]


def test_a_step_logged_twice_reads_as_its_last_value(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed run repeats the steps after its last checkpoint: the value logged last counts."""
    clock = iter([1000, 2000])
    monkeypatch.setattr(tracking, "_now_ms", lambda: next(clock))
    with RunTracker(store, "resumed", run_name="resumed") as tracker:
        tracker.log_metrics({WT2: 40.0}, step=100)
        tracker.log_metrics({WT2: 30.0}, step=100)
    row = load_runs(store, "resumed").row(0, named=True)
    assert (row[WT2], row[f"{WT2}:best"]) == (30.0, 30.0)
    assert metric_histories(store, [row["run_id"]], [WT2]).select("step", "value").rows() == [(100, 30.0)]


def test_unknown_experiment_is_a_value_error(store: str, synthetic: dict) -> None:
    with pytest.raises(ValueError, match="--experiment.*synthetic"):
        load_runs(store, "no-such-experiment")


# ----------------------------------------------------------------------------- figures


def test_pareto_front_brute_force() -> None:
    kv = [1.0, 2.0, 2.0, 4.0, 8.0]
    value = [9.0, 7.0, 8.0, 7.0, 5.0]
    assert tables.pareto_front(kv, value) == [True, True, False, False, True]


@pytest.mark.parametrize("figure", FIGURE_NAMES)
def test_figure_command_writes_images_and_exact_numbers(store: str, synthetic: dict, tmp_path: Path,
                                                        figure: str, capsys: pytest.CaptureFixture) -> None:
    assert cli.main([figure, "--experiment", "synthetic", "--tracking-uri", store, "--out", str(tmp_path)]) == 0
    paths = {suffix: tmp_path / f"{figure}.{suffix}" for suffix in ("png", "pdf", "csv", "md")}
    _check_images(paths)
    rows = _csv_rows(paths["csv"])
    assert rows, "a figure with an empty table"
    for row in rows:
        assert {"run_name", "family", "chunk_size", "leading_tokens", "attn_width", "kv_bytes_per_token",
                "step", "mean", "std", "n", "seeds"} <= set(row)
        logged = synthetic[row["run_name"]]
        assert float(row["mean"]) == logged[int(row["step"])], row
        assert (row["std"], row["n"]) == ("", "1"), row  # one seed: no spread
    if figure != "curves":  # one row per run, at its final step
        assert len({row["run_name"] for row in rows}) == len(rows)
        assert all(int(row["step"]) == 100 for row in rows)
    printed = capsys.readouterr().out
    assert "| run_name |" in printed and paths["md"].read_text().splitlines()[2] in printed
    # runs that don't fit are listed, with a reason, in the printout and the Markdown
    assert "crashed: status FAILED" in printed and "no-eval: no eval/wikitext2" in printed
    assert "- iso:" not in printed  # a sweep parent is not a run to plot


def test_iso_kv_roles_and_relative_difference(store: str, synthetic: dict) -> None:
    data = tables.iso_kv_table(load_runs(store, "synthetic"))
    by_name = {row["run_name"]: row for row in data.table.iter_rows(named=True)}
    assert set(by_name) == {"att-p4", "att-p8", "kv-p4", "kv-p8", "flops-p4", "window-p8", "full"}
    assert by_name["kv-p4"]["role"] == "iso-kv" and by_name["flops-p4"]["role"] == "iso-flops"
    assert by_name["window-p8"]["role"] == "sliding-window" and by_name["full"]["role"] == "full"
    assert by_name["kv-p8"]["rel_diff"] == pytest.approx(31.0 / 34.0 - 1)
    assert by_name["flops-p4"]["rel_diff"] == pytest.approx(30.0 / 32.0 - 1)
    assert by_name["att-p4"]["rel_diff"] is None
    report = markdown_report(data)
    (full_row,) = [line for line in report.splitlines() if line.startswith("| full |")]
    assert "| cyclic |" not in full_row  # a full transformer has no chunking to show
    assert "`rel_diff`: Attamba's mean" in report
    reasons = dict(data.excluded)
    assert "not in a sweep with matched baselines" in reasons["att-p8-l1"]
    assert "pseudo" in reasons["att-p8-pseudo"]


def test_pareto_lists_runs_without_a_kv_cache(store: str, synthetic: dict) -> None:
    data = tables.pareto_table(load_runs(store, "synthetic"))
    assert "log axis" in dict(data.excluded)["ssm"]
    front = set(data.table.filter(pl.col("on_front"))["run_name"])
    points = data.table.select("run_name", "kv_bytes_per_token", "mean").rows()
    for name, kv, value in points:  # brute force: nothing is both smaller and better than a front point
        dominated = any(k <= kv and v <= value and (k < kv or v < value) for _, k, v in points)
        assert (name in front) == (not dominated)


def test_leading_tokens_and_strategy_series(store: str, synthetic: dict) -> None:
    runs = load_runs(store, "synthetic")
    leads = tables.leading_tokens_table(runs).table
    line = leads.filter(pl.col("role") == "attamba")
    assert line.select("run_name", "leading_tokens").rows() == [("att-p8-l1", 1), ("att-p8", 8), ("att-p8-l32", 32)]
    assert leads.filter(pl.col("role") == "full")["run_name"].to_list() == ["full"]
    strategies = tables.chunk_strategy_table(runs).table
    assert strategies["strategy"].to_list() == ["uniform", "cyclic", "random", "pseudo"]
    assert strategies["run_name"].to_list() == ["att-p8-uniform", "att-p8", "att-p8-random", "att-p8-pseudo"]


def test_fallback_to_validation_perplexity_is_on_the_axis(store: str, validation_only: str,
                                                          tmp_path: Path) -> None:
    data = tables.iso_kv_table(load_runs(store, validation_only))
    assert data.metric.key == VAL
    figure = DRAWERS["iso-kv"](data)
    assert "validation" in figure.axes[0].get_ylabel() and "fallback" in figure.axes[0].get_ylabel()
    paths = write_figure(data, tmp_path)
    assert "fallback: no WikiText-2 results" in paths["md"].read_text()


def test_the_wikitext_metric_most_runs_logged_is_plotted_and_named() -> None:
    """Paper runs report only the paper's per-token perplexity; our runs log both it and lm-eval's
    word perplexity: a selection mixing them plots the one every run has, and says which it is."""
    mixed = pl.DataFrame({"run_name": ["ours", "paper-a", "paper-b"], WT2: [80.0, None, None],
                          PAPER_WT2: [30.0, 33.5, 34.1]})
    metric = tables.choose_metric(mixed, None)
    assert metric.key == PAPER_WT2 and "Attamba paper" in metric.label and "per token" in metric.label
    ours_only = mixed.filter(pl.col("run_name") == "ours")
    assert tables.choose_metric(ours_only, None).key == WT2  # a tie keeps lm-eval's word perplexity
    assert "lm-eval" in tables.choose_metric(ours_only, None).label


def test_bad_metric_names_the_setting(store: str, synthetic: dict, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["pareto", "--experiment", "synthetic", "--tracking-uri", store, "--metric", "nope",
                     "--out", str(tmp_path)]) == 2
    assert "--metric" in capsys.readouterr().err


def test_all_builds_every_supported_figure(store: str, synthetic: dict, validation_only: str,
                                           tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["all", "--experiment", "synthetic", validation_only, "--tracking-uri", store,
                     "--out", str(tmp_path)]) == 0
    for name in FIGURE_NAMES:
        assert (tmp_path / "synthetic" / f"{name}.png").is_file()
    assert (tmp_path / validation_only / "iso-kv.png").is_file()
    assert f"[{validation_only}] leading-tokens: skipped" in capsys.readouterr().out


# ----------------------------------------------------------------------------- seeds, recall, passkey

MQAR = "eval/mqar/accuracy"
PASSKEY = "eval/passkey/accuracy"


def _seeded(config: Config, seed: int, **train: object) -> Config:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed, **train))


ATT, KV = _config("attamba", size=8), _config("transformer", size=8, attn_dim=64, match="kv_cache")
FLOPS, FULL = _config("transformer", size=8, attn_dim=480, match="flops"), _config("transformer")
# name -> (config, sweep, final WikiText-2 perplexity, final MQAR accuracy, passkey.csv rows, text or None).
# Names say nothing of seeds: the groups must come from the params. "dup" is seed 1 of Attamba logged
# before "a1" (a re-run); "a2" differs from a0/a1 only in where and how fast it ran.
SEEDED = {
    "dup": (_seeded(ATT, 1), "iso", 99.0, None, None),
    "a0": (_seeded(ATT, 0), "iso", 30.0, 0.9, [(256, 0.0, 1.0, 4), (256, 0.5, 0.5, 4),
                                                (512, 0.0, 0.75, 4), (512, 0.5, 0.25, 4)]),
    "a1": (_seeded(ATT, 1), "iso", 31.0, 0.8, [(256, 0.0, 1.0, 4), (256, 0.5, 1.0, 4),
                                                (512, 0.0, 0.25, 4), (512, 0.5, 0.25, 4)]),
    "a2": (_seeded(ATT, 2, device="cpu", compile=True, output_dir="/elsewhere"), "iso", 32.0, 0.7, None),
    "k0": (_seeded(KV, 0), "iso", 32.0, 0.5, None),
    "k1": (_seeded(KV, 1), "iso", 34.0, 0.6, None),
    "k2": (_seeded(KV, 2), "iso", 36.0, 0.7, None),
    "f0": (_seeded(FLOPS, 0), "iso", 31.0, 0.4, None),
    "f1": (_seeded(FLOPS, 1), "iso", 32.0, 0.5, None),
    "f2": (_seeded(FLOPS, 2), "iso", 33.0, 0.6, None),
    "w0": (_seeded(_config("transformer", size=8, window=64), 0), "iso", 36.0, None, None),
    "t0": (_seeded(FULL, 0), "iso", 28.0, 1.0, [(256, 0.0, 1.0, 2), (512, 0.5, 1.0, 2)]),
    "t1": (_seeded(FULL, 1), "iso", 29.0, 1.0, None),
    "lr": (_seeded(dataclasses.replace(ATT, train=dataclasses.replace(ATT.train, lr=1e-3)), 0), None, 40.0, None, None),
    "ssm": (_seeded(_config("mamba2"), 0), None, 33.0, None, "length,depth,accuracy,n\nlong,0.5,1.0,4\n"),
}


@pytest.fixture(scope="module")
def seeded(store: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Seed replicates (``train.seed=0,1,2``) with WikiText-2, MQAR and passkey results."""
    folder = tmp_path_factory.mktemp("passkey")
    start_parent_run(store, "seeds", "iso", tags={})
    for name, (config, sweep, wt2, mqar, cells) in SEEDED.items():
        finals = {MQAR: mqar} if mqar is not None else {}
        artifact = None
        if name.startswith("a") or cells is not None:  # a2 logged the metric, but its passkey.csv is missing
            finals[PASSKEY] = 0.5
        if cells is not None:
            artifact = folder / name / "passkey.csv"
            artifact.parent.mkdir()
            artifact.write_text(cells if isinstance(cells, str) else
                                "length,depth,accuracy,n\n" + "".join(f"{l},{d},{a},{n}\n" for l, d, a, n in cells))
        _log_run(store, "seeds", name, config, sweep, wt2, "FINISHED", WT2, finals, artifact)
    return "seeds"


def _by_first_run(table: pl.DataFrame) -> dict[str, dict]:
    return {row["run_name"].split(", ")[0]: row for row in table.iter_rows(named=True)}


def test_seed_groups_mean_std_n_by_hand(store: str, seeded: str) -> None:
    data = tables.iso_kv_table(load_runs(store, seeded))
    rows = _by_first_run(data.table)
    assert set(rows) == {"a0", "k0", "f0", "w0", "t0"}
    attamba = rows["a0"]
    # 30, 31, 32: mean 31, deviations -1, 0, 1, sample variance (1 + 0 + 1) / 2 = 1
    assert (attamba["mean"], attamba["std"], attamba["n"]) == (31.0, 1.0, 3)
    assert attamba["run_name"] == "a0, a1, a2" and attamba["seeds"] == "0, 1, 2"
    # 32, 34, 36: mean 34, sample variance (4 + 0 + 4) / 2 = 4
    assert (rows["k0"]["mean"], rows["k0"]["std"], rows["k0"]["n"]) == (34.0, 2.0, 3)
    # 28, 29: mean 28.5, sample variance (0.25 + 0.25) / 1 = 0.5
    assert rows["t0"]["mean"] == 28.5 and rows["t0"]["std"] == pytest.approx(0.5 ** 0.5, rel=1e-12)
    # one seed: its value, no spread
    assert (rows["w0"]["mean"], rows["w0"]["std"], rows["w0"]["n"]) == (36.0, None, 1)
    assert ("dup", "same settings as the later run a1") in data.excluded


def test_rel_diff_uncertainty_and_within_spread_by_hand(store: str, seeded: str) -> None:
    rows = _by_first_run(tables.iso_kv_table(load_runs(store, seeded)).table)
    # iso-KV: 31/34 - 1; se = (31/34) sqrt((1/sqrt3/31)^2 + (2/sqrt3/34)^2) = 0.9118 * 0.03873;
    # |31 - 34| = 3 > sqrt(1 + 4) = 2.24: resolved by the seeds
    assert rows["k0"]["rel_diff"] == pytest.approx(-0.0882352941, rel=1e-9)
    assert rows["k0"]["rel_diff_se"] == pytest.approx(0.0353155960, rel=1e-8)
    assert rows["k0"]["within_spread"] is False
    # iso-FLOPs 31, 32, 33: 31/32 - 1 = -0.03125; se = (31/32) sqrt((1/sqrt3/31)^2 + (1/sqrt3/32)^2);
    # |31 - 32| = 1 < sqrt(1 + 1) = 1.41: within the seed spread
    assert rows["f0"]["rel_diff"] == pytest.approx(-0.03125, rel=1e-12)
    assert rows["f0"]["rel_diff_se"] == pytest.approx(0.0251200021, rel=1e-8)
    assert rows["f0"]["within_spread"] is True
    # one seed of the window baseline: a difference, but no uncertainty to give
    assert rows["w0"]["rel_diff"] == pytest.approx(31 / 36 - 1, rel=1e-12)
    assert rows["w0"]["rel_diff_se"] is None and rows["w0"]["within_spread"] is None
    assert rows["a0"]["rel_diff"] is None


def test_iso_kv_figure_marks_error_bars_and_spread(store: str, seeded: str, synthetic: dict) -> None:
    seeds_figure = DRAWERS["iso-kv"](tables.iso_kv_table(load_runs(store, seeded)))
    labels = {text.get_text() for text in seeds_figure.axes[0].texts}
    assert {"-8.8% ± 3.5%", "≈-3.1% ± 2.5%", "-13.9%"} <= labels  # ≈: within the seed spread
    errors = [bars.errorbar for bars in seeds_figure.axes[0].containers if hasattr(bars, "patches")]
    assert errors and all(error is not None for error in errors)
    single = DRAWERS["iso-kv"](tables.iso_kv_table(load_runs(store, "synthetic")))
    assert all(bars.errorbar is None for bars in single.axes[0].containers if hasattr(bars, "patches"))


def test_seed_groups_come_from_params_not_names(store: str, seeded: str) -> None:
    data = tables.pareto_table(load_runs(store, seeded))
    rows = _by_first_run(data.table)
    # lr=1e-3 is another configuration: its own group, though its other params equal a0's
    assert rows["lr"]["n"] == 1 and rows["lr"]["mean"] == 40.0
    assert rows["a0"]["run_name"] == "a0, a1, a2"


def test_seed_curves_have_per_step_spread(store: str, seeded: str) -> None:
    runs = load_runs(store, seeded)
    histories = metric_histories(store, runs["run_id"].to_list(), [WT2])
    table = tables.curves_table(runs, histories).table
    attamba = table.filter(pl.col("run_name") == "a0, a1, a2")
    # step 50 logged final + 2: 32, 33, 34
    assert attamba.select("step", "mean", "std", "n").rows() == [(50, 33.0, 1.0, 3), (100, 31.0, 1.0, 3)]


def test_recall_against_kv_bytes_with_front(store: str, seeded: str, tmp_path: Path) -> None:
    assert cli.main(["recall", "--experiment", seeded, "--tracking-uri", store, "--out", str(tmp_path)]) == 0
    _check_images({suffix: tmp_path / f"recall.{suffix}" for suffix in ("png", "pdf")})
    rows = {row["run_name"].split(", ")[0]: row for row in _csv_rows(tmp_path / "recall.csv")}
    assert set(rows) == {"a0", "k0", "f0", "t0"}
    # Attamba 0.9, 0.8, 0.7 (dup logged none); iso-KV 0.5, 0.6, 0.7; iso-FLOPs 0.4, 0.5, 0.6
    assert float(rows["a0"]["mean"]) == pytest.approx(0.8) and float(rows["a0"]["std"]) == pytest.approx(0.1)
    assert rows["a0"]["n"] == "3" and float(rows["k0"]["mean"]) == pytest.approx(0.6)
    assert rows["t0"]["std"] == "0.0" and rows["t0"]["n"] == "2"
    # iso-FLOPs (15360 B/token, 0.5) is beaten by Attamba (2616 B/token, 0.8); the others trade bytes for recall
    assert {name for name, row in rows.items() if row["on_front"] == "true"} == {"a0", "k0", "t0"}
    assert float(rows["a0"]["kv_bytes_per_token"]) == 2616.0


def test_pareto_front_higher_is_better() -> None:
    assert tables.pareto_front([1.0, 2.0, 3.0, 4.0], [0.5, 0.4, 0.9, 0.9], higher_is_better=True) == \
        [True, False, True, False]


def test_passkey_heatmap_from_artifacts(store: str, seeded: str, tmp_path: Path) -> None:
    assert cli.main(["passkey", "--experiment", seeded, "--tracking-uri", store, "--out", str(tmp_path)]) == 0
    _check_images({suffix: tmp_path / f"passkey.{suffix}" for suffix in ("png", "pdf")})
    rows = _csv_rows(tmp_path / "passkey.csv")
    cells = {(row["run_name"], int(row["length"]), float(row["depth"])):
             (float(row["mean"]), row["std"], int(row["n"]), int(row["trials"])) for row in rows}
    # a0 and a1 (a2's passkey.csv is missing): means of 1.0/1.0, 0.5/1.0, 0.75/0.25, 0.25/0.25,
    # sample std of two values a, b: |a - b| / sqrt 2
    half = f"{0.5 / 2 ** 0.5:.6g}"
    assert {key: value for key, value in cells.items() if key[0] == "a0, a1"} == {
        ("a0, a1", 256, 0.0): (1.0, "0.0", 2, 8), ("a0, a1", 256, 0.5): (0.75, cells[("a0, a1", 256, 0.5)][1], 2, 8),
        ("a0, a1", 512, 0.0): (0.5, cells[("a0, a1", 512, 0.0)][1], 2, 8), ("a0, a1", 512, 0.5): (0.25, "0.0", 2, 8)}
    assert f"{float(cells[('a0, a1', 256, 0.5)][1]):.6g}" == half == f"{float(cells[('a0, a1', 512, 0.0)][1]):.6g}"
    # one seed of the full transformer wrote a table: n = 1, no spread
    assert cells[("t0", 512, 0.5)] == (1.0, "", 1, 2)
    report = (tmp_path / "passkey.md").read_text()
    assert "a2: no passkey.csv artifact" in report
    assert "ssm: passkey.csv unreadable: conversion from `str` to `i64` failed in column 'length'" in report


def test_all_draws_seed_figures_and_skips_missing_ones(store: str, seeded: str, synthetic: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["all", "--experiment", seeded, "synthetic", "--tracking-uri", store,
                     "--out", str(tmp_path)]) == 0
    for name in (*FIGURE_NAMES, "recall", "passkey"):
        if name not in ("leading-tokens", "chunk-strategy"):
            assert (tmp_path / seeded / f"{name}.md").is_file(), name
    printed = capsys.readouterr().out
    assert "[synthetic] recall: skipped: no run logged eval/mqar/accuracy" in printed
    assert "[synthetic] passkey: skipped: no run logged eval/passkey/accuracy" in printed
    assert "within_spread" in (tmp_path / seeded / "iso-kv.md").read_text()


# ----------------------------------------------------------------------------- Lingua import


@pytest.fixture(scope="module")
def paper_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    archive = require_shared(PAPER_RUNS)
    target = tmp_path_factory.mktemp("paper")
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target / "attamba-paper-runs"


def _values(store: str, experiment: str) -> dict[str, tuple]:
    runs = load_runs(store, experiment)
    return {row["run_name"]: (row["run_id"], row.get(PAPER_WT2), row.get("train/loss"), row.get("model.family"))
            for row in runs.iter_rows(named=True)}


def test_import_lingua_final_perplexity_and_idempotence(store: str, paper_runs: Path) -> None:
    dirs = [paper_runs / "comparative_runs" / "isoAttentiveSSM4"]
    assert cli.main(["import-lingua", *map(str, dirs), "--experiment", "lingua", "--tracking-uri", store]) == 0
    runs = load_runs(store, "lingua")
    row = runs.filter(pl.col("run_name") == "isoAttentiveSSM4").row(0, named=True)
    assert round(row[PAPER_WT2], 4) == 33.5362 and row[f"{PAPER_WT2}:step"] == 60000
    # the paper's word/byte perplexities are that same per-token number: not imported as ours
    assert not {WT2, "eval/wikitext2/byte_perplexity", "eval/wikitext2/bits_per_byte"} & set(runs.columns)
    assert row["model.family"] == "attamba" and row["chunking.size"] == 4
    assert row["chunking.leading_tokens"] == 8 and row["chunking.strategy"] == "cyclic"
    assert row["tags.attamba.sweep"] == "attamba_isoStudy" and row["tags.attamba.source"] == "lingua"
    # KV bytes from the accounting, at the run's 1024-token context in bf16
    model = ModelConfig(family="attamba")
    expected_kv = accounting.kv_bytes_per_token(model, ChunkingConfig("cyclic", 4, 8), 1024)
    assert row["model/kv_bytes_per_token"] == expected_kv
    # histories keep their steps and values, e.g. the training loss and the perplexity per eval
    records = [json.loads(line) for line in (dirs[0] / "metrics.jsonl").read_text().splitlines()]
    history = metric_histories(store, [row["run_id"]], ["train/loss", PAPER_WT2])
    loss = history.filter(pl.col("key") == "train/loss")
    assert loss.select("step", "value").rows() == [(r["global_step"], r["loss/out"]) for r in records]
    evals = [json.loads(line) for line in (dirs[0] / "metrics.eval.jsonl").read_text().splitlines()]
    assert history.filter(pl.col("key") == PAPER_WT2)["step"].to_list() == [r["global_step"] for r in evals]
    assert row["speed/tokens_per_s"] == records[-1]["speed/wps"]
    assert row["mem/peak_gib"] == records[-1]["memory/max_active_gib"]

    before = _values(store, "lingua")
    results = lingua.import_dumps(dirs, store, "lingua")
    assert [result.action for result in results] == ["unchanged"]
    assert _values(store, "lingua") == before


def test_import_lingua_with_missing_and_empty_files_warns(store: str, paper_runs: Path, tmp_path: Path) -> None:
    source = paper_runs / "comparative_runs" / "isoKV4"
    empty_train = tmp_path / "empty_train"
    empty_train.mkdir()
    shutil.copy(source / "config.yaml", empty_train)
    (empty_train / "metrics.jsonl").write_text("")
    evals = (source / "metrics.eval.jsonl").read_text().splitlines()
    (empty_train / "metrics.eval.jsonl").write_text("\n".join(evals[:3]) + '\n{"global_step": 20000, "wiki')
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "metrics.eval.jsonl").write_text(evals[0] + "\n")
    with pytest.warns(lingua.LinguaImportWarning) as caught:
        results = lingua.import_dumps([empty_train, no_config], store, "lingua-partial")
    messages = "\n".join(str(warning.message) for warning in caught)
    assert "metrics.jsonl holds no records" in messages and "malformed" in messages
    assert "no config.yaml" in messages
    assert [result.action for result in results] == ["imported", "imported"]
    runs = load_runs(store, "lingua-partial")
    partial = runs.filter(pl.col("run_name") == "empty_train").row(0, named=True)
    assert partial["model.attn_dim"] == 128 and partial["model.family"] == "transformer"
    assert partial[f"{PAPER_WT2}:step"] == json.loads(evals[2])["global_step"]
    assert partial.get("train/loss") is None
    bare = runs.filter(pl.col("run_name") == "no_config").row(0, named=True)
    assert bare[PAPER_WT2] == json.loads(evals[0])["wikitext"]["word_perplexity,none"]


def test_lingua_roles_come_from_the_configs(paper_runs: Path) -> None:
    directories = sorted((paper_runs / "comparative_runs").iterdir()) + [
        paper_runs / "reported_runs" / "AttentiveSSMNoProjCyc", paper_runs / "long_runs" / "mamba_long"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lingua.LinguaImportWarning)  # long runs lack metrics.jsonl
        dumps = {path.name: lingua.read_dump(path) for path in directories}
    params = {name: lingua.run_params(dump) for name, dump in dumps.items()}
    lingua.infer_matches(params, {name: dump.study for name, dump in dumps.items()})
    roles = {name: (p["model.family"], p.get("model.match"), p.get("chunking.size")) for name, p in params.items()}
    assert roles["isoKV4"] == ("transformer", "kv_cache", 4)
    assert roles["isoKV16"] == ("transformer", "kv_cache", 16)
    assert roles["isoFLOP160"] == ("transformer", "flops", 4)
    assert roles["isoFLOP72"] == ("transformer", "flops", 16)
    assert roles["isoParam"] == ("transformer", "params", None)
    assert roles["mamba_long"][0] == "mamba2"
    # a config predating leading_tokens: the paper labels it with leading tokens = chunk size
    assert params["AttentiveSSMNoProjCyc"]["chunking.leading_tokens"] == 8
    assert params["isoAttentiveSSM16"]["chunking.leading_tokens"] == 16
    assert lingua.kv_bytes_per_token(params["mamba_long"]) == 0


@pytest.mark.slow
def test_paper_runs_full_import_and_figures(store: str, paper_runs: Path, tmp_path: Path) -> None:
    """Every published run imported (a few minutes on 2 cores), then every figure drawn."""
    for study in ("comparative_runs", "reported_runs", "long_runs"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lingua.LinguaImportWarning)
            results = lingua.import_dumps(sorted((paper_runs / study).iterdir()), store, f"paper-{study}")
        assert len(results) == len(list((paper_runs / study).iterdir()))
    assert cli.main(["all", "--tracking-uri", store, "--out", str(tmp_path),
                     "--experiment", "paper-comparative_runs", "paper-reported_runs", "paper-long_runs"]) == 0
    iso = _csv_rows(tmp_path / "paper-comparative_runs" / "iso-kv.csv")
    values = {row["run_name"]: float(row["mean"]) for row in iso}
    assert round(values["isoAttentiveSSM4"], 4) == 33.5362
    assert {row["metric"] for row in iso} == {PAPER_WT2}  # the figure says which perplexity it plots
    for row in iso:  # every plotted number is the dump's last WikiText-2 result
        evals = (paper_runs / "comparative_runs" / row["run_name"] / "metrics.eval.jsonl").read_text()
        last = json.loads(evals.splitlines()[-1])
        assert math.isclose(float(row["mean"]), last["wikitext"]["word_perplexity,none"], rel_tol=1e-12)
        assert int(row["step"]) == last["global_step"]
    for experiment in ("paper-comparative_runs", "paper-reported_runs"):
        for name in ("iso-kv", "pareto", "curves") if experiment.startswith("paper-comp") else FIGURE_NAMES[1:]:
            _check_images({suffix: tmp_path / experiment / f"{name}.{suffix}" for suffix in ("png", "pdf")})
