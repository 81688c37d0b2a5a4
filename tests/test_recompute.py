"""model.ssm.recompute: the SSM block keeps only its input for the backward and runs again there."""

import dataclasses

import pytest
import torch

import attamba
from attamba import Generator, build_model
from attamba.config import ChunkingConfig
from attamba.models import mamba2

from test_models import tiny

FAMILIES = ["attamba", "mamba2"]  # both run SSMBlock: Attamba for K/V, mamba2 as the mixer


def pair(family: str, n_layers: int = 3, **ssm) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same weights built with recompute off and on."""
    models = []
    for recompute in (False, True):
        config = dataclasses.replace(tiny(family), n_layers=n_layers)
        config = dataclasses.replace(config, ssm=dataclasses.replace(config.ssm, recompute=recompute, **ssm))
        models.append(build_model(config, ChunkingConfig(strategy="cyclic", size=4, leading_tokens=2)))
    models[1].load_state_dict(models[0].state_dict())
    return models[0], models[1]


def loss_and_grads(model, tokens) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    logits = model(tokens)
    loss = logits.square().mean()
    loss.backward()
    return logits.detach(), loss.detach(), [p.grad for p in model.parameters()]


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def assert_same(got, want, atol: float, rtol: float) -> None:
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = got, want
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=rtol)
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol)
    for index, (grad, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        assert grad is not None and ref is not None
        torch.testing.assert_close(grad, ref, atol=atol, rtol=rtol, msg=lambda m, i=index: f"parameter {i}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_recompute_gives_the_same_logits_and_gradients(family):
    plain, recomputed = pair(family)
    tokens = torch.randint(0, 97, (2, 37))
    # the same ops run again on the same inputs: equal up to the order gradients are summed in
    assert_same(loss_and_grads(recomputed, tokens), loss_and_grads(plain, tokens), atol=1e-7, rtol=1e-6)


def test_recompute_keeps_only_the_block_input():
    plain, recomputed = pair("attamba")
    tokens = torch.randint(0, 97, (2, 64))
    u = torch.randn(2, 64, 32, requires_grad=True)
    blocks = {}
    for name, model in (("off", plain), ("on", recomputed)):
        mixer = model.layers[0].mixer
        plan = mixer.plan(64, u.device).scan
        blocks[name] = saved_bytes(lambda: mixer.kv_ssm(u, plan))
    assert blocks["on"] == u.nbytes  # the input, and nothing the block computes from it
    assert blocks["off"] > 10 * u.nbytes  # the scan's inputs and internals of two streams

    whole = {name: saved_bytes(lambda: model(tokens)) for name, model in (("off", plain), ("on", recomputed))}
    # tiny: ~8.4 KB per token per layer off, ~6.8 KB on (the FFN, attention and logits are still kept)
    assert whole["on"] <= 0.85 * whole["off"]
    assert whole["off"] - whole["on"] >= 3 * (blocks["off"] - blocks["on"]) * 0.9  # what each layer's block held


def test_recompute_only_where_a_backward_will_follow(monkeypatch):
    """No grad and prefill (which returns the state) take the plain path; weights alone needing grad do not."""
    calls = []  # whole-block recomputations (the conv and gated norm always rerun: see below)
    checkpoint = mamba2.checkpoint

    def counted(fn, *args, **kwargs):
        if fn.__name__ == "_forward":
            calls.append(1)
        return checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(mamba2, "checkpoint", counted)
    plain, recomputed = pair("attamba", n_layers=1)
    block, plan = recomputed.layers[0].mixer.kv_ssm, recomputed.layers[0].mixer.plan(9, torch.device("cpu")).scan
    u = torch.randn(1, 9, 32)
    with torch.no_grad():
        block(u.requires_grad_(), plan)
    block(u.requires_grad_(), plan, return_state=True)
    assert calls == []
    block(u, plan)
    block(u.detach(), plan)  # e.g. frozen embeddings: the block's own weights still need their activations
    assert calls == [1, 1]

    tokens = torch.randint(0, 97, (2, 13))
    gen = Generator(recomputed)
    decoded = [gen.prefill(tokens[:, :5])] + [gen.step(tokens[:, t:t + 1]) for t in range(5, 13)]
    torch.testing.assert_close(torch.cat(decoded, 1), plain(tokens), atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # raised inside torch.compile
def test_compiled_recompute_matches_eager():
    """Inductor traces the checkpoint (one layer, CPU's default scan: ~50 s cold, ~6 s with its cache warm)."""
    torch._dynamo.reset()
    plain, recomputed = pair("attamba", n_layers=1)
    tokens = torch.randint(0, 97, (2, 24))
    eager_on, eager_off = saved_bytes(lambda: recomputed(tokens)), saved_bytes(lambda: plain(tokens))
    compiled = torch.compile(recomputed)
    results = {}
    compiled_on = saved_bytes(lambda: results.update(on=loss_and_grads(compiled, tokens)))
    assert_same(results["on"], loss_and_grads(plain, tokens), atol=1e-5, rtol=1e-4)  # fused kernels round differently
    # The partitioner honours the checkpoint: it keeps less than eager recompute does (~0.91 of it),
    # while a compiled forward without recompute keeps more (~1.26 of it).
    assert compiled_on <= eager_on < eager_off


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # raised inside torch.compile
def test_compiled_block_reruns_its_projection_conv_and_gated_norm_in_the_backward(monkeypatch):
    """Always on (mamba_ssm's checkpoint_lvl=1, and the input projection too): none of their outputs is kept.

    Compared with the same block compiled keeping them; the gradients are the same to bf16 rounding.
    """
    plain, _ = pair("attamba", n_layers=1)
    block, plan = plain.layers[0].mixer.kv_ssm, plain.layers[0].mixer.plan(128, torch.device("cpu")).scan
    u = torch.randn(2, 128, 32, requires_grad=True)
    kept, grads = {}, {}
    for rerun in (True, False):
        if not rerun:
            monkeypatch.setattr(mamba2, "_rerun_in_backward", lambda fn, *args: fn(*args))
        torch._dynamo.reset()
        compiled = torch.compile(block)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kept[rerun] = saved_bytes(lambda: grads.update({rerun: torch.autograd.grad(
                compiled(u, plan).float().square().sum(), [u, *block.parameters()])}))
    for got, want in zip(grads[True], grads[False], strict=True):
        # Inductor fuses the two graphs differently, so a bf16 rounding may land elsewhere: on some CPUs
        # the gradients are bitwise equal, on others they differ by up to ~1e-3 of their largest element.
        torch.testing.assert_close(got, want, atol=2 ** -8 * want.abs().max().item(), rtol=0)
    projection_output = 2 * block.proj_width * block.streams  # bf16 bytes per token
    # Kept less per token: 368 bytes here, more than the projection's output (336; rerunning only the
    # conv and the norm saved 250); 2.4 KB per layer at the paper's sizes (counted on CPU, compiled model).
    assert kept[False] - kept[True] >= projection_output * u.shape[0] * u.shape[1]


def test_recompute_is_a_config_switch():
    assert attamba.load_config().model.ssm.recompute is False
    assert attamba.load_config(["model.ssm.recompute=true"]).model.ssm.recompute is True
    assert attamba.load_config(["model=mamba2", "model.ssm.recompute=true"]).model.ssm.recompute is True
