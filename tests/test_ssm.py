"""The chunk-reset selective scan: every path against a brute-force loop over the recurrence."""

from __future__ import annotations

import pytest
import torch

from attamba.ops.ssm import chunk_scan, select_impl, ssm_step, triton_available

TORCH_IMPLS = ("reference", "blockdiag", "ssd")


def starts_at(length: int, positions) -> torch.Tensor:
    chunk_start = torch.zeros(length, dtype=torch.bool)
    chunk_start[list(positions)] = True
    return chunk_start


def uniform(length: int, size: int) -> torch.Tensor:
    return starts_at(length, range(0, length, size))


def random_layout(length: int, mean: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(length, generator=gen) < 1 / mean) | starts_at(length, [0])


LAYOUTS = {
    "uniform_P1": uniform(20, 1),
    "uniform_P3": uniform(40, 3),  # L not a multiple of P
    "uniform_P8": uniform(64, 8),
    "shifted_P8": starts_at(50, [0, *range(5, 50, 8)]),  # cyclic-like: short first chunk
    "random": random_layout(70, 6, seed=1),
    "no_resets": starts_at(100, [0]),  # a pure SSM LM: two SSD blocks, the second padded
    "shorter_than_P": uniform(5, 8),
    "long_chunks": starts_at(130, [0, 10, 70, 71, 95]),  # chunks across SSD block edges
    "start_on_block_edge": starts_at(130, [0, 64, 65, 128]),
}


def make_inputs(length: int, b=2, h=4, p=8, n=16, g=2, device="cpu", dtype=torch.float32):
    """Random scan inputs with Mamba-like ranges: dt = softplus(·) > 0, A = -exp(A_log) < 0."""
    kw = dict(device=device, dtype=torch.float32)
    return dict(
        x=torch.randn(b, length, h, p, **kw).to(dtype),
        dt=torch.nn.functional.softplus(torch.randn(b, length, h, **kw) - 1.0),
        A=-torch.empty(h, **kw).uniform_(0.01, 2.0),
        B=torch.randn(b, length, g, n, **kw).to(dtype),
        C=torch.randn(b, length, g, n, **kw).to(dtype),
        D=torch.randn(h, **kw),
    )


