"""The fused band kernels of the flash path against their PyTorch reference and the definition.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET
before they are imported), in fp32 and fp16; bf16, torch.compile and speed need a GPU: ``-m gpu``.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="the fused band kernels need triton (pip install triton)")

from attamba.ops import chunk_flash  # noqa: E402
from attamba.ops.attention import chunk_attention  # noqa: E402
from attamba.ops.band_triton import BLOCK, band_backward, band_forward  # noqa: E402
from test_attention import (LAYOUTS, assert_all_close, brute_force_chunk_mask, forward_backward,  # noqa: E402
                            naive_attention, random_layout)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def head_major_view(batch: int, heads: int, length: int, dim: int, dtype=torch.float32) -> torch.Tensor:
    """``[b, h, L, d]`` as a model makes it: a view of ``[b, L, h, d]`` (rows of stride ``h * d``)."""
    return torch.randn(batch, length, heads, dim, dtype=dtype, device=DEVICE).transpose(1, 2)


def band_inputs(length: int, heads: int, kv_heads: int, dim: int = 16, batch: int = 2, dtype=torch.float32,
                seed: int = 0):
    torch.manual_seed(seed)
    q = head_major_view(batch, heads, length, dim, dtype)
    k, v = (head_major_view(batch, kv_heads, length, dim, dtype) for _ in range(2))
    return q, k, v, folded_past(length, heads, dim, batch, dtype)


def folded_past(length: int, heads: int, dim: int, batch: int, dtype=torch.float32):
    """A past as the folded causal kernel leaves it: ``rows`` rows in their own order, query t's at ``index[t]``."""
    rows = length + 5
    out = torch.randn(batch, heads, rows, dim, dtype=dtype, device=DEVICE)
    lse = torch.randn(batch, rows, heads, device=DEVICE).transpose(1, 2) + 2  # a strided view
    index = torch.randperm(rows, device=DEVICE).repeat_interleave(2)[: 2 * length : 2]  # a strided view
    index[: length // 3] = rows  # the first queries see no past boundary
    return out, lse, index


def reference_band(q, k, v, lead, scale, past):
    """chunk_flash's PyTorch band (and merge), what runs off CUDA."""
    return chunk_flash._band(q.cpu(), k.cpu(), v.cpu(), lead, scale,
                             None if past is None else tuple(t.cpu() for t in past))


def test_the_reference_reads_the_past_of_each_query_from_its_row():
    q, k, v, (out, lse, index) = band_inputs(BLOCK + 7, 4, 2)
    scale = 1 / math.sqrt(q.shape[-1])
    merged_out, merged_lse = reference_band(q, k, v, 3, scale, (out, lse, index))
    band_out, band_lse = reference_band(q, k, v, 3, scale, None)
    for t, row in enumerate(index.tolist()):
        if row >= out.shape[2]:  # no past: the band alone
            torch.testing.assert_close(merged_out[..., t, :], band_out[..., t, :])
            continue
        joint = torch.logaddexp(band_lse[..., t], lse[..., row])
        torch.testing.assert_close(merged_lse[..., t], joint)
        expected = (band_out[..., t, :] * (band_lse[..., t] - joint).exp()[..., None]
                    + out[..., row, :] * (lse[..., row] - joint).exp()[..., None])
        torch.testing.assert_close(merged_out[..., t, :], expected)


SHAPES = [  # (length, heads, kv_heads): lengths around the block, GQA groups of 1, 2 and 4
    (BLOCK, 4, 4),
    (BLOCK + 7, 4, 2),
    (3, 4, 1),
    (2 * BLOCK + 33, 2, 2),
]


@pytest.mark.parametrize("with_past", [False, True], ids=["band_only", "merged"])
@pytest.mark.parametrize("lead", [0, 1, 8, 13])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_band_forward_matches_reference(shape, lead, with_past):
    q, k, v, past = band_inputs(*shape)
    scale = 1 / math.sqrt(q.shape[-1])
    past = past if with_past else None
    out, lse = band_forward(q, k, v, lead, scale, past)
    expected_out, expected_lse = reference_band(q, k, v, lead, scale, past)
    torch.testing.assert_close(out.cpu(), expected_out.to(out.dtype), atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(lse.cpu(), expected_lse, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("with_past", [False, True], ids=["band_only", "past_dq_added"])
@pytest.mark.parametrize("lead", [0, 1, 8, 13])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_band_backward_matches_reference(shape, lead, with_past):
    """Gradients under a joint softmax whose other part (the past) is random, with the past's dq added."""
    q, k, v, past = band_inputs(*shape)
    scale = 1 / math.sqrt(q.shape[-1])
    out, lse = reference_band(q, k, v, lead, scale, past)
    grad_out = torch.randn_like(out)
    past_dq = None
    if with_past:
        past_out, _, index = past
        past_dq = (torch.randn_like(past_out), index)
    actual = band_backward(grad_out.to(DEVICE), q, k, v, out.to(DEVICE), lse.to(DEVICE), lead, scale, past_dq)
    expected = chunk_flash._band_gradients(grad_out, q.cpu(), k.cpu(), v.cpu(), out, lse, lead, scale,
                                           None if past_dq is None else tuple(t.cpu() for t in past_dq))
    for name, a, e in zip(("dq", "dk", "dv"), actual, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.cpu(), e, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_band_forward_keeps_half_precision_and_its_error():
    """fp16 in, fp16 out; arithmetic in fp32, so the error is the output's own rounding."""
    q, k, v, past = band_inputs(BLOCK + 5, 4, 2, dtype=torch.float16)
    scale = 1 / math.sqrt(q.shape[-1])
    out, lse = band_forward(q, k, v, 8, scale, past)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    expected_out, expected_lse = reference_band(q.float(), k.float(), v.float(), 8, scale,
                                                (past[0].float(), *past[1:]))
    torch.testing.assert_close(out.cpu().float(), expected_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse.cpu(), expected_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("lead", [0, 3, 8])
@pytest.mark.parametrize("layout", ["uniform", "random", "ragged"])
def test_flash_path_with_fused_band_matches_definition(layout, lead, kv_heads, monkeypatch):
    """The whole flash path, its band in the kernels (forced on here), against the masked softmax."""
    monkeypatch.setattr(chunk_flash, "_fused_band", lambda q: True)
    boundary = LAYOUTS[layout]()
    q, k, v = (t.detach().float().requires_grad_() for t in band_inputs(boundary.shape[0], 4, kv_heads)[:3])
    expected = forward_backward(lambda *t: naive_attention(*t, brute_force_chunk_mask(boundary, lead)), q, k, v)
    actual = forward_backward(lambda *t: chunk_attention(*t, boundary, lead, impl="flash"), q, k, v)
    assert_all_close(actual, expected, atol=1e-5, rtol=1e-4)


@needs_cuda
@pytest.mark.gpu
def test_bf16_band_on_gpu_matches_fp32_reference():
    """bf16 inputs, long irregular layout, compiled model-style call: within bf16 rounding of fp32."""
    boundary = random_layout(4096 + 17, 8, seed=2)
    q, k, v, past = band_inputs(boundary.shape[0], 8, 2, dim=64, batch=2, dtype=torch.bfloat16)
    scale = 1 / 8
    out, lse = torch.compile(band_forward, fullgraph=True)(q, k, v, 8, scale, past)
    expected_out, expected_lse = reference_band(q.float(), k.float(), v.float(), 8, scale,
                                                (past[0].float(), *past[1:]))
    torch.testing.assert_close(out.float().cpu(), expected_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.cpu(), expected_lse, atol=1e-3, rtol=1e-3)
    grad_out = torch.randn_like(out)
    actual = band_backward(grad_out, q, k, v, out, lse, 8, scale)
    expected = chunk_flash._band_backward(grad_out.float().cpu(), q.float().cpu(), k.float().cpu(),
                                          v.float().cpu(), out.float().cpu(), lse.cpu(), 8, scale)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.cpu(), e, atol=3e-2, rtol=3e-2)
