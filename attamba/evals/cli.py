"""``attamba-eval RUN``: evaluate a trained run's final checkpoint and log the results into its MLflow run.

    attamba-eval RUN --evals val,passkey                      # RUN: run id, run name, or a directory
    attamba-eval RUN --evals passkey eval.passkey_lengths=[512,2048]
    attamba-eval RUN --lm-eval niah_single_1                  # lm-evaluation-harness tasks

RUN is a tracked run id or run name (looked up in ``--tracking-uri``), a run's output directory
(``train.output_dir``: its latest checkpoint) or one checkpoint directory (``.../checkpoints/step_N``).
The metrics go into the run the checkpoint belongs to, at the checkpoint's step and under the names
training logs, and the run's ``attamba.evaluations`` tag lists the evaluations added; its status is
left alone. Every check runs before the model is loaded, and nothing is written on an error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from attamba.config import DEVICES, Config, TrackingConfig, from_dict, to_dict

LM_EVAL_EXTRA = "pip install '.[eval]'"


@dataclass
class Located:
    """A checkpoint to evaluate and the tracked run it belongs to."""

    checkpoint: Path
    state: dict[str, Any]
    config: Config
    run_id: str
    uri: str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attamba-eval", description="Evaluate a trained run's checkpoint and log the results into its MLflow run.")
    parser.add_argument("run", metavar="RUN", help="a tracked run id or run name, a run's output directory "
                        "(train.output_dir) or a checkpoint directory (.../checkpoints/step_N)")
    parser.add_argument("overrides", nargs="*", metavar="eval.KEY=VALUE",
                        help="eval settings for this evaluation, e.g. eval.passkey_lengths=[512,2048]")
    parser.add_argument("--evals", default="", metavar="NAMES",
                        help="comma-separated evaluations: val, wikitext2, passkey (text runs), mqar (data=mqar runs)")
    parser.add_argument("--lm-eval", default="", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks")
    parser.add_argument("--tracking-uri", default=None,
                        help="the store that holds the run (default: a directory's own tracking.uri, else "
                             f"{TrackingConfig.uri})")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    return parser


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def check_evaluations(evaluations: Sequence[str], tasks: Sequence[str]) -> None:
    from attamba.evals.suite import EVALUATIONS

    for name in evaluations:
        if name not in EVALUATIONS:
            raise ValueError(f"--evals: unknown evaluation {name!r}; allowed: {', '.join(EVALUATIONS)}")
    if not evaluations and not tasks:
        raise ValueError(f"--evals: nothing to run; give --evals ({', '.join(EVALUATIONS)}) and/or --lm-eval TASKS")


def locate(run: str, tracking_uri: str | None) -> Located:
    """The checkpoint that ``run`` names, its state and configuration, and its run in the store."""
    from attamba import checkpoint
    from attamba.evals.runs import checkpoint_dir
    from attamba.tracking import find_run

    path = checkpoint_dir(run, tracking_uri, setting="RUN")
    state = checkpoint.load(path)
    config = from_dict(state["config"])
    # A directory carries its run's store; a run id or name was looked up in the one given (or the default).
    uri = tracking_uri or (config.tracking.uri if Path(run).expanduser().is_dir() else TrackingConfig.uri)
    if find_run(uri, state["mlflow_run_id"]) is None:
        raise ValueError(f"RUN: {path} belongs to MLflow run {state['mlflow_run_id']}, which {uri} does not "
                         "hold; pass the store with --tracking-uri")
    return Located(path, state, config, state["mlflow_run_id"], uri)


def with_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """``config`` with ``eval.*`` settings overridden (and validated as in training)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for override in overrides:
        if not override.startswith("eval.") or "=" not in override:
            raise ValueError(f"eval.KEY=VALUE: only eval settings change for a trained run, got {override!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.create(to_dict(config)), OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as error:
        raise ValueError(f"eval.KEY=VALUE: cannot read {' '.join(overrides)} ({error})") from None
    return from_dict(OmegaConf.to_container(merged))


def check_fit(evaluations: Sequence[str], config: Config) -> None:
    """Each evaluation suits the run: text evaluations for text runs, mqar for MQAR runs."""
    from attamba.evals.suite import TEXT_EVALUATIONS

    source = config.data.source
    for name in evaluations:
        if name in TEXT_EVALUATIONS and source == "mqar":
            raise ValueError(f"--evals: {name} reads text, and this run trained on data=mqar's integers "
                             "(use --evals mqar)")
        if name == "mqar" and source != "mqar":
            raise ValueError(f"--evals: mqar scores runs trained on data=mqar; this run trained on "
                             f"data.source={source}")
    if "wikitext2" in evaluations and config.eval.wikitext2_path is None:
        raise ValueError("eval.wikitext2_path: --evals wikitext2 needs the file; add eval.wikitext2_path=PATH")
    if "wikitext2" in evaluations and not Path(config.eval.wikitext2_path).is_file():
        raise ValueError(f"eval.wikitext2_path: no such file {config.eval.wikitext2_path}")


def lm_eval_harness() -> Any:
    """``attamba.evals.harness``, imported only when lm-eval tasks are asked for (an optional extra)."""
    try:
        return importlib.import_module("attamba.evals.harness")
    except ImportError as error:
        raise ValueError(f"--lm-eval: lm-evaluation-harness support is not installed ({error}); "
                         f"it is an optional extra: {LM_EVAL_EXTRA}") from None


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    """Every check, then the evaluations, then one write into the run; returns the metrics logged."""
    import torch

    from attamba.data import load_tokenizer
    from attamba.evals import suite
    from attamba.evals.passkey import check_lengths
    from attamba.models import build_model
    from attamba.tracking import log_evaluation
    from attamba.hardware import resolve_device

    evaluations, tasks = _names(args.evals), _names(args.lm_eval)
    check_evaluations(evaluations, tasks)
    located = locate(args.run, args.tracking_uri)
    config = with_overrides(located.config, args.overrides)
    check_fit(evaluations, config)
    harness = lm_eval_harness() if tasks else None
    tokenizer_files = sorted((located.checkpoint / "tokenizer").glob("tokenizer.*"))
    if not tokenizer_files:
        raise ValueError(f"RUN: checkpoint {located.checkpoint} has no tokenizer/ beside its state")
    tokenizer = load_tokenizer(tokenizer_files[0])
    if "passkey" in evaluations:
        check_lengths(config.passkey_lengths, config.eval.passkey_depths, config.eval.passkey_trials, tokenizer,
                      config.model.max_length)

    device = resolve_device(args.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    model = build_model(config)
    model.load_state_dict(located.state["model"])
    model.to(device)
    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="attamba-eval-") as scratch:
        artifacts: list[Path] = []
        for name in evaluations:
            if name == "val":
                metrics.update(suite.validation(model, tokenizer, config, device, amp_dtype))
            elif name == "wikitext2":
                metrics.update(suite.wikitext2(model, tokenizer, config, device, amp_dtype))
            elif name == "mqar":
                metrics.update(suite.mqar(model, config, device, amp_dtype))
            else:
                passkey_metrics, tables = suite.passkey(model, tokenizer, config, device, amp_dtype, Path(scratch))
                metrics.update(passkey_metrics)
                artifacts += tables
        if harness is not None:
            metrics.update(harness.run_tasks(model, tokenizer, tasks, device))
        log_evaluation(located.uri, located.run_id, metrics, located.state["step"],
                       [*evaluations, *(f"lm-eval:{task}" for task in tasks)], artifacts)
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    try:
        metrics = evaluate(args)
    except ValueError as error:  # a bad argument or setting: one line naming it, no traceback
        print(f"attamba-eval: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    for key, value in sorted(metrics.items()):
        print(f"{key} {value:.6g}")


if __name__ == "__main__":
    main()
