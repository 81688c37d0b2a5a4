"""The three families end to end on CPU: causality, decoding == forward, cache growth."""

import dataclasses
import re
import subprocess
import sys

import pytest
import torch

import attamba
from attamba import Generator, NextTokenLoss, build_model
from attamba.config import ChunkingConfig, Config, ModelConfig, SSMConfig
from conftest import README

STRATEGIES = ["uniform", "cyclic", "random", "pseudo"]


def tiny(family: str, **model) -> ModelConfig:
    ssm = SSMConfig(state_dim=8, hidden=32, heads=4, conv=model.pop("conv", 4))
    return ModelConfig(family=family, vocab_size=97, dim=32, n_layers=3, n_heads=4, ssm=ssm, **model)


def model_of(family: str, strategy: str = "cyclic", size: int = 4, lead: int = 2, **model):
    torch.manual_seed(0)
    net = build_model(tiny(family, **model), ChunkingConfig(strategy=strategy, size=size, leading_tokens=lead))
    return net.eval()


CASES = (
    [("attamba", dict(strategy=s)) for s in STRATEGIES]
    + [("attamba", dict(lead=0)), ("attamba", dict(size=1)), ("attamba", dict(kv_residual=False)),
       ("attamba", dict(kv_proj=True)), ("attamba", dict(conv=0)), ("attamba", dict(size=5, lead=3))]
    + [("transformer", {}), ("transformer", dict(n_kv_heads=2)), ("transformer", dict(attn_dim=16)),
       ("transformer", dict(window=5)), ("mamba2", {})]
)
IDS = [f"{family}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for family, kw in CASES]


@pytest.mark.parametrize("family,kwargs", CASES, ids=IDS)
def test_changing_token_t_never_changes_earlier_logits(family, kwargs):
    model = model_of(family, **kwargs)
    tokens = torch.randint(0, 97, (2, 23))
    base = model(tokens)
    assert base.shape == (2, 23, 97)
    for t in (0, 6, 11, 22):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("family,kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("prompt", [1, 7, 8, 9])
def test_prefill_then_step_equals_full_forward(family, kwargs, prompt):
    model = model_of(family, **kwargs)
    tokens = torch.randint(0, 97, (2, 21))
    full = model(tokens)
    gen = Generator(model)
    decoded = [gen.prefill(tokens[:, :prompt])]
    for t in range(prompt, tokens.shape[1]):
        decoded.append(gen.step(tokens[:, t:t + 1]))
    assert (torch.cat(decoded, 1) - full).abs().max() <= 1e-4


def cache_sizes(model, lengths):
    gen = Generator(model)
    tokens = torch.randint(0, 97, (1, max(lengths)))
    gen.prefill(tokens[:, :1])
    sizes = {1: gen.cache_bytes()}
    for t in range(1, max(lengths)):
        gen.step(tokens[:, t:t + 1])
        sizes[t + 1] = gen.cache_bytes()
    return [sizes[n] for n in lengths]


def test_attamba_cache_grows_like_l_over_p_plus_leading_tokens():
    size, lead, dim, layers = 4, 2, 32, 3
    model = model_of("attamba", strategy="uniform", size=size, lead=lead)
    a, b = cache_sizes(model, [40, 80])
    per_key = 2 * dim * 4 * layers  # K and V, fp32, all layers
    # 40 more tokens add 10 boundaries per layer; the ring and SSM state are constant
    assert b - a == (40 // size) * per_key
    # at 40 tokens: boundaries 0, 3, 7, ..., 39 (11) + a ring of 2; the running state of K and V:
    ssm_state = 2 * 4 * 8 * 8  # streams × heads × head_dim × state
    conv_state = 2 * (32 + 2 * 8) * 3  # streams × [x, B, C] channels × (conv - 1)
    assert a == (11 + lead) * per_key + layers * 4 * (ssm_state + conv_state)


def test_transformer_cache_grows_like_l_and_window_caps_it():
    full = model_of("transformer")
    a, b = cache_sizes(full, [30, 60])
    per_key = 2 * 32 * 4 * 3
    assert (a, b) == (30 * per_key, 60 * per_key)
    windowed = model_of("transformer", window=5)
    assert cache_sizes(windowed, [3, 30, 60]) == [3 * per_key, 4 * per_key, 4 * per_key]


def test_mamba2_cache_is_constant():
    a, b = cache_sizes(model_of("mamba2"), [10, 50])
    assert a == b > 0


def test_public_api_composes_conf_and_builds():
    config = attamba.load_config(["model.dim=64", "model.n_layers=2", "model.vocab_size=50",
                                  "chunking=uniform", "chunking.size=4", "model.ssm.hidden=64"])
    assert isinstance(config, Config) and config.chunking.strategy == "uniform"
    model = attamba.build_model(config)
    tokens = torch.randint(0, 50, (1, 9))
    assert model(tokens).shape == (1, 9, 50)
    loss = attamba.NextTokenLoss(model)(tokens[:, :-1], tokens[:, 1:])
    assert loss.shape == () and loss.requires_grad
    for family in ("transformer", "mamba2"):
        assert attamba.load_config([f"model={family}"]).model.family == family


@pytest.mark.parametrize("override,setting", [
    (["chunking.size=0"], "chunking.size"),
    (["chunking.leading_tokens=-1"], "chunking.leading_tokens"),
    (["model.n_heads=7"], "model.n_heads"),
    (["model=transformer", "model.attn_dim=100"], "model.attn_dim"),
    (["chunking.strategy=diagonal"], "chunking.strategy"),
    (["model.family=rnn"], "model.family"),
    (["model.ssm.impl=cuda"], "model.ssm.impl"),
    (["train.seq_len=4", "chunking.size=8"], "train.seq_len"),
    (["train.compile_mode=fast"], "train.compile_mode"),
])
def test_bad_settings_raise_value_error_naming_the_setting(override, setting):
    with pytest.raises(ValueError, match=setting):
        attamba.load_config(override)


def test_init_follows_the_paper():
    model = model_of("attamba")
    ssm = model.layers[0].mixer.kv_ssm
    a = torch.exp(ssm.A_log)
    assert a.min() >= 0.01 and a.max() <= 2.0  # A_log = log U(0.01, 2)
    std = 32 ** -0.5
    assert model.tok_embeddings.weight.abs().max() <= 3 * std + 1e-6  # truncated at 3 std
    deep, shallow = model.layers[2].mixer.wo.weight.std(), model.layers[0].mixer.wo.weight.std()
    assert deep < shallow  # depth-scaled output projections


@pytest.mark.parametrize("strategy", ["uniform", "cyclic", "random"])
@pytest.mark.parametrize("attn_impl", ["flash", "fused"])
def test_fast_attention_paths_match_the_reference_in_the_model(strategy, attn_impl):
    """The phase-folded decomposition (dense form on CPU) and the fused kernels (Triton's interpreter
    on CPU, heads of 8 padded to their 16-wide tiles) inside the whole model, forward and backward."""
    models = {impl: model_of("attamba", strategy=strategy, size=4, lead=3, attn_impl=impl)
              for impl in ("reference", attn_impl)}
    tokens = torch.randint(0, 97, (2, 37))
    logits = {impl: model(tokens) for impl, model in models.items()}
    torch.testing.assert_close(logits[attn_impl], logits["reference"], atol=1e-5, rtol=1e-5)
    for impl in models:
        logits[impl].square().mean().backward()
    for (name, fast), slow in zip(models[attn_impl].named_parameters(), models["reference"].parameters()):
        torch.testing.assert_close(fast.grad, slow.grad, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("strategy", ["cyclic", "random"])
def test_tiled_scan_with_its_fused_conv_matches_the_reference_in_the_model(strategy):
    """``ssm.impl=tiled`` (Triton's interpreter on CPU), whose kernels also run the chunked conv and dt's
    softplus from the projection, inside the whole model, forward and backward."""
    ssm = SSMConfig(state_dim=16, hidden=32, heads=2, conv=4)  # widths of 16: the kernels' tl.dot minimum
    models = {}
    for impl in ("reference", "tiled"):
        torch.manual_seed(0)
        config = dataclasses.replace(tiny("attamba"), ssm=dataclasses.replace(ssm, impl=impl))
        models[impl] = build_model(config, ChunkingConfig(strategy=strategy, size=4, leading_tokens=3))
    tokens = torch.randint(0, 97, (2, 37))
    logits = {impl: model(tokens) for impl, model in models.items()}
    torch.testing.assert_close(logits["tiled"], logits["reference"], atol=1e-5, rtol=1e-5)
    for impl in models:
        logits[impl].square().mean().backward()
    for (name, fast), slow in zip(models["tiled"].named_parameters(), models["reference"].parameters()):
        torch.testing.assert_close(fast.grad, slow.grad, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["cyclic", "random"])
@pytest.mark.parametrize("ssm_impl", ["auto", "triton", "tiled"])
@pytest.mark.parametrize("attn_impl", ["flash", "flex", "fused"])
def test_cuda_fast_paths_match_the_cpu_reference_forward_and_backward(strategy, ssm_impl, attn_impl):
    """The whole model with each fast attention and CUDA scan against the plain-PyTorch oracle."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from attamba.ops.ssm import triton_available

    if ssm_impl == "triton" and not triton_available():
        pytest.skip("mamba_ssm's Triton kernels are not importable")
    torch.manual_seed(0)
    # head dims 16: FlexAttention's and the fused scan's minimum (tl.dot)
    config = dataclasses.replace(tiny("attamba"), n_heads=2, ssm=SSMConfig(state_dim=16, hidden=32, heads=2, conv=4))
    reference_cfg = dataclasses.replace(config, attn_impl="reference",
                                        ssm=dataclasses.replace(config.ssm, impl="reference"))
    fast_cfg = dataclasses.replace(config, attn_impl=attn_impl, ssm=dataclasses.replace(config.ssm, impl=ssm_impl))
    chunking = ChunkingConfig(strategy=strategy, size=8, leading_tokens=4)
    reference = build_model(reference_cfg, chunking)
    fast = build_model(fast_cfg, chunking).cuda()
    fast.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 97, (2, 300))
    ref_logits, fast_logits = reference(tokens), fast(tokens.cuda())
    ref_logits.square().mean().backward()
    fast_logits.square().mean().backward()
    forward_err = (fast_logits.cpu() - ref_logits).abs().max().item()
    grad_err = max((pf.grad.cpu() - pr.grad).abs().max().item() / (pr.grad.abs().max().item() + 1e-12)
                   for pf, pr in zip(fast.parameters(), reference.parameters()))
    print(f"\n[{strategy}, ssm={ssm_impl}, attn={attn_impl}] max |logits diff| {forward_err:.2e}, "
          f"max relative grad diff {grad_err:.2e}")
    assert forward_err < 1e-3 and grad_err < 1e-2


COMPILED_GRADIENT_CASES = [
    ("cpu", "flash", "auto"),
    ("cpu", "fused", "auto"),
    pytest.param("cuda", "flash", "auto", marks=pytest.mark.gpu),
    pytest.param("cuda", "fused", "auto", marks=pytest.mark.gpu),
    pytest.param("cuda", "flex", "auto", marks=pytest.mark.gpu),
    pytest.param("cuda", "flash", "triton", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("device,attn_impl,ssm_impl", COMPILED_GRADIENT_CASES)
def test_compiled_model_trains_with_the_eager_gradients(device, attn_impl, ssm_impl):
    """torch.compile of the whole model and its loss, as the trainer runs it (bf16 autocast on CUDA), against eager.

    torch 2.11 once compiled the flash path's traced autograd.Function with a zero gradient
    for its output: the loss matched, and attention silently stopped learning.
    """
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    ssm = SSMConfig(state_dim=16, hidden=64, heads=4, conv=4, impl=ssm_impl)
    config = ModelConfig(family="attamba", vocab_size=97, dim=64, n_layers=1, n_heads=4, ssm=ssm,
                         attn_impl=attn_impl)
    model = build_model(config, ChunkingConfig(strategy="cyclic", size=8, leading_tokens=4)).to(device)
    tokens = torch.randint(0, 97, (2, 257), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def gradients(loss_of) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_of(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        return {name: p.grad.float().clone() for name, p in model.named_parameters()}

    eager = gradients(NextTokenLoss(model))
    compiled = gradients(torch.compile(NextTokenLoss(model)))
    errors = {name: ((compiled[name] - grad).norm() / grad.norm()).item() for name, grad in eager.items()}
    worst = max(errors, key=errors.get)
    # bf16 rounding differs between the compiled and eager kernels; a lost gradient path errs by ~1
    assert errors[worst] < (0.1 if device == "cuda" else 1e-3), f"{worst}: relative error {errors[worst]:.3g}"


def test_the_readme_python_example_runs_as_printed():
    """The README's "Use it from Python" block, run as a script: the API it shows is the API we have."""
    readme = README.read_text()
    (example,) = re.findall(r"## Use it from Python\n\n```python\n(.*?)```", readme, re.S)
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip()) > 0  # the cache's bytes
