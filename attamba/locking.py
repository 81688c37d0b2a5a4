"""An inter-process lock on a file: one process at a time prepares a corpus, migrates a store, trains a run, ..."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class LockBusy(RuntimeError):
    """Another process holds the lock (``holder``: its pid, as it wrote it, or "")."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is locked by {'process ' + holder if holder else 'another process'}")
        self.path, self.holder = path, holder


@contextmanager
def exclusive_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) across processes on this host.

    ``wait=False``: raise :class:`LockBusy` at once if another process holds it. The holder's pid
    is written into the file for that message; the lock goes with the process, even on ``kill -9``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            raise LockBusy(path, handle.read().strip()) from None
        try:
            handle.truncate(0)
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
