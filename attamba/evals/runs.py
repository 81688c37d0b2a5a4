"""A finished run's final checkpoint, found from its MLflow run id, run name or directory, and loaded.

``load_run(run)`` accepts what a user has at hand: a tracked run's id or name (its checkpoints
are in the ``train.output_dir`` it logged as a param), a run's output directory (its
``checkpoints/latest``), or one checkpoint directory (``checkpoints/step_*``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from attamba import checkpoint
from attamba.config import Config, TrackingConfig, from_dict
from attamba.data.tokenizer import Tokenizer, load_tokenizer
from attamba.models import LanguageModel, build_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def checkpoint_dir(run: str, tracking_uri: str | None = None, setting: str = "run") -> Path:
    """The checkpoint directory ``run`` names (see the module docstring); a ``ValueError`` naming
    ``setting`` (how the caller's user gave ``run``) when there is none."""
    path = Path(run).expanduser()
    if path.is_dir():
        if (path / "state.pt").is_file():
            return path
        latest = checkpoint.latest(path)
        if latest is None:
            raise ValueError(f"{setting}: {path} holds no checkpoint (neither a checkpoints/step_N directory "
                             "nor a run's train.output_dir with checkpoints/latest)")
        return latest
    from attamba.tracking import find_run

    uri = tracking_uri or TrackingConfig.uri
    found = find_run(uri, run)
    if found is None:
        raise ValueError(f"{setting}: no run with the id or name {run!r} in {uri} (and no such directory)")
    output = found["params"].get("train.output_dir")
    latest = checkpoint.latest(Path(output)) if output not in (None, "None") else None
    if latest is None:
        raise ValueError(f"{setting}: run {found['run_id']} ({found['run_name']}) has no checkpoint in its "
                         f"train.output_dir={output} (relative paths are read from {Path.cwd()})")
    return latest


def load_run(run: str, tracking_uri: str | None = None,
             device: str | torch.device = "cpu") -> tuple[Config, LanguageModel, Tokenizer]:
    """The config, model (eval mode, on ``device``) and tokenizer of ``run``'s latest checkpoint."""
    directory = checkpoint_dir(run, tracking_uri)
    state = checkpoint.load(directory, map_location="cpu")
    config = from_dict(state["config"])
    model = build_model(config)
    model.load_state_dict(state["model"])
    tokenizers = [path for path in (directory / "tokenizer" / name for name in TOKENIZER_FILES) if path.is_file()]
    if not tokenizers:
        raise ValueError(f"run: checkpoint {directory} holds no tokenizer/ ({' or '.join(TOKENIZER_FILES)})")
    return config, model.to(device).eval(), load_tokenizer(tokenizers[0])
