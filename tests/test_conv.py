"""The chunk-resetting depthwise causal conv against a brute-force loop and nn.functional.conv1d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attamba.ops.conv import chunked_causal_conv, conv_step, offset_in_chunk

from test_recompute import saved_bytes

LENGTH, CHANNELS = 30, 6
LAYOUTS = {
    "no_resets": [0],
    "uniform_P4": list(range(0, LENGTH, 4)),
    "every_token": list(range(LENGTH)),
    "irregular": [0, 1, 2, 7, 8, 20, 29],
}


def starts(positions) -> torch.Tensor:
    chunk_start = torch.zeros(LENGTH, dtype=torch.bool)
    chunk_start[positions] = True
    return chunk_start


def brute_force(x, weight, bias, chunk_start):
    """out[t, c] = silu(bias[c] + Σ_k weight[c, w-1-k] x[t-k, c]) over taps t-k inside t's chunk."""
    width = weight.shape[1]
    out = torch.zeros_like(x) if bias is None else bias.expand_as(x).clone()
    chunk_first = 0
    for t in range(x.shape[1]):
        if chunk_start[t]:
            chunk_first = t
        for k in range(width):
            if t - k >= chunk_first:
                out[:, t] += weight[:, width - 1 - k] * x[:, t - k]
    return F.silu(out)


def make(width: int, with_bias: bool):
    x = torch.randn(2, LENGTH, CHANNELS)
    weight = torch.randn(CHANNELS, width)
    bias = torch.randn(CHANNELS) if with_bias else None
    return x, weight, bias


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("width", [2, 3, 4])
def test_matches_brute_force(width, layout, with_bias):
    x, weight, bias = make(width, with_bias)
    chunk_start = starts(LAYOUTS[layout])
    expected = brute_force(x, weight, bias, chunk_start)
    torch.testing.assert_close(chunked_causal_conv(x, weight, bias, offset_in_chunk(chunk_start)), expected)


def test_channels_over_several_dims_match_the_flat_conv_forward_and_backward():
    """The model convolves [b, L, streams, width] in place: same values and gradients as flattened channels."""
    streams, width = 2, 3
    x, weight, bias = (t.requires_grad_() for t in make(4, True))
    offsets = offset_in_chunk(starts(LAYOUTS["irregular"]))
    flat = chunked_causal_conv(x, weight, bias, offsets)
    split = chunked_causal_conv(x.unflatten(-1, (streams, width)), weight.unflatten(0, (streams, width)),
                                bias.unflatten(0, (streams, width)), offsets)
    torch.testing.assert_close(split.flatten(-2), flat)
    grad = torch.randn_like(flat)
    expected = torch.autograd.grad(brute_force(x, weight, bias, starts(LAYOUTS["irregular"])), (x, weight, bias), grad)
    for got, want in zip(torch.autograd.grad(split.flatten(-2), (x, weight, bias), grad), expected):
        torch.testing.assert_close(got, want)


def test_the_sequence_end_never_reaches_its_start():
    """No tap wraps around from the end (a cyclic shift would need its wrapped taps masked, NaN included)."""
    x, weight, bias = make(4, True)
    x[:, -1] = float("nan")
    out = chunked_causal_conv(x, weight, bias, offset_in_chunk(starts(LAYOUTS["uniform_P4"])))
    assert out[:, :-1].isfinite().all()


def test_compiled_backward_keeps_the_input_in_its_own_dtype():
    """What a compiled model saves for the conv's backward: the bf16 input (padded), not an fp32 copy.

    An fp32 copy cost 2.5 KB per token per layer of Attamba's K/V SSMs, 0.16 GiB of peak memory in
    the 1K training benchmark on the H200.
    """
    length = 256
    x = torch.randn(2, length, 2, 40, dtype=torch.bfloat16)
    weight, bias = torch.randn(2, 40, 4, requires_grad=True), torch.randn(2, 40, requires_grad=True)
    offsets = offset_in_chunk(torch.arange(length) % 8 == 0)
    conv = torch.compile(chunked_causal_conv)
    conv(x, weight, bias, offsets)
    kept = saved_bytes(lambda: conv(x, weight, bias, offsets))
    assert x.nbytes <= kept <= 1.1 * x.nbytes


@pytest.mark.parametrize("width", [2, 3, 4])
def test_without_resets_equals_mambas_conv1d(width):
    """weight[:, -1] multiplies the current token, as in nn.Conv1d(padding=w-1, groups=c)[..., :L]."""
    x, weight, bias = make(width, True)
    conv = F.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=width - 1, groups=CHANNELS)
    expected = F.silu(conv[..., :LENGTH]).transpose(1, 2)
    torch.testing.assert_close(chunked_causal_conv(x, weight, bias, offset_in_chunk(starts([0]))), expected)


@pytest.mark.parametrize("width", [2, 3, 4])
def test_no_leak_across_chunk_starts(width):
    x, weight, bias = make(width, True)
    chunk_start = starts(LAYOUTS["irregular"])
    poked = x.clone()
    poked[:, 19] += 1.0  # last token of chunk [8, 20)
    change = (chunked_causal_conv(x, weight, bias, offset_in_chunk(chunk_start))
              - chunked_causal_conv(poked, weight, bias, offset_in_chunk(chunk_start))).abs().amax(dim=(0, 2))
    assert change[:19].eq(0).all()
    assert change[19] > 0
    assert change[20:].eq(0).all()  # token 20 starts a chunk: the window must not reach back


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("width", [2, 3, 4])
def test_steps_continue_the_full_conv(width, layout):
    x, weight, bias = make(width, True)
    chunk_start = starts(LAYOUTS[layout])
    full = chunked_causal_conv(x, weight, bias, offset_in_chunk(chunk_start))
    split = 13  # prefill the first 13 tokens, then decode token by token
    state = x.new_zeros(2, CHANNELS, width - 1)
    outputs = []
    for t in range(LENGTH):
        if chunk_start[t]:
            state = torch.zeros_like(state)
        y_t, state = conv_step(state, x[:, t], weight, bias)
        outputs.append(y_t)
        if t == split - 1:
            prefix = chunked_causal_conv(x[:, :split], weight, bias, offset_in_chunk(chunk_start[:split]))
            torch.testing.assert_close(torch.stack(outputs, 1), prefix)
    torch.testing.assert_close(torch.stack(outputs, 1), full)


def test_low_precision_input_keeps_its_dtype():
    x, weight, bias = make(4, True)
    chunk_start = starts(LAYOUTS["uniform_P4"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = chunked_causal_conv(x.bfloat16(), weight, bias, offset_in_chunk(chunk_start))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), brute_force(x.bfloat16().float(), weight, bias, chunk_start),
                               atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("width", [1, 5])
def test_bad_width_names_the_setting(width):
    x, weight, bias = make(width, True)
    with pytest.raises(ValueError, match="model.ssm.conv"):
        chunked_causal_conv(x, weight, bias, offset_in_chunk(starts([0])))


def test_offset_in_chunk_counts_from_each_chunk_start():
    offsets = offset_in_chunk(starts(LAYOUTS["irregular"]))  # starts 0, 1, 2, 7, 8, 20, 29
    assert offsets[:10].tolist() == [0, 0, 0, 1, 2, 3, 4, 0, 0, 1]
    assert offsets[-2:].tolist() == [8, 0]


def test_bool_chunk_starts_in_place_of_offsets_are_refused():
    x, weight, bias = make(4, True)
    with pytest.raises(ValueError, match="offset_in_chunk must be an int64 tensor"):
        chunked_causal_conv(x, weight, bias, starts([0]))
