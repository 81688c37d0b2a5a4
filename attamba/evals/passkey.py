"""Passkey retrieval: a random number hidden at a controlled depth in filler text, asked for at the end.

A prompt of exactly ``length`` tokens is ``[BOS] INTRO filler[:before] NEEDLE filler[before:] QUESTION``,
where the filler is the validation split's text (its tokens, read cyclically from a random offset)
and ``before`` is ``depth`` of the filler's tokens (0: the needle follows the introduction, 1: it
precedes the question). The model answers by greedy decoding through the cached
:class:`~attamba.inference.Generator`, as it would be used, not by teacher forcing; an answer is
right when the first number in it is the passkey, exactly. Needles and offsets come from a fixed
seed per (length, depth), so every model is asked the same questions.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from attamba.config import check_passkey_lengths
from attamba.data.tokenizer import Tokenizer
from attamba.evaluate import _model_device
from attamba.inference import Generator

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER = " {key}"
DIGITS = 5


@dataclass
class Cell:
    """The trials of one context length and needle depth."""

    length: int
    depth: float
    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n


@dataclass
class PasskeyResult:
    cells: list[Cell]

    @property
    def accuracy(self) -> float:
        """Exact-match accuracy over every trial of every cell."""
        return sum(cell.correct for cell in self.cells) / sum(cell.n for cell in self.cells)

    def write(self, directory: str | Path) -> list[Path]:
        """``passkey.csv`` (``length,depth,accuracy,n``, one row per cell) and ``passkey.md`` (lengths ×
        depths) in ``directory``; returns both paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        csv = directory / "passkey.csv"
        csv.write_text("length,depth,accuracy,n\n" + "".join(
            f"{cell.length},{cell.depth},{cell.accuracy},{cell.n}\n" for cell in self.cells))
        lengths = sorted({cell.length for cell in self.cells})
        depths = sorted({cell.depth for cell in self.cells})
        table = {(cell.length, cell.depth): cell for cell in self.cells}
        lines = [f"Passkey accuracy (exact match; {self.cells[0].n} trials per cell), overall {self.accuracy:.3f}", "",
                 "| length \\ depth | " + " | ".join(f"{depth:g}" for depth in depths) + " |",
                 "|---|" + "---|" * len(depths)]
        lines += [f"| {length} | " + " | ".join(f"{table[length, depth].accuracy:.2f}" for depth in depths) + " |"
                  for length in lengths]
        markdown = directory / "passkey.md"
        markdown.write_text("\n".join(lines) + "\n")
        return [csv, markdown]


def _trial_keys(length: int, depth: float, trials: int) -> list[str]:
    rng = random.Random(f"attamba.passkey:keys:{length}:{depth}")
    return [str(rng.randrange(10 ** (DIGITS - 1), 10 ** DIGITS)) for _ in range(trials)]


def _trial_offsets(length: int, depth: float, trials: int, filler_size: int) -> list[int]:
    rng = random.Random(f"attamba.passkey:offsets:{length}:{depth}")
    return [rng.randrange(filler_size) for _ in range(trials)]


def _fixed_tokens(tokenizer: Tokenizer, key: str, length: int) -> tuple[list[int], list[int], list[int], int]:
    """The prompt's parts around the filler (``[BOS] INTRO``, the needle, the question) and how many
    filler tokens make it ``length`` long; a length too short for them names its setting."""
    head, needle, question = ([tokenizer.bos_id, *tokenizer.encode(INTRO)], tokenizer.encode(NEEDLE.format(key=key)),
                              tokenizer.encode(QUESTION))
    fixed = len(head) + len(needle) + len(question)
    if length < fixed:
        raise ValueError(f"eval.passkey_lengths: {length} tokens cannot hold the passkey prompt without its filler "
                         f"({fixed} tokens)")
    return head, needle, question, length - fixed


def check_lengths(lengths: Sequence[int], depths: Sequence[float], trials: int, tokenizer: Tokenizer,
                  max_length: Optional[int]) -> None:
    """Refuse lengths the model cannot run (``max_length``, None: no limit) and lengths too short for
    the prompt around the filler, naming ``eval.passkey_lengths``."""
    check_passkey_lengths(list(lengths), max_length)
    for length in lengths:
        for depth in depths:
            for key in _trial_keys(length, depth, trials):
                _fixed_tokens(tokenizer, key, length)


def filler_tokens(tokenizer: Tokenizer, documents: Sequence[str]) -> np.ndarray:
    """The documents' tokens, one after another: the text the needle hides in."""
    tokens = np.array([token for ids in tokenizer.encode_batch(list(documents)) for token in ids], dtype=np.int64)
    if len(tokens) == 0:
        raise ValueError("data: the validation split has no text to hide a passkey in")
    return tokens


def passkey_prompts(tokenizer: Tokenizer, filler: np.ndarray, length: int, depth: float,
                    trials: int) -> tuple[torch.Tensor, list[str]]:
    """``trials`` prompts ``[trials, length]`` with the needle at ``depth``, and their passkeys."""
    prompts = []
    keys = _trial_keys(length, depth, trials)
    for key, offset in zip(keys, _trial_offsets(length, depth, trials, len(filler))):
        head, needle, question, count = _fixed_tokens(tokenizer, key, length)
        text = filler[(offset + np.arange(count)) % len(filler)].tolist()
        before = round(depth * count)
        prompts.append(head + text[:before] + needle + text[before:] + question)
    return torch.tensor(prompts, dtype=torch.long), keys


def _answered(text: str, key: str) -> bool:
    number = re.match(r"\s*(\d+)", text)
    return number is not None and number.group(1) == key


def evaluate_passkey(model: nn.Module, tokenizer: Tokenizer, documents: Sequence[str], lengths: Sequence[int],
                     depths: Sequence[float], trials: int, max_length: Optional[int] = None,
                     device: Optional[torch.device | str] = None,
                     autocast_dtype: Optional[torch.dtype] = None) -> PasskeyResult:
    """Ask ``trials`` passkeys at every length and depth, hidden in ``documents``' text, and score
    the greedy answers. The model runs in eval mode and gets its mode back."""
    check_lengths(lengths, depths, trials, tokenizer, max_length)
    filler = filler_tokens(tokenizer, documents)
    device = torch.device(device) if device is not None else _model_device(model)
    cells = []
    was_training = model.training
    model.eval()
    try:
        for length in lengths:
            for depth in depths:
                prompts, keys = passkey_prompts(tokenizer, filler, length, depth, trials)
                # the answer's own tokens and one more, which shows whether the number goes on
                new_tokens = max(len(tokenizer.encode(ANSWER.format(key=key))) for key in keys) + 1
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    answers = Generator(model).generate(prompts.to(device), new_tokens)
                correct = sum(_answered(tokenizer.decode(answer), key) for answer, key in zip(answers.tolist(), keys))
                cells.append(Cell(length, depth, correct, trials))
    finally:
        model.train(was_training)
    return PasskeyResult(cells)
