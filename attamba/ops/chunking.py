"""Where chunks end: the boundary tokens of every layer.

A chunk ends at a *boundary* token; the SSMs reset at the token after it, so the
SSM output at a boundary summarises its whole chunk, and attention keeps only
boundary keys (plus a few leading ones). Layouts are shared by the batch and
depend only on (strategy, size, layer, seed), never on the data.

Two views of the same layout:
* ``intrinsic_boundaries`` — the boundaries a token has by position alone. They
  are prefix-consistent (the layout of a prefix is the prefix of the layout),
  which is what a decoding cache relies on.
* ``boundary_mask`` — the same plus the last token, which DESIGN.md makes a
  boundary of every sequence. The last token is never a *past* key of any query
  in that sequence, so forcing it changes no output.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from attamba.config import STRATEGIES

# Random layouts are drawn in fixed-size blocks, each from its own seed, so the
# gaps near position t never depend on how long a sequence was asked for.
_RANDOM_BLOCK = 1024


def cyclic_shift(size: int, layer: int, n_layers: int) -> int:
    """How far layer ``layer`` moves its boundaries left under the cyclic strategy."""
    return min(size - 1, layer * (size // n_layers))


def _random_gaps(size: int, layer: int, seed: int, n_blocks: int) -> np.ndarray:
    """Gaps uniform on 1..2P-1 (mean P), one independent stream per (seed, layer, block)."""
    blocks = [
        np.random.default_rng([seed, layer, block]).integers(1, 2 * size, size=_RANDOM_BLOCK)
        for block in range(n_blocks)
    ]
    return np.concatenate(blocks)


@lru_cache(maxsize=256)
def _intrinsic(seq_len: int, strategy: str, size: int, layer: int, n_layers: int, seed: int) -> np.ndarray:
    if strategy not in STRATEGIES:
        raise ValueError(f"chunking.strategy: got {strategy!r}, allowed values are {', '.join(STRATEGIES)}")
    if size < 1:
        raise ValueError(f"chunking.size: must be an integer >= 1, got {size!r}")
    positions = np.arange(seq_len)
    if strategy == "random":
        n_blocks = 1
        while (ends := np.cumsum(_random_gaps(size, layer, seed, n_blocks)) - 1)[-1] < seq_len:
            n_blocks += 1
        is_boundary = np.isin(positions, ends[ends < seq_len])
    else:
        shift = cyclic_shift(size, layer, n_layers) if strategy == "cyclic" else 0
        is_boundary = (positions + shift + 1) % size == 0
    is_boundary[:1] = True
    is_boundary.setflags(write=False)
    return is_boundary


def intrinsic_boundaries(seq_len: int, strategy: str, size: int, layer: int, n_layers: int,
                         seed: int = 0) -> torch.Tensor:
    """Bool[seq_len]: boundaries by position alone (token 0 always; the last only if it falls there)."""
    return torch.from_numpy(_intrinsic(seq_len, strategy, size, layer, n_layers, seed).copy())


# Decoding asks "is position t a boundary?" one token at a time; layouts are prefix-consistent,
# so it is answered from a cached layout of this granularity.
_LOOKUP_TABLE = 4096


def is_boundary(position: int, strategy: str, size: int, layer: int, n_layers: int, seed: int = 0) -> bool:
    """Whether ``position`` is an intrinsic boundary (the same answer for every sequence containing it)."""
    table = -(-(position + 1) // _LOOKUP_TABLE) * _LOOKUP_TABLE
    return bool(_intrinsic(table, strategy, size, layer, n_layers, seed)[position])


def boundary_mask(seq_len: int, strategy: str, size: int, layer: int, n_layers: int,
                  seed: int = 0) -> torch.Tensor:
    """Bool[seq_len]: the boundaries of a sequence of this length (token 0 and the last token always)."""
    mask = intrinsic_boundaries(seq_len, strategy, size, layer, n_layers, seed)
    mask[-1:] = True
    return mask


def chunk_starts(boundary: torch.Tensor) -> torch.Tensor:
    """Bool[L]: the first token of every chunk (token 0, and every token right after a boundary)."""
    starts = torch.ones_like(boundary)
    starts[1:] = boundary[:-1]
    return starts


def past_boundaries(boundary: torch.Tensor, lead: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The boundaries attention sees past the band (CPU host work, once per layout).

    Query t sees boundary s as a past key iff ``s < t - lead``. Boundaries are sorted, so those
    a query sees are a prefix of them: returns (the tokens of the boundaries some query sees,
    long ``[n]``; how many of them each query sees, long ``[L]``). Boundaries in the last
    ``lead + 1`` tokens are in every later query's band, so none of them is listed.
    """
    length = boundary.shape[0]
    boundaries = boundary.cpu().nonzero().flatten()
    n_visible = torch.searchsorted(boundaries, torch.arange(length) - lead)
    return boundaries[: int(n_visible.max()) if length else 0], n_visible
