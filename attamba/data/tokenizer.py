"""One tokenizer interface over HF ``tokenizers`` files and SentencePiece models.

A :class:`Tokenizer` holds the bytes of its file, so it pickles (to dataloader
workers, into checkpoints) and saves with each run as an exact copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import sentencepiece
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from attamba.data.prepare import atomic_write
from attamba.locking import exclusive_lock

BOS, EOS = "<s>", "</s>"
# Names under which tokenizer.json files in the wild (Llama, Llama-3, GPT-2, ...) keep
# their document delimiters; GPT-2's single <|endoftext|> serves as both.
BOS_NAMES = (BOS, "<|begin_of_text|>", "<bos>", "[BOS]", "<|endoftext|>")
EOS_NAMES = (EOS, "<|end_of_text|>", "<eos>", "[EOS]", "<|endoftext|>")
MIN_BPE_VOCAB = 256 + 2  # every byte, plus BOS and EOS
KINDS = ("tokenizers", "sentencepiece")


class Tokenizer:
    """Encode and decode text; ``bos_id`` / ``eos_id`` delimit documents when packing."""

    vocab_size: int
    bos_id: int
    eos_id: int

    def __init__(self, kind: str, blob: bytes, source: str = "<memory>") -> None:
        """``blob`` is a tokenizer.json (``kind="tokenizers"``) or a SentencePiece model
        (``kind="sentencepiece"``); ``source`` names where it came from, for errors."""
        if kind not in KINDS:
            raise ValueError(f"kind: got {kind!r}, allowed values are {', '.join(KINDS)}")
        self.kind, self._blob, self.source = kind, blob, source
        if kind == "tokenizers":
            self._hf = _load_hf(blob, source)
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            self.bos_id = _special_id(self._hf, BOS_NAMES, "BOS", source)
            self.eos_id = _special_id(self._hf, EOS_NAMES, "EOS", source)
        else:
            self._sp = _load_sentencepiece(blob, source)
            self.vocab_size = self._sp.get_piece_size()
            self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
            if min(self.bos_id, self.eos_id) < 0:
                raise ValueError(f"data.tokenizer: {source} defines no BOS/EOS pieces to delimit documents")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no BOS/EOS), using the backend's parallel batch encoder."""
        if self.kind == "tokenizers":
            return [encoding.ids for encoding in self._hf.encode_batch(texts, add_special_tokens=False)]
        return self._sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; BOS/EOS and other special tokens are left out."""
        if self.kind == "tokenizers":
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._sp.decode(ids)

    def save(self, directory: Path) -> Path:
        """Write the tokenizer file into ``directory``; :func:`load_tokenizer` reads it back."""
        name = "tokenizer.json" if self.kind == "tokenizers" else "tokenizer.model"
        path = Path(directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._blob)
        return path

    def __getstate__(self) -> dict:
        # Backends are rebuilt from the file bytes: SentencePiece processors do not pickle.
        return {"kind": self.kind, "blob": self._blob, "source": self.source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["kind"], state["blob"], state["source"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, source={self.source!r})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a HF ``tokenizer.json`` or a SentencePiece model (``.model``, any file name).

    The format is told from the content (JSON text vs. protobuf), so files such as
    mistral-common's ``tokenizer.model.v1`` load too.
    """
    if not str(path).strip():
        raise ValueError("data.tokenizer: empty; use \"bpe\", a SentencePiece .model or a HF tokenizer.json")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"data.tokenizer: {str(path)!r} is not a file; use \"bpe\", a SentencePiece "
                         f".model or a HF tokenizer.json")
    blob = path.read_bytes()
    kind = "tokenizers" if blob.lstrip()[:1] == b"{" else "sentencepiece"
    return Tokenizer(kind, blob, str(path))


def train_bpe(texts: Iterable[str], vocab_size: int, cache_dir: Path, key: str) -> Tokenizer:
    """A byte-level BPE with ``<s>``/``</s>``, trained on ``texts`` unless ``key`` is cached.

    The cache file is ``cache_dir/bpe-<key>.json``; ``key`` must identify the texts and
    settings. Parallel jobs (DDP ranks, sweep runs) train it once: the others wait on a
    lock, then load the file, which is written atomically.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"data.vocab_size: a byte-level BPE needs >= {MIN_BPE_VOCAB}, got {vocab_size}")
    path = Path(cache_dir) / f"bpe-{key}.json"
    if not path.exists():
        with exclusive_lock(path.with_suffix(".lock")):
            if not path.exists():
                atomic_write(path, _train_byte_level_bpe(texts, vocab_size).to_str())
    return load_tokenizer(path)


def _train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _load_hf(blob: bytes, source: str) -> HFTokenizer:
    try:
        return HFTokenizer.from_str(blob.decode("utf-8"))
    except Exception as error:  # tokenizers raises bare Exceptions for malformed files
        raise ValueError(f"data.tokenizer: {source} is not a loadable HF tokenizer.json ({error})") from None


def _load_sentencepiece(blob: bytes, source: str) -> sentencepiece.SentencePieceProcessor:
    try:
        return sentencepiece.SentencePieceProcessor(model_proto=blob)
    except Exception as error:  # sentencepiece raises RuntimeError or OSError depending on the damage
        raise ValueError(f"data.tokenizer: {source} is not a loadable SentencePiece model ({error})") from None


def _special_id(tokenizer: HFTokenizer, names: tuple[str, ...], role: str, source: str) -> int:
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    raise ValueError(f"data.tokenizer: {source} has no {role} token; expected one of {', '.join(names)}")

