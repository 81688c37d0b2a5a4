"""Costs from the config alone, checked against hand arithmetic, brute force and the real modules.

The tiny config used throughout (``tiny()``): vocab V=32, dim d=16, 2 layers,
2 heads (head_dim 8), ffn_dim 48 (int(2*4*16/3)=42 rounded up to a multiple of 8),
SSM hidden Hs=8 in Hh=2 heads, state N=4, conv c=4.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attamba.accounting import (
    Match,
    attended_keys,
    attention_flops_per_token,
    flops_per_token,
    kv_bytes_per_token,
    kv_cache_bytes,
    kv_cache_entries,
    match_attn_dim,
    matmul_params,
    param_count,
    ssm_flops_per_token,
    state_bytes,
    transformer_baseline,
)
from attamba.config import ChunkingConfig, Config, ModelConfig, SSMConfig
from attamba.inference import Generator
from attamba.models import build_model
from attamba.ops.chunking import boundary_mask


def tiny(family: str = "attamba", **overrides) -> ModelConfig:
    ssm = SSMConfig(state_dim=4, hidden=8, heads=2, conv=overrides.pop("conv", 4))
    return ModelConfig(family=family, vocab_size=32, dim=16, n_layers=2, n_heads=2, ffn_multiple_of=8,
                       ssm=ssm, **overrides)


def chunks(strategy: str = "uniform", size: int = 4, lead: int = 2, seed: int = 0) -> ChunkingConfig:
    return ChunkingConfig(strategy=strategy, size=size, leading_tokens=lead, seed=seed)


def paper(**overrides) -> ModelConfig:
    return ModelConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, **overrides)


# ----------------------------------------------------------------------------- parameters

# Shared by every family: embedding 32*16 = 512, output head 16*32 = 512, final norm 16;
# per layer two norms 2*16 = 32 and SwiGLU 3*16*48 = 2304.
SHELL = 512 + 512 + 16
LAYER_SHELL = 32 + 2304


def test_tiny_config_is_what_the_comments_assume():
    model = tiny()
    assert (model.ffn_dim, model.head_dim, model.ssm.head_dim) == (48, 8, 4)


def test_params_attamba_by_hand():
    # wq 16*16 = 256, wo 256.
    # K/V SSMs, S=2: in_proj 2*(2*8 + 2*4 + 2)*16 = 2*26*16 = 832; conv weight 2*(8+2*4)*4 = 128,
    # conv bias 2*16 = 32; dt_bias, A_log, D 3*2*2 = 12; norm 2*8 = 16; out_proj 2*16*8 = 256
    # -> 832 + 128 + 32 + 12 + 16 + 256 = 1276.
    layer = LAYER_SHELL + 256 + 256 + 1276  # 4124
    assert param_count(tiny()) == SHELL + 2 * layer == 9288


def test_params_attamba_kv_proj_adds_wkv():
    # wkv: 16 -> 2*16, 512 weights per layer, 2 layers.
    assert param_count(tiny(kv_proj=True)) == 9288 + 2 * 512 == 10312


def test_params_attamba_without_conv():
    # Drops conv weight 128 + conv bias 32 per layer.
    assert param_count(tiny(conv=0)) == 9288 - 2 * 160 == 8968


def test_params_transformer_by_hand():
    # wq, wk, wv, wo: 4 * 16*16 = 1024 per layer.
    assert param_count(tiny("transformer")) == SHELL + 2 * (LAYER_SHELL + 1024) == 7760


def test_params_transformer_gqa():
    # One kv head of 8: wq 256, wk 16*8 = 128, wv 128, wo 256 = 768 per layer.
    assert param_count(tiny("transformer", n_kv_heads=1)) == SHELL + 2 * (LAYER_SHELL + 768) == 7248


def test_params_transformer_narrow_attention():
    # attn_dim 8: wq 16*8, wk 16*8, wv 16*8, wo 8*16 = 512 per layer.
    assert param_count(tiny("transformer", attn_dim=8)) == SHELL + 2 * (LAYER_SHELL + 512) == 6736


def test_params_tied_embeddings_count_the_table_once():
    assert param_count(tiny("transformer", tie_embeddings=True)) == 7760 - 512


def test_params_mamba2_by_hand():
    # One SSM stream: in_proj 26*16 = 416; conv 16*4 + 16 = 80; dt_bias, A_log, D 3*2 = 6;
    # norm 8; out_proj 16*8 = 128 -> 638.
    assert param_count(tiny("mamba2")) == SHELL + 2 * (LAYER_SHELL + 638) == 6988
    assert param_count(tiny("mamba2", conv=0)) == SHELL + 2 * (LAYER_SHELL + 558) == 6828


def test_matmul_params_by_hand():
    # Attamba layer: wq + wo 512, in_proj 832, out_proj 256, FFN 2304 = 3904; plus the head 512.
    assert matmul_params(tiny()) == 2 * 3904 + 512 == 8320
    # A tied head still runs its matmul.
    assert matmul_params(tiny("transformer", tie_embeddings=True)) == 2 * (1024 + 2304) + 512 == 7168


BUILT = [
    (tiny(), chunks()),
    (tiny(kv_proj=True, kv_residual=False), chunks("cyclic")),
    (tiny(conv=0, tie_embeddings=True), chunks("random")),
    (tiny("transformer"), chunks()),
    (tiny("transformer", n_kv_heads=1, attn_dim=12, window=5), chunks()),
    (tiny("transformer", attn_dim=24, tie_embeddings=True), chunks()),
    (tiny("mamba2"), chunks()),
    (tiny("mamba2", conv=0, tie_embeddings=True), chunks()),
    (ModelConfig(vocab_size=50, dim=24, n_layers=3, n_heads=3, ffn_dim_multiplier=1.3,
                 ssm=SSMConfig(state_dim=6, hidden=12, heads=3, conv=2)), chunks("pseudo")),
]


@pytest.mark.parametrize(("model", "chunking"), BUILT)
def test_param_count_equals_built_model(model, chunking):
    built = build_model(Config(model=model, chunking=chunking))
    assert param_count(model) == sum(p.numel() for p in built.parameters())


# ----------------------------------------------------------------------------- KV cache


def test_kv_entries_attamba_uniform_by_hand():
    # P=4, context 10: intrinsic boundaries 0, 3, 7 (9 is not a chunk end) + a ring of 2 = 5 per layer.
    assert kv_cache_entries(tiny(), chunks("uniform"), 10) == 2 * 5
    # K and V, width 16, 2 bytes.
    assert kv_cache_bytes(tiny(), chunks("uniform"), 10) == 10 * 2 * 16 * 2 == 640
    assert kv_bytes_per_token(tiny(), chunks("uniform"), 10) == 64.0
    assert kv_cache_bytes(tiny(), chunks("uniform"), 10, bytes_per_value=4) == 1280


def test_kv_entries_attamba_cyclic_differs_by_layer():
    # 2 layers, P=4: layer 1 shifts left by min(3, 1*(4//2)) = 2 -> boundaries 0, 1, 5, 9 (4);
    # layer 0 is uniform: 0, 3, 7 (3). Each adds a ring of 2.
    assert kv_cache_entries(tiny(), chunks("cyclic"), 10) == (3 + 2) + (4 + 2) == 11


def test_kv_entries_attamba_short_context_and_no_lead():
    # context 1: boundary 0 only, ring min(2, 1) = 1.
    assert kv_cache_entries(tiny(), chunks(), 1) == 2 * (1 + 1)
    # context 12 without leading tokens: boundaries 0, 3, 7, 11.
    assert kv_cache_entries(tiny(), chunks(lead=0), 12) == 2 * 4


def test_kv_entries_pseudo_keeps_every_token():
    assert kv_cache_entries(tiny(), chunks("pseudo"), 10) == 2 * 10


def test_kv_entries_transformer_by_hand():
    assert kv_cache_entries(tiny("transformer"), chunks(), 10) == 2 * 10
    assert kv_cache_bytes(tiny("transformer"), chunks(), 10) == 20 * 2 * 16 * 2 == 1280
    # A window of 4 keys (the query's own included): min(10, 4) per layer.
    assert kv_cache_entries(tiny("transformer", window=4), chunks(), 10) == 2 * 4
    assert kv_cache_entries(tiny("transformer", window=40), chunks(), 10) == 2 * 10
    # GQA with one kv head: width 8.
    assert kv_cache_bytes(tiny("transformer", n_kv_heads=1), chunks(), 10) == 20 * 2 * 8 * 2 == 640
    # attn_dim 8 with 2 kv heads of 4: width 8.
    assert kv_cache_bytes(tiny("transformer", attn_dim=8), chunks(), 10) == 640


def test_mamba2_has_no_kv_cache():
    assert kv_cache_entries(tiny("mamba2"), chunks(), 10) == 0
    assert kv_cache_bytes(tiny("mamba2"), chunks(), 10) == 0


def test_state_bytes_by_hand():
    # Per SSM stream: scan state Hs*N = 8*4 = 32, conv window (4-1)*(8+2*4) = 48 -> 80 values.
    assert state_bytes(tiny()) == 2 * 2 * 80 * 2 == 640  # 2 layers, K and V streams, 2 bytes
    assert state_bytes(tiny("mamba2"), bytes_per_value=4) == 2 * 1 * 80 * 4 == 640
    assert state_bytes(tiny("mamba2", conv=0)) == 2 * 1 * 32 * 2 == 128
    assert state_bytes(tiny("transformer")) == 0


@pytest.mark.parametrize(("model", "chunking"), [
    (tiny(), chunks("uniform")),
    (tiny(), chunks("cyclic", lead=3)),
    (tiny(conv=0), chunks("random", size=3, lead=0, seed=5)),
    (tiny(kv_proj=True), chunks("uniform", size=5, lead=7)),
    (tiny(), chunks("pseudo")),
    (tiny("transformer"), chunks()),
    (tiny("transformer", n_kv_heads=1, attn_dim=12), chunks()),
    (tiny("mamba2"), chunks()),
])
def test_cache_and_state_bytes_equal_what_the_decoder_holds(model, chunking):
    """After prefill(19) and 4 steps, the decoder's tensors are the KV cache plus the fp32 SSM state."""
    generator = Generator(build_model(Config(model=model, chunking=chunking)).eval())
    tokens = torch.randint(0, model.vocab_size, (1, 23))
    generator.prefill(tokens[:, :19])
    for position in range(19, 23):
        generator.step(tokens[:, position:position + 1])
    expected = kv_cache_bytes(model, chunking, 23, bytes_per_value=4) + state_bytes(model, bytes_per_value=4)
    assert generator.cache_bytes() == expected


