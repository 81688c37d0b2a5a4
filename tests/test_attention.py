"""Attention kernels against brute-force definitions.

Oracles: masks built by a double loop over (query, key); attention written out
as an explicit masked softmax in float64. The fast paths are compared with
them: the phase-folded flash decomposition forward + backward everywhere (its
dense fp32/fp64 form on CPU, the flash kernel on CUDA), FlexAttention forward on
CPU and forward + backward on CUDA.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from attamba.ops.attention import (attend_chunks, boundary_mask, causal_attention, chunk_attention, chunk_mask,
                                  resolve_chunk_impl, sliding_window_mask)
from attamba.ops.chunk_flash import phase_table

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Eager FlexAttention (the CPU path) warns that it is unfused; that is the point there.
eager_flex = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


# ---------------------------------------------------------------------------
# Layouts and brute-force definitions


def uniform_layout(length: int, size: int, shift: int = 0) -> torch.Tensor:
    """Boundaries every ``size`` tokens, moved ``shift`` left; token 0 and the last always."""
    boundary = torch.tensor([(s + shift + 1) % size == 0 for s in range(length)])
    boundary[0] = boundary[-1] = True
    return boundary


def random_layout(length: int, size: int, seed: int = 0) -> torch.Tensor:
    """Irregular boundaries with gaps uniform on 1..2*size-1; token 0 and the last always."""
    gaps = torch.randint(1, 2 * size, (length,), generator=torch.Generator().manual_seed(seed))
    ends = gaps.cumsum(0) - 1
    boundary = torch.zeros(length, dtype=torch.bool)
    boundary[ends[ends < length]] = True
    boundary[0] = boundary[-1] = True
    return boundary


LAYOUTS = {
    "uniform": lambda: uniform_layout(32, 4),
    "shifted": lambda: uniform_layout(32, 8, shift=3),
    "random": lambda: random_layout(40, 4),
    "ragged": lambda: uniform_layout(19, 4),  # L not a multiple of P
    "short": lambda: uniform_layout(5, 8),  # L < P
}


def brute_force_chunk_mask(boundary: torch.Tensor, lead: int) -> torch.Tensor:
    length = boundary.shape[0]
    mask = torch.zeros(length, length, dtype=torch.bool)
    for t in range(length):
        for s in range(length):
            mask[t, s] = bool(s < t and boundary[s]) or (t - lead <= s <= t)
    return mask


def brute_force_window_mask(length: int, window: int) -> torch.Tensor:
    mask = torch.zeros(length, length, dtype=torch.bool)
    for t in range(length):
        for s in range(length):
            mask[t, s] = t - window + 1 <= s <= t
    return mask


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), -inf where ~mask) v, with k/v heads repeated for GQA."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1])
    weights = scores.masked_fill(~mask.to(q.device), float("-inf")).softmax(dim=-1)
    return torch.einsum("bhts,bhsd->bhtd", weights, v)


def random_qkv(length: int, heads: int = 4, kv_heads: int = 2, dim: int = 16, batch: int = 2,
               dtype: torch.dtype = torch.float64, device: str = "cpu"):
    def make(h: int) -> torch.Tensor:
        return torch.randn(batch, h, length, dim, dtype=dtype, device=device, requires_grad=True)

    return make(heads), make(kv_heads), make(kv_heads)


def forward_backward(fn, q, k, v):
    """Output and (dq, dk, dv) under a fixed random cotangent."""
    out = fn(q, k, v)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    return (out, *torch.autograd.grad(out, (q, k, v), cotangent))


def assert_all_close(actual, expected, **tolerances) -> None:
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}", **tolerances)


# ---------------------------------------------------------------------------
# Masks


@pytest.mark.parametrize("lead", [0, 1, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_boundary_mask_matches_definition(layout, lead):
    boundary = LAYOUTS[layout]()
    assert torch.equal(boundary_mask(boundary, lead), brute_force_chunk_mask(boundary, lead))


@pytest.mark.parametrize("length,window", [(17, 1), (17, 4), (17, 17), (9, 30)])
def test_sliding_window_mask_matches_definition(length, window):
    assert torch.equal(sliding_window_mask(length, window), brute_force_window_mask(length, window))


def test_every_query_sees_itself_and_nothing_later():
    mask = boundary_mask(random_layout(64, 8), 0)
    assert mask.diagonal().all()
    assert not mask.triu(1).any()


# ---------------------------------------------------------------------------
# Reference paths against the naive softmax


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("layout,lead", [("uniform", 1), ("random", 0), ("ragged", 8), ("shifted", 3)])
def test_chunk_reference_matches_naive(layout, lead, kv_heads):
    boundary = LAYOUTS[layout]()
    q, k, v = random_qkv(boundary.shape[0], kv_heads=kv_heads)
    mask = brute_force_chunk_mask(boundary, lead)
    actual = forward_backward(lambda *t: chunk_attention(*t, boundary, lead, impl="reference"), q, k, v)
    expected = forward_backward(lambda *t: naive_attention(*t, mask), q, k, v)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("window", [1, 3, 8, 22])
def test_sliding_window_matches_naive(window, kv_heads):
    q, k, v = random_qkv(23, kv_heads=kv_heads)
    mask = brute_force_window_mask(23, window)
    actual = forward_backward(lambda *t: causal_attention(*t, window=window, impl="reference"), q, k, v)
    expected = forward_backward(lambda *t: naive_attention(*t, mask), q, k, v)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("window", [None, 23, 100])
def test_full_causal_matches_naive(window, kv_heads):
    """window=None, and any window covering the whole sequence, is plain causal attention."""
    q, k, v = random_qkv(23, kv_heads=kv_heads)
    mask = brute_force_window_mask(23, 23)
    actual = forward_backward(lambda *t: causal_attention(*t, window=window), q, k, v)
    expected = forward_backward(lambda *t: naive_attention(*t, mask), q, k, v)
    assert_all_close(actual, expected)


ATTENTIONS = {
    "chunk": lambda q, k, v: chunk_attention(q, k, v, random_layout(q.shape[2], 4), 2, impl="reference"),
    "causal": lambda q, k, v: causal_attention(q, k, v),
    "window": lambda q, k, v: causal_attention(q, k, v, window=5, impl="reference"),
}


@pytest.mark.parametrize("changed", ["q", "k", "v"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_no_output_depends_on_a_later_token(attention, changed):
    q, k, v = (t.detach() for t in random_qkv(30))
    fn = ATTENTIONS[attention]
    before = fn(q, k, v)
    for t in (1, 7, 29):
        inputs = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
        inputs[changed][:, :, t] += 1.0
        after = fn(inputs["q"], inputs["k"], inputs["v"])
        assert torch.equal(after[:, :, :t], before[:, :, :t]), f"token {t} leaked into earlier outputs"
        assert not torch.equal(after[:, :, t], before[:, :, t]), "token t must see itself"


# ---------------------------------------------------------------------------
# Bad settings


def test_bad_impl_names_the_setting_and_choices():
    q, k, v = random_qkv(8)
    with pytest.raises(ValueError, match=r"model\.attn_impl.*auto, reference, flash, flex"):
        chunk_attention(q, k, v, uniform_layout(8, 4), 2, impl="dense")
    with pytest.raises(ValueError, match=r"model\.attn_impl"):
        causal_attention(q, k, v, impl="dense")


@pytest.mark.parametrize("call", [
    lambda q, k, v: chunk_attention(q, k, v, uniform_layout(8, 4), -1),
    lambda q, k, v: chunk_attention(q, k, v, uniform_layout(9, 4), 2),
    lambda q, k, v: chunk_attention(q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1),
                                    uniform_layout(8, 4), 2),
    lambda q, k, v: causal_attention(q, k, v, window=0),
])
def test_bad_inputs_raise_value_error(call):
    q, k, v = random_qkv(8)
    with pytest.raises(ValueError):
        call(q, k, v)


# ---------------------------------------------------------------------------
# Phase-folded flash decomposition against the definition (CPU: its dense form, float64)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("lead", [0, 1, 3, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunk_flash_matches_naive(layout, lead, kv_heads):
    boundary = LAYOUTS[layout]()
    q, k, v = random_qkv(boundary.shape[0], kv_heads=kv_heads)
    expected = forward_backward(lambda *t: naive_attention(*t, brute_force_chunk_mask(boundary, lead)), q, k, v)
    actual = forward_backward(lambda *t: chunk_attention(*t, boundary, lead, impl="flash"), q, k, v)
    assert_all_close(actual, expected)


def test_chunk_flash_under_autocast_takes_mixed_dtypes_like_sdpa():
    """In a model q comes out of a bf16 matmul and k, v out of an fp32 scan; both paths cast alike."""
    boundary = LAYOUTS["shifted"]()
    q, k, v = random_qkv(boundary.shape[0], dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = {impl: forward_backward(lambda *t: chunk_attention(t[0].bfloat16(), t[1], t[2], boundary, 3,
                                                                     impl=impl), q, k, v)
                   for impl in ("flash", "reference")}
    assert results["flash"][0].dtype == torch.bfloat16
    assert_all_close(results["flash"], results["reference"], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("layout,lead", [("uniform", 1), ("shifted", 8), ("random", 3), ("short", 2)])
def test_phase_table_places_every_query_that_sees_a_boundary_once(layout, lead):
    boundary = LAYOUTS[layout]()
    length = boundary.shape[0]
    table = phase_table(boundary, lead, torch.device("cpu"))
    mask = brute_force_chunk_mask(boundary, lead)
    n = table.keys.numel()
    for t in range(length):
        past = [s for s in range(length) if mask[t, s] and s < t - lead]
        if not past:
            assert table.fold_index[t] == table.phases * n
            continue
        slot = int(table.fold_index[t])
        assert table.slots[slot] == t and slot not in table.padding_slots.tolist()
        # its folded index m - 1 sees gathered keys 0 .. m - 1: exactly its past boundaries
        assert table.keys[: slot % n + 1].tolist() == past
    holding = table.phases * n - table.padding_slots.numel()
    assert holding == int((table.fold_index < table.phases * n).sum())


def test_regular_chunks_fold_into_p_phases_without_padding():
    table = phase_table(uniform_layout(1024, 8, shift=3), 8, torch.device("cpu"))
    assert table.phases == 8
    # only the first and last groups are short
    assert table.padding_slots.numel() < 0.01 * table.phases * table.keys.numel()


# ---------------------------------------------------------------------------
# FlexAttention against the reference: forward on CPU (flex has no CPU backward)


FLEX_CASES = [  # (L, layout, lead, kv_heads): KV lengths off the 128 block grid, GQA, lead 0
    pytest.param(200, uniform_layout(200, 4), 3, 2, id="uniform-200"),
    pytest.param(256, uniform_layout(256, 8, shift=5), 8, 4, id="shifted-256"),
    pytest.param(300, random_layout(300, 8, seed=3), 0, 1, id="random-300-lead0"),
    pytest.param(7, uniform_layout(7, 8), 8, 2, id="short-7"),
]


@eager_flex
@pytest.mark.parametrize("length,boundary,lead,kv_heads", FLEX_CASES)
def test_chunk_flex_matches_reference_on_cpu(length, boundary, lead, kv_heads):
    q, k, v = (t.detach() for t in random_qkv(length, kv_heads=kv_heads, dtype=torch.float32))
    expected = chunk_attention(q, k, v, boundary, lead, impl="reference")
    torch.testing.assert_close(chunk_attention(q, k, v, boundary, lead, impl="flex"), expected)
    # A fresh tensor with the same layout takes the content-keyed cache; same answer.
    torch.testing.assert_close(chunk_attention(q, k, v, boundary.clone(), lead, impl="flex"), expected)


@eager_flex
def test_flex_gathers_only_the_boundaries_some_query_sees_past_its_band():
    """130 boundaries, of which the last two lie within every later query's band: 128 gathered, one block."""
    length, lead = 1024, 8
    boundary = uniform_layout(length, 8, shift=3)
    mask = chunk_mask(boundary, lead, "cpu", impl="flex")
    seen = [s for s in boundary.nonzero().flatten().tolist() if s < length - 1 - lead]
    assert boundary.sum() == 130 and len(seen) == 128
    assert mask.key_index[:-length].tolist() == seen
    q, k, v = (t.detach() for t in random_qkv(length, kv_heads=2, dtype=torch.float32))
    torch.testing.assert_close(attend_chunks(q, k, v, mask),
                               chunk_attention(q, k, v, boundary, lead, impl="reference"))


