"""What a sweep is before anything runs: its points, validated, deduplicated, planned.

Every point of a Hydra multirun is composed and resolved here (iso-matched widths
included) before a single job is submitted, so a typo in the 12th point never
leaves 11 orphaned jobs. Points that resolve to the same configuration (the full
transformer repeated across a grid of chunk sizes) run once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

from attamba import accounting, checkpoint
from attamba.config import Config, flat_params

# A planning assumption, not a measurement: the share of an H200's bf16 peak a run sustains.
PLAN_MFU = 0.35
PLAN_PEAK_FLOPS = 989e12


@dataclass(frozen=True)
class SweepPoint:
    index: int
    overrides: tuple[str, ...]
    config: Config

    @cached_property
    def config_hash(self) -> str:
        """The run's identity: the same configuration is the same run, whichever sweep asks for it."""
        from attamba.tracking import config_hash

        return config_hash(flat_params(self.config))

    @property
    def name(self) -> str:
        from attamba.trainer import run_name

        return run_name(self.config)

    def checkpoint_step(self) -> int | None:
        """The step of the point's newest checkpoint (an earlier command trained it that far), or None."""
        return checkpoint.latest_step(Path(self.config.train.output_dir))


# What the sweep does with a point, as the plan's status column says it.
FINISHED = "finished"  # the store holds a FINISHED run of its configuration: skipped
LOG_FROM_CHECKPOINT = "log from checkpoint"  # trained to the end, absent from the store: logged, not retrained
TO_RUN = "to run"


def status(point: SweepPoint, tracked: Collection[str]) -> str:
    """``FINISHED``, ``LOG_FROM_CHECKPOINT``, ``resume from step N`` or ``TO_RUN``; ``tracked`` holds the
    config hashes of the FINISHED runs in the sweep's store (see :mod:`attamba.record` for why a run
    finished on disk is logged rather than trained again)."""
    if point.config_hash in tracked:
        return FINISHED
    step = point.checkpoint_step()
    if step is None:
        return TO_RUN
    return LOG_FROM_CHECKPOINT if step >= point.config.train.steps else f"resume from step {step}"


def require_int(setting: str, value: Any, minimum: int) -> None:
    """A launcher setting that must be a whole number of at least ``minimum``: else an error naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{setting}: must be an integer >= {minimum}, got {value!r}")


class SweepError(ValueError):
    """One or more points of a sweep are invalid; nothing was submitted."""


def sweep_key(overrides: Sequence[str]) -> str:
    """Identity of a sweep command: the same overrides (in any order) are the same sweep."""
    return hashlib.sha256(json.dumps(sorted(overrides)).encode()).hexdigest()[:12]


def prepare_points(job_overrides: Sequence[Sequence[str]], compose: Callable[[list[str]], Config]) -> list[SweepPoint]:
    """Compose and validate every point (its model must build and run a forward pass: see
    :func:`forward_problem`); raise one :class:`SweepError` listing every bad point."""
    seen: dict[tuple[str, ...], int] = {}
    errors: list[str] = []
    points: list[SweepPoint] = []
    checked: dict[str, str | None] = {}  # by model shape: why its forward pass fails, None if it ran
    for index, overrides in enumerate(job_overrides):
        key = tuple(sorted(overrides))
        if key in seen:
            errors.append(f"point {index} ({' '.join(overrides)}): duplicate of point {seen[key]}")
            continue
        seen[key] = index
        try:
            config = compose(list(overrides))
            shape = model_shape(config)
            if shape not in checked:
                checked[shape] = forward_problem(config)
            if checked[shape]:
                raise ValueError(checked[shape])
        except Exception as error:  # noqa: BLE001 - every composition failure is reported, with its point
            errors.append(f"point {index} ({' '.join(overrides) or 'no overrides'}): {_first_line(error)}")
            continue
        points.append(SweepPoint(index, tuple(overrides), config))
    if errors:
        raise SweepError("invalid sweep, nothing was submitted:\n  " + "\n  ".join(errors))
    return points


def failure_reason(error: BaseException) -> str:
    """One line saying why a job failed: the exception its run raised (the last line of the trace that
    submitit wraps between dashed lines in its ``FailedJobError``, before the paths of its logs)."""
    text = str(error).strip()
    parts = text.split("----------------------\n")
    if len(parts) >= 3:
        text = parts[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return re.sub(r"^(\w+\.)+(?=\w+: )", "", lines[-1]) if lines else type(error).__name__


# The forward check's tokens: enough for two chunks of any usual size; shapes do not depend on length.
CHECK_TOKENS = 64
CHECK_VOCAB = 256  # the embedding's size never decides whether a model runs; a small one is quick to zero


def model_shape(config: Config) -> str:
    """What decides whether the model of ``config`` runs :func:`forward_problem`'s forward pass: its
    settings (not what a baseline was matched to), the chunking where it chunks, and the check's length."""
    model = dataclasses.replace(config.model, match=None)
    chunking = dataclasses.asdict(config.chunking) if model.family == "attamba" else None
    return json.dumps([dataclasses.asdict(model), chunking, _check_length(config)])


def _check_length(config: Config) -> int:
    return min(config.train.seq_len, max(CHECK_TOKENS, 2 * config.chunking.size))


