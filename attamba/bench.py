"""``attamba-bench``: training and decoding throughput, side by side in one process.

Every candidate is measured in the same process as its baseline, at the same tokens
per step, and reported with its ratio to it::

    attamba-bench --contexts 1024 16384 65536 --tokens-per-step 16384 --compile --out bench.json

Training steps are real (forward, backward, fused AdamW; bf16 autocast on GPU).
Decoding prefills a context and times cached ``step`` calls. ``--attention`` adds
the chunk-boundary attention op alone against full causal flash attention, ``--scan``
the K/V SSMs alone: their scan against its plain-PyTorch block-diagonal path, and their whole
block against the transformer's key and value projections.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from attamba import accounting, distributed, hardware
from attamba.config import COMPILE_MODES, ChunkingConfig, Config, ModelConfig, OptimConfig, SSMConfig, TrainConfig
from attamba.data.prefetch import Prefetcher
from attamba.inference import Generator
from attamba.models import build_model
from attamba.step import StepOutput, TrainStep, build_training


def paper_models(vocab: int, strategy: str, size: int, lead: int, ssm_impl: str = "auto",
                 attn_impl: str = "auto", ssm_recompute: bool = False) -> dict[str, tuple[ModelConfig, ChunkingConfig]]:
    """The paper's model (dim 512, 8 layers, 8 heads of 64, SSM hidden 256 in 8 heads, state 32)."""
    ssm = SSMConfig(state_dim=32, hidden=256, heads=8, conv=4, impl=ssm_impl, recompute=ssm_recompute)
    base = ModelConfig(vocab_size=vocab, dim=512, n_layers=8, n_heads=8, ssm=ssm, attn_impl=attn_impl)
    chunking = ChunkingConfig(strategy=strategy, size=size, leading_tokens=lead)
    return {
        "transformer": (dataclasses.replace(base, family="transformer"), ChunkingConfig()),
        f"attamba-{strategy}-P{size}": (dataclasses.replace(base, family="attamba"), chunking),
    }


