"""The ``wikitext2`` task's dataset and scoring, from :mod:`attamba.evaluate` (one definition of both)."""

from __future__ import annotations

from typing import Any

import datasets

from attamba.evaluate import count_bytes, count_words, wikitext2_documents, wikitext_detokenize


def pages(wikitext2_path: str | None = None, **_: Any) -> dict[str, datasets.Dataset]:
    if not wikitext2_path:
        raise ValueError("wikitext2_path: the wikitext2 task reads lm-eval's WikiText-2 raw test file "
                         "(wiki.test.raw); pass it in the task metadata, e.g. "
                         "--metadata '{\"wikitext2_path\": \"../shared/data/wikitext-2/wiki.test.raw\"}'")
    return {"test": datasets.Dataset.from_list([{"page": page} for page in wikitext2_documents(wikitext2_path)])}


def detokenize(doc: dict[str, str]) -> str:
    return wikitext_detokenize(doc["page"])


def process_results(doc: dict[str, str], results: list[float]) -> dict[str, tuple[float, int]]:
    """As lm-eval's wikitext: words and bytes of the *original* page."""
    (loglikelihood,) = results
    words, size = count_words(doc["page"]), count_bytes(doc["page"])
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}
