"""Multi-query associative recall (MQAR), as Zoology defines it (Arora et al. 2023, ``_mqar`` in
HazyResearch/zoology's ``zoology/data/associative_recall.py``).

An example of ``seq_len`` tokens over a vocabulary of ``V`` integers:

* the first ``2n`` tokens are ``n`` key-value pairs ``k1 v1 k2 v2 ...``: distinct keys from
  ``[1, V/2)``, distinct values from ``[V/2, V)``;
* every key is queried once, at an even offset ``2g`` after the pairs, where the gaps ``g`` are
  drawn without replacement from ``[0, (seq_len - 2n) / 2)`` with the power law
  ``p(g) ∝ a · (g + 1) ** (a - 1)`` (``a = data.mqar_power_a``; 1 is uniform, small values put
  queries near the pairs, as repeated bigrams are in text);
* the target at a query's position is its key's value; every other target is ``IGNORE_INDEX``;
* every other input token (the zeros of Zoology's template) is uniform noise over the vocabulary.

Batches are ``[B, 2, seq_len]``: inputs and targets (see :func:`attamba.models.split_batch`).
Each batch is drawn from its own seeded stream, so the sequence of batches is unlimited,
deterministic and resumable from a batch count; the held-out set is one fixed stream that no
training seed reaches, so every run of a configuration is scored on the same examples.
"""

from __future__ import annotations

import numpy as np
import torch

from attamba.config import DataConfig
from attamba.data.tokenizer import BOS, EOS, Tokenizer
from attamba.models.objective import IGNORE_INDEX

_STREAM = 0x6D716172  # "mqar": keeps these streams apart from the other seeded draws of a run
_TRAIN, _HELDOUT = 0, 1


def gap_probabilities(space: int, power_a: float) -> np.ndarray:
    """Zoology's power law over the ``space`` query slots after the pairs."""
    weights = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return weights / weights.sum()


def mqar_examples(rng: np.random.Generator, count: int, vocab_size: int, seq_len: int, kv_pairs: int,
                  power_a: float) -> tuple[np.ndarray, np.ndarray]:
    """``count`` examples: int64 inputs and targets, each ``[count, seq_len]``."""
    context, half = 2 * kv_pairs, vocab_size // 2
    probabilities = gap_probabilities((seq_len - context) // 2, power_a)
    # One token past the end, as in Zoology: the targets are the labels shifted left by one.
    examples = np.zeros((count, seq_len + 1), dtype=np.int64)
    labels = np.full((count, seq_len + 1), IGNORE_INDEX, dtype=np.int64)
    for row in range(count):
        keys = 1 + rng.choice(half - 1, size=kv_pairs, replace=False)
        values = half + rng.choice(vocab_size - half, size=kv_pairs, replace=False)
        gaps = rng.choice(len(probabilities), size=kv_pairs, replace=False, p=probabilities)
        examples[row, 0:context:2], examples[row, 1:context:2] = keys, values
        examples[row, context + 2 * gaps] = keys
        labels[row, context + 2 * gaps + 1] = values
    inputs, targets = examples[:, :-1], labels[:, 1:]
    noise = inputs == 0  # keys and values are never 0: only the template's blanks are
    inputs[noise] = rng.integers(0, vocab_size, size=int(noise.sum()))
    return inputs, targets


def _batch(rng: np.random.Generator, data: DataConfig, count: int, seq_len: int) -> torch.Tensor:
    inputs, targets = mqar_examples(rng, count, data.vocab_size, seq_len, data.mqar_kv_pairs, data.mqar_power_a)
    return torch.from_numpy(np.stack([inputs, targets], axis=1))


def heldout_set(data: DataConfig, seq_len: int) -> torch.Tensor:
    """The ``data.mqar_val_examples`` held-out examples, ``[N, 2, seq_len]``, the same for every seed."""
    return _batch(np.random.default_rng([_STREAM, _HELDOUT]), data, data.mqar_val_examples, seq_len)


def integer_tokenizer(vocab_size: int) -> Tokenizer:
    """MQAR's vocabulary: the integers ``0 .. vocab_size - 1`` as words, then BOS and EOS (which the
    :class:`Tokenizer` interface requires and MQAR never uses). Saves and loads like any tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {str(token): token for token in range(vocab_size)}
    vocab.update({BOS: vocab_size, EOS: vocab_size + 1})
    backend = HFTokenizer(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer("tokenizers", backend.to_str().encode(), source=f"mqar integers (data.vocab_size={vocab_size})")


class MQARBatches:
    """Infinite iterator of ``[batch_size, 2, seq_len]`` MQAR batches for one rank.

    Batch ``i`` of rank ``r`` is drawn from the stream ``(seed, i * world_size + r)``, so ranks
    never repeat each other and ``state_dict()`` (how many batches were taken) resumes exactly.
    """

    def __init__(self, data: DataConfig, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self._taken = 0

    def __iter__(self) -> MQARBatches:
        return self

    def __next__(self) -> torch.Tensor:
        index = self._taken * self.world_size + self.rank
        rng = np.random.default_rng([_STREAM, _TRAIN, self.seed, index])
        self._taken += 1
        return _batch(rng, self.data, self.batch_size, self.seq_len)

    def state_dict(self) -> dict:
        return {"batches": self._taken, "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for name in ("seed", "rank", "world_size"):
            if state[name] != getattr(self, name):
                raise ValueError(f"{name}: this loader has {getattr(self, name)}, the state was saved "
                                 f"with {state[name]}; each rank must resume its own state")
        self._taken = state["batches"]