def _timed(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> float:
    """Mean seconds per call after warmup (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    hardware.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    hardware.synchronize(device)
    return (time.perf_counter() - start) / repeats


class _Windows:
    """Token windows ``[batch, context + 1]`` made on the host, as the trainer's loader makes them,
    behind the trainer's :class:`Prefetcher` (pinned, copied without waiting)."""

    def __init__(self, make: Callable[[int], torch.Tensor]):
        self.make, self.index = make, 0

    def __next__(self) -> torch.Tensor:
        self.index += 1
        return self.make(self.index - 1)

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def run_config(model_cfg: ModelConfig, chunking: ChunkingConfig, context: int, batch: int,
               compile_setting: str, compile_mode: str, lr: float = 1e-4) -> Config:
    """A run of ``model_cfg`` as ``attamba-train`` would configure it, at ``batch`` x ``context`` tokens."""
    train = TrainConfig(steps=1_000_000, batch_size=batch, seq_len=context, lr=lr, warmup=0,
                        compile=compile_setting, compile_mode=compile_mode)
    return Config(model=model_cfg, chunking=chunking, train=train)


class _Trainer:
    """The trainer's step of one run, fed as the trainer feeds it: ``step()`` trains one optimizer step."""

    def __init__(self, config: Config, device: torch.device, windows: Callable[[int], torch.Tensor],
                 info: distributed.DistInfo = distributed.DistInfo()):
        self.device = device
        self.train_step = TrainStep(build_training(config, device), config, device, info)
        self.feed = Prefetcher(_Windows(windows), pin=device.type == "cuda")
        self.steps = 0

    def step(self) -> StepOutput:
        self.steps += 1
        return self.train_step([next(self.feed).to(self.device, non_blocking=True)], self.steps)


def bench_training(model_cfg: ModelConfig, chunking: ChunkingConfig, context: int, batch: int, steps: int,
                   warmup: int, compile_setting: str, compile_mode: str, device: torch.device, profile: int = 0,
                   trace: Path | None = None) -> dict:
    """Tokens/s of the trainer's own step (:class:`attamba.step.TrainStep`) over random tokens."""
    config = run_config(model_cfg, chunking, context, batch, compile_setting, compile_mode)
    trainer = _Trainer(config, device, lambda _: torch.randint(0, model_cfg.vocab_size, (batch, context + 1)))

    def train_step() -> None:
        trainer.step()

    compile_start = time.perf_counter()
    train_step()
    hardware.synchronize(device)
    first_step_s = time.perf_counter() - compile_start
    if device.type == "cuda":  # the steady state's peak: compilation and autotuning use memory only once
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _timed(train_step, device, steps, warmup)
    host_ms = _host_ms(train_step, device)
    if profile:
        _profile(train_step, profile, trace)
    trainer.feed.close()
    tokens_per_s = batch * context / seconds
    peak = hardware.peak_flops(device)
    flops = accounting.flops_per_token(model_cfg, chunking, context, training=True)
    return {
        "tokens_per_s": tokens_per_s,
        "step_ms": seconds * 1e3,
        "host_ms": host_ms,
        "mfu": flops * tokens_per_s / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "first_step_s": first_step_s,
        "compile": f"{trainer.train_step.compile_mode}" if trainer.train_step.compiled else "off",
        "params": accounting.param_count(model_cfg),
        "kv_bytes_per_token": accounting.kv_bytes_per_token(model_cfg, chunking, context),
    }


def _host_ms(step: Callable[[], None], device: torch.device) -> float | None:
    """Milliseconds the host takes to issue one step while the GPU is kept busy (CUDA only).

    Near ``step_ms``, the step is bound by the host (Python and kernel launches), not the GPU.
    None when the host waited for the GPU to wake up before it could finish issuing the step:
    something in it synchronises, or it has more kernels than CUDA's launch queue holds (~1,000).
    """
    if device.type != "cuda":
        return None
    sleep_cycles = 1_000_000_000  # ~0.5 s of GPU clock cycles: nothing issued behind it can start
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    torch.cuda._sleep(sleep_cycles)
    torch.cuda.synchronize(device)
    asleep_s = time.perf_counter() - start
    torch.cuda._sleep(sleep_cycles)
    start = time.perf_counter()
    step()
    host_s = time.perf_counter() - start
    torch.cuda.synchronize(device)
    return None if host_s >= asleep_s else host_s * 1e3


def learnable_tokens(batch: int, length: int, vocab: int, step: int, seed: int = 0) -> torch.Tensor:
    """A batch of a fixed random Markov chain (next = perm[token] 90% of the time): loss falls fast.

    Deterministic in (step, seed), so runs with different world sizes see the same global batch.
    """
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    rng = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
    tokens = torch.empty(batch, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=rng)
    jumps = torch.rand(batch, length, generator=rng) < 0.1
    noise = torch.randint(0, vocab, (batch, length), generator=rng)
    for t in range(1, length):
        tokens[:, t] = torch.where(jumps[:, t], noise[:, t], perm[tokens[:, t - 1]])
    return tokens


def bench_ddp(model_cfg: ModelConfig, chunking: ChunkingConfig, context: int, global_batch: int, steps: int,
              warmup: int, compile_setting: str, compile_mode: str, info: distributed.DistInfo,
              device: torch.device) -> dict:
    """Data-parallel training with the trainer's step (DDP, then compile): tokens/s and the loss of every step.

    Every rank takes its rows of the same global batch, so a one-process run and an
    N-process run optimise the same objective and their loss curves can be compared.
    """
    if global_batch % info.world_size:
        raise ValueError(f"--tokens-per-step gives {global_batch} sequences, not divisible by {info.world_size} ranks")
    config = run_config(model_cfg, chunking, context, global_batch, compile_setting, compile_mode, lr=1e-3)
    config = dataclasses.replace(config, optim=OptimConfig(weight_decay=0.0, clip=0.0))
    trainer = _Trainer(config, device, lambda step: learnable_tokens(
        global_batch, context + 1, model_cfg.vocab_size, step)[info.rank::info.world_size], info)
    losses = []

    def train_step() -> None:
        losses.append(trainer.step().loss)

    for _ in range(warmup):
        train_step()
    seconds = _timed(train_step, device, steps, warmup=0)
    trainer.feed.close()
    return {"world_size": info.world_size, "tokens_per_s": global_batch * context / seconds,
            "step_ms": seconds * 1e3, "losses": [float(loss) for loss in losses]}


def _profile(step: Callable[[], None], rows: int, trace: Path | None = None) -> None:
    """The ``rows`` kernels that take the most device time over two steps, to stderr; their
    Chrome trace (host ops, launches and kernels on one timeline) to ``trace`` if given."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(2):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(trace))
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=90), file=sys.stderr)


def bench_decoding(model_cfg: ModelConfig, chunking: ChunkingConfig, context: int, batch: int, new_tokens: int,
                   device: torch.device, cuda_graph: bool = False, compile_step: bool | str = False) -> dict:
    """Tokens/s of ``new_tokens`` cached steps after a ``context``-token prompt, and the cache they hold.

    Every family runs the same :class:`Generator` options (static caches, one CUDA graph per
    step, torch.compile), so no baseline is handicapped. Each step reads every allocated cache
    slot, so ``cache_read_tb_s`` near the HBM bandwidth says a step is as fast as its cache
    allows. ``setup_s`` is the prefill plus the graph capture (and the compilation, if any).
    """
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(model_cfg, chunking).to(device=device, dtype=dtype).eval()
    warmup = 2
    generator = Generator(model, capacity=context + warmup + new_tokens, cuda_graph=cuda_graph,
                          compile_step=compile_step)
    prompt = torch.randint(0, model_cfg.vocab_size, (batch, context), device=device)
    setup_start = time.perf_counter()
    generator.prefill(prompt, all_logits=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    setup_s = time.perf_counter() - setup_start
    token = prompt[:, -1:]
    seconds = _timed(lambda: generator.step(token), device, new_tokens, warmup=warmup)
    return {"decode_tokens_per_s": batch / seconds, "decode_step_ms": seconds * 1e3,
            "cache_bytes": generator.cache_bytes(), "allocated_bytes": generator.allocated_bytes(),
            "cache_read_tb_s": generator.allocated_bytes() / seconds / 1e12, "decode_context": context,
            "decode_batch": batch, "cuda_graph": cuda_graph, "compile_step": compile_step, "setup_s": setup_s}


def bench_attention(context: int, size: int, lead: int, device: torch.device, impl: str = "auto",
                    batch: int = 1, repeats: int = 10, profile: int = 0, trace: Path | None = None) -> dict:
    """Chunk-boundary attention alone (compiled, as in a model) vs full causal flash SDPA, fwd+bwd, bf16.

    ``batch`` sequences of ``context`` tokens, 8 heads of 64: one layer's attention in a training step.
    """
    from attamba.ops.attention import attend_chunks, causal_attention, chunk_mask
    from attamba.ops.chunking import boundary_mask

    heads, head_dim = 8, 64
    shape = (batch, heads, context, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    boundary = boundary_mask(context, "uniform", size, layer=0, n_layers=1)

    def run(op) -> Callable[[], None]:
        def fwd_bwd() -> None:
            op().sum().backward()
        return fwd_bwd

    mask = chunk_mask(boundary, lead, device, impl)
    attend = torch.compile(attend_chunks, fullgraph=True) if device.type == "cuda" else attend_chunks
    chunk = _timed(run(lambda: attend(q, k, v, mask)), device, repeats, warmup=3)
    full = _timed(run(lambda: causal_attention(q, k, v)), device, repeats, warmup=3)
    if profile:
        _profile(run(lambda: attend(q, k, v, mask)), profile, trace)
    return {"context": context, "batch": batch, "chunk_impl": mask.impl, "chunk_ms": chunk * 1e3,
            "causal_flash_ms": full * 1e3, "speedup": full / chunk}


def bench_scan(context: int, size: int, device: torch.device, impl: str = "auto", batch: int = 1,
               repeats: int = 50) -> dict:
    """The K/V SSMs' chunk-reset scan alone, fwd+bwd, vs the plain-PyTorch block-diagonal path.

    One Attamba layer's scan in a training step of ``batch`` sequences: K's and V's 8 heads of 32
    (16 heads, 2 B/C groups), state 32, layer 3 of 8's cyclic chunks of ``size``; x, B, C in bf16
    and dt in fp32 as the model feeds them. On CUDA both paths are compiled, with the layout planned
    outside as in a model, and timed as CUDA graphs.
    """
    from attamba.ops.chunking import boundary_mask, chunk_starts
    from attamba.ops.ssm import plan_scan, scan

    heads, head_dim, groups, state = 16, 32, 2, 32
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the model's autocast dtype
    starts = chunk_starts(boundary_mask(context, "cyclic", size, layer=3, n_layers=8))
    inputs = [torch.randn(batch, context, heads, head_dim, device=device, dtype=dtype),
              torch.nn.functional.softplus(torch.randn(batch, context, heads, device=device) - 2),
              -torch.rand(heads, device=device) - 0.01,
              torch.randn(batch, context, groups, state, device=device, dtype=dtype),
              torch.randn(batch, context, groups, state, device=device, dtype=dtype),
              torch.ones(heads, device=device)]
    leaves = [t.requires_grad_() for t in inputs]

    def timed(plan) -> float:
        def layer_scan(x, dt, A, B, C, D):
            return scan(x, dt, A, B, C, plan, D=D)
        return _fwd_bwd_seconds(layer_scan, leaves, device, repeats)

    plan = plan_scan(starts, device, impl)
    ms, reference_ms = timed(plan) * 1e3, timed(plan_scan(starts, device, "blockdiag")) * 1e3
    return {"context": context, "batch": batch, "scan_impl": plan.impl, "scan_ms": ms,
            "blockdiag_ms": reference_ms, "speedup": reference_ms / ms}


def bench_kv_block(context: int, size: int, device: torch.device, impl: str = "auto", batch: int = 1,
                   repeats: int = 50) -> dict:
    """One Attamba layer's K/V SSM block alone, fwd+bwd, against what the transformer computes in its place.

    The paper's block (K's and V's projection, chunked conv, scan, gated norm, out_proj) from the layer's
    input u [batch, context, 512], with the scan ``impl`` and then ``blockdiag``, against the transformer's
    two 512 -> 512 key and value projections of the same u; bf16 autocast on CUDA, compiled and timed as
    CUDA graphs there (see `_fwd_bwd_seconds`). Layer 3 of 8's cyclic chunks of ``size``.
    """
    from attamba.models.mamba2 import SSMBlock
    from attamba.ops.chunking import boundary_mask, chunk_starts
    from attamba.ops.ssm import plan_scan

    config, _ = paper_models(256, "cyclic", size, 0, ssm_impl=impl)["transformer"]  # both models' dim and SSM
    block = SSMBlock(config.ssm, config.dim, config.dim, streams=2).to(device)
    block.reset_parameters(std=0.02, depth_factor=1.0)
    wk, wv = (torch.nn.Linear(config.dim, config.dim, bias=False).to(device) for _ in range(2))
    u = torch.randn(batch, context, config.dim, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)
    starts = chunk_starts(boundary_mask(context, "cyclic", size, layer=3, n_layers=8))

    def block_ms(plan) -> float:
        names = [name for name, _ in block.named_parameters()]

        def keys_values(u, *weights):
            with autocast:
                return torch.func.functional_call(block, dict(zip(names, weights)), (u, plan))
        return _fwd_bwd_seconds(keys_values, [u, *block.parameters()], device, repeats) * 1e3

    def projections(u, k_weight, v_weight):
        with autocast:
            return torch.nn.functional.linear(u, k_weight), torch.nn.functional.linear(u, v_weight)

    plan = plan_scan(starts, device, impl)
    ms, blockdiag_ms = block_ms(plan), block_ms(plan_scan(starts, device, "blockdiag"))
    projections_ms = _fwd_bwd_seconds(projections, [u, wk.weight, wv.weight], device, repeats) * 1e3
    return {"context": context, "batch": batch, "scan_impl": plan.impl, "block_ms": ms,
            "block_blockdiag_ms": blockdiag_ms, "kv_projections_ms": projections_ms,
            "block_over_projections": ms / projections_ms}


def _fwd_bwd_seconds(fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], leaves: list[torch.Tensor],
                     device: torch.device, repeats: int) -> float:
    """Seconds per forward and backward of ``fn(*leaves)`` (every leaf requires grad).

    On CUDA ``fn`` is compiled, and its forward and backward each replay one CUDA graph, as a
    `reduce-overhead` training step runs them: the kernels' time, not Python's launches.
    """
    if device.type == "cuda":
        fn = torch.cuda.make_graphed_callables(torch.compile(fn), tuple(leaves))

    def outputs() -> tuple[torch.Tensor, ...]:
        out = fn(*leaves)
        return out if isinstance(out, tuple) else (out,)
    grads = [torch.ones_like(out) for out in outputs()]
    return _timed(lambda: torch.autograd.backward(outputs(), grads), device, repeats, warmup=3)


def markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _progress(kind: str, name: str, result: dict) -> None:
    """Each measurement as soon as it exists, so a run cut short still reports what it measured."""
    print(json.dumps({"kind": kind, "model": name, **result}), file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attamba-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="*", default=[1024], help="training contexts (none: skip)")
    parser.add_argument("--tokens-per-step", type=int, default=16 * 1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", nargs="?", const="default", default="auto", metavar="MODE",
                        choices=[*COMPILE_MODES, "off"],
                        help="how the training step compiles: left out, as attamba-train does by default "
                             "(train.compile=auto); bare, in torch.compile's default mode; else in MODE "
                             "(e.g. reduce-overhead for CUDA graphs), or 'off' for eager")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--strategy", default="cyclic")
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--leading-tokens", type=int, default=8)
    parser.add_argument("--ssm-impl", default="auto", help="model.ssm.impl of the Attamba candidate")
    parser.add_argument("--ssm-recompute", action="store_true",
                        help="model.ssm.recompute of the Attamba candidate (its SSMs rerun in the backward)")
    parser.add_argument("--attn-impl", default="auto", help="model.attn_impl of every model")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="after timing, print the ROWS most expensive kernels of two training steps "
                             "(and of two chunk-attention calls)")
    parser.add_argument("--trace", type=Path, metavar="DIR",
                        help="with --profile, also write each profile's Chrome trace there (MODEL-CONTEXT.json.gz)")
    parser.add_argument("--decode-context", type=int, default=0, help="0 skips decoding")
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--decode-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="replay each decode step from one CUDA graph (default: on with CUDA)")
    parser.add_argument("--decode-compile", nargs="?", const=True, default=False, metavar="MODE",
                        help="torch.compile the decode step (optionally with MODE, e.g. max-autotune-no-cudagraphs)")
    parser.add_argument("--attention", type=int, nargs="*", default=[], help="contexts for the attention-only bench")
    parser.add_argument("--scan", type=int, nargs="*", default=[],
                        help="contexts for the K/V SSMs alone: the scan (--ssm-impl against the PyTorch block-diagonal "
                             "path), and the whole SSM block against the transformer's K and V projections")
    parser.add_argument("--ddp", action="store_true",
                        help="data-parallel training under torchrun (one process per GPU): tokens/s and per-step "
                             "losses of the Attamba model, to compare with a one-process run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.trace and not args.profile:
        parser.error("--trace writes the traces of --profile: give --profile ROWS as well")
    device = torch.device(args.device)
    torch._dynamo.config.recompile_limit = 64

    models = paper_models(args.vocab, args.strategy, args.chunk_size, args.leading_tokens, args.ssm_impl,
                          args.attn_impl, args.ssm_recompute)
    if args.ddp:
        return _main_ddp(args, models)
    baseline = "transformer"
    rows = []
    for context in args.contexts:
        batch = max(1, args.tokens_per_step // context)
        results = {}
        for name, (cfg, chunking) in models.items():
            trace = _trace_path(args.trace, f"{name}-{context}")
            results[name] = _measure(lambda: bench_training(cfg, chunking, context, batch, args.steps, args.warmup,
                                                            *_compile_settings(args.compile), device,
                                                            args.profile, trace))
            _progress("training", name, {"context": context, **results[name]})
        for name, result in results.items():
            rows.append({"model": name, "context": context, "batch": batch, **result,
                         "speed_ratio": _ratio(result, results[baseline], "tokens_per_s"),
                         "mem_ratio": _ratio(result, results[baseline], "peak_mem_gib")})
    decode_rows = []
    if args.decode_context:
        results = {}
        cuda_graph = device.type == "cuda" if args.decode_graph is None else args.decode_graph
        decode = (args.decode_context, args.decode_batch, args.decode_tokens)
        for name, (cfg, chunking) in models.items():
            results[name] = _measure(lambda: bench_decoding(cfg, chunking, *decode, device, cuda_graph,
                                                            args.decode_compile))
            _progress("decoding", name, results[name])
        for name, result in results.items():
            decode_rows.append({"model": name, **result,
                                "decode_ratio": _ratio(result, results[baseline], "decode_tokens_per_s"),
                                "cache_ratio": _ratio(result, results[baseline], "cache_bytes")})
    attention_rows = []
    for context in args.attention:
        measured = _measure(lambda: bench_attention(context, args.chunk_size, args.leading_tokens, device,
                                                    args.attn_impl, max(1, args.tokens_per_step // context),
                                                    profile=args.profile,
                                                    trace=_trace_path(args.trace, f"attention-{context}")))
        attention_rows.append({"context": context, **measured})
        _progress("attention", "chunk-vs-flash", attention_rows[-1])

    scan_rows, block_rows = [], []
    for context in args.scan:
        measured = _measure(lambda: bench_scan(context, args.chunk_size, device, args.ssm_impl,
                                               max(1, args.tokens_per_step // context)))
        scan_rows.append({"context": context, **measured})
        _progress("scan", "scan-vs-blockdiag", scan_rows[-1])
        measured = _measure(lambda: bench_kv_block(context, args.chunk_size, device, args.ssm_impl,
                                                   max(1, args.tokens_per_step // context)))
        block_rows.append({"context": context, **measured})
        _progress("kv_block", "ssm-block-vs-projections", block_rows[-1])

    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": _device_name(device),
              "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
              "training": rows, "decoding": decode_rows, "attention": attention_rows, "scan": scan_rows,
              "kv_block": block_rows}
    print(f"# attamba-bench on {report['device']} ({report['date']}, torch {torch.__version__})\n")
    if rows:
        print(markdown(rows, ["model", "context", "batch", "compile", "tokens_per_s", "speed_ratio", "step_ms", "host_ms",
                              "mfu", "peak_mem_gib", "mem_ratio", "kv_bytes_per_token", "error"]))
    if decode_rows:
        print("\n" + markdown(decode_rows, ["model", "decode_context", "decode_batch", "decode_tokens_per_s",
                                            "decode_ratio", "decode_step_ms", "cache_bytes", "cache_ratio",
                                            "allocated_bytes", "cache_read_tb_s", "error"]))
    if attention_rows:
        print("\n" + markdown(attention_rows, ["context", "batch", "chunk_impl", "chunk_ms", "causal_flash_ms",
                                                "speedup", "error"]))
    if scan_rows:
        print("\n" + markdown(scan_rows, ["context", "batch", "scan_impl", "scan_ms", "blockdiag_ms", "speedup",
                                           "error"]))
    if block_rows:
        print("\n" + markdown(block_rows, ["context", "batch", "scan_impl", "block_ms", "block_blockdiag_ms",
                                            "kv_projections_ms", "block_over_projections", "error"]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def _measure(run: Callable[[], dict]) -> dict:
    """One measurement, or the reason it failed (a compiler error at one size must not lose the others)."""
    try:
        return run()
    except Exception as error:  # reported in the table and the JSON, next to the measurements that worked
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _trace_path(directory: Path | None, stem: str) -> Path | None:
    """Where ``--trace`` puts one profile's Chrome trace (None without ``--trace``)."""
    return directory / f"{stem}.json.gz" if directory else None


def _ratio(result: dict, baseline: dict, key: str) -> float | None:
    if result.get(key) is None or not baseline.get(key):
        return None
    return result[key] / baseline[key]


def _main_ddp(args: argparse.Namespace, models: dict) -> None:
    info = distributed.detect()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    distributed.init(info, device)
    name = next(name for name in models if name != "transformer")
    cfg, chunking = models[name]
    context = args.contexts[0]
    result = bench_ddp(cfg, chunking, context, max(1, args.tokens_per_step // context), args.steps, args.warmup,
                       *_compile_settings(args.compile), info, device)
    distributed.shutdown()
    if not info.is_main:
        return
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": _device_name(device),
              "model": name, "context": context, **result}
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def _compile_settings(flag: str) -> tuple[str, str]:
    """``--compile``'s value as ``train.compile`` and ``train.compile_mode``."""
    if flag == "off":
        return "false", "auto"
    if flag == "auto":
        return "auto", "auto"
    return "true", flag


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    main()
