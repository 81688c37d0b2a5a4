"""Rolling-window perplexity, computed exactly as lm-evaluation-harness does.

Two evaluations share one scorer so their numbers are comparable across
tokenizers:

* ``evaluate_wikitext2``: lm-eval's ``wikitext`` task (WikiText-2 raw test
  split as 62 Wikipedia pages). Each page is detokenized, tokenized and scored
  with ``loglikelihood_rolling`` windows; word and byte counts come from the
  *original* page, as in lm-eval's ``process_results``.
* ``evaluate_validation``: the same rolling scorer over held-out documents
  (no detokenizer), reporting mean NLL per token and word perplexity.

Rolling windows (lm-eval's ``get_rolling_token_windows`` with
``context_len=1`` followed by ``make_disjoint_window``): the first window is
``[BOS] + t[0:L-1]`` and scores ``t[0:L]``; every later window scores the next
``L`` tokens (fewer at the end of a page), each conditioned on the ``L`` tokens
right before it, so every token is scored exactly once.

``paper_perplexity`` is the number the Attamba paper reports as WikiText-2
"word perplexity". Its evaluation (Lingua's ``EvalHarnessLM`` over a patched
lm-eval) scores each detokenized page once, as one prompt: ``[BOS] + t``
truncated to its last ``L - 1`` tokens (``max_prompt_len`` = model length minus
the one token it would generate), every token after the first of that window
predicted from the window before it, and returns ``(ΣLL, tokens scored)`` per
page; the reported value is ``exp(-ΣLL / Σtokens)`` over the pages (the one
aggregation the stored numbers fit; the repository's lm-eval patch as committed
would divide by words). It is a per-token perplexity of each page's last ``L - 2`` tokens (the whole page when
shorter), which is why the paper's stored word and byte perplexities are the
same number and its bits per byte their log2: neither counts words or bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn

Window = tuple[list[int], list[int]]


class Tokenizer(Protocol):
    """What the scorer needs from a tokenizer (``attamba.data`` provides one)."""

    bos_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""
        ...


# ---------------------------------------------------------------------------
# WikiText-2 pages (lm-eval's EleutherAI/wikitext_document_level)
# ---------------------------------------------------------------------------


def _is_page_title(line: str) -> bool:
    """A top-level heading ``= Title =``; ``= = Section = =`` lines are not."""
    collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
    return collapsed.startswith("= ") and collapsed.endswith(" =")


def wikitext2_documents(path: str | Path) -> list[str]:
    """Split a WikiText raw file into its original pages (62 for the WikiText-2 test split).

    A page starts at each title line and keeps its lines verbatim, joined by
    ``"\\n"``. As in ``wikitext_document_level``, text before the first title
    is dropped when it is blank, and the last page is kept unconditionally.
    """
    pages: list[str] = []
    lines: list[str] = []
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if _is_page_title(line):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def _literal(old: str, new: str) -> Callable[[str], str]:
    return lambda text: text.replace(old, new)


def _pattern(regex: str, replacement: str) -> Callable[[str], str]:
    compiled = re.compile(regex)
    return lambda text: compiled.sub(replacement, text)


# lm-eval's ``wikitext_detokenizer``, step for step; the order matters.
_DETOKENIZER_STEPS: tuple[Callable[[str], str], ...] = (
    # contractions; the second rule is lm-eval's (it only ever matches the
    # literal "/' 5/" and writes "/'[0-9]/"), kept so our text is identical
    _literal("s '", "s'"),
    _pattern(r"/' [0-9]/", "/'[0-9]/"),
    # number separators
    _literal(" @-@ ", "-"),
    _literal(" @,@ ", ","),
    _literal(" @.@ ", "."),
    # punctuation
    _literal(" : ", ": "),
    _literal(" ; ", "; "),
    _literal(" . ", ". "),
    _literal(" ! ", "! "),
    _literal(" ? ", "? "),
    _literal(" , ", ", "),
    # brackets and quotes hug their contents
    _pattern(r"\(\s*([^\)]*?)\s*\)", r"(\1)"),
    _pattern(r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    _pattern(r"{\s*([^}]*?)\s*}", r"{\1}"),
    _pattern(r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    _pattern(r"'\s*([^']*?)\s*'", r"'\1'"),
    # headings, degrees, line edges, the number placeholder, possessives
    _literal("= = = =", "===="),
    _literal("= = =", "==="),
    _literal("= =", "=="),
    _literal(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    _literal(" \n", "\n"),
    _literal("\n ", "\n"),
    _literal(" N ", " 1 "),
    _literal(" 's", "'s"),
)


def wikitext_detokenize(page: str) -> str:
    """Undo WikiText's tokenization spaces (``" @-@ "`` → ``"-"``, ``" , "`` → ``", "`` …)."""
    for step in _DETOKENIZER_STEPS:
        page = step(page)
    return page