@eager_flex
def test_window_flex_matches_reference_on_cpu():
    q, k, v = (t.detach() for t in random_qkv(200, kv_heads=2, dtype=torch.float32))
    expected = causal_attention(q, k, v, window=37, impl="reference")
    torch.testing.assert_close(causal_attention(q, k, v, window=37, impl="flex"), expected)


# ---------------------------------------------------------------------------
# CUDA: flex forward + backward, long sequences, timings


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("length,boundary,lead,kv_heads", FLEX_CASES + [
    pytest.param(1000, random_layout(1000, 8, seed=7), 8, 2, id="random-1000"),
    pytest.param(1024, uniform_layout(1024, 16, shift=9), 1, 4, id="shifted-1024"),
])
@pytest.mark.parametrize("impl", ["flex", "flash", "fused"])
def test_chunk_fast_paths_match_reference_on_cuda(length, boundary, lead, kv_heads, impl):
    q, k, v = random_qkv(length, kv_heads=kv_heads, dim=64, dtype=torch.float32, device="cuda")
    on_cuda = boundary.cuda()
    actual = forward_backward(lambda *t: chunk_attention(*t, on_cuda, lead, impl=impl), q, k, v)
    expected = forward_backward(lambda *t: chunk_attention(*t, on_cuda, lead, impl="reference"), q, k, v)
    assert_all_close(actual, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("window", [1, 64, 300])
def test_window_flex_matches_reference_on_cuda(window):
    q, k, v = random_qkv(1000, kv_heads=2, dim=64, dtype=torch.float32, device="cuda")
    actual = forward_backward(lambda *t: causal_attention(*t, window=window, impl="flex"), q, k, v)
    expected = forward_backward(lambda *t: causal_attention(*t, window=window, impl="reference"), q, k, v)
    assert_all_close(actual, expected, atol=2e-5, rtol=1e-4)


LONG = dict(size=8, lead=8, heads=8, dim=64)


def long_inputs(length: int, dtype: torch.dtype):
    q, k, v = random_qkv(length, heads=LONG["heads"], kv_heads=LONG["heads"], dim=LONG["dim"], batch=1,
                         dtype=dtype, device="cuda")
    return q, k, v, uniform_layout(length, LONG["size"]).cuda()


def max_errors(actual, expected) -> list[float]:
    return [(a.float() - e.float()).abs().max().item() for a, e in zip(actual, expected)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_chunk_fast_paths_bf16_at_16k_tokens(kv_heads):
    """bf16 flash and fused (their kernels, eager and compiled), bf16 flex and bf16 reference stray from
    fp32 alike."""
    q, k, v, boundary = long_inputs(16384, torch.float32)
    k, v = (t.detach()[:, :kv_heads].clone().requires_grad_() for t in (k, v))
    exact = forward_backward(lambda *t: chunk_attention(*t, boundary, LONG["lead"], impl="reference"), q, k, v)
    half = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    attend = {impl: functools.partial(chunk_attention, boundary=boundary, leading_tokens=LONG["lead"], impl=impl)
              for impl in ("flash", "fused", "flex", "reference")}
    compiled = torch.compile(attend_chunks, fullgraph=True)
    for impl in ("flash", "fused"):
        mask = chunk_mask(boundary, LONG["lead"], boundary.device, impl)
        attend[f"{impl} compiled"] = functools.partial(compiled, mask=mask)
    errors = {name: max_errors(forward_backward(fn, *half), exact) for name, fn in attend.items()}
    print(f"\nmax |bf16 - fp32 reference| (out, dq, dk, dv), {kv_heads} kv heads: {errors}")
    for name in ("flash", "flash compiled", "fused", "fused compiled", "flex"):
        for error, reference_error in zip(errors[name], errors["reference"]):
            assert error <= 2 * reference_error + 1e-3, name


# ---------------------------------------------------------------------------
# What a compiled model keeps of the flash decomposition for its backward


def saved_activation_bytes(fn, *inputs) -> int:
    """Bytes of the tensors Inductor's min-cut partitioner saves for the backward of ``fn`` (no codegen)."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    saved = []

    def partition(joint, joint_inputs, *, num_fwd_outputs, **kwargs):
        forward, backward = min_cut_rematerialization_partition(
            joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **{**kwargs, "compiler": "inductor"})
        outputs = next(node for node in forward.graph.nodes if node.op == "output").args[0]
        saved.extend(node.meta["val"] for node in outputs[num_fwd_outputs:])
        return forward, backward

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=lambda gm, _: make_boxed_func(gm),
                           partition_fn=partition, decompositions=select_decomp_table())
    torch._dynamo.reset()
    torch.compile(fn, backend=backend)(*inputs).float().sum().backward()
    return sum(t.nbytes for t in saved if isinstance(t, torch.Tensor))


def test_compiled_flash_path_keeps_no_copy_per_band_offset():
    """Shifted keys built by concatenation were each kept in fp32: 17 copies per layer at lead 8."""
    length, heads, dim = 64, 2, 16
    boundary = uniform_layout(length, 8, shift=3)
    q, k, v = (torch.randn(1, heads, length, dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def saved(lead: int) -> int:
        mask = chunk_mask(boundary, lead, "cpu", "flash")
        return saved_activation_bytes(lambda *t: attend_chunks(*t, mask), q, k, v)

    growth_per_token = (saved(8) - saved(1)) / length
    # 7 more band probabilities per head (fp32) may be kept; a copy of k or v per offset may not
    assert growth_per_token <= 2 * 7 * heads * 4


@pytest.mark.parametrize("device,length,expected", [
    ("cpu", 65536, "reference"), ("cuda", 1024, "fused"), ("cuda", 16384, "fused"), ("cuda", 65536, "flash"),
])
def test_auto_picks_the_path_measured_fastest_for_the_length(device, length, expected):
    assert resolve_chunk_impl("auto", torch.device(device), length) == expected
    assert resolve_chunk_impl("flex", torch.device(device), length) == "flex"  # an explicit choice stands
