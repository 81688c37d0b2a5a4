"""attamba-bench end to end on the CPU: the table, the JSON report, and data-parallel loss matching."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attamba
from attamba.bench import build_parser, learnable_tokens, main
from attamba.step import TrainStep, build_training
from conftest import PERFORMANCE, README

TINY = ["--device", "cpu", "--vocab", "256", "--steps", "1", "--warmup", "0"]


def test_training_and_decoding_are_reported_with_ratios_to_the_transformer(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main([*TINY, "--contexts", "64", "--tokens-per-step", "128", "--decode-context", "32", "--decode-batch", "2",
          "--decode-tokens", "2", "--out", str(out)])
    table = capsys.readouterr().out
    assert "| transformer | 64 | 2 |" in table and "| attamba-cyclic-P8 | 64 | 2 |" in table
    report = json.loads(out.read_text())
    training = {row["model"]: row for row in report["training"]}
    assert training["transformer"]["speed_ratio"] == 1.0
    assert training["attamba-cyclic-P8"]["tokens_per_s"] > 0
    assert training["attamba-cyclic-P8"]["kv_bytes_per_token"] < training["transformer"]["kv_bytes_per_token"]
    decoding = {row["model"]: row for row in report["decoding"]}
    assert decoding["attamba-cyclic-P8"]["cache_ratio"] < 1.0


@pytest.mark.parametrize("impl", ["flash", "reference"])
def test_attention_bench_times_one_layer_of_a_training_step(tmp_path, impl):
    """As many sequences as a training step holds (--tokens-per-step), with the chunk path asked for."""
    out = tmp_path / "bench.json"
    main([*TINY, "--contexts", "--attention", "64", "--tokens-per-step", "256", "--attn-impl", impl,
          "--out", str(out)])
    (row,) = json.loads(out.read_text())["attention"]
    assert (row["context"], row["batch"], row["chunk_impl"]) == (64, 4, impl)
    assert row["chunk_ms"] > 0 and row["causal_flash_ms"] > 0 and "error" not in row


def test_scan_bench_times_one_layer_of_a_training_step(tmp_path):
    out = tmp_path / "bench.json"
    main([*TINY, "--contexts", "--scan", "64", "--tokens-per-step", "256", "--ssm-impl", "ssd", "--out", str(out)])
    report = json.loads(out.read_text())
    (scan,), (block,) = report["scan"], report["kv_block"]
    for row in (scan, block):
        assert (row["context"], row["batch"], row["scan_impl"]) == (64, 4, "ssd") and "error" not in row
    assert scan["scan_ms"] > 0 and scan["blockdiag_ms"] > 0
    assert block["block_ms"] > 0 and block["block_blockdiag_ms"] > 0 and block["kv_projections_ms"] > 0
    assert block["block_over_projections"] == pytest.approx(block["block_ms"] / block["kv_projections_ms"])


def test_learnable_tokens_are_deterministic_per_step():
    first = learnable_tokens(4, 32, 100, step=3)
    assert torch.equal(first, learnable_tokens(4, 32, 100, step=3))
    assert not torch.equal(first, learnable_tokens(4, 32, 100, step=4))
    assert first.min() >= 0 and first.max() < 100


class _LossInOneBuffer(torch.nn.Module):
    """Returns every step's loss in the same tensor, as a CUDA graph returns its outputs in one buffer."""

    def __init__(self):
        super().__init__()
        self.loss = torch.nn.Parameter(torch.zeros(()))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.loss.copy_(inputs.float().mean())
        return self.loss


def test_a_step_loss_outlives_the_next_step_that_reuses_its_buffer():
    """``--ddp --compile reduce-overhead`` read every loss after the run, overwritten by the next replay."""
    config = attamba.load_config(["experiment=smoke", "train.compile=false"])
    device = torch.device("cpu")
    train_step = TrainStep(build_training(config, device), config, device)
    train_step.loss_model = _LossInOneBuffer()
    losses = [train_step([torch.full((1, 3), value)], step).loss for step, value in ((1, 1), (2, 2))]
    assert [loss.item() for loss in losses] == [1.0, 2.0]


def _ddp_losses(tmp_path: Path, processes: int) -> list[float]:
    out = tmp_path / f"ddp{processes}.json"
    args = ["--ddp", *TINY, "--steps", "2", "--contexts", "32", "--tokens-per-step", "128", "--out", str(out)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(29600 + processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*launcher, "-m", "attamba.bench", *args], check=True, env=env, timeout=300,
                   capture_output=True)
    report = json.loads(out.read_text())
    assert report["world_size"] == processes
    return report["losses"]


@pytest.mark.slow
def test_two_process_data_parallel_losses_match_one_process(tmp_path):
    one, two = _ddp_losses(tmp_path, 1), _ddp_losses(tmp_path, 2)
    assert len(one) == len(two) == 2
    assert one == pytest.approx(two, rel=1e-5)  # fp32 on the CPU: only the reduction order differs


def test_compiled_ddp_stays_split_at_its_buckets_in_every_mode(tmp_path):
    """Splitting at the buckets lets each all-reduce overlap the backward; under CUDA graphs too."""
    import torch.distributed as dist

    from attamba.compilation import compile_for_training

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        with torch._dynamo.config.patch(optimize_ddp=True):
            for mode in ("default", "reduce-overhead", "max-autotune"):
                compile_for_training(ddp, mode)
                assert torch._dynamo.config.optimize_ddp is True, mode
    finally:
        dist.destroy_process_group()


def test_profile_traces_are_written_per_model_and_context(tmp_path, capsys):
    import gzip

    main([*TINY, "--contexts", "64", "--tokens-per-step", "128", "--attention", "64", "--profile", "3",
          "--trace", str(tmp_path / "traces")])
    written = sorted(path.name for path in (tmp_path / "traces").iterdir())
    assert written == ["attamba-cyclic-P8-64.json.gz", "attention-64.json.gz", "transformer-64.json.gz"]
    events = json.loads(gzip.open(tmp_path / "traces" / "attamba-cyclic-P8-64.json.gz").read())["traceEvents"]
    assert any(event.get("name") == "aten::mm" for event in events)
    assert "Self CPU" in capsys.readouterr().err  # the --profile table itself


def test_trace_without_profile_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([*TINY, "--contexts", "64", "--trace", str(tmp_path)])
    assert "--trace" in capsys.readouterr().err and not any(tmp_path.iterdir())


def _documented_bench_commands() -> list[str]:
    """Every attamba-bench command in the shell blocks of the README and docs/performance.md,
    continuation lines joined, comments cut."""
    commands = []
    for page in (README, PERFORMANCE):
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("#")[0].strip()
                if "attamba.bench" in line or line.startswith("attamba-bench"):
                    commands.append(line)
    return commands


def test_every_documented_bench_command_parses():
    """The performance pages tell readers which commands produced their tables: they must still run."""
    commands = _documented_bench_commands()
    assert len(commands) >= 8
    parser = build_parser()
    for command in commands:
        words = shlex.split(command)
        start = words.index("attamba.bench") + 1 if "attamba.bench" in words else 1
        parser.parse_args(words[start:])