def count_words(text: str) -> int:
    """lm-eval's word count: pieces between runs of whitespace (``""`` counts as one)."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    """UTF-8 length of ``text``."""
    return len(text.encode("utf-8"))


# ---------------------------------------------------------------------------
# Rolling windows
# ---------------------------------------------------------------------------


def rolling_windows(tokens: list[int], bos_id: int, max_len: int) -> list[Window]:
    """Cut ``tokens`` into ``(input, targets)`` windows that score each token once.

    ``input`` is what the model reads (at most ``max_len`` tokens) and
    ``targets`` are the tokens predicted by its last ``len(targets)``
    positions. The first window reads ``[bos_id] + tokens[:max_len - 1]``;
    each later one scores up to ``max_len`` new tokens with the ``max_len``
    tokens right before its end as input. An empty list has no windows.
    """
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len: must be an integer >= 1, got {max_len!r}")
    first = min(max_len, len(tokens))
    windows: list[Window] = [([bos_id] + tokens[: first - 1], tokens[:first])] if tokens else []
    scored = first
    while scored < len(tokens):
        end = min(scored + max_len, len(tokens))
        windows.append((tokens[end - max_len - 1 : end - 1], tokens[scored:end]))
        scored = end
    return windows


def paper_windows(tokens: list[int], bos_id: int, max_len: int) -> list[Window]:
    """The Attamba paper's one window per page: the last ``max_len - 1`` tokens of ``[BOS] + tokens``,
    each after the first predicted from those before it (no window for an empty page)."""
    if not isinstance(max_len, int) or max_len < 3:
        raise ValueError(f"context: the paper's WikiText-2 window needs an integer >= 3, got {max_len!r}")
    window = ([bos_id] + tokens)[-(max_len - 1):]
    return [(window[:-1], window[1:])] if len(window) > 1 else []


WindowMaker = Callable[[list[int], int, int], list[Window]]


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------


@dataclass
class DocumentScores:
    """Summed log-likelihood of a set of documents and what it is normalised by."""

    loglikelihood: float  # natural log, summed over every scored token
    tokens: int
    words: int  # lm-eval word count of the original documents
    bytes: int  # UTF-8 bytes of the original documents
    documents: int

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return -self.loglikelihood / self.bytes / math.log(2)

    @property
    def token_loss(self) -> float:
        """Mean negative log-likelihood per token (nats)."""
        return -self.loglikelihood / self.tokens

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.token_loss)


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _collate(batch: list[Window], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs, targets aligned with input positions, and the mask of scored positions.

    Padding goes after each window, where a causal model cannot see it; its
    id only has to be a valid embedding index, since its positions are masked.
    """
    length = max(len(inputs) for inputs, _ in batch)
    inputs = torch.full((len(batch), length), pad_id, dtype=torch.long)
    targets = torch.zeros((len(batch), length), dtype=torch.long)
    scored = torch.zeros((len(batch), length), dtype=torch.bool)
    for row, (window_inputs, window_targets) in enumerate(batch):
        end, start = len(window_inputs), len(window_inputs) - len(window_targets)
        inputs[row, :end] = torch.tensor(window_inputs)
        targets[row, start:end] = torch.tensor(window_targets)
        scored[row, start:end] = True
    return inputs, targets, scored


def _batch_scores(
    model: nn.Module, batch: list[Window], pad_id: int, device: torch.device,
    autocast_dtype: Optional[torch.dtype],
) -> list[tuple[float, bool]]:
    """Per window: summed log-probability of its targets, and whether each target was the argmax."""
    inputs, targets, scored = (tensor.to(device) for tensor in _collate(batch, pad_id))
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(inputs)
    # fp32 softmax: bf16 logits would cost ~3 significant digits of perplexity
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
    loglikelihoods = torch.where(scored, token_logprobs, 0.0).sum(-1).tolist()
    greedy = (~scored | (logprobs.argmax(-1) == targets)).all(-1).tolist()
    return list(zip(loglikelihoods, greedy))


