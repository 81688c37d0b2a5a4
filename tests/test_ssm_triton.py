"""The fused short-chunk SSD kernels against the reference scan: tile packing, outputs, every gradient.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET
before they are imported), which covers the fp32 and fp16 paths; bf16 (whose dots the interpreter
cannot evaluate), torch.compile with Inductor and speed need a GPU: ``-m gpu``.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("triton", reason="the fused SSD kernels need triton (pip install triton)")

from attamba.ops.ssm import chunk_scan  # noqa: E402
from attamba.ops.conv import chunked_causal_conv, offset_in_chunk  # noqa: E402
from attamba.ops.ssm_triton import ChunkConv, TileTable, chunk_local_ssd, tile_table  # noqa: E402
import test_ssm  # noqa: E402
from test_ssm import assert_close_to_scale, starts_at, uniform  # noqa: E402


def random_lengths(length: int, longest: int, seed: int) -> torch.Tensor:
    """Chunks of lengths drawn uniformly from 1..longest."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, longest + 1, (length,), generator=gen)
    return starts_at(length, [0, *sizes.cumsum(0)[sizes.cumsum(0) < length].tolist()])


LAYOUTS = {
    "uniform_P8": uniform(100, 8),  # L not a multiple of the tile: a short last tile
    "shifted_P8": starts_at(90, [0, 1, *range(6, 90, 8)]),  # cyclic-like: chunks of 1 and 5 first
    "random_1_40": random_lengths(300, 40, seed=3),  # tiles end where the next chunk does not fit
    "single_chunk": starts_at(50, [0]),
    "full_tiles": uniform(128, 64),  # chunks exactly one tile long
    "P1": uniform(70, 1),  # every token its own chunk: 64 chunks in a tile
}


def chunk_bounds(chunk_start: torch.Tensor) -> list[tuple[int, int]]:
    starts = chunk_start.nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [chunk_start.numel()]))


# test_ssm's inputs with head width 16, the fused kernel's minimum (tl.dot)
make_inputs = functools.partial(test_ssm.make_inputs, p=16)


