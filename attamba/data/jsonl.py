"""User shards: ``*.jsonl`` / ``*.jsonl.gz`` files of ``{"text": ...}`` lines (the DCLM layout).

Files are read line by line, never whole. The *reference stream* is the files in
sorted path order, each in line order; validation is its first ``data.val_docs``
documents and training the rest. Lines that are blank or whose text is empty
are not documents.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

from attamba.config import DataConfig

SUFFIXES = (".jsonl", ".jsonl.gz")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Shard:
    """One file of the training stream, less the documents at its head held out for validation."""

    path: Path
    skip: int = 0


def resolve_paths(patterns: Sequence[str]) -> list[Path]:
    """Expand files and globs (``**`` allowed) into a sorted, duplicate-free list of shards."""
    if not patterns:
        raise ValueError("data.paths: data=jsonl needs at least one .jsonl or .jsonl.gz file or glob")
    paths: set[Path] = set()
    for pattern in patterns:
        matches = [Path(match) for match in glob.glob(str(Path(pattern).expanduser()), recursive=True)]
        files = [path for path in matches if path.is_file()]
        if not files:
            raise ValueError(f"data.paths: {pattern!r} matches no file")
        for path in files:
            if not path.name.endswith(SUFFIXES):
                raise ValueError(f"data.paths: {str(path)!r} is not a {' or '.join(SUFFIXES)} file")
        paths.update(files)
    return sorted(paths)


def read_texts(path: Path) -> Iterator[str]:
    """Stream the non-empty ``text`` fields of one shard, in line order; a file that is not
    UTF-8 text (or not gzip, for ``.gz``) is a ``ValueError`` naming it."""
    try:
        with _open(path) as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    text = _text_of(line, path, number)
                    if text.strip():
                        yield text
    except UnicodeDecodeError as error:
        raise ValueError(f"data.paths: {path} is not UTF-8 text (byte {error.object[error.start]:#04x}); "
                         "shards hold JSON lines") from None
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError; a cut-off gzip an EOFError
        if not path.name.endswith(".gz"):
            raise
        raise ValueError(f"data.paths: {path} is not a readable gzip file ({type(error).__name__}: {error})") from None


def iter_documents(data: DataConfig, split: str) -> Iterator[str]:
    """Documents of ``split`` ("train" | "val") in reference-stream order, streamed."""
    check_split(split)
    shards = train_shards(data)
    if split == "val":
        return chain.from_iterable(islice(read_texts(shard.path), shard.skip) for shard in shards)
    return require_documents(read_shards(shards), data)


def check_split(split: str) -> None:
    """Reject a split name other than "train" or "val"."""
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}, allowed values are {', '.join(SPLITS)}")


def train_shards(data: DataConfig) -> list[Shard]:
    """The training files in reference order, each with its held-out head to skip."""
    files = resolve_paths(data.paths)
    return [Shard(path, skip) for path, skip in zip(files, validation_counts(files, data.val_docs))]


def read_shards(shards: Iterable[Shard]) -> Iterator[str]:
    """The training documents of ``shards``, in the order given."""
    return chain.from_iterable(islice(read_texts(shard.path), shard.skip, None) for shard in shards)


def validation_counts(files: Sequence[Path], val_docs: int) -> list[int]:
    """How many documents at the head of each file belong to the first ``val_docs`` of the
    reference stream; only those documents are read."""
    counts = []
    remaining = val_docs
    for path in files:
        taken = sum(1 for _ in islice(read_texts(path), remaining)) if remaining > 0 else 0
        counts.append(taken)
        remaining -= taken
    return counts


def require_documents(documents: Iterable[str], data: DataConfig) -> Iterator[str]:
    """Pass ``documents`` through; raise once they run out if there were none at all."""
    count = 0
    for count, text in enumerate(documents, start=1):
        yield text
    if count == 0:
        raise no_documents_error(data)


def no_documents_error(data: DataConfig) -> ValueError:
    """The error for a training split without documents, naming the settings that cause it."""
    return ValueError(f"data.paths: no training documents in {data.paths} (a document is a line with a "
                      f"non-empty \"text\"; the first data.val_docs={data.val_docs} are held out)")


def fingerprint(data: DataConfig) -> str:
    """A cheap identity of the shards (paths, sizes, modification times) and the split.

    Hashing the content of a multi-GB DCLM shard set on every start would cost minutes;
    rewriting or touching a file changes its fingerprint.
    """
    entries = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
               for path in resolve_paths(data.paths)]
    return hashlib.sha256(json.dumps({"files": entries, "val_docs": data.val_docs}).encode()).hexdigest()


def _open(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _text_of(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"data.paths: {path}:{number} is not a JSON line ({error.msg})") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError(f"data.paths: {path}:{number} has no string \"text\" field")
    return text