# ----------------------------------------------------------------------------- FLOPs


def dense_attended_keys(boundary: torch.Tensor, lead: int) -> int:
    """Brute force from the mask's definition: t sees s iff (s < t and s is a boundary) or t-lead <= s <= t."""
    t = torch.arange(boundary.numel())[:, None]
    s = torch.arange(boundary.numel())[None, :]
    visible = ((s < t) & boundary[None, :]) | ((s >= t - lead) & (s <= t))
    return int(visible.sum())


@pytest.mark.parametrize("chunking", [
    chunks("uniform", size=4, lead=2), chunks("cyclic", size=8, lead=3), chunks("cyclic", size=3, lead=0),
    chunks("random", size=5, lead=4, seed=1), chunks("uniform", size=1, lead=1),
])
@pytest.mark.parametrize("context", [1, 7, 64])
def test_attended_keys_match_the_dense_mask(chunking, context):
    model = dataclasses.replace(tiny(), n_layers=4)
    expected = sum(
        dense_attended_keys(boundary_mask(context, chunking.strategy, chunking.size, layer, 4, chunking.seed),
                            chunking.leading_tokens)
        for layer in range(4)
    )
    assert attended_keys(model, chunking, context) == expected


def test_attention_flops_attamba_uniform_by_hand():
    # P=4, lead 2, context 10; training-mask boundaries 0, 3, 7, 9. Keys per query t
    # (boundaries before max(0, t-2), plus the window t-2..t):
    #   t:    0  1  2  3  4  5  6  7  8  9
    #   keys: 1  2  3  4  4  4  5  5  5  5   -> 38 per layer, 76 over 2 layers.
    # Each key costs 16 MACs for QK^T and 16 for AV: 4*16 FLOPs. Averaged over 10 tokens:
    assert attention_flops_per_token(tiny(), chunks("uniform"), 10) == pytest.approx(4 * 16 * 76 / 10)


def test_attention_flops_attamba_cyclic_by_hand():
    # Layer 0 as uniform: 38. Layer 1 boundaries 0, 1, 5, 9:
    #   t:    0  1  2  3  4  5  6  7  8  9
    #   keys: 1  2  3  4  5  5  5  5  6  6   -> 42.
    assert attention_flops_per_token(tiny(), chunks("cyclic"), 10) == pytest.approx(4 * 16 * (38 + 42) / 10)


def test_attention_flops_causal_by_hand():
    # Full causal: sum_{t<10} (t+1) = 55 keys per layer, 110 over 2 layers.
    assert attention_flops_per_token(tiny("transformer"), chunks(), 10) == pytest.approx(4 * 16 * 110 / 10)
    assert attention_flops_per_token(tiny(), chunks("pseudo"), 10) == pytest.approx(4 * 16 * 110 / 10)
    # GQA shares keys between query heads; every query head still does the work.
    assert attention_flops_per_token(tiny("transformer", n_kv_heads=1), chunks(), 10) == pytest.approx(704.0)
    # attn_dim 8 halves the per-key cost.
    assert attention_flops_per_token(tiny("transformer", attn_dim=8), chunks(), 10) == pytest.approx(352.0)
    # Window 4: 1, 2, 3, then 4 for the remaining 7 queries = 34 per layer.
    assert attention_flops_per_token(tiny("transformer", window=4), chunks(), 10) == pytest.approx(4 * 16 * 68 / 10)
    assert attention_flops_per_token(tiny("mamba2"), chunks(), 10) == 0


def test_ssm_flops_by_hand():
    # Per stream and token: conv 2*4*(8 + 2*4) = 128; scan 3*8*4 (update) + 2*8*4 (read-out) = 160.
    assert ssm_flops_per_token(tiny(), chunks(), 10) == 2 * 2 * (128 + 160) == 1152
    assert ssm_flops_per_token(tiny("mamba2"), chunks(), 10) == 2 * 1 * 288 == 576
    assert ssm_flops_per_token(tiny(conv=0), chunks(), 10) == 2 * 2 * 160 == 640
    assert ssm_flops_per_token(tiny("transformer"), chunks(), 10) == 0


def test_flops_per_token_by_hand():
    # Attamba: 2 * 8320 matmul weights + 486.4 attention + 1152 SSM.
    forward = 2 * 8320 + 4 * 16 * 76 / 10 + 1152
    assert flops_per_token(tiny(), chunks("uniform"), 10) == pytest.approx(forward)
    assert flops_per_token(tiny(), chunks("uniform"), 10, training=True) == pytest.approx(3 * forward)
    # kv_proj adds 2 FLOPs for each of its 2 * 512 weights.
    assert flops_per_token(tiny(kv_proj=True), chunks("uniform"), 10) == pytest.approx(forward + 2 * 1024)
    # Transformer: 2 * (2 * (1024 + 2304) + 512) + 704.
    assert flops_per_token(tiny("transformer"), chunks(), 10) == pytest.approx(2 * 7168 + 704)
    # Mamba-2: 2 * (2 * (416 + 128 + 2304) + 512) + 576.
    assert flops_per_token(tiny("mamba2"), chunks(), 10) == pytest.approx(2 * 6208 + 576)


@pytest.mark.parametrize(("setting", "call"), [
    ("context", lambda: kv_cache_entries(tiny(), chunks(), 0)),
    ("context", lambda: attention_flops_per_token(tiny(), chunks(), -3)),
    ("bytes_per_value", lambda: kv_cache_bytes(tiny(), chunks(), 8, bytes_per_value=0)),
])
def test_bad_sizes_raise(setting, call):
    with pytest.raises(ValueError, match=setting):
        call()


# ----------------------------------------------------------------------------- iso-cost matching


@pytest.mark.parametrize("strategy", ["uniform", "cyclic"])
@pytest.mark.parametrize(("size", "attn_dim"), [(4, 128), (8, 64), (16, 32)])
def test_iso_kv_reproduces_the_papers_widths(strategy, size, attn_dim):
    chunking = ChunkingConfig(strategy=strategy, size=size, leading_tokens=8)
    match = match_attn_dim(paper(), chunking, 1024, "kv_cache")
    assert match.attn_dim == attn_dim
    assert match.target == "kv_cache"
    assert match.baseline_value == kv_cache_bytes(transformer_baseline(paper(), attn_dim), chunking, 1024)
    assert match.attamba_value == kv_cache_bytes(paper(), chunking, 1024)
    assert match.ratio == pytest.approx(match.baseline_value / match.attamba_value)
    assert 0.85 < match.ratio <= 1.0


