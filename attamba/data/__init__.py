"""Data: corpora (embedded default or jsonl shards), tokenizers and packed training batches."""

from attamba.data.corpus import iter_documents
from attamba.data.loader import PackedBatches, build_tokenizer, validation_documents
from attamba.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

__all__ = ["PackedBatches", "Tokenizer", "build_tokenizer", "iter_documents", "load_tokenizer",
           "train_bpe", "validation_documents"]
