"""Atomic, verified checkpoints: a crash, a full disk or Ctrl-C mid-write never costs a resumable state.

Layout under a run's output directory::

    checkpoints/step_00000500/state.pt    model, optimizer, scheduler, data position, RNG, step, run id
    checkpoints/step_00000500/tokenizer/  the tokenizer the run was trained with
    checkpoints/latest                    name of the newest *complete* checkpoint
    mlflow_run_id                         the MLflow run of this directory, from before its first checkpoint

A checkpoint is written into a temporary ``.partial`` directory, flushed, loaded back,
renamed into place, and only then named by ``latest`` (itself replaced atomically with
``os.replace``). Older checkpoints are pruned only once a newer one has loaded back, and
resuming falls back past checkpoints that no longer load (truncated, emptied, deleted).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

KEEP_LAST = 2
RUN_ID_FILE = "mlflow_run_id"
# What resuming reads from a state; a state without them is damaged even if it unpickles.
REQUIRED_KEYS = frozenset({"model", "optimizer", "scheduler", "data", "rng", "step", "mlflow_run_id", "final"})


class NoSpaceLeft(OSError):
    """A checkpoint did not fit on its file system; its partial files are removed. ``setting``: the
    config setting that chose ``path``, named first in the message."""

    def __init__(self, path: Path, step: int, setting: str = ""):
        prefix = f"{setting}: " if setting else ""
        super().__init__(errno.ENOSPC, f"{prefix}no space left on {path} to write checkpoint step {step}")
        self.path, self.step = path, step


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


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, then deliver it: raised inside ``torch.save`` it comes out
    as an opaque ``RuntimeError`` and leaves a partial file (signals reach the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


def _is_no_space(error: BaseException | None) -> bool:
    """Whether ``error`` or an error it was raised from is ENOSPC/EDQUOT (``torch.save`` wraps the
    ``OSError`` of a failed write in a ``RuntimeError``)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _complete(root: Path) -> list[Path]:
    """Checkpoint directories, newest first."""
    return sorted((p for p in root.glob("step_*") if (p / "state.pt").is_file()), key=_step_of, reverse=True)


def save(directory: Path, step: int, state: dict[str, Any], tokenizer=None) -> Path:
    """Write ``state`` as checkpoint ``step``, check that it loads, point ``latest`` at it, prune old ones.

    Raises :class:`NoSpaceLeft` when the file system is full; nothing partial stays behind.
    """
    root = Path(directory) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final, staging = root / name, root / f".{name}.partial"
    for stale in root.glob(".*.partial"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    try:
        with _interrupts_held():
            staging.mkdir()
            with open(staging / "state.pt", "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            if tokenizer is not None:
                tokenizer.save(staging / "tokenizer")
            load(staging, mmap=True)  # one that does not load back must not replace (or prune) one that does
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            pointer = root / ".latest.partial"
            pointer.write_text(name)
            os.replace(pointer, root / "latest")
            _fsync_dir(root)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        (root / ".latest.partial").unlink(missing_ok=True)
        if _is_no_space(error):
            raise NoSpaceLeft(root, step) from error
        raise
    _prune(root, newest=final)
    return final


def _prune(root: Path, newest: Path) -> None:
    """Delete checkpoints older than the ``KEEP_LAST`` newest up to ``newest``, which loaded back.

    Checkpoints past ``newest`` are left alone: they exist only if resuming could not load them.
    """
    kept = [path for path in _complete(root) if _step_of(path) <= _step_of(newest)]
    for old in kept[KEEP_LAST:]:
        shutil.rmtree(old, ignore_errors=True)


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint directory (``latest``'s, or the newest left if it names none), or None."""
    root = Path(directory) / "checkpoints"
    pointer = root / "latest"
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / "state.pt").is_file():
            return path
    complete = _complete(root) if root.is_dir() else []
    return complete[0] if complete else None


def latest_step(directory: Path) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    path = latest(directory)
    return None if path is None else _step_of(path)


def load(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The state of checkpoint ``path``; ``ValueError`` if it is not a whole training state.
    ``mmap``: tensors stay on disk until read (a check that the file loads, without reading it all)."""
    state = torch.load(Path(path) / "state.pt", map_location=map_location, weights_only=False, mmap=mmap)
    if not isinstance(state, dict) or not REQUIRED_KEYS <= state.keys():
        raise ValueError(f"{Path(path) / 'state.pt'} is not a training state")
    return state


def load_latest(directory: Path, map_location: str | torch.device = "cpu",
                say: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, and its state; None if there is no checkpoint.

    Checkpoints that do not load are skipped, and ``say`` is told which and why. If none
    loads, a ``ValueError`` naming ``train.output_dir``: training from step 0 would
    overwrite them, and a checkpoint that fails here may still load elsewhere.
    """
    root = Path(directory) / "checkpoints"
    pointer = root / "latest"
    named = pointer.read_text().strip() if pointer.exists() else None
    gone = named is not None and not (root / named / "state.pt").is_file()
    if gone:
        say(f"checkpoint {named}, the latest in {root}, is gone")
    failures = []
    for path in _complete(root) if root.is_dir() else []:
        try:
            state = load(path, map_location)
        except Exception as error:  # noqa: BLE001 - any unreadable file is a damaged checkpoint
            message = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            failures.append(f"{path.name} ({type(error).__name__}: {message})")
            say(f"checkpoint {path} does not load: {failures[-1]}")
            continue
        if failures or gone:
            say(f"resuming from the newest checkpoint that loads: {path}")
        return path, state
    if failures:
        raise ValueError(f"train.output_dir: no checkpoint in {root} loads: {'; '.join(failures)}; "
                         "move them away to train from step 0")
    return None


def record_run_id(directory: Path, run_id: str) -> None:
    """Remember the MLflow run of ``directory`` from its start, so that a run stopped before its
    first checkpoint continues in the same MLflow run."""
    target = Path(directory) / RUN_ID_FILE
    staging = target.with_name(f".{RUN_ID_FILE}.partial")
    staging.write_text(run_id)
    os.replace(staging, target)


def recorded_run_id(directory: Path) -> str | None:
    target = Path(directory) / RUN_ID_FILE
    if not target.is_file():
        return None
    return target.read_text().strip() or None
