"""Boundary layouts: the rules of DESIGN.md, for every strategy and awkward lengths."""

import pytest
import torch

from attamba.ops.chunking import boundary_mask, chunk_starts, cyclic_shift, intrinsic_boundaries

STRATEGIES = ["uniform", "cyclic", "random", "pseudo"]


def positions(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("length", [1, 2, 5, 8, 13, 64, 100])
@pytest.mark.parametrize("size", [1, 3, 8, 16])
def test_first_and_last_tokens_are_boundaries(strategy, length, size):
    mask = boundary_mask(length, strategy, size, layer=3, n_layers=8)
    assert mask.shape == (length,) and mask.dtype == torch.bool
    assert mask[0] and mask[-1]


def test_uniform_boundaries_end_every_chunk_of_p():
    assert positions(boundary_mask(20, "uniform", 8, layer=5, n_layers=8)) == [0, 7, 15, 19]
    assert positions(boundary_mask(16, "uniform", 4, layer=0, n_layers=8)) == [0, 3, 7, 11, 15]


def test_size_one_makes_every_token_a_boundary():
    for strategy in STRATEGIES:
        assert boundary_mask(10, strategy, 1, layer=2, n_layers=4).all()


def test_cyclic_shift_formula():
    # min(P-1, layer * (P // n_layers))
    assert [cyclic_shift(8, layer, 8) for layer in range(8)] == list(range(8))
    assert [cyclic_shift(16, layer, 8) for layer in range(8)] == [0, 2, 4, 6, 8, 10, 12, 14]
    assert [cyclic_shift(4, layer, 8) for layer in range(8)] == [0] * 8  # 4 // 8 == 0
    assert cyclic_shift(8, 20, 4) == 7  # clamped to P - 1


def test_cyclic_layers_shift_left():
    assert positions(intrinsic_boundaries(24, "cyclic", 8, layer=0, n_layers=8)) == [0, 7, 15, 23]
    assert positions(intrinsic_boundaries(24, "cyclic", 8, layer=3, n_layers=8)) == [0, 4, 12, 20]
    assert positions(intrinsic_boundaries(24, "cyclic", 8, layer=7, n_layers=8)) == [0, 8, 16]


def test_random_layout_mean_spacing_seed_and_layer():
    length, size = 20_000, 8
    a = boundary_mask(length, "random", size, layer=1, n_layers=8, seed=3)
    assert torch.equal(a, boundary_mask(length, "random", size, layer=1, n_layers=8, seed=3))
    assert not torch.equal(a, boundary_mask(length, "random", size, layer=2, n_layers=8, seed=3))
    assert not torch.equal(a, boundary_mask(length, "random", size, layer=1, n_layers=8, seed=4))
    gaps = torch.diff(torch.tensor(positions(a)))
    assert abs(gaps.float().mean().item() - size) < 0.2
    assert gaps.min() >= 1 and gaps.max() <= 2 * size - 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_intrinsic_layout_is_prefix_consistent(strategy):
    """What a decoder caches at position t must not depend on how long the sequence gets."""
    long = intrinsic_boundaries(3000, strategy, 8, layer=4, n_layers=8, seed=1)
    for length in (1, 7, 8, 9, 1023, 1024, 1025, 2999):
        assert torch.equal(intrinsic_boundaries(length, strategy, 8, layer=4, n_layers=8, seed=1), long[:length])


def test_chunk_starts_follow_boundaries():
    boundary = boundary_mask(10, "uniform", 4, layer=0, n_layers=1)  # [0, 3, 7, 9]
    assert positions(chunk_starts(boundary)) == [0, 1, 4, 8]


def test_unknown_strategy_and_bad_size_name_the_setting():
    with pytest.raises(ValueError, match="chunking.strategy.*uniform, cyclic, random, pseudo"):
        boundary_mask(10, "diagonal", 4, layer=0, n_layers=1)
    with pytest.raises(ValueError, match="chunking.size"):
        boundary_mask(10, "uniform", 0, layer=0, n_layers=1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_is_boundary_agrees_with_the_layout(strategy):
    from attamba.ops.chunking import is_boundary

    layout = intrinsic_boundaries(9000, strategy, 8, layer=5, n_layers=8, seed=2).tolist()
    assert [is_boundary(t, strategy, 8, layer=5, n_layers=8, seed=2) for t in range(9000)] == layout
