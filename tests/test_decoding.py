"""Static-cache decoding: capacity, held vs allocated bytes, generate, and CUDA graphs (``-m gpu``)."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

from attamba import Generator, build_model
from attamba.config import ChunkingConfig, ModelConfig, SSMConfig
from attamba.inference import DEFAULT_MARGIN


def tiny(family: str, **model) -> ModelConfig:
    ssm = SSMConfig(state_dim=8, hidden=32, heads=4, conv=4)
    defaults = dict(vocab_size=97, dim=32, n_layers=3, n_heads=4, ssm=ssm)
    return ModelConfig(family=family, **{**defaults, **model})


def model_of(family: str, strategy: str = "cyclic", size: int = 4, lead: int = 2, **model):
    torch.manual_seed(0)
    return build_model(tiny(family, **model), ChunkingConfig(strategy=strategy, size=size, leading_tokens=lead)).eval()


def decode(gen: Generator, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of every position: the prompt's from prefill, then one step per token."""
    logits = [gen.prefill(tokens[:, :prompt])]
    logits += [gen.step(tokens[:, t:t + 1]) for t in range(prompt, tokens.shape[1])]
    return torch.cat(logits, 1)


@pytest.mark.parametrize("strategy", ["uniform", "cyclic", "random", "pseudo"])
@pytest.mark.parametrize("lead", [0, 3])
@pytest.mark.parametrize("size", [3, 8])
def test_a_full_capacity_decodes_like_the_forward(strategy, lead, size):
    """With no spare position, the chunk still open at the end writes to the scratch slot."""
    model = model_of("attamba", strategy, size=size, lead=lead)
    tokens = torch.randint(0, 97, (2, 29))
    gen = Generator(model, capacity=tokens.shape[1])
    assert (decode(gen, tokens, prompt=5) - model(tokens)).abs().max() <= 1e-4


@pytest.mark.parametrize("model_kwargs", [dict(window=4), dict(window=40), dict(n_kv_heads=1)])
def test_transformer_variants_decode_like_the_forward_at_full_capacity(model_kwargs):
    model = model_of("transformer", **model_kwargs)
    tokens = torch.randint(0, 97, (2, 29))
    gen = Generator(model, capacity=tokens.shape[1])
    assert (decode(gen, tokens, prompt=6) - model(tokens)).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["transformer", "attamba", "mamba2"])
def test_a_step_past_the_capacity_raises(family):
    gen = Generator(model_of(family), capacity=10)
    tokens = torch.randint(0, 97, (1, 11))
    gen.prefill(tokens[:, :8])
    gen.step(tokens[:, 8:9])
    gen.step(tokens[:, 9:10])
    with pytest.raises(ValueError, match="capacity"):
        gen.step(tokens[:, 10:11])
    with pytest.raises(ValueError, match="capacity"):
        gen.prefill(tokens)