def outputs_and_grads(fn, inputs: dict, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """y and the gradients of sum(y * weight) w.r.t. every tensor input."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items() if t is not None}
    y = fn(**{**inputs, **leaves})
    grads = torch.autograd.grad((y.float() * weight).sum(), list(leaves.values()))
    return y.detach(), dict(zip(leaves, grads))


def reference(chunk_start: torch.Tensor):
    return lambda **t: chunk_scan(chunk_start=chunk_start, impl="reference", **t)


def fused(table: TileTable):
    return lambda **t: chunk_local_ssd(table=table, **t)


CONV = ("x_weight", "x_bias", "B_weight", "B_bias", "C_weight", "C_bias")


def with_conv(length: int, width: int = 4, **shapes) -> dict:
    """`make_inputs` plus what the kernels fuse in front of the scan: the conv's weights and biases
    (x's channels [h, p], B's and C's [g, n]) and dt_bias, with dt before its softplus (any sign)."""
    inputs = make_inputs(length, **shapes)
    (b, _, h, p), (g, n), device = inputs["x"].shape, inputs["B"].shape[-2:], inputs["A"].device
    channels = {"x": (h, p), "B": (g, n), "C": (g, n)}
    for name, shape in channels.items():
        inputs[f"{name}_weight"] = torch.randn(*shape, width, device=device) * 0.5
        inputs[f"{name}_bias"] = torch.randn(*shape, device=device) * 0.5
    inputs["dt"] = torch.randn(b, length, h, device=device) * 2
    inputs["dt_bias"] = torch.randn(h, device=device)
    return inputs


def fused_with_conv(table: TileTable):
    def run(x, dt, A, B, C, D, dt_bias, **conv):
        return chunk_local_ssd(x, dt, A, B, C, D, table, ChunkConv(**conv), dt_bias)
    return run


def reference_with_conv(chunk_start: torch.Tensor):
    """The chunked conv + SiLU and softplus in plain PyTorch, then the reference scan."""
    def run(x, dt, A, B, C, D, dt_bias, **conv):
        offset = offset_in_chunk(chunk_start).to(x.device)
        x, B, C = (chunked_causal_conv(t, conv[f"{name}_weight"], conv[f"{name}_bias"], offset)
                   for name, t in (("x", x), ("B", B), ("C", C)))
        dt = torch.nn.functional.softplus(dt + dt_bias)
        return chunk_scan(x, dt, A, B, C, chunk_start=chunk_start, D=D, impl="reference")
    return run


def assert_matches_reference(chunk_start: torch.Tensor, inputs: dict, rel: float, device="cpu",
                             tile: int | None = None) -> None:
    """Forward and every gradient of the fused kernels vs the fp32 reference scan (with the conv
    and the softplus when `inputs` has their weights)."""
    table = tile_table(chunk_start, tile).to(device)
    weight = torch.randn(inputs["x"].shape, device=device)
    conv = "x_weight" in inputs
    y, grads = outputs_and_grads((fused_with_conv if conv else fused)(table), inputs, weight)
    as_fp32 = {name: t.float() if t is not None else None for name, t in inputs.items()}
    y_ref, grads_ref = outputs_and_grads((reference_with_conv if conv else reference)(chunk_start), as_fp32, weight)
    assert y.dtype == inputs["x"].dtype
    assert_close_to_scale(y, y_ref, rel, "y")
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, f"d/d{name} is {grad.dtype}"
        assert_close_to_scale(grad, grads_ref[name], rel, f"d/d{name}")


# ----------------------------------------------------------------------------- tile table


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tile", [64, 32, 16])
def test_tile_table_packs_whole_chunks_greedily(layout, tile):
    chunk_start = LAYOUTS[layout]
    table = tile_table(chunk_start, tile)
    if max(end - start for start, end in chunk_bounds(chunk_start)) > tile:
        assert table is None
        return
    starts, lengths = table.starts.tolist(), table.lengths.tolist()
    assert table.starts.dtype == table.lengths.dtype == table.chunk_id.dtype == torch.int32
    assert starts[0] == 0 and all(a + n == b for a, n, b in zip(starts, lengths, starts[1:]))
    assert starts[-1] + lengths[-1] == chunk_start.numel()  # tiles cover 0..L in order
    assert all(0 < n <= tile for n in lengths)
    assert all(chunk_start[s] for s in starts)  # no chunk is split
    for start, end in chunk_bounds(chunk_start):  # greedy: a tile closes only when the next chunk won't fit
        if start in starts[1:]:
            previous = starts.index(start) - 1
            assert lengths[previous] + end - start > tile
    assert torch.equal(table.chunk_id, chunk_start.cumsum(0).int() - 1)


@pytest.mark.parametrize("longest,tile", [(1, 16), (8, 16), (16, 16), (17, 32), (32, 32), (33, 64), (64, 64)])
def test_tile_table_picks_the_smallest_tile_holding_the_longest_chunk(longest, tile):
    chunk_start = starts_at(40 + longest, [*range(21), *range(20 + longest, 40 + longest)])  # one chunk `longest` long
    assert tile_table(chunk_start).tile == tile


def test_tile_table_none_for_a_chunk_longer_than_the_tile():
    assert tile_table(starts_at(65, [0])) is None
    assert tile_table(starts_at(130, [0, 64, 65])) is None  # [65, 130) is 65 tokens long
    assert tile_table(starts_at(129, [0, 64, 65])).lengths.tolist() == [64, 1, 64]  # 1 + 64 won't fit
    with pytest.raises(ValueError, match="tile"):
        tile_table(starts_at(64, [0]), tile=48)


def test_tile_table_is_cached_per_layout_and_device():
    table = tile_table(uniform(100, 8))
    assert tile_table(uniform(100, 8)) is table
    assert table.to("cpu") is table
    assert table.seq_len == 100 and table.tile == 16 and table.n_tiles == 7


# ----------------------------------------------------------------------------- kernels (CPU: interpreter)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference_forward_and_backward(layout):
    chunk_start = LAYOUTS[layout]
    assert_matches_reference(chunk_start, make_inputs(chunk_start.numel()), rel=1e-4)


@pytest.mark.parametrize("tile", [16, 32, 64])
def test_every_tile_size(tile):
    chunk_start = LAYOUTS["shifted_P8"]
    assert_matches_reference(chunk_start, make_inputs(chunk_start.numel()), rel=1e-4, tile=tile)


def test_four_heads_per_group():
    chunk_start = LAYOUTS["shifted_P8"]
    assert_matches_reference(chunk_start, make_inputs(chunk_start.numel(), h=8, g=2), rel=1e-4)


def test_without_skip_term():
    chunk_start = LAYOUTS["shifted_P8"]
    inputs = dict(make_inputs(chunk_start.numel()), D=None)
    assert_matches_reference(chunk_start, inputs, rel=1e-4)


def test_one_group_p_not_n_and_tile_32():
    chunk_start = random_lengths(150, 32, seed=5)
    assert_matches_reference(chunk_start, make_inputs(150, h=2, g=1, p=16, n=32), rel=1e-4, tile=32)


def test_strided_views_and_broadcast_gradient():
    """x, B, C, dt sliced out of one projection (as the model does) and dy = ones (stride 0)."""
    chunk_start = LAYOUTS["uniform_P8"]
    b, length, h, p, g, n = 2, chunk_start.numel(), 4, 16, 2, 16
    proj = torch.randn(b, length, h * p + 2 * g * n + h, requires_grad=True)
    A, D = -torch.rand(h) - 0.1, torch.randn(h)

    def split(fn):
        x, B, C, dt = proj.split([h * p, g * n, g * n, h], dim=-1)
        y = fn(x=x.unflatten(-1, (h, p)), dt=torch.nn.functional.softplus(dt), A=A,
               B=B.unflatten(-1, (g, n)), C=C.unflatten(-1, (g, n)), D=D)
        return y, torch.autograd.grad(y.sum(), proj)[0]

    y, grad = split(fused(tile_table(chunk_start)))
    y_ref, grad_ref = split(reference(chunk_start))
    assert_close_to_scale(y, y_ref, 1e-4, "y")
    assert_close_to_scale(grad, grad_ref, 1e-4, "d/dproj")


def test_half_precision_operands():
    """fp16 x, B, C feed the dots in fp16 (the path bf16 takes on a GPU)."""
    chunk_start = LAYOUTS["shifted_P8"]
    assert_matches_reference(chunk_start, make_inputs(chunk_start.numel(), dtype=torch.float16), rel=1e-2)


@pytest.mark.parametrize("conv", [False, True], ids=["scan", "conv-scan"])
def test_custom_op_registrations(conv):
    """Schema, fake (meta) kernels and autograd formula, as torch.compile and AOTAutograd use them."""
    chunk_start = LAYOUTS["shifted_P8"]
    table = tile_table(chunk_start)
    length = chunk_start.numel()
    inputs = {name: t.requires_grad_() for name, t in (with_conv if conv else make_inputs)(length, b=1).items()}
    x, dt = inputs["x"].unflatten(2, (2, -1)), inputs["dt"].unflatten(2, (2, -1))  # heads grouped as B's groups
    optional = [inputs.get(name) for name in ("D", "dt_bias", *CONV)]
    args = (x, dt, inputs["A"], inputs["B"], inputs["C"], *optional, table.starts, table.lengths, table.chunk_id,
            table.tile)
    torch.library.opcheck(torch.ops.attamba.chunk_local_ssd_fwd.default, args)


# ----------------------------------------------------------------------------- with the conv and softplus fused


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_and_softplus_fused_match_the_reference(layout):
    chunk_start = LAYOUTS[layout]
    assert_matches_reference(chunk_start, with_conv(chunk_start.numel()), rel=1e-4)


@pytest.mark.parametrize("width", [2, 3])
def test_narrower_convs(width):
    chunk_start = LAYOUTS["shifted_P8"]
    assert_matches_reference(chunk_start, with_conv(chunk_start.numel(), width=width, h=8, g=2), rel=1e-4)


def test_conv_fused_with_half_precision_operands():
    chunk_start = LAYOUTS["random_1_40"]
    assert_matches_reference(chunk_start, with_conv(chunk_start.numel(), dtype=torch.float16), rel=1e-2)


def test_conv_fused_from_views_of_one_projection():
    """As the model calls it: x [b, L, g, h/g, p], B, C and dt [b, L, g, h/g] all views of one
    per-group projection [b, L, g, h/g*p + 2n + h/g]; the gradient reaches it through the views."""
    chunk_start = LAYOUTS["uniform_P8"]
    b, length, g, r, p, n = 2, chunk_start.numel(), 2, 2, 16, 16
    proj = torch.randn(b, length, g, r * p + 2 * n + r, requires_grad=True)
    params = {name: t for name, t in with_conv(length, b=b, h=g * r, p=p, g=g, n=n).items()
              if name not in ("x", "dt", "B", "C")}

    def split(fn, grouped: bool):
        x, B, C, dt = proj.split([r * p, n, n, r], dim=-1)
        x = x.unflatten(-1, (r, p))
        x, dt = (x, dt) if grouped else (x.flatten(2, 3), dt.flatten(2, 3))
        y = fn(x=x, dt=dt, B=B, C=C, **params)
        return y, torch.autograd.grad((y * torch.arange(y.numel()).view(y.shape).cos()).sum(), proj)[0]

    y, grad = split(fused_with_conv(tile_table(chunk_start)), grouped=True)
    y_ref, grad_ref = split(reference_with_conv(chunk_start), grouped=False)
    assert_close_to_scale(y, y_ref, 1e-4, "y")
    assert_close_to_scale(grad, grad_ref, 1e-4, "d/dproj")


def test_conv_width_is_checked_by_name():
    chunk_start = uniform(32, 8)
    inputs = with_conv(32, width=5)
    with pytest.raises(ValueError, match="model.ssm.conv"):
        fused_with_conv(tile_table(chunk_start))(**inputs)


# Compiles the kernels for Hopper (sm_90) without a GPU, as the model runs them (bf16 inputs, with and
# without the fused conv): Triton's code generator and ptxas check what its interpreter does not
# (loop-carried types, layouts).
_COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attamba.ops import ssm_triton as st

conv, tile = CASE
fp32 = {"A_ptr", "D_ptr", "dt_bias_ptr", "head_part_ptr"}
optional = {"dt_bias_ptr", "wx_ptr", "bx_ptr", "wB_ptr", "bB_ptr", "wC_ptr", "bC_ptr", "dwx_part_ptr", "dbx_part_ptr",
            "dwB_part_ptr", "dbB_part_ptr", "dwC_part_ptr", "dbC_part_ptr"}
constants = dict(P=32, N=32, TILE=tile, HEADS_PER_GROUP=8, WIDTH=4 if conv else 0)
for kernel, warps in ((st._ssd_fwd_kernel, st.WARPS[tile][0]), (st._ssd_bwd_kernel, st.WARPS[tile][1])):
    given = dict(constants)
    if not conv:
        given.update({name: None for name in optional if name in kernel.arg_names})
    signature = {}
    for name in kernel.arg_names:
        if name in given:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            is_fp32 = name in fp32 or name in optional or "part" in name
            table = name[:-4] in ("starts", "lengths", "chunk_id")
            signature[name] = "*i32" if table else "*fp32" if is_fp32 else "*bf16"
        else:
            signature[name] = "i32"
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=given), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=warps))
"""


@pytest.mark.parametrize("conv,tile", [(True, 16), (True, 32), (True, 64), (False, 16)])
def test_kernels_compile_for_hopper_without_a_gpu(conv, tile, compile_without_interpreter):
    compile_without_interpreter(_COMPILE_FOR_HOPPER.replace("CASE", repr((conv, tile))))


def test_traces_into_one_graph():
    chunk_start = LAYOUTS["uniform_P8"]
    table = tile_table(chunk_start)
    inputs = make_inputs(chunk_start.numel())
    weight = torch.randn(inputs["x"].shape)
    compiled = torch.compile(fused(table), fullgraph=True, backend="aot_eager")  # fullgraph: breaks raise
    y, grads = outputs_and_grads(compiled, inputs, weight)
    y_eager, grads_eager = outputs_and_grads(fused(table), inputs, weight)
    torch.testing.assert_close(y, y_eager)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_eager[name], msg=name)


def test_bad_sizes_name_the_setting():
    chunk_start = uniform(32, 8)
    table = tile_table(chunk_start)
    with pytest.raises(ValueError, match="model.ssm.hidden / model.ssm.heads"):
        chunk_local_ssd(**make_inputs(32, p=24), table=table)
    with pytest.raises(ValueError, match="model.ssm.state_dim"):
        chunk_local_ssd(**make_inputs(32, n=8), table=table)
    with pytest.raises(ValueError, match="tile table is for 32 tokens"):
        chunk_local_ssd(**make_inputs(40), table=table)


# ----------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_cuda_matches_reference(layout, dtype, rel):
    chunk_start = LAYOUTS[layout]
    inputs = make_inputs(chunk_start.numel(), h=8, p=32, n=32, device="cuda", dtype=dtype)
    assert_matches_reference(chunk_start, inputs, rel, device="cuda")


REAL_SIZE = dict(b=16, h=16, p=32, g=2, n=32, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_cuda_real_size_compiled(dtype, rel):
    """b=16, L=1024, 16 heads x 32, state 32, random chunks up to 63 long, under torch.compile."""
    chunk_start = random_lengths(1024, 63, seed=4)
    table = tile_table(chunk_start).to("cuda")
    inputs = make_inputs(1024, dtype=dtype, **REAL_SIZE)
    weight = torch.randn(inputs["x"].shape, device="cuda")
    compiled = torch.compile(fused(table), fullgraph=True)  # fullgraph: a graph break raises
    y, grads = outputs_and_grads(compiled, inputs, weight)
    as_fp32 = {name: t.float() for name, t in inputs.items()}
    y_ref, grads_ref = outputs_and_grads(reference(chunk_start), as_fp32, weight)
    assert_close_to_scale(y, y_ref, rel, "y")
    for name in grads:
        assert_close_to_scale(grads[name], grads_ref[name], rel, f"d/d{name}")


# ----------------------------------------------------------------------------- in the model


@pytest.mark.parametrize("strategy", ["cyclic", "random"])
def test_attamba_model_with_the_fused_scan_matches_the_reference(strategy):
    """The whole model through ssm.impl="tiled" (plans, strided projection views, K/V streams) vs the oracle."""
    import dataclasses

    from attamba.config import ChunkingConfig, ModelConfig, SSMConfig
    from attamba.models import build_model

    ssm = SSMConfig(state_dim=16, hidden=32, heads=2, conv=4, impl="reference")  # head dim 16: tl.dot's minimum
    config = ModelConfig(family="attamba", vocab_size=97, dim=32, n_layers=2, n_heads=2, ssm=ssm,
                         attn_impl="reference")
    chunking = ChunkingConfig(strategy=strategy, size=8, leading_tokens=2)
    torch.manual_seed(0)
    reference = build_model(config, chunking)
    fused_model = build_model(dataclasses.replace(config, ssm=dataclasses.replace(ssm, impl="tiled")), chunking)
    fused_model.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 97, (2, 90))
    assert fused_model.layers[0].mixer.plan(90, tokens.device).scan.impl == "tiled"
    expected, actual = reference(tokens), fused_model(tokens)
    expected.square().mean().backward()
    actual.square().mean().backward()
    assert_close_to_scale(actual, expected, 1e-4, "logits")
    for (name, p_ref), p_fused in zip(reference.named_parameters(), fused_model.parameters()):
        assert_close_to_scale(p_fused.grad, p_ref.grad, 1e-4, f"d/d{name}")