def brute_force(x, dt, A, B, C, D, chunk_start):
    """The recurrence written out token by token, per head, independently of the library."""
    b, length, h, p = x.shape
    group = torch.arange(h) // (h // B.shape[2])
    state = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(length):
        if chunk_start[t]:
            state = torch.zeros_like(state)
        decay = torch.exp(dt[:, t] * A)  # [b, h]
        inject = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, group, None, :]
        state = decay[..., None, None] * state + inject
        ys.append((state * C[:, t, group, None, :]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1), state


def as_double(inputs: dict) -> dict:
    return {name: t.double() for name, t in inputs.items()}


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """Max error at most `rel` times the largest |expected|: fp32 rounding grows with magnitude."""
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rel * scale, f"{what}: max error {error:.2e} > {rel:.0e} x max |expected| {scale:.2e}"


def leaves(inputs: dict) -> dict:
    return {name: t.detach().clone().requires_grad_(True) for name, t in inputs.items()}


def loss_and_grads(fn, inputs: dict, weights: tuple[torch.Tensor, torch.Tensor]):
    """Outputs, final state and gradients of a weighted sum of both w.r.t. every input."""
    params = leaves(inputs)
    y, state = fn(**params)
    loss = (y * weights[0]).sum() + (state * weights[1]).sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    return y.detach(), state.detach(), dict(zip(params, grads))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", TORCH_IMPLS)
@pytest.mark.parametrize("groups", [1, 2])
def test_paths_match_brute_force_forward_and_backward(impl, layout, groups):
    chunk_start = LAYOUTS[layout]
    inputs = make_inputs(chunk_start.numel(), g=groups)
    weights = (torch.randn_like(inputs["x"]), torch.randn(2, 4, 8, 16))

    def ours(**t):
        return chunk_scan(chunk_start=chunk_start, impl=impl, return_final_state=True, **t)

    def oracle(**t):
        return brute_force(chunk_start=chunk_start, **t)

    y, state, grads = loss_and_grads(ours, inputs, weights)
    exact = loss_and_grads(oracle, as_double(inputs), tuple(w.double() for w in weights))
    assert_close_to_scale(y, exact[0], 1e-5, "y")
    assert_close_to_scale(state, exact[1], 1e-5, "final state")
    for name in inputs:  # a gradient sums over the whole sequence: a little more rounding
        assert_close_to_scale(grads[name], exact[2][name], 2e-5, f"d/d{name}")


@pytest.mark.parametrize("impl", TORCH_IMPLS)
def test_reset_isolates_chunks(impl):
    chunk_start = LAYOUTS["long_chunks"]  # chunks [0,10) [10,70) [70,71) [71,95) [95,130)
    inputs = make_inputs(chunk_start.numel())
    inputs["A"] = torch.full_like(inputs["A"], -0.01)  # slow decay: the poke stays visible in fp32
    y = chunk_scan(chunk_start=chunk_start, impl=impl, **inputs)
    poked = dict(inputs, x=inputs["x"].clone())
    poked["x"][:, 40] += 1.0  # inside chunk [10, 70)
    y_poked = chunk_scan(chunk_start=chunk_start, impl=impl, **poked)
    change = (y - y_poked).abs().amax(dim=(0, 2, 3))  # per token
    assert change[:40].eq(0).all()  # causal
    assert change[40:70].gt(1e-3).all()  # the rest of its own chunk
    assert change[70:].eq(0).all()  # later chunks see nothing of it


@pytest.mark.parametrize("impl", TORCH_IMPLS)
@pytest.mark.parametrize("split", [30, 70, 71], ids=["inside_chunk", "at_chunk_end", "one_token_chunk"])
def test_prefill_then_steps_equals_full_scan(impl, split):
    chunk_start = LAYOUTS["long_chunks"]
    inputs = make_inputs(chunk_start.numel())
    y_full = chunk_scan(chunk_start=chunk_start, impl=impl, **inputs)
    head = {k: v[:, :split] if v.dim() > 1 else v for k, v in inputs.items()}
    y_head, state = chunk_scan(chunk_start=chunk_start[:split], impl=impl, return_final_state=True, **head)
    steps = []
    for t in range(split, chunk_start.numel()):
        if chunk_start[t]:
            state = torch.zeros_like(state)
        y_t, state = ssm_step(state, inputs["x"][:, t], inputs["dt"][:, t], inputs["A"],
                              inputs["B"][:, t], inputs["C"][:, t], inputs["D"])
        steps.append(y_t)
    torch.testing.assert_close(torch.cat([y_head, torch.stack(steps, 1)], 1), y_full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", TORCH_IMPLS)
def test_low_precision_inputs_return_their_dtype(impl):
    chunk_start = uniform(48, 8)
    inputs = make_inputs(48, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = chunk_scan(chunk_start=chunk_start, impl=impl, **inputs)
    exact, _ = brute_force(**{k: v.float() for k, v in inputs.items()}, chunk_start=chunk_start)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), exact, atol=2e-2, rtol=2e-2)


def test_select_impl_choices():
    short, long, pure, tiny = uniform(256, 8), uniform(256, 100), starts_at(256, [0]), starts_at(32, [0])
    assert select_impl("cpu", short) == "blockdiag"
    assert select_impl("cpu", long) == "ssd"
    assert select_impl("cpu", pure) == "ssd"
    assert select_impl("cpu", tiny) == "blockdiag"
    assert select_impl("cuda", short, triton=True) == "blockdiag"
    assert select_impl("cuda", long, triton=True) == "triton"
    assert select_impl("cuda", pure, triton=True) == "triton"
    assert select_impl("cuda", tiny, triton=True) == "triton"
    assert select_impl("cuda", long, triton=False) == "ssd"
    assert select_impl("cpu", long, triton=True) == "ssd"  # Triton has no CPU driver
    assert select_impl("cpu", short, "ssd") == "ssd"


def test_bad_impl_names_the_setting():
    inputs = make_inputs(16)
    with pytest.raises(ValueError, match="model.ssm.impl"):
        chunk_scan(chunk_start=uniform(16, 4), impl="fast", **inputs)
    with pytest.raises(ValueError, match="model.ssm.impl.*CUDA"):
        chunk_scan(chunk_start=uniform(16, 4), impl="triton", **inputs)


def test_bad_shapes_are_value_errors():
    inputs = make_inputs(16)
    with pytest.raises(ValueError, match="chunk_start"):
        chunk_scan(chunk_start=uniform(15, 4), **inputs)
    with pytest.raises(ValueError, match="B must be"):
        three_groups = torch.randn(2, 16, 3, 16)  # 3 groups cannot share 4 heads
        chunk_scan(chunk_start=uniform(16, 4), **dict(inputs, B=three_groups, C=three_groups))


# ----------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(not triton_available(), reason="needs CUDA and mamba_ssm's Triton kernels")
GPU_LAYOUTS = {
    "uniform_P8": uniform(512, 8),
    "shifted_P64": starts_at(512, [0, *range(40, 512, 64)]),
    "random": random_layout(512, 16, seed=2),
    "long_chunks": starts_at(512, [0, 100, 300, 301]),
    "no_resets": starts_at(512, [0]),
}


def gpu_case(layout: str, dtype: torch.dtype):
    chunk_start = GPU_LAYOUTS[layout]
    inputs = make_inputs(chunk_start.numel(), b=2, h=8, p=32, n=32, g=1, device="cuda", dtype=dtype)
    weights = (torch.randn_like(inputs["x"], dtype=torch.float32), torch.randn(2, 8, 32, 32, device="cuda"))
    return chunk_start, inputs, weights


def assert_matches_reference(impl_fn, layout: str, dtype: torch.dtype, tol: float):
    """Forward, final state and input gradients of impl_fn vs the reference path on the GPU."""
    chunk_start, inputs, weights = gpu_case(layout, dtype)
    y, state, grads = loss_and_grads(impl_fn(chunk_start), inputs, weights)
    fp32 = {k: v.float() for k, v in inputs.items()}
    ref = lambda **t: chunk_scan(chunk_start=chunk_start, impl="reference", return_final_state=True, **t)  # noqa: E731
    y_ref, state_ref, grads_ref = loss_and_grads(ref, fp32, weights)
    scale = lambda t: t.abs().max().item()  # noqa: E731  (bf16 errors scale with magnitude)
    torch.testing.assert_close(y.float(), y_ref, atol=tol * scale(y_ref), rtol=tol)
    torch.testing.assert_close(state, state_ref, atol=tol * scale(state_ref), rtol=tol)
    for name in inputs:
        torch.testing.assert_close(grads[name].float(), grads_ref[name], atol=tol * scale(grads_ref[name]),
                                   rtol=tol, msg=name)


def scan_fn(impl: str, compiled: bool = False):
    def bind(chunk_start):
        fn = lambda **t: chunk_scan(chunk_start=chunk_start, impl=impl, return_final_state=True, **t)  # noqa: E731
        return torch.compile(fn) if compiled else fn
    return bind


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_triton_matches_reference(layout, dtype, tol):
    assert_matches_reference(scan_fn("triton"), layout, dtype, tol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["uniform_P8", "shifted_P64", "random"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_blockdiag_on_cuda_matches_reference(layout, compiled):
    assert_matches_reference(scan_fn("blockdiag", compiled), layout, torch.float32, 1e-4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
def test_ssd_on_cuda_matches_reference(layout):
    assert_matches_reference(scan_fn("ssd"), layout, torch.float32, 1e-4)


def test_fused_scan_off_cuda_names_the_setting(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="model.ssm.impl='tiled' needs a CUDA device"):
        chunk_scan(chunk_start=uniform(16, 4), impl="tiled", **make_inputs(16))
