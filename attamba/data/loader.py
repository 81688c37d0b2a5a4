"""Tokenizer construction and the packed, sharded, resumable training batches.

Packing: every document becomes ``[BOS] + encode(text) + [EOS]``; documents are
concatenated in the epoch's order and cut into consecutive windows of
``seq_len + 1`` tokens (inputs ``[:, :-1]``, targets ``[:, 1:]``). Only the
final partial window of an epoch is dropped. Each epoch streams the training
shards in a ``(seed, epoch)``-shuffled file order through a bounded shuffle
buffer, so order changes per epoch without ever loading the corpus. Rank ``r``
of ``world_size`` takes every ``world_size``-th document of that order, so ranks
read disjoint documents and each tokenizes only its own.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from attamba.config import DataConfig
from attamba.data import corpus
from attamba.data.jsonl import Shard, no_documents_error, read_shards
from attamba.data.mqar import MQARBatches, integer_tokenizer
from attamba.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

SHUFFLE_BUFFER = 4096  # documents held for shuffling (the whole default corpus fits)
ENCODE_BATCH = 64  # documents per encode_batch call
# The BPE trains on at most this much of the training split (the start of its reference
# order): plenty for merges, and bounded for multi-GB jsonl corpora.
BPE_TRAIN_CHARS = 100_000_000
BPE_FORMAT = 1  # bump when train_bpe's recipe changes, so that cached files are retrained


def build_tokenizer(data: DataConfig) -> Tokenizer:
    """``data.tokenizer="bpe"``: the BPE trained on the training split (cached under
    ``data.root/tokenizers`` by corpus and settings); ``"integers"``: MQAR's vocabulary;
    otherwise the file at that path."""
    if data.tokenizer == "integers":
        return integer_tokenizer(data.vocab_size)
    if data.tokenizer != "bpe":
        return load_tokenizer(data.tokenizer)
    settings = {"corpus": corpus.fingerprint(data), "vocab_size": data.vocab_size,
                "max_chars": BPE_TRAIN_CHARS, "format": BPE_FORMAT}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    texts = _first_characters(corpus.iter_documents(data, "train"), BPE_TRAIN_CHARS)
    return train_bpe(texts, data.vocab_size, Path(data.root) / "tokenizers", key)


def build_batches(data: DataConfig, tokenizer: Tokenizer, batch_size: int, seq_len: int, rank: int = 0,
                  world_size: int = 1, seed: int = 0) -> PackedBatches | MQARBatches:
    """The training batches of ``data.source`` for one rank: packed text windows, or MQAR examples
    (see :func:`attamba.models.split_batch` for both layouts)."""
    if data.source == "mqar":
        return MQARBatches(data, batch_size, seq_len, rank=rank, world_size=world_size, seed=seed)
    return PackedBatches(data, tokenizer, batch_size, seq_len, rank=rank, world_size=world_size, seed=seed)


def validation_documents(data: DataConfig, limit: int | None = None) -> list[str]:
    """The held-out documents (the first ``limit`` of them), in their fixed order."""
    return list(islice(corpus.iter_documents(data, "val"), limit))


class PackedBatches:
    """Infinite iterator of ``[batch_size, seq_len + 1]`` token batches for one rank.

    ``batch_size`` is this rank's. ``state_dict()`` after any batch lets a new iterator
    (same data, seed, rank and world size) continue with exactly the batches this one
    would have produced next; each rank keeps its own state.
    """

    def __init__(self, data: DataConfig, tokenizer: Tokenizer, batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        for name, value in (("train.batch_size", batch_size), ("train.seq_len", seq_len)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
        self.tokenizer, self.batch_size, self.seq_len = tokenizer, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self._shards = corpus.train_shards(data)
        if next(read_shards(self._shards), None) is None:
            raise no_documents_error(data)
        self._seek(epoch=0, document=0, offset=0)
        self._empty_epochs = 0  # epochs in a row that ended before giving a window

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> torch.LongTensor:
        windows = [self._next_window() for _ in range(self.batch_size)]
        return torch.from_numpy(np.stack(windows))

    def state_dict(self) -> dict:
        """Where the next window starts: epoch, global index of its document, tokens into it."""
        document = self._pending[0][0] if self._pending else self._cursor
        return {"epoch": self._epoch, "document": document, "offset": self._offset,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for name in ("seed", "rank", "world_size"):
            if state[name] != getattr(self, name):
                raise ValueError(f"{name}: this loader has {getattr(self, name)}, the state was saved "
                                 f"with {state[name]}; each rank must resume its own state")
        self._seek(state["epoch"], state["document"], state["offset"])
        self._empty_epochs = 0

    def _seek(self, epoch: int, document: int, offset: int) -> None:
        """Restart the stream at ``offset`` tokens into document ``document`` of ``epoch``."""
        self._epoch, self._cursor, self._offset = epoch, document, offset
        self._pending: deque[tuple[int, np.ndarray]] = deque()  # (document index, tokens)
        self._available = -offset  # tokens in _pending not yet emitted
        self._documents = islice(enumerate(epoch_documents(self._shards, self.seed, epoch)), document, None)

    def _next_window(self) -> np.ndarray:
        size = self.seq_len + 1
        while self._available < size:
            if not self._read_documents():
                self._next_epoch()
        self._empty_epochs = 0
        return self._take(size)

    def _read_documents(self) -> bool:
        """Encode this rank's next few documents into the pending queue; False at epoch end."""
        batch = []
        for index, text in self._documents:
            self._cursor = index + 1
            if index % self.world_size == self.rank:
                batch.append((index, text))
                if len(batch) == ENCODE_BATCH:
                    break
        if not batch:
            return False
        encoded = self.tokenizer.encode_batch([text for _, text in batch])
        for (index, _), ids in zip(batch, encoded):
            tokens = np.array([self.tokenizer.bos_id, *ids, self.tokenizer.eos_id], dtype=np.int64)
            self._pending.append((index, tokens))
            self._available += len(tokens)
        return True

    def _next_epoch(self) -> None:
        """Drop the epoch's final partial window and start the next epoch."""
        # Resuming at an epoch's very end legitimately meets one empty remainder; two
        # epochs in a row without a window mean this rank's share is too small.
        self._empty_epochs += 1
        if self._empty_epochs == 2:
            raise ValueError(f"train.seq_len: rank {self.rank} of {self.world_size} gets fewer than "
                             f"seq_len + 1 = {self.seq_len + 1} tokens per epoch of the training split")
        self._seek(self._epoch + 1, document=0, offset=0)

    def _take(self, size: int) -> np.ndarray:
        pieces = []
        needed = size
        while needed:
            _, tokens = self._pending[0]
            piece = tokens[self._offset:self._offset + needed]
            pieces.append(piece)
            needed -= len(piece)
            self._offset += len(piece)
            if self._offset == len(tokens):
                self._pending.popleft()
                self._offset = 0
        self._available -= size
        return np.concatenate(pieces)


def epoch_documents(shards: list[Shard], seed: int, epoch: int) -> Iterator[str]:
    """All ranks' training documents in the order of ``epoch``: shards in a shuffled
    order, then a bounded shuffle buffer over their documents."""
    rng = random.Random(f"attamba.data:{seed}:{epoch}")
    order = list(shards)
    rng.shuffle(order)
    return _shuffle_buffer(read_shards(order), SHUFFLE_BUFFER, rng)


def _shuffle_buffer(items: Iterable[str], size: int, rng: random.Random) -> Iterator[str]:
    """Yield ``items`` in a random order while holding at most ``size`` of them."""
    buffer: list[str] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def _first_characters(texts: Iterable[str], limit: int) -> Iterator[str]:
    """The texts, stopping after the one that reaches ``limit`` characters in total."""
    total = 0
    for text in texts:
        yield text
        total += len(text)
        if total >= limit:
            return