def test_step_checks_its_input():
    gen = Generator(model_of("attamba"))
    with pytest.raises(RuntimeError, match="prefill"):
        gen.step(torch.zeros(2, 1, dtype=torch.long))
    gen.prefill(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        gen.step(torch.zeros(3, 1, dtype=torch.long))


@pytest.mark.parametrize("family,strategy", [("attamba", "uniform"), ("attamba", "random"), ("attamba", "pseudo"),
                                             ("transformer", "uniform"), ("mamba2", "uniform")])
def test_cache_bytes_count_what_is_held_whatever_the_capacity(family, strategy):
    tokens = torch.randint(0, 97, (1, 30))
    held = []
    for capacity in (30, 300):
        gen = Generator(model_of(family, strategy), capacity=capacity)
        decode(gen, tokens, prompt=7)
        held.append(gen.cache_bytes())
        assert gen.cache_bytes() <= gen.allocated_bytes()
    assert held[0] == held[1] > 0


def test_allocated_bytes_are_the_padded_slots_and_do_not_grow():
    size, lead, capacity = 4, 2, 40
    gen = Generator(model_of("attamba", "uniform", size=size, lead=lead), capacity=capacity)
    tokens = torch.randint(0, 97, (1, 12))
    gen.prefill(tokens[:, :5])
    allocated = gen.allocated_bytes()
    for t in range(5, 12):
        gen.step(tokens[:, t:t + 1])
        assert gen.allocated_bytes() == allocated
    # boundaries 0, 3, 7, ..., 39 (10), a scratch slot, a ring of lead + 1: 14 slots, padded to 16
    per_slot = 2 * 32 * 4  # K and V, dim 32, fp32
    states = 2 * 4 * 8 * 8 + 2 * (32 + 2 * 8) * 3  # scan + conv state of K and V
    assert allocated == 3 * (16 * per_slot + 4 * states)

    transformer = Generator(model_of("transformer"), capacity=capacity)
    transformer.prefill(tokens[:, :5])
    assert transformer.allocated_bytes() == 3 * 48 * per_slot  # 40 positions, padded to 48
    assert transformer.cache_bytes() == 3 * 5 * per_slot


def test_prefill_reserves_a_margin_by_default_and_generate_what_it_needs():
    model = model_of("transformer")
    gen = Generator(model)
    gen.prefill(torch.zeros(1, 5, dtype=torch.long))
    per_position = 3 * 2 * 32 * 4
    assert gen.allocated_bytes() == per_position * -(-(5 + DEFAULT_MARGIN) // 16) * 16
    gen.generate(torch.zeros(1, 5, dtype=torch.long), new_tokens=11)
    assert gen.allocated_bytes() == per_position * 16


@pytest.mark.parametrize("family", ["transformer", "attamba", "mamba2"])
def test_greedy_generate_follows_the_full_forward(family):
    model = model_of(family)
    prompt = torch.randint(0, 97, (2, 6))
    out = Generator(model).generate(prompt, new_tokens=12)
    sequence = prompt
    for _ in range(12):
        sequence = torch.cat([sequence, model(sequence)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, sequence[:, 6:])


def test_a_second_prefill_starts_a_fresh_sequence():
    model = model_of("attamba", "random", lead=3)
    tokens = torch.randint(0, 97, (2, 20))
    gen = Generator(model)
    decode(gen, torch.randint(0, 97, (2, 17)), prompt=9)
    assert (decode(gen, tokens, prompt=4) - model(tokens)).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- CUDA graphs (-m gpu)


def _timed_steps(gen: Generator, token: torch.Tensor, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        gen.step(token)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


@pytest.mark.gpu
@pytest.mark.parametrize("family,strategy,compile_step", [
    ("transformer", "uniform", False), ("attamba", "cyclic", False), ("attamba", "random", False),
    ("attamba", "pseudo", False), ("mamba2", "uniform", False),
    ("transformer", "uniform", True), ("attamba", "cyclic", True),
])
def test_cuda_graph_replays_match_eager_steps(family, strategy, compile_step):
    """The paper's model at 1K tokens of context, fp32: graph replays give the eager step's logits."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ssm = SSMConfig(state_dim=32, hidden=256, heads=8, conv=4)
    config = ModelConfig(family=family, vocab_size=32000, dim=512, n_layers=8, n_heads=8, ssm=ssm)
    torch.manual_seed(0)
    model = build_model(config, ChunkingConfig(strategy=strategy, size=8, leading_tokens=8)).cuda().eval()
    tokens = torch.randint(0, config.vocab_size, (4, 1024 + 40), device="cuda")
    eager = Generator(model)
    graphed = Generator(model, cuda_graph=True, compile_step=compile_step)
    eager_logits = decode(eager, tokens, prompt=1024)[:, 1024:]
    start = time.perf_counter()
    graphed.prefill(tokens[:, :1024], all_logits=False)  # captures (and compiles) the step
    torch.cuda.synchronize()
    setup_s = time.perf_counter() - start
    graphed_logits = torch.cat([graphed.step(tokens[:, t:t + 1]) for t in range(1024, tokens.shape[1])], 1)
    error = (graphed_logits - eager_logits).abs().max().item()
    token = tokens[:, -1:]  # both continue the same sequence, well within the default margin
    eager_ms, graph_ms = _timed_steps(eager, token, 30), _timed_steps(graphed, token, 30)
    print(f"\n[{family}-{strategy}, compile={compile_step}] max |graph - eager| {error:.1e}; step "
          f"{eager_ms:.2f} ms eager, {graph_ms:.2f} ms graph ({eager_ms / graph_ms:.1f}x); setup {setup_s:.1f} s")
    assert error <= (1e-3 if compile_step else 1e-5)  # compiled kernels sum in another order
    assert graphed.cache_bytes() == eager.cache_bytes()


@pytest.mark.gpu
def test_cuda_graph_generate_matches_eager_generate():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = model_of("attamba", "cyclic").cuda()
    prompt = torch.randint(0, 97, (3, 9), device="cuda")
    eager = Generator(model).generate(prompt, new_tokens=20)
    graphed = Generator(model, cuda_graph=True).generate(prompt, new_tokens=20)
    assert torch.equal(graphed, eager)


@pytest.mark.gpu
def test_decode_attention_backend_timings():
    """One decode attention of the paper model at 32K tokens, batch 16, bf16, per SDPA backend:
    the transformer's slots against Attamba's (P=8, 8 leading tokens). Near-HBM-bandwidth
    reads mean the transformer's decode is not handicapped by its attention kernel."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attamba.models.transformer import attend_cached

    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    q = torch.randn(16, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    for family, slots in [("transformer", 32768 + 64), ("attamba", 32768 // 8 + 16)]:
        k, v = (torch.randn(16, 8, slots, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        visible = torch.arange(slots, device="cuda") < slots - 5
        with sdpa_kernel(SDPBackend.MATH):
            expected = attend_cached(q, k, v, visible)
        report = []
        for backend in [*backends, None]:  # None: PyTorch's own pick
            with contextlib.nullcontext() if backend is None else sdpa_kernel([backend]):
                try:
                    out = attend_cached(q, k, v, visible)
                except RuntimeError:
                    report.append(f"{backend.name}: unsupported")
                    continue
                ms = _timed_ms(lambda: attend_cached(q, k, v, visible))
            name = "auto" if backend is None else backend.name
            report.append(f"{name} {ms:.3f} ms ({(k.nbytes + v.nbytes) / ms / 1e9:.2f} TB/s)")
            assert (out - expected).abs().max() < 2e-2
        print(f"\n[{family}, {slots} slots] " + "; ".join(report))


def _timed_ms(fn, repeats: int = 50) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def test_cuda_graph_needs_a_cuda_device():
    with pytest.raises(ValueError, match="CUDA"):
        Generator(model_of("transformer"), cuda_graph=True).prefill(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # raised inside torch.compile
def test_compiled_step_decodes_like_the_forward_without_recompiling():
    torch._dynamo.reset()
    model = model_of("attamba", "cyclic", lead=3, n_layers=1)  # one layer: compiles in seconds
    tokens = torch.randint(0, 97, (2, 16))
    with torch._dynamo.config.patch(error_on_recompile=True):
        gen = Generator(model, capacity=16, compile_step=True)
        assert (decode(gen, tokens, prompt=5) - model(tokens)).abs().max() <= 1e-4
