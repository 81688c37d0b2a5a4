"""The fused chunk-attention kernels (``model.attn_impl=fused``) against the definition.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET
before they are imported), in fp32; bf16 at 16K tokens, compiled, is with the other fast paths
in test_attention.py (``-m gpu``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the fused chunk kernels need triton (pip install triton)")

from attamba.ops import chunk_triton  # noqa: E402
from attamba.ops.attention import chunk_attention, chunk_mask  # noqa: E402
from test_attention import (LAYOUTS, assert_all_close, brute_force_chunk_mask, forward_backward,  # noqa: E402
                            naive_attention, random_layout, random_qkv, uniform_layout)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = chunk_triton.BLOCK_M

# Beyond the small layouts: sequences over several blocks, regular, shifted and irregular.
LONG_LAYOUTS = {
    "random-3-blocks": lambda: random_layout(3 * BLOCK + 7, 8, seed=3),
    "shifted-2-blocks": lambda: uniform_layout(2 * BLOCK + 1, 8, shift=5),
}


def fused_and_naive(boundary: torch.Tensor, lead: int, kv_heads: int, dim: int = 16):
    torch.manual_seed(0)
    q, k, v = random_qkv(boundary.shape[0], kv_heads=kv_heads, dim=dim, dtype=torch.float32, device=DEVICE)
    expected = forward_backward(lambda *t: naive_attention(*t, brute_force_chunk_mask(boundary, lead)), q, k, v)
    actual = forward_backward(lambda *t: chunk_attention(*t, boundary.to(DEVICE), lead, impl="fused"), q, k, v)
    return actual, expected


@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("lead", [0, 1, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_matches_naive(layout, lead, kv_heads):
    actual, expected = fused_and_naive(LAYOUTS[layout](), lead, kv_heads)
    assert_all_close(actual, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lead", [3, 8, 20])  # 20: a band wider than the 16-row tile beside a block
@pytest.mark.parametrize("layout", LONG_LAYOUTS)
def test_fused_matches_naive_over_several_blocks(layout, lead):
    actual, expected = fused_and_naive(LONG_LAYOUTS[layout](), lead, kv_heads=2)
    assert_all_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_query_spans_split_the_boundary_keys_backward_without_changing_it(monkeypatch):
    boundary = LONG_LAYOUTS["random-3-blocks"]()
    whole, _ = fused_and_naive(boundary, 3, kv_heads=2)
    monkeypatch.setattr(chunk_triton, "MIN_SPAN", 1)
    monkeypatch.setattr(chunk_triton, "MAX_SPANS", 4)
    assert chunk_triton._query_spans(boundary.shape[0]) == (BLOCK, 4)
    split, expected = fused_and_naive(boundary, 3, kv_heads=2)
    assert_all_close(split, expected, atol=1e-5, rtol=1e-4)
    assert_all_close(split, whole, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout,lead", [("uniform", 1), ("random", 3), ("short", 2), ("shifted", 8)])
def test_boundary_table_lists_the_boundaries_each_query_sees_past_its_band(layout, lead):
    boundary = LAYOUTS[layout]()
    table = chunk_triton.boundary_table(boundary, lead, torch.device("cpu"))
    keys = table.keys.tolist()
    for t in range(boundary.shape[0]):
        seen = [s for s in range(t - lead) if boundary[s]]
        assert keys[: table.n_visible[t]] == seen, f"query {t}"
    assert table.key_slot.tolist() == [keys.index(s) if s in keys else -1 for s in range(boundary.shape[0])]


def test_fused_under_autocast_takes_mixed_dtypes_like_sdpa():
    """In a model q comes out of a half-precision matmul and k, v out of an fp32 scan: both paths cast
    alike. (fp16 on CPU: Triton's interpreter computes in NumPy, which has no bf16.)"""
    boundary = LAYOUTS["shifted"]()
    half = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    q, k, v = random_qkv(boundary.shape[0], dtype=torch.float32, device=DEVICE)
    with torch.autocast(DEVICE, dtype=half):
        results = {impl: forward_backward(lambda *t: chunk_attention(t[0].to(half), t[1], t[2], boundary.to(DEVICE),
                                                                     3, impl=impl), q, k, v)
                   for impl in ("fused", "reference")}
    assert results["fused"][0].dtype == half
    assert_all_close(results["fused"], results["reference"], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dim", [8, 24])  # below the 16-wide tiles, and between powers of two
def test_head_dims_off_the_tile_widths_are_padded_exactly(dim):
    actual, expected = fused_and_naive(LONG_LAYOUTS["shifted-2-blocks"](), 3, kv_heads=2, dim=dim)
    assert_all_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_inputs_past_the_kernels_32_bit_offsets_are_refused_by_name():
    mask = chunk_mask(uniform_layout(65536, 8), 8, torch.device("cpu"), "fused")
    q = torch.empty(33, 65536, 8, 64, device="meta").transpose(1, 2)  # 33 * 2^25 elements: fits
    # v as a model makes it, one of the keys' and values' interleaved streams: it spans twice its size
    v = torch.empty(33, 65536, 2, 8 * 64, device="meta")[:, :, 1].unflatten(-1, (8, 64)).transpose(1, 2)
    with pytest.raises(ValueError, match=r"model\.attn_impl=fused.*32-bit"):
        chunk_triton.fused_chunk_attention(q, q, v, mask.boundaries)


# Compiles the kernels for Hopper (sm_90) without a GPU: Triton's code generator and ptxas check
# what its interpreter does not (loop-carried types, static branches, register allocation).
_COMPILE_FOR_HOPPER = """
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attamba.ops import chunk_triton as ct

pointers = {"KEYS": "*i32", "N_VISIBLE": "*i32", "KEY_SLOT": "*i32", "LSE": "*fp32", "DELTA": "*fp32",
            "DK_PAST": "*fp32", "DV_PAST": "*fp32"}
head_dim, lead, group, dtype = CASE
constants = dict(D=ct._tile_width(head_dim), HEAD_DIM=head_dim, LEAD=lead, LEAD_PAD=ct._tile_width(lead),
                 PRECISION=ct._precision(getattr(torch, dtype)), BLOCK_M=ct.BLOCK_M, BLOCK_N=ct.BLOCK_N,
                 GROUP=group, HAS_PAST=True)
element = {"bfloat16": "*bf16", "float32": "*fp32"}[dtype]
for kernel in (ct._fwd_kernel, ct._bwd_query_kernel, ct._bwd_past_key_kernel, ct._bwd_band_key_kernel):
    given = {name: value for name, value in constants.items() if name in kernel.arg_names}
    signature = {name: "constexpr" if name in given else pointers.get(name, element) if name.isupper()
                 else "fp32" if name.endswith("scale") else "i32" for name in kernel.arg_names}
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=given), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=ct.NUM_WARPS, num_stages=ct.NUM_STAGES))
"""


@pytest.mark.parametrize("head_dim,lead,group,dtype", [(64, 8, 1, "bfloat16"), (24, 3, 2, "bfloat16"),
                                                      (64, 8, 1, "float32")],
                         ids=["paper-model", "padded-gqa", "paper-model-fp32"])
def test_kernels_compile_for_hopper_without_a_gpu(head_dim, lead, group, dtype, compile_without_interpreter):
    compile_without_interpreter(_COMPILE_FOR_HOPPER.replace("CASE", repr((head_dim, lead, group, dtype))))