def score_windows(
    model: nn.Module,
    windows: Sequence[Window],
    pad_id: int,
    batch_size: int = 8,
    device: Optional[torch.device | str] = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> list[tuple[float, bool]]:
    """``(log-likelihood of the targets, all targets greedy)`` of each window, in order.

    Windows are batched longest first, right-padded and masked, so the model must be
    causal. The model runs in eval mode under ``no_grad`` and gets its mode back afterwards.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    order = sorted(range(len(windows)), key=lambda index: len(windows[index][0]), reverse=True)
    results: list[tuple[float, bool]] = [(0.0, True)] * len(windows)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                indices = order[start:start + batch_size]
                scores = _batch_scores(model, [windows[index] for index in indices], pad_id, device, autocast_dtype)
                for index, score in zip(indices, scores):
                    results[index] = score
    finally:
        model.train(was_training)
    return results


def score_documents(
    model: nn.Module,
    tokenizer: Tokenizer,
    pages: Sequence[str],
    context: int,
    batch_size: int = 8,
    detokenize: Optional[Callable[[str], str]] = None,
    device: Optional[torch.device | str] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    windows_of: WindowMaker = rolling_windows,
) -> DocumentScores:
    """Score every token of every page once with rolling windows of ``context`` tokens
    (or the windows ``windows_of(tokens, bos_id, context)`` makes, such as :func:`paper_windows`).

    The model reads ``detokenize(page)`` (or the page itself); words and bytes
    are counted on the original page. Windows from all pages are batched
    together by :func:`score_windows`, so the model must be causal: its output
    at a position may not depend on later positions.
    """
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"context: must be an integer >= 1, got {context!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if len(pages) == 0:
        raise ValueError("pages: need at least one document to score, got none")

    windows: list[Window] = []
    for page in pages:
        text = detokenize(page) if detokenize is not None else page
        windows.extend(windows_of(tokenizer.encode(text), tokenizer.bos_id, context))

    scores = score_windows(model, windows, tokenizer.bos_id, batch_size, device, autocast_dtype)
    return DocumentScores(
        loglikelihood=math.fsum(loglikelihood for loglikelihood, _ in scores),
        tokens=sum(len(targets) for _, targets in windows),
        words=sum(count_words(page) for page in pages),
        bytes=sum(count_bytes(page) for page in pages),
        documents=len(pages),
    )


def evaluate_wikitext2(
    model: nn.Module,
    tokenizer: Tokenizer,
    path: str | Path,
    context: int,
    batch_size: int = 8,
    device: Optional[torch.device | str] = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> dict[str, float]:
    """lm-eval's ``wikitext`` metrics on a WikiText-2 raw file (``wiki.test.raw``), and the
    Attamba paper's ``paper_perplexity`` (see the module docstring) at the same context."""
    pages = wikitext2_documents(path)
    scores, paper = (
        score_documents(model, tokenizer, pages, context, batch_size=batch_size, detokenize=wikitext_detokenize,
                        device=device, autocast_dtype=autocast_dtype, windows_of=windows_of)
        for windows_of in (rolling_windows, paper_windows)
    )
    return {
        "word_perplexity": scores.word_perplexity,
        "byte_perplexity": scores.byte_perplexity,
        "bits_per_byte": scores.bits_per_byte,
        "paper_perplexity": paper.token_perplexity,
        "paper_tokens": paper.tokens,
        "loglikelihood": scores.loglikelihood,
        "words": scores.words,
        "bytes": scores.bytes,
        "tokens": scores.tokens,
        "documents": scores.documents,
    }


def evaluate_validation(
    model: nn.Module,
    tokenizer: Tokenizer,
    documents: Sequence[str],
    context: int,
    batch_size: int = 8,
    device: Optional[torch.device | str] = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> dict[str, float]:
    """Held-out loss (mean NLL per token) and word perplexity, with the WikiText scorer."""
    scores = score_documents(
        model, tokenizer, documents, context, batch_size=batch_size,
        device=device, autocast_dtype=autocast_dtype,
    )
    return {
        "loss": scores.token_loss,
        "word_perplexity": scores.word_perplexity,
        "tokens": scores.tokens,
        "words": scores.words,
    }
