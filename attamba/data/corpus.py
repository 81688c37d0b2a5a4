"""Where documents come from: the embedded default corpus or the user's jsonl shards.

Both sources are jsonl files in the end; this module picks them by
``data.source`` and prepares the default corpus on first use (``make install``
normally has done it already).
"""

from __future__ import annotations

import json
from typing import Iterator

from attamba.config import DataConfig
from attamba.data import jsonl
from attamba.data.jsonl import Shard, check_split
from attamba.data.prepare import ensure_default_corpus


def iter_documents(data: DataConfig, split: str) -> Iterator[str]:
    """Documents of ``split`` ("train" | "val"), streamed in a deterministic order."""
    check_split(split)
    if data.source == "mqar":
        raise ValueError("data.source: data=mqar generates integer examples (attamba.data.mqar), not documents")
    if data.source == "jsonl":
        return jsonl.iter_documents(data, split)
    directory = ensure_default_corpus(data.root, data.val_fraction)
    return jsonl.read_texts(directory / f"{split}.jsonl")


def train_shards(data: DataConfig) -> list[Shard]:
    """The training split as shards in reference order (one shard for the default corpus)."""
    if data.source == "jsonl":
        return jsonl.train_shards(data)
    return [Shard(ensure_default_corpus(data.root, data.val_fraction) / "train.jsonl")]


def fingerprint(data: DataConfig) -> str:
    """An identity of the training split, for caching what is derived from it."""
    if data.source == "jsonl":
        return jsonl.fingerprint(data)
    manifest = ensure_default_corpus(data.root, data.val_fraction) / "manifest.json"
    return json.loads(manifest.read_text())["sha256"]
