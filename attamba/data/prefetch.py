"""Batches made ahead of the training step, so the accelerator never waits for tokenization."""

from __future__ import annotations

import queue
import threading
from typing import Any, Protocol

import torch


class ResumableBatches(Protocol):
    def __next__(self) -> torch.Tensor: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


_POLL_S = 0.1  # how often a producer blocked on a full queue checks whether it should stop


class Prefetcher:
    """``loader``'s batches, made ``depth`` ahead by a background thread (in pinned memory with ``pin``).

    Resumable exactly as the loader: :meth:`state_dict` is the position after the last batch
    *returned*, not after the last one made, so a checkpoint never skips the batches still queued.
    Tokenization releases the GIL, so the thread runs beside the training step's Python. An error
    in the loader is raised by the ``next`` call that would have returned its batch.
    """

    def __init__(self, loader: ResumableBatches, depth: int = 2, pin: bool = False):
        if depth < 1:
            raise ValueError(f"depth: must be >= 1, got {depth}")
        self.loader, self.depth, self.pin = loader, depth, pin
        self._state = loader.state_dict()
        self._queue: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> torch.Tensor:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self.close()  # what was made ahead belongs to the old position
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    def close(self) -> None:
        """Stop the thread and drop the batches made ahead (``next`` starts it again)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread, self._queue = None, None

    def __del__(self) -> None:
        self.close()

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                        name="attamba-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                batch = next(self.loader)
                if self.pin:
                    batch = batch.pin_memory()
                self._put(out, stop, (batch, self.loader.state_dict()))
        except BaseException as error:  # handed to the consumer, which raises it where the batch was due
            self._put(out, stop, error)

    @staticmethod
    def _put(out: queue.Queue, stop: threading.Event, item: Any) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue
