"""The trainer's step as a GPU runs it: no host waits in steady state, batches made ahead and
resumable, compilation chosen per device and recorded as used, divergence still caught."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from attamba import hardware
from attamba.compilation import resolve_compile
from attamba.config import TrainConfig
from attamba.data import PackedBatches, load_tokenizer
from attamba.data.prefetch import Prefetcher
from attamba.models import NextTokenLoss
from attamba.tracking import find_runs
from attamba.trainer import TrainingDiverged, train
from test_data import id_corpus, id_tokenizer
from test_trainer import smoke_config

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize("compile_setting, mode, device, expected", [
    ("auto", "auto", CUDA, (True, "reduce-overhead")),
    ("auto", "auto", CPU, (False, "default")),
    ("true", "auto", CPU, (True, "default")),
    ("false", "auto", CUDA, (False, "reduce-overhead")),
    ("auto", "max-autotune", CUDA, (True, "max-autotune")),
    (True, "default", CUDA, (True, "default")),  # a bool typed on the command line
])
def test_compilation_defaults_per_device(compile_setting, mode, device, expected):
    assert resolve_compile(TrainConfig(compile=compile_setting, compile_mode=mode), device) == expected


def test_a_bad_compile_setting_names_itself():
    with pytest.raises(ValueError, match="train.compile: got 'sometimes'"):
        TrainConfig(compile="sometimes")


# What makes the host wait for the device: reading a tensor's value, and explicit synchronisation.
SYNCHRONISING = ("item", "tolist", "__bool__", "__float__", "__int__")


def test_steady_state_steps_never_wait_for_the_device(tmp_path, monkeypatch):
    """Only logging steps read values off the device; the first step waits to time compilation."""
    per_step: list[list[str]] = []

    def counting(name, original):
        def call(*args, **kwargs):
            if per_step:
                per_step[-1].append(name)
            return original(*args, **kwargs)
        return call

    for name in SYNCHRONISING:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(hardware, "synchronize", counting("synchronize", hardware.synchronize))

    def next_step() -> bool:
        per_step.append([])
        return False

    config = smoke_config(tmp_path, "train.steps=7", "train.log_every=3", "train.eval_every=100",
                          "train.checkpoint_every=100")
    train(config, stop_requested=next_step)
    assert len(per_step) == 7
    assert {step: calls for step, calls in enumerate(per_step, 1) if calls and step not in (1, 3, 6, 7)} == {}
    assert "synchronize" in per_step[0]  # the first step (and its one-off set-up): timed as speed/first_step_s
    assert "item" in per_step[2]  # the logging step reads the loss (and so the test sees reads at all)


def test_compiled_runs_keep_the_compiler_caches_where_the_sweep_shares_them(tmp_path, monkeypatch):
    """Jobs of a sweep are separate processes: the same cache folders make the later ones reuse the graphs."""
    import attamba
    from attamba.step import TrainStep, build_training

    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(variable, "")  # so that monkeypatch restores the variable after the test
        monkeypatch.delenv(variable)
    config = attamba.load_config(["experiment=smoke", "train.compile=true", f"train.compile_cache={tmp_path}/cc"])
    step = TrainStep(build_training(config, CPU), config, CPU)
    assert step.compiled and step.compile_mode == "default"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cc" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cc" / "triton")


def test_a_non_finite_loss_fails_the_run_with_its_step_at_the_next_logging_step(tmp_path, monkeypatch):
    forward, calls = NextTokenLoss.forward, [0]

    def nan_at_step_3(self, inputs, targets):
        calls[0] += 1
        loss = forward(self, inputs, targets)
        return loss * float("nan") if calls[0] == 3 else loss

    monkeypatch.setattr(NextTokenLoss, "forward", nan_at_step_3)
    config = smoke_config(tmp_path, "train.steps=10", "train.log_every=5", "train.eval_every=100")
    with pytest.raises(TrainingDiverged, match=r"at step 3 \(seen at the logging step 5\)"):
        train(config)
    (run,) = find_runs(config.tracking.uri, "smoke")
    assert run["status"] == "FAILED" and "at step 3" in run["tags"]["attamba.failure_reason"]


def test_the_run_records_the_compilation_it_used(tmp_path):
    config = smoke_config(tmp_path, "train.steps=1", "train.eval_every=100")
    assert (config.train.compile, config.train.compile_mode) == ("auto", "auto")
    train(config)
    (run,) = find_runs(config.tracking.uri, "smoke")
    assert (run["params"]["train.compile"], run["params"]["train.compile_mode"]) == ("false", "default")


def _packed(tmp_path: Path) -> PackedBatches:
    data = id_corpus(tmp_path, n_docs=40)
    return PackedBatches(data, load_tokenizer(id_tokenizer(tmp_path)), batch_size=3, seq_len=7, seed=5)


def test_prefetched_batches_resume_exactly_where_the_consumer_stopped(tmp_path):
    """The state is the position after the batches *taken*, though the thread has made more ahead."""
    plain = _packed(tmp_path)
    reference = [next(plain) for _ in range(30)]
    for stop in (0, 1, 7, 20):
        feed = Prefetcher(_packed(tmp_path), depth=4)
        taken = [next(feed) for _ in range(stop)]
        state = json.loads(json.dumps(feed.state_dict()))
        feed.close()
        for got, want in zip(taken, reference):
            assert torch.equal(got, want)
        resumed = Prefetcher(_packed(tmp_path), depth=2)
        resumed.load_state_dict(state)
        for want in reference[stop:stop + 5]:
            assert torch.equal(next(resumed), want), stop
        resumed.close()


def test_a_loader_error_is_raised_where_its_batch_was_due():
    class Failing:
        def __init__(self):
            self.made = 0

        def __next__(self):
            self.made += 1
            if self.made == 3:
                raise ValueError("train.seq_len: too long for this corpus")
            return torch.full((1, 2), self.made)

        def state_dict(self):
            return {"made": self.made}

        def load_state_dict(self, state):
            self.made = state["made"]

    feed = Prefetcher(Failing())
    assert [int(next(feed)[0, 0]) for _ in range(2)] == [1, 2]
    with pytest.raises(ValueError, match="train.seq_len"):
        next(feed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluation_inside_training_does_not_recompile_the_training_graph(tmp_path):
    """Evaluations run the eager model, between compiled steps (``train.compile`` left at ``auto``: compiled,
    CUDA graphs): the training step's frame keeps the one compiled entry it got at the first step."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    torch._dynamo.reset()
    config = smoke_config(tmp_path, "train.device=cuda", "train.steps=6", "train.eval_every=2")
    train(config)
    assert len(_debug_get_cache_entry_list(NextTokenLoss.forward.__code__)) == 1


def test_a_setting_found_wrong_while_training_fails_the_run(tmp_path, monkeypatch):
    """Refused settings (exit 2) change nothing; one found wrong mid-run has a run to mark FAILED (exit 1)."""
    from attamba.evals import suite
    from attamba.trainer import RunFailed

    def unreadable(*args, **kwargs):
        raise ValueError("data.paths: shard_7.jsonl.gz is not a readable gzip file")

    monkeypatch.setattr(suite, "validation", unreadable)
    config = smoke_config(tmp_path, "train.steps=4", "train.eval_every=2")
    with pytest.raises(RunFailed, match="shard_7"):
        train(config)
    (run,) = find_runs(config.tracking.uri, "smoke")
    assert run["status"] == "FAILED" and "shard_7" in run["tags"]["attamba.failure_reason"]