def forward_problem(config: Config) -> str | None:
    """Why the model of ``config`` cannot build and run a forward pass, naming its settings; None if it can.

    Run on the CPU of the submitting machine, through the kernels' CPU paths (``auto``): what it
    checks is that the configured shapes fit together, which no job should find out after submission.
    """
    import torch

    from attamba.models import build_model

    model = dataclasses.replace(config.model, vocab_size=min(config.model.vocab_size, CHECK_VOCAB),
                                attn_impl="auto", ssm=dataclasses.replace(config.model.ssm, impl="auto"))
    length = _check_length(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only wait on each other's threads, for seconds on a busy machine
    try:
        with torch.device("meta"):  # no initialisation: the weights' values do not matter here
            module = build_model(model, config.chunking)
        module = module.to_empty(device="cpu")
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.zero_()
            module(torch.zeros(1, length, dtype=torch.long))
    except Exception as error:  # noqa: BLE001 - whatever fails, the point is named with its model's settings
        settings = (f"model.family={model.family} model.dim={model.dim} model.n_heads={model.n_heads} "
                    f"model.attn_dim={model.attn_dim} model.n_kv_heads={model.n_kv_heads} "
                    f"model.window={model.window} chunking.size={config.chunking.size} "
                    f"chunking.leading_tokens={config.chunking.leading_tokens}")
        return f"model: does not run a forward pass with {settings}: {_first_line(error)}"
    finally:
        torch.set_num_threads(threads)
    return None


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0] if "\n" in text and len(text) > 300 else text


def unique(points: Sequence[SweepPoint]) -> tuple[list[SweepPoint], list[tuple[SweepPoint, SweepPoint]]]:
    """Points with distinct configurations, and (duplicate, kept) pairs for the ones merged."""
    kept: dict[str, SweepPoint] = {}
    merged = []
    for point in points:
        if point.config_hash in kept:
            merged.append((point, kept[point.config_hash]))
        else:
            kept[point.config_hash] = point
    return list(kept.values()), merged


def estimate(config: Config) -> dict[str, float]:
    """Parameters, training tokens, FLOPs and GPU-hours of one run, from accounting alone."""
    model, train = config.model, config.train
    tokens = train.steps * train.batch_size * train.seq_len
    flops = accounting.flops_per_token(model, config.chunking, train.seq_len, training=True) * tokens
    return {
        "params": float(accounting.param_count(model)),
        "tokens": float(tokens),
        "flops": flops,
        "gpu_hours": flops / (PLAN_PEAK_FLOPS * PLAN_MFU) / 3600,
        "kv_bytes_per_token": accounting.kv_bytes_per_token(model, config.chunking, train.seq_len),
    }


def plan_table(points: Sequence[SweepPoint], tracked: Collection[str]) -> str:
    """The run matrix as a Markdown table, with totals; ``tracked`` as for :func:`status`."""
    header = ("| # | run | family | P | lead | attn_dim | params | tokens | train FLOPs | KV B/token "
              "| GPU-h | status |")
    lines = [header, "|" + "---|" * 12]
    totals = {"tokens": 0.0, "flops": 0.0, "gpu_hours": 0.0}
    for point in points:
        config, numbers = point.config, estimate(point.config)
        for key in totals:
            totals[key] += numbers[key]
        attamba_like = config.model.family == "attamba" or config.model.match is not None
        lines.append(
            f"| {point.index} | {point.name} | {config.model.family} "
            f"| {config.chunking.size if attamba_like else '-'} "
            f"| {config.chunking.leading_tokens if config.model.family == 'attamba' else '-'} "
            f"| {config.model.width if config.model.family != 'mamba2' else '-'} "
            f"| {numbers['params'] / 1e6:.2f}M | {numbers['tokens'] / 1e6:.1f}M | {numbers['flops']:.3g} "
            f"| {numbers['kv_bytes_per_token']:.0f} | {numbers['gpu_hours']:.3f} "
            f"| {status(point, tracked)} |")
    lines.append(f"\n{len(points)} runs, {totals['tokens'] / 1e9:.3f}B tokens, {totals['flops']:.3g} FLOPs, "
                 f"≈{totals['gpu_hours']:.2f} H200 GPU-hours at {PLAN_MFU:.0%} MFU")
    return "\n".join(lines)


def named_apart(points: Sequence[SweepPoint]) -> list[SweepPoint]:
    """``points``, where runs would share a name (a sweep over ``train.lr``: the name shows the model),
    named with the overrides that set them apart, so the plan and the MLflow UI tell them apart.

    The name is a tracking setting, so no point's identity (its config hash) changes.
    """
    by_name: dict[str, list[SweepPoint]] = {}
    for point in points:
        by_name.setdefault(point.name, []).append(point)
    names: dict[int, str] = {}
    for name, group in by_name.items():
        if len(group) > 1:
            shared = set.intersection(*(set(point.overrides) for point in group))
            for point in group:
                names[point.index] = " ".join([name, *(o for o in point.overrides if o not in shared)])
    return [dataclasses.replace(point, config=with_tracking(point.config, run_name=names[point.index]))
            if point.index in names else point for point in points]


def with_tracking(config: Config, **settings: Any) -> Config:
    """``config`` with these ``tracking`` settings (where a run is logged and under what name; never its hash)."""
    return dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, **settings))
