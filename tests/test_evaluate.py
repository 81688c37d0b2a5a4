"""lm-eval-compatible rolling perplexity: page splitting, detokenizer, windows, scorer.

The oracles here are written independently of ``attamba.evaluate``: word and
byte counts from lm-eval's definitions, windows checked token by token against
the document, and log-likelihoods recomputed one unbatched window at a time
from a small real (randomly initialised) language model.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from attamba.evaluate import (
    DocumentScores,
    evaluate_validation,
    evaluate_wikitext2,
    paper_windows,
    rolling_windows,
    score_documents,
    wikitext2_documents,
    wikitext_detokenize,
)
from conftest import WIKITEXT2_TEST, require_shared

# The three shortest WikiText-2 test pages (113, 1,350 and 2,389 bytes): the
# first fits in one window of CONTEXT tokens, the others need many.
SHORT_PAGES = (28, 29, 14)
CONTEXT = 128


class ByteTokenizer:
    """UTF-8 bytes shifted past the BOS id: a real, lossless tokenizer."""

    bos_id = 0
    offset = 1
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [byte + self.offset for byte in text.encode("utf-8")]


class TinyGRULM(nn.Module):
    """Embedding → 1-layer GRU → dropout → logits: causal, and sees its whole input.

    The dropout makes the model random in train mode, so a scorer that forgets
    ``model.eval()`` cannot match the oracle.
    """

    def __init__(self, vocab_size: int, dim: int = 32, seed: int = 1234) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab_size, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(dim, vocab_size)
        torch.random.set_rng_state(generator_state)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(tokens))
        return self.head(self.dropout(hidden))


@pytest.fixture
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def model(tokenizer: ByteTokenizer) -> TinyGRULM:
    return TinyGRULM(tokenizer.vocab_size)


@pytest.fixture(scope="module")
def wikitext_pages() -> list[str]:
    return wikitext2_documents(require_shared(WIKITEXT2_TEST))


def lm_eval_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def oracle_loglikelihood(model: nn.Module, tokens: list[int], bos_id: int, context: int) -> float:
    """Sum of log p(token) with lm-eval's contexts, one unbatched forward per window.

    lm-eval scores the document in consecutive blocks of ``context`` tokens;
    block ``[start, end)`` is predicted from the ``context`` symbols right
    before ``end`` in ``[BOS] + tokens`` (fewer for the first block).
    """
    shifted = [bos_id] + tokens
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens), context):
            end = min(start + context, len(tokens))
            inputs = shifted[max(0, end - context) : end]
            logprobs = torch.log_softmax(model(torch.tensor([inputs]))[0].float(), dim=-1)
            for position in range(len(inputs) - (end - start), len(inputs)):
                target = shifted[end - len(inputs) + position + 1]
                total += logprobs[position, target].item()
    return total


# ---------------------------------------------------------------------------
# WikiText-2 pages and counts (all 62 pages)
# ---------------------------------------------------------------------------


def test_wikitext2_has_62_pages_with_lm_eval_word_and_byte_counts(wikitext_pages):
    assert len(wikitext_pages) == 62
    assert sum(lm_eval_words(page) for page in wikitext_pages) == 241_335
    assert sum(len(page.encode("utf-8")) for page in wikitext_pages) == 1_290_527


def test_wikitext2_pages_start_at_titles_and_cover_the_file(wikitext_pages):
    text = WIKITEXT2_TEST.read_text(encoding="utf-8")
    # The only text outside the pages is the blank line before the first title.
    assert "\n".join(wikitext_pages) == text[text.index(" = Robert Boulter = ") :]
    for page in wikitext_pages:
        title = page.split("\n")[0]
        assert re.fullmatch(r" = [^=].* = ", title), title


def test_wikitext2_documents_round_trip_a_subset(tmp_path, wikitext_pages):
    subset = [wikitext_pages[index] for index in SHORT_PAGES]
    path = tmp_path / "subset.raw"
    path.write_text("\n".join(subset), encoding="utf-8")
    assert wikitext2_documents(path) == subset


# ---------------------------------------------------------------------------
# Detokenizer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a guest @-@ starring role", "a guest-starring role"),
        ("about 1 @,@ 000 people", "about 1,000 people"),
        ("it weighs 3 @.@ 5 kg", "it weighs 3.5 kg"),
        ("film , television and theatre", "film, television and theatre"),
        ("an actor . He had", "an actor. He had"),
        ("Why ? Yes ! Here : there ; now", "Why? Yes! Here: there; now"),
        ("the episode \" Teddy 's Story \" of", 'the episode "Teddy\'s Story" of'),
        ("Boulter ( born 1970 ) is", "Boulter (born 1970) is"),
        ("see [ 1 ] and { x }", "see [1] and {x}"),
        ("the players ' union", "the players' union"),
        ("at 25 \N{DEGREE SIGN} C", "at 25\N{DEGREE SIGN}C"),
        ("won N games", "won 1 games"),
        (" = = = Early life = = = \n", " === Early life ===\n"),
        (" = = = = Notes = = = = \n", " ==== Notes ====\n"),
        (" = Robert = \n \n = = Career = = \n In 2000 .", " = Robert =\n\n== Career ==\nIn 2000 ."),
    ],
)
def test_wikitext_detokenize_known_strings(raw, expected):
    assert wikitext_detokenize(raw) == expected


def test_wikitext_detokenize_real_page(wikitext_pages):
    page = wikitext_detokenize(wikitext_pages[0])
    assert page.startswith(" = Robert Boulter =\n\nRobert Boulter is an English film, television")
    assert "guest-starring role" in page
    assert " @" not in page


# ---------------------------------------------------------------------------
# Rolling windows
# ---------------------------------------------------------------------------


def test_rolling_windows_known_answer():
    """The example from lm-eval's docstring (max_seq_len 3, context_len 1), plus one token."""
    tokens = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    assert rolling_windows(tokens, bos_id=99, max_len=3) == [
        ([99, 10, 11], [10, 11, 12]),
        ([12, 13, 14], [13, 14, 15]),
        ([15, 16, 17], [16, 17, 18]),
        ([16, 17, 18], [19]),
    ]


