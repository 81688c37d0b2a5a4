"""MQAR data against Zoology's definition, its loader's determinism and resumption, the answer-only loss,
and recall accuracy of an oracle and of chance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import attamba
from attamba.config import DataConfig
from attamba.data import build_batches, build_tokenizer, load_tokenizer
from attamba.data.mqar import MQARBatches, gap_probabilities, heldout_set, mqar_examples
from attamba.evals.mqar import evaluate_mqar
from attamba.models import IGNORE_INDEX, NextTokenLoss, split_batch
from attamba.train import resolve_vocab

VOCAB, SEQ_LEN, PAIRS = 128, 64, 8


def mqar_data(**settings) -> DataConfig:
    values = {"source": "mqar", "tokenizer": "integers", "vocab_size": VOCAB, "mqar_kv_pairs": PAIRS,
              "mqar_val_examples": 200, **settings}
    return DataConfig(**values)


def test_examples_follow_zoologys_definition():
    inputs, targets = mqar_examples(np.random.default_rng(0), 300, VOCAB, SEQ_LEN, PAIRS, power_a=0.01)
    assert inputs.shape == targets.shape == (300, SEQ_LEN)
    context = 2 * PAIRS
    for row_inputs, row_targets in zip(inputs, targets):
        keys, values = row_inputs[0:context:2], row_inputs[1:context:2]
        assert len(set(keys)) == PAIRS and all(1 <= k < VOCAB // 2 for k in keys)
        assert len(set(values)) == PAIRS and all(VOCAB // 2 <= v < VOCAB for v in values)
        paired = dict(zip(keys.tolist(), values.tolist()))
        (scored,) = np.nonzero(row_targets != IGNORE_INDEX)
        assert len(scored) == PAIRS  # every key is queried once ...
        assert sorted(row_inputs[scored].tolist()) == sorted(keys.tolist())
        for position in scored:  # ... after the pairs, at an even offset, answered by its key's value
            assert position >= context and (position - context) % 2 == 0
            assert row_targets[position] == paired[row_inputs[position]]
        assert (row_targets[row_targets != IGNORE_INDEX] >= VOCAB // 2).all()
        assert (row_inputs >= 0).all() and (row_inputs < VOCAB).all()  # the blanks are noise over the vocabulary
    assert (inputs[:, context + 1::2] != 0).mean() > 0.9  # noise, not Zoology's template zeros


def test_query_positions_follow_the_power_law():
    """With one pair the gap is a single draw from Zoology's distribution: the frequencies match it."""
    count, power_a = 4000, 0.3
    inputs, targets = mqar_examples(np.random.default_rng(1), count, VOCAB, SEQ_LEN, 1, power_a)
    gaps = (np.argmax(targets != IGNORE_INDEX, axis=1) - 2) // 2
    expected = gap_probabilities((SEQ_LEN - 2) // 2, power_a)
    observed = np.bincount(gaps, minlength=len(expected)) / count
    standard_error = np.sqrt(expected * (1 - expected) / count)
    assert np.all(np.abs(observed - expected) < 5 * standard_error + 1e-9)
    assert expected[0] > 5 * expected[-1]  # the law puts queries near the pairs; uniform would not
    assert np.allclose(gap_probabilities(10, 1.0), 0.1)


def test_batches_are_deterministic_per_seed_and_rank():
    data = mqar_data()
    first = [next(MQARBatches(data, 4, SEQ_LEN, seed=3)) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    loader = MQARBatches(data, 4, SEQ_LEN, seed=3)
    assert not torch.equal(next(loader), next(loader))  # unlimited: each batch is new
    assert not torch.equal(first[0], next(MQARBatches(data, 4, SEQ_LEN, seed=4)))
    ranks = [next(MQARBatches(data, 4, SEQ_LEN, rank=r, world_size=2, seed=3)) for r in (0, 1)]
    assert not torch.equal(ranks[0], ranks[1])
    assert first[0].shape == (4, 2, SEQ_LEN) and first[0].dtype == torch.long


def test_batches_resume_from_their_state():
    data = mqar_data()
    loader = MQARBatches(data, 4, SEQ_LEN, rank=1, world_size=2, seed=5)
    for _ in range(3):
        next(loader)
    state = loader.state_dict()
    want = [next(loader) for _ in range(2)]
    resumed = MQARBatches(data, 4, SEQ_LEN, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(want, [next(resumed) for _ in range(2)]))
    with pytest.raises(ValueError, match="rank"):
        MQARBatches(data, 4, SEQ_LEN, rank=0, world_size=2, seed=5).load_state_dict(state)


def test_heldout_set_is_fixed_and_apart_from_training():
    data = mqar_data()
    heldout = heldout_set(data, SEQ_LEN)
    assert heldout.shape == (200, 2, SEQ_LEN) and torch.equal(heldout, heldout_set(data, SEQ_LEN))
    training = {tuple(row.tolist()) for seed in (0, 1) for row in next(MQARBatches(data, 64, SEQ_LEN, seed=seed))[:, 0]}
    assert not training & {tuple(row.tolist()) for row in heldout[:, 0]}


def test_build_batches_and_tokenizer_pick_mqar(tmp_path):
    data = mqar_data()
    tokenizer = build_tokenizer(data)
    assert tokenizer.vocab_size == VOCAB + 2 and tokenizer.encode("5 127") == [5, 127]
    assert load_tokenizer(tokenizer.save(tmp_path)).encode("3 4") == [3, 4]  # saved with checkpoints, reloads
    assert isinstance(build_batches(data, tokenizer, 2, SEQ_LEN), MQARBatches)


def test_loss_counts_only_the_answers():
    batch = next(MQARBatches(mqar_data(), 3, SEQ_LEN))
    inputs, targets = split_batch(batch)
    logits = torch.randn(3, SEQ_LEN, VOCAB + 2, requires_grad=True)
    loss = NextTokenLoss(lambda _: logits)(inputs, targets)
    scored = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[scored], targets[scored])
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad[~scored].abs().max() == 0 and logits.grad[scored].abs().max() > 0


def test_split_batch_keeps_the_packed_windows():
    window = torch.arange(12).reshape(2, 6)
    inputs, targets = split_batch(window)
    assert torch.equal(inputs, window[:, :-1]) and torch.equal(targets, window[:, 1:])


class CopyingOracle(nn.Module):
    """At each position, predicts the token after the first earlier occurrence of the current token:
    the pairs come first, so a query finds its key there and copies the value."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, self.vocab)
        for row, sequence in enumerate(tokens.tolist()):
            first: dict[int, int] = {}
            for position, token in enumerate(sequence):
                if token in first:
                    logits[row, position, sequence[first[token] + 1]] = 1.0
                else:
                    first[token] = position
        return logits


class RandomLogits(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(()))
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.randn(*tokens.shape, self.vocab, generator=self.generator)


def test_an_oracle_recalls_everything_and_chance_recalls_one_in_the_vocabulary():
    examples = heldout_set(mqar_data(mqar_val_examples=500), SEQ_LEN)
    assert evaluate_mqar(CopyingOracle(VOCAB + 2), examples)["accuracy"] == 1.0
    chance = 1 / (VOCAB + 2)
    queries = 500 * PAIRS
    accuracy = evaluate_mqar(RandomLogits(VOCAB + 2), examples)["accuracy"]
    assert abs(accuracy - chance) < 5 * (chance * (1 - chance) / queries) ** 0.5


def test_an_untrained_model_is_scored_with_its_loss():
    config = resolve_vocab(attamba.load_config(["experiment=smoke", "data=mqar", f"data.vocab_size={VOCAB}",
                                                f"data.mqar_kv_pairs={PAIRS}", "data.mqar_val_examples=16"]))
    assert config.model.vocab_size == VOCAB + 2
    model = attamba.build_model(config)
    scores = evaluate_mqar(model, heldout_set(config.data, config.train.seq_len))
    assert 0 <= scores["accuracy"] < 0.2 and scores["loss"] > 0


@pytest.mark.parametrize("overrides,setting", [
    (["train.seq_len=63"], "train.seq_len"),
    (["data.mqar_kv_pairs=17"], "data.mqar_kv_pairs"),
    (["data.vocab_size=64"], "data.vocab_size"),
    (["data.mqar_power_a=0"], "data.mqar_power_a"),
    (["data.tokenizer=bpe"], "data.tokenizer"),
    (["eval.passkey=true"], "eval.passkey"),
])
def test_bad_mqar_settings_name_the_setting(overrides, setting):
    with pytest.raises(ValueError, match=f"^{setting}"):
        attamba.load_config(["experiment=smoke", "data=mqar", "train.seq_len=64", *overrides])
