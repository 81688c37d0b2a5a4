"""Passkey retrieval: prompts of exact lengths with the needle at its depth, scored from greedy answers of the
cached Generator; stub models that do and do not find the needle; refused lengths; the run at the end of training."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

import attamba
from attamba.data import build_tokenizer, validation_documents
from attamba.evals.passkey import NEEDLE, evaluate_passkey, filler_tokens, passkey_prompts
from attamba.tracking import find_runs
from attamba.trainer import train

from test_trainer import smoke_config


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(attamba.load_config(["experiment=smoke"]).data)


@pytest.fixture(scope="module")
def documents():
    return validation_documents(attamba.load_config(["experiment=smoke"]).data, limit=4)


class NeedleCopier(nn.Module):
    """A stub language model for the Generator: predicts the token that followed the latest earlier
    occurrence of the last three tokens, looking back at most ``reach`` tokens (None: all). The
    question ends like the needle ("The pass key is"), so with the needle in reach it copies the key."""

    def __init__(self, vocab: int, reach: int | None = None):
        super().__init__()
        self.vocab, self.reach, self.prefills = vocab, reach, 0
        self.anchor = nn.Parameter(torch.zeros(()))

    def _predict(self, history: list[list[int]]) -> torch.Tensor:
        logits = torch.zeros(len(history), 1, self.vocab)
        for row, sequence in enumerate(history):
            tail, start = sequence[-3:], 0 if self.reach is None else max(0, len(sequence) - self.reach)
            match = next((s for s in range(len(sequence) - 4, start - 1, -1) if sequence[s:s + 3] == tail), None)
            logits[row, 0, sequence[match + 3] if match is not None else 0] = 1.0
        return logits

    def prefill(self, tokens: torch.Tensor, capacity: int, all_logits: bool = True):
        self.prefills += 1
        history = tokens.tolist()
        return self._predict(history), [history]

    def step(self, tokens: torch.Tensor, position: torch.Tensor, caches: list):
        (history,) = caches
        for sequence, token in zip(history, tokens[:, 0].tolist()):
            sequence.append(token)
        return self._predict(history)


@pytest.mark.parametrize("length", [128, 301])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompts_have_their_length_and_the_needle_at_its_depth(tokenizer, documents, length, depth):
    filler = filler_tokens(tokenizer, documents)
    prompts, keys = passkey_prompts(tokenizer, filler, length, depth, trials=3)
    assert prompts.shape == (3, length) and len(set(keys)) == 3
    for prompt, key in zip(prompts.tolist(), keys):
        needle = tokenizer.encode(NEEDLE.format(key=key))
        starts = [i for i in range(length) if prompt[i:i + len(needle)] == needle]
        assert len(starts) == 1
        head = 1 + len(tokenizer.encode("There is an important info hidden inside a lot of irrelevant text. Find it "
                                        "and memorize it. I will quiz you about the important information there.\n\n"))
        question = tokenizer.encode("\n\nWhat is the pass key? The pass key is")
        filler_count = length - head - len(needle) - len(question)
        assert starts[0] == head + round(depth * filler_count)
        assert prompt[-len(question):] == question and prompt[0] == tokenizer.bos_id
    again, _ = passkey_prompts(tokenizer, filler, length, depth, trials=3)
    with pytest.raises(ValueError, match="^eval.passkey_lengths: 40 tokens cannot hold"):
        passkey_prompts(tokenizer, filler, 40, depth, trials=1)
    assert torch.equal(prompts, again)  # every model is asked the same questions


def test_a_model_that_finds_the_needle_scores_one_and_one_that_cannot_fails(tokenizer, documents):
    lengths, depths = [128, 256], [0.0, 1.0]
    found = evaluate_passkey(NeedleCopier(tokenizer.vocab_size), tokenizer, documents, lengths, depths, trials=3)
    assert [cell.accuracy for cell in found.cells] == [1.0] * 4 and found.accuracy == 1.0
    # Reaching 64 tokens back, it sees the needle only when it sits right before the question.
    short = evaluate_passkey(NeedleCopier(tokenizer.vocab_size, reach=64), tokenizer, documents, lengths, depths,
                             trials=3)
    assert {(cell.length, cell.depth): cell.accuracy for cell in short.cells} == {
        (128, 0.0): 0.0, (128, 1.0): 1.0, (256, 0.0): 0.0, (256, 1.0): 1.0}
    assert short.accuracy == 0.5 and all(cell.n == 3 for cell in short.cells)


def test_the_table_is_written_as_csv_and_markdown(tokenizer, documents, tmp_path):
    result = evaluate_passkey(NeedleCopier(tokenizer.vocab_size, reach=64), tokenizer, documents, [128], [0.0, 1.0],
                              trials=2)
    csv_path, md_path = result.write(tmp_path)
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["length", "depth", "accuracy", "n"]
    assert [(r["length"], float(r["depth"]), float(r["accuracy"]), r["n"]) for r in rows] == [
        ("128", 0.0, 0.0, "2"), ("128", 1.0, 1.0, "2")]
    assert "| 128 | 0.00 | 1.00 |" in md_path.read_text()


@pytest.mark.parametrize("lengths,message", [
    ([128, 256], "eval.passkey_lengths: 256 is beyond the 200 tokens this model supports"),
    ([12], "eval.passkey_lengths: 12 tokens cannot hold the passkey prompt"),
])
def test_lengths_it_cannot_use_are_refused_before_any_generation(tokenizer, documents, lengths, message):
    model = NeedleCopier(tokenizer.vocab_size)
    with pytest.raises(ValueError, match=message):
        evaluate_passkey(model, tokenizer, documents, lengths, [0.5], trials=1, max_length=200)
    assert model.prefills == 0


def test_rope_models_refuse_lengths_past_exact_fp32_positions_and_mamba2_does_not():
    with pytest.raises(ValueError, match="^eval.passkey_lengths: 16777217 is beyond the 16777216 tokens"):
        attamba.load_config(["experiment=smoke", "eval.passkey=true", "eval.passkey_lengths=[64,16777217]"])
    config = attamba.load_config(["experiment=smoke", "model=mamba2", "eval.passkey=true",
                                  "eval.passkey_lengths=[16777217]"])
    assert config.model.max_length is None


def test_training_with_passkey_logs_its_accuracy_and_table(tmp_path):
    from mlflow.tracking import MlflowClient

    config = smoke_config(tmp_path, "train.steps=2", "train.eval_every=100", "eval.passkey=true",
                          "eval.passkey_lengths=[128,192]", "eval.passkey_depths=[0.0,1.0]", "eval.passkey_trials=2")
    final = train(config)
    (run,) = find_runs(config.tracking.uri, "smoke")
    assert run["metrics"]["eval/passkey/accuracy"] == pytest.approx(final["eval/passkey/accuracy"])
    assert 0.0 <= final["eval/passkey/accuracy"] <= 1.0
    client = MlflowClient(config.tracking.uri)
    assert {"passkey.csv", "passkey.md"} <= {a.path for a in client.list_artifacts(run["run_id"])}
    table = Path(client.download_artifacts(run["run_id"], "passkey.csv", str(tmp_path))).read_text().splitlines()
    assert table[0] == "length,depth,accuracy,n" and len(table) == 5


def test_a_passkey_length_too_short_stops_training_before_anything_is_tracked(tmp_path):
    config = smoke_config(tmp_path, "train.steps=2", "eval.passkey=true", "eval.passkey_lengths=[8,128]")
    with pytest.raises(ValueError, match="^eval.passkey_lengths: 8 tokens"):
        train(config)
    assert not (tmp_path / "mlflow.db").exists()