@pytest.mark.parametrize("max_len", [1, 2, 5, 16])
@pytest.mark.parametrize("length_vs_max", ["empty", "one", "below", "equal", "above", "double", "far_above"])
def test_rolling_windows_score_every_token_once_with_full_context(max_len, length_vs_max):
    length = {"empty": 0, "one": 1, "below": max_len - 1, "equal": max_len, "above": max_len + 1,
              "double": 2 * max_len, "far_above": 10 * max_len + 3}[length_vs_max]
    bos = 7
    tokens = [100 + (i * 37) % 23 for i in range(length)]
    windows = rolling_windows(tokens, bos_id=bos, max_len=max_len)

    assert [t for _, targets in windows for t in targets] == tokens
    if tokens:
        assert windows[0][0][0] == bos
    shifted = [bos] + tokens  # shifted[j] is what the model reads when predicting tokens[j]
    end = 0
    for inputs, targets in windows:
        end += len(targets)
        assert 1 <= len(targets) <= len(inputs) <= max_len
        # Maximal context: everything available, up to max_len.
        assert len(inputs) == min(max_len, end)
        # Teacher forcing: the input is exactly the document right before each target.
        assert inputs == shifted[end - len(inputs) : end]


def test_rolling_windows_rejects_bad_max_len():
    with pytest.raises(ValueError, match="max_len"):
        rolling_windows([1, 2, 3], bos_id=0, max_len=0)


# ---------------------------------------------------------------------------
# Scorer against the unbatched oracle
# ---------------------------------------------------------------------------


def test_score_documents_matches_per_window_oracle(model, tokenizer, wikitext_pages):
    pages = [wikitext_pages[index] for index in SHORT_PAGES]
    scores = score_documents(model, tokenizer, pages, CONTEXT, batch_size=4,
                             detokenize=wikitext_detokenize)

    expected_ll = sum(
        oracle_loglikelihood(model, tokenizer.encode(wikitext_detokenize(page)), tokenizer.bos_id, CONTEXT)
        for page in pages
    )
    expected_words = sum(lm_eval_words(page) for page in pages)
    assert scores.documents == 3
    assert scores.words == expected_words
    assert scores.loglikelihood == pytest.approx(expected_ll, rel=1e-6)
    assert scores.word_perplexity == pytest.approx(math.exp(-expected_ll / expected_words), rel=1e-6)


def test_words_and_bytes_come_from_the_original_page(model, tokenizer, wikitext_pages):
    page = wikitext_pages[SHORT_PAGES[1]]
    detokenized = wikitext_detokenize(page)
    assert len(detokenized) < len(page)
    scores = score_documents(model, tokenizer, [page], CONTEXT, detokenize=wikitext_detokenize)
    assert scores.tokens == len(detokenized.encode("utf-8"))  # the model reads the detokenized page
    assert scores.bytes == len(page.encode("utf-8"))
    assert scores.words == lm_eval_words(page)


