"""Data: corpora (embedded default or jsonl shards), tokenizers, packed training batches and MQAR."""

from attamba.data.corpus import iter_documents
from attamba.data.loader import PackedBatches, build_batches, build_tokenizer, validation_documents
from attamba.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

__all__ = ["PackedBatches", "Tokenizer", "build_batches", "build_tokenizer", "iter_documents", "load_tokenizer",
           "train_bpe", "validation_documents"]
