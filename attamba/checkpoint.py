"""Atomic checkpoints: a crash mid-write never leaves a corrupt ``latest``.

Layout under a run's output directory::

    checkpoints/step_00000500/state.pt    model, optimizer, scheduler, data position, RNG, step, run id
    checkpoints/step_00000500/tokenizer/  the tokenizer the run was trained with
    checkpoints/latest                    name of the newest *complete* checkpoint

A checkpoint is written into a temporary directory, flushed, renamed into place,
and only then named by ``latest`` (itself replaced atomically with ``os.replace``).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

KEEP_LAST = 2


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: Path, step: int, state: dict[str, Any], tokenizer=None) -> Path:
    """Write ``state`` as checkpoint ``step`` and point ``latest`` at it; prune old ones."""
    root = Path(directory) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final, staging = root / name, root / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    with open(staging / "state.pt", "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if tokenizer is not None:
        tokenizer.save(staging / "tokenizer")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    pointer = root / ".latest.partial"
    pointer.write_text(name)
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    _prune(root, keep=name)
    return final


def _prune(root: Path, keep: str) -> None:
    complete = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in complete[:-KEEP_LAST]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    pointer = Path(directory) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def latest_step(directory: Path) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    path = latest(directory)
    return None if path is None else int(path.name.removeprefix("step_"))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(path) / "state.pt", map_location=map_location, weights_only=False)