def test_batching_does_not_change_the_scores(model, tokenizer, wikitext_pages):
    pages = [wikitext_pages[index] for index in SHORT_PAGES]
    one = score_documents(model, tokenizer, pages, CONTEXT, batch_size=1)
    seven = score_documents(model, tokenizer, pages, CONTEXT, batch_size=7)
    assert (one.tokens, one.words, one.bytes) == (seven.tokens, seven.words, seven.bytes)
    assert seven.loglikelihood == pytest.approx(one.loglikelihood, rel=1e-6)


def test_evaluate_wikitext2_metrics_on_a_page_subset(tmp_path, model, tokenizer, wikitext_pages):
    pages = [wikitext_pages[index] for index in SHORT_PAGES]
    path = tmp_path / "subset.raw"
    path.write_text("\n".join(pages), encoding="utf-8")

    metrics = evaluate_wikitext2(model, tokenizer, path, CONTEXT, batch_size=3)

    ll = sum(
        oracle_loglikelihood(model, tokenizer.encode(wikitext_detokenize(page)), tokenizer.bos_id, CONTEXT)
        for page in pages
    )
    words = sum(lm_eval_words(page) for page in pages)
    n_bytes = sum(len(page.encode("utf-8")) for page in pages)
    assert metrics["documents"] == 3
    assert (metrics["words"], metrics["bytes"]) == (words, n_bytes)
    assert metrics["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-6)
    assert metrics["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-6)
    assert metrics["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-6)
    assert metrics["loglikelihood"] == pytest.approx(ll, rel=1e-6)


def test_evaluate_validation_loss_and_word_perplexity(model, tokenizer):
    documents = [
        "The quick brown fox jumps over the lazy dog.\nIt was not amused.",
        "  Leading spaces,\ttabs and a trailing newline\n",
        "x",
        "A longer held-out document. " * 12,
    ]
    metrics = evaluate_validation(model, tokenizer, documents, context=16, batch_size=5)

    ll = sum(oracle_loglikelihood(model, tokenizer.encode(doc), tokenizer.bos_id, 16) for doc in documents)
    tokens = sum(len(doc.encode("utf-8")) for doc in documents)
    words = sum(lm_eval_words(doc) for doc in documents)
    assert (metrics["tokens"], metrics["words"]) == (tokens, words)
    assert metrics["loss"] == pytest.approx(-ll / tokens, rel=1e-6)
    assert metrics["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_scoring_restores_the_train_eval_mode(model, tokenizer, training):
    model.train(training)
    first = evaluate_validation(model, tokenizer, ["some held-out text"], context=8)
    assert model.training is training and model.dropout.training is training
    second = evaluate_validation(model, tokenizer, ["some held-out text"], context=8)
    assert first == second  # eval mode while scoring: dropout is off


def test_autocast_bfloat16_stays_close_to_fp32(model, tokenizer):
    documents = ["Mixed precision should move perplexity by well under a percent. " * 4]
    fp32 = evaluate_validation(model, tokenizer, documents, context=32)
    bf16 = evaluate_validation(model, tokenizer, documents, context=32, autocast_dtype=torch.bfloat16)
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2)


# ---------------------------------------------------------------------------
# The Attamba paper's WikiText-2 perplexity
# ---------------------------------------------------------------------------


class FixedDistributionLM(nn.Module):
    """Predicts p = (1/8, 1/2, 1/4, 1/8) over ids 0..3 at every position, whatever it reads."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.log(torch.tensor([1 / 8, 1 / 2, 1 / 4, 1 / 8]))
        return logits.expand(*tokens.shape, 4)


class LetterTokenizer:
    bos_id = 0

    def encode(self, text: str) -> list[int]:
        return [" abc".index(letter) for letter in text]


def test_paper_perplexity_hand_computed():
    """Two pages at context 4: the window is the last 3 tokens of [BOS] + page, 2 tokens scored each.

    "abca" = [1, 2, 3, 1]: window [2, 3, 1] scores 3 then 1: log2 p = -3 - 1.
    "cb" = [3, 2]: window [BOS, 3, 2] scores 3 then 2: log2 p = -3 - 2.
    Paper perplexity = 2 ** (9 / 4); lm-eval's rolling windows score all 6 tokens over 2 words:
    log2 p = -(1 + 2 + 3 + 1) - (3 + 2) = -12, word perplexity 2 ** (12 / 2) = 64.
    """
    model, tokenizer, pages = FixedDistributionLM(), LetterTokenizer(), ["abca", "cb"]
    paper = score_documents(model, tokenizer, pages, context=4, windows_of=paper_windows)
    assert paper.tokens == 4
    assert paper.token_perplexity == pytest.approx(2 ** (9 / 4), rel=1e-6)
    rolling = score_documents(model, tokenizer, pages, context=4)
    assert rolling.word_perplexity == pytest.approx(64.0, rel=1e-6)


def test_paper_windows_keep_the_last_tokens_and_drop_bos_once_truncated():
    assert paper_windows([5, 6], bos_id=9, max_len=4) == [([9, 5], [5, 6])]
    assert paper_windows([5, 6, 7, 8], bos_id=9, max_len=4) == [([6, 7], [7, 8])]
    assert paper_windows([], bos_id=9, max_len=4) == []
    with pytest.raises(ValueError, match="context"):
        paper_windows([5, 6], bos_id=9, max_len=2)


def seed_repository_paper_perplexity(model: nn.Module, tokenizer, pages: list[str], max_seqlen: int) -> float:
    """The seed repository's computation, transcribed: Lingua's generator tokenizes each detokenized
    page with BOS, keeps ``p[-max_prompt_len:]`` (max_prompt_len = max_seqlen - max_gen_len, the
    latter set to 1), scores ``-cross_entropy(logits[:-1], p[1:])``; EvalHarnessLM returns
    ``(ll.sum(), len(ll))`` per page, aggregated as ΣLL / Σlen."""
    total_ll, total_len = 0.0, 0
    model.eval()
    with torch.no_grad():
        for page in pages:
            prompt = [tokenizer.bos_id] + tokenizer.encode(wikitext_detokenize(page))
            prompt = prompt[-(max_seqlen - 1):]
            logits = model(torch.tensor([prompt]))[0].float()
            ll = -torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(prompt[1:]), reduction="none")
            total_ll += ll.double().sum().item()
            total_len += len(ll)
    return math.exp(-total_ll / total_len)


def test_evaluate_wikitext2_paper_perplexity_matches_the_seed_repository(tmp_path, model, tokenizer, wikitext_pages):
    pages = [wikitext_pages[index] for index in SHORT_PAGES]
    path = tmp_path / "subset.raw"
    path.write_text("\n".join(pages), encoding="utf-8")
    metrics = evaluate_wikitext2(model, tokenizer, path, CONTEXT, batch_size=2)
    expected = seed_repository_paper_perplexity(model, tokenizer, pages, CONTEXT)
    assert metrics["paper_perplexity"] == pytest.approx(expected, rel=1e-6)
    # one page fits in a window, the two longer ones are cut to their last CONTEXT - 2 tokens
    assert metrics["paper_tokens"] < metrics["tokens"]
    assert metrics["paper_perplexity"] != pytest.approx(metrics["word_perplexity"], rel=1e-3)


def test_document_scores_metric_definitions():
    scores = DocumentScores(loglikelihood=-1000.0, tokens=400, words=250, bytes=1200, documents=2)
    assert scores.word_perplexity == pytest.approx(math.exp(4.0))
    assert scores.byte_perplexity == pytest.approx(math.exp(1000 / 1200))
    assert scores.bits_per_byte == pytest.approx(1000 / 1200 / math.log(2))
    assert scores.token_loss == pytest.approx(2.5)
    assert scores.token_perplexity == pytest.approx(math.exp(2.5))


@pytest.mark.parametrize(
    ("setting", "kwargs"),
    [("context", {"context": 0}), ("batch_size", {"context": 8, "batch_size": 0})],
)
def test_score_documents_rejects_bad_settings(model, tokenizer, setting, kwargs):
    with pytest.raises(ValueError, match=setting):
        score_documents(model, tokenizer, ["text"], **kwargs)


def test_score_documents_rejects_no_documents(model, tokenizer):
    with pytest.raises(ValueError, match="pages"):
        score_documents(model, tokenizer, [], context=8)


@pytest.mark.gpu
def test_cuda_scores_match_cpu(model, tokenizer, wikitext_pages):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pages = [wikitext_pages[index] for index in SHORT_PAGES]
    cpu = score_documents(model, tokenizer, pages, CONTEXT, detokenize=wikitext_detokenize)
    cuda = score_documents(model.cuda(), tokenizer, pages, CONTEXT, detokenize=wikitext_detokenize)
    assert cuda.tokens == cpu.tokens
    assert cuda.loglikelihood == pytest.approx(cpu.loglikelihood, rel=1e-4)