def test_iso_kv_exact_paper_budget():
    # P=8 uniform: 1024/8 chunk ends + token 0 + 8 leading = 137 keys of width 512 per layer;
    # the transformer holds 1024 keys of width w: w <= 137*512/1024 = 68.5 -> 64.
    match = match_attn_dim(paper(), ChunkingConfig(strategy="uniform", size=8, leading_tokens=8), 1024, "kv_cache")
    assert match == Match(attn_dim=64, target="kv_cache", attamba_value=8 * 137 * 2 * 512 * 2,
                          baseline_value=8 * 1024 * 2 * 64 * 2, ratio=64 * 1024 / (137 * 512))


COSTS = {
    "kv_cache": kv_cache_bytes,
    "flops": flops_per_token,
    "params": lambda model, chunking, context: param_count(model),
}


@pytest.mark.parametrize("target", ["kv_cache", "flops", "params"])
@pytest.mark.parametrize(("model", "chunking", "context"), [
    (paper(), ChunkingConfig(strategy="cyclic", size=8, leading_tokens=8), 1024),
    (paper(kv_proj=True, tie_embeddings=True), ChunkingConfig(strategy="uniform", size=16, leading_tokens=0), 4096),
    (tiny(), chunks("random", size=3, lead=1), 32),
])
def test_matched_width_is_the_widest_that_fits(target, model, chunking, context):
    cost = COSTS[target]
    match = match_attn_dim(model, chunking, context, target)
    budget = cost(model, chunking, context)
    fits = cost(transformer_baseline(model, match.attn_dim), chunking, context)
    wider = cost(transformer_baseline(model, match.attn_dim + 2 * model.n_heads), chunking, context)
    assert match.attn_dim % (2 * model.n_heads) == 0  # heads of an even width: RoPE rotates pairs
    assert fits <= budget < wider
    assert (match.attamba_value, match.baseline_value) == (pytest.approx(budget), pytest.approx(fits))


def test_baseline_is_full_attention_transformer():
    baseline = transformer_baseline(paper(match="flops"), 96)
    assert (baseline.family, baseline.attn_dim, baseline.n_kv_heads, baseline.window, baseline.match) == (
        "transformer", 96, None, None, None)
    assert (baseline.dim, baseline.n_layers, baseline.n_heads, baseline.vocab_size, baseline.ffn_dim) == (
        512, 8, 8, 32000, paper().ffn_dim)


def test_unknown_target_raises():
    with pytest.raises(ValueError, match=r"model\.match.*kv_cache, flops, params"):
        match_attn_dim(paper(), ChunkingConfig(), 1024, "memory")


def test_non_attamba_input_raises():
    with pytest.raises(ValueError, match="model.family"):
        match_attn_dim(tiny("transformer"), chunks(), 16, "kv_cache")


def test_budget_below_the_narrowest_runnable_baseline_raises():
    # P=64 over 64 tokens, no leading tokens: boundaries 0 and 63, 2 keys of width 16 per layer
    # (32 values); the narrowest baseline, attn_dim 4 (2 heads of 2), caches 64 keys of width 4 (256 values).
    with pytest.raises(ValueError, match=r"model\.match.*attn_dim=4 \(2 heads of 2, the narrowest RoPE can rotate\)"):
        match_attn_dim(tiny(), chunks(size=64, lead=0), 64, "kv_cache")


@pytest.mark.parametrize(("target", "attn_dim"), [("kv_cache", 16), ("flops", 136), ("params", 144)])
def test_smoke_model_matches_to_widths_it_can_run(target, attn_dim):
    """The smoke model (dim 64, 4 heads) matched at P=4, 4 leading tokens, 64 tokens: the widest fitting
    multiples of n_heads were 20 for KV cache (heads of 5, which RoPE cannot rotate) and 148 for params (37)."""
    model = ModelConfig(vocab_size=2048, dim=64, n_layers=2, n_heads=4,
                        ssm=SSMConfig(state_dim=16, hidden=64, heads=4))
    match = match_attn_dim(model, ChunkingConfig(strategy="cyclic", size=4, leading_tokens=4), 64, target)
    assert match.attn_dim == attn_dim
    assert match.ratio == pytest.approx(match.baseline_value / match.attamba_value) and match.ratio <= 1
