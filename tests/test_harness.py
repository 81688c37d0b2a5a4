"""lm-evaluation-harness over our models: run loading, the ``attamba`` LM's three request types,
``run_tasks`` on our WikiText-2 task (against attamba.evaluate) and the ``lm_eval`` command line.

The fixture is a real tracked run: a tiny Attamba model saved as a checkpoint with its
tokenizer, and an MLflow run (sqlite store) whose ``train.output_dir`` points at it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attamba
from attamba import checkpoint
from attamba.config import flat_params, to_dict
from attamba.data.tokenizer import train_bpe
from attamba.evals.harness import TASKS_DIR, AttambaLM, metric_name, run_tasks
from attamba.evals.runs import checkpoint_dir, load_run
from attamba.evaluate import evaluate_wikitext2, score_documents, wikitext2_documents
from attamba.inference import Generator
from attamba.tracking import RunTracker
from conftest import WIKITEXT2_TEST, require_shared
from lm_eval.api.instance import Instance

CONTEXT = 32
RUN_NAME = "tiny-harness-run"
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 4, "A needle of 7421 hides in the hay. " * 4,
         "Attamba compresses chunks of keys and values with state-space models."]


@dataclasses.dataclass
class TinyRun:
    uri: str
    run_id: str
    output: Path
    config: attamba.Config
    model: torch.nn.Module
    tokenizer: object


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    root = tmp_path_factory.mktemp("harness")
    tokenizer = train_bpe(TEXTS * 8, vocab_size=300, cache_dir=root, key="tiny")
    output = root / "checkpoints" / "tiny"
    config = attamba.load_config(["experiment=smoke", f"train.output_dir={output}", f"train.seq_len={CONTEXT}",
                                  f"model.vocab_size={tokenizer.vocab_size}"])
    torch.manual_seed(3)
    model = attamba.build_model(config).eval()
    state = {"model": model.state_dict(), "config": to_dict(config), "step": 1, "mlflow_run_id": None,
             "optimizer": {}, "scheduler": {}, "data": [], "rng": {}, "final": {}}  # what evaluation reads is real
    checkpoint.save(output, 1, state, tokenizer=tokenizer)
    uri = f"sqlite:///{root}/mlflow.db"
    tracker = RunTracker(uri, "harness", run_name=RUN_NAME)
    tracker.log_params(flat_params(config))
    tracker.finish()
    return TinyRun(uri, tracker.run_id, output, config, model, tokenizer)


def rolling(text: str) -> Instance:
    return Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)


# ------------------------------------------------------------------------------------------- runs


@pytest.mark.parametrize("how", ["run_id", "run_name", "output_dir", "checkpoint_dir"])
def test_load_run_finds_the_checkpoint_every_way(tiny_run: TinyRun, how: str) -> None:
    run = {"run_id": tiny_run.run_id, "run_name": RUN_NAME, "output_dir": str(tiny_run.output),
           "checkpoint_dir": str(tiny_run.output / "checkpoints" / "step_00000001")}[how]
    config, model, tokenizer = load_run(run, tracking_uri=tiny_run.uri)
    assert config == tiny_run.config and tokenizer.vocab_size == tiny_run.tokenizer.vocab_size
    for name, value in tiny_run.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert not model.training


def test_load_run_errors_name_the_setting(tiny_run: TinyRun, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^run: no run with the id or name 'nope'"):
        checkpoint_dir("nope", tracking_uri=tiny_run.uri)
    with pytest.raises(ValueError, match="^run: .* holds no checkpoint"):
        checkpoint_dir(str(tmp_path), tracking_uri=tiny_run.uri)


# ---------------------------------------------------------------------------------- request types


def test_loglikelihood_rolling_is_our_wikitext_sum(tiny_run: TinyRun) -> None:
    """The adapter's per-document ΣLL is the one attamba.evaluate sums (rolling windows of CONTEXT)."""
    lm = AttambaLM(tiny_run.model, tiny_run.tokenizer, context=CONTEXT, batch_size=3)
    got = lm.loglikelihood_rolling([rolling(text) for text in TEXTS])
    for text, value in zip(TEXTS, got):
        expected = score_documents(tiny_run.model, tiny_run.tokenizer, [text], CONTEXT).loglikelihood
        assert len(tiny_run.tokenizer.encode(text)) > CONTEXT or text == TEXTS[2]  # several windows
        assert value == pytest.approx(expected, rel=1e-9)


def test_loglikelihood_is_the_continuations_log_probability(tiny_run: TinyRun) -> None:
    lm = AttambaLM(tiny_run.model, tiny_run.tokenizer, context=CONTEXT)
    context, continuation = "The quick brown", " fox jumps"
    [(loglikelihood, greedy)] = lm.loglikelihood(
        [Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)])
    tokenizer = tiny_run.tokenizer
    prefix = [tokenizer.bos_id] + tokenizer.encode(context)
    targets = tokenizer.encode(context + continuation)[len(prefix) - 1:]
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny_run.model(torch.tensor([prefix + targets]))[0, :-1].float(), -1)
    positions = range(len(prefix) - 1, len(prefix) + len(targets) - 1)
    expected = sum(logprobs[p, t].item() for p, t in zip(positions, targets))
    assert loglikelihood == pytest.approx(expected, rel=1e-5)
    assert greedy == all(logprobs[p].argmax().item() == t for p, t in zip(positions, targets))


def test_generate_until_decodes_greedily_through_the_cached_generator(tiny_run: TinyRun) -> None:
    lm = AttambaLM(tiny_run.model, tiny_run.tokenizer, context=CONTEXT)
    tokenizer, prompt = tiny_run.tokenizer, "A needle of"
    tokens = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(prompt)])
    greedy = Generator(tiny_run.model).generate(tokens, 6)[0].tolist()
    expected = tokenizer.decode(greedy[:greedy.index(tokenizer.eos_id)] if tokenizer.eos_id in greedy else greedy)
    request = Instance(request_type="generate_until", doc={}, idx=0,
                       arguments=(prompt, {"until": [], "max_gen_toks": 6, "do_sample": False}))
    assert lm.generate_until([request]) == [expected]
    if expected.strip():  # a stop string cuts the text before it
        stop = expected.strip()[-1]
        cut = dataclasses.replace(request, arguments=(prompt, {"until": [stop], "max_gen_toks": 6}))
        assert lm.generate_until([cut]) == [expected[:expected.index(stop)]]


# ------------------------------------------------------------------------------------ run_tasks


def test_metric_names() -> None:
    assert metric_name("wikitext2", "word_perplexity,none") == "eval/wikitext2/word_perplexity"
    assert metric_name("gsm8k", "exact_match,strict-match") == "eval/gsm8k/exact_match/strict-match"


def test_unknown_task_is_an_error_naming_it(tiny_run: TinyRun) -> None:
    with pytest.raises(ValueError, match="^tasks: unknown lm-eval task.*no_such_task"):
        run_tasks(tiny_run.model, tiny_run.tokenizer, ["no_such_task"], "cpu", context=CONTEXT)


def test_ruler_niah_runs_offline_with_our_tokenizer(tiny_run: TinyRun) -> None:
    """RULER's needle-in-a-haystack generates its data sized by our tokenizer (saved for transformers)
    and is answered by greedy decoding: an untrained model runs it and scores in [0, 1]."""
    metrics = run_tasks(tiny_run.model, tiny_run.tokenizer, ["niah_single_1"], "cpu", context=512, limit=1)
    assert set(metrics) == {"eval/niah_single_1/512"}
    assert 0.0 <= metrics["eval/niah_single_1/512"] <= 1.0


@pytest.fixture(scope="module")
def wikitext_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three short WikiText-2 test pages (one of them spans several windows of CONTEXT tokens)."""
    pages = wikitext2_documents(require_shared(WIKITEXT2_TEST))
    path = tmp_path_factory.mktemp("wikitext") / "subset.raw"
    path.write_text("\n".join(pages[index] for index in (28, 29, 14)), encoding="utf-8")
    return path


def test_lm_eval_wikitext2_agrees_with_our_evaluation(tiny_run: TinyRun, wikitext_subset: Path) -> None:
    ours = evaluate_wikitext2(tiny_run.model, tiny_run.tokenizer, wikitext_subset, CONTEXT)
    theirs = run_tasks(tiny_run.model, tiny_run.tokenizer, ["wikitext2"], "cpu", context=CONTEXT,
                       metadata={"wikitext2_path": str(wikitext_subset)})
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert theirs[f"eval/wikitext2/{key}"] == pytest.approx(ours[key], rel=1e-6), key


def test_wikitext2_task_without_its_file_says_which_setting(tiny_run: TinyRun) -> None:
    with pytest.raises(ValueError, match="wikitext2_path"):
        run_tasks(tiny_run.model, tiny_run.tokenizer, ["wikitext2"], "cpu", context=CONTEXT)


def test_installed_hook_registers_the_attamba_model_with_lm_eval(tmp_path: Path) -> None:
    """A fresh interpreter (the .pth runs at start-up) resolves lm-eval's model name ``attamba``,
    without lm-eval or torch having been imported by the hook itself."""
    program = ("import sys; assert 'lm_eval' not in sys.modules and 'torch' not in sys.modules; "
               "from lm_eval.api.registry import get_model; print(get_model('attamba').__module__)")
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "attamba.evals.harness"


@pytest.mark.slow
def test_lm_eval_command_line_runs_the_attamba_model(tiny_run: TinyRun, wikitext_subset: Path,
                                                     tmp_path: Path) -> None:
    """``lm_eval --model attamba --model_args run=<name>``: lm-eval finds our model through the
    installed .pth hook, loads the tracked run by name and scores our WikiText-2 task."""
    lm_eval = Path(sys.executable).parent / "lm_eval"
    model_args = f"run={RUN_NAME},tracking_uri={tiny_run.uri},context={CONTEXT}"
    command = [str(lm_eval), "--model", "attamba", "--model_args", model_args, "--tasks", "wikitext2",
               "--include_path", str(TASKS_DIR), "--metadata", json.dumps({"wikitext2_path": str(wikitext_subset)}),
               "--output_path", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    reported = json.loads(results_file.read_text())["results"]["wikitext2"]["word_perplexity,none"]
    ours = evaluate_wikitext2(tiny_run.model, tiny_run.tokenizer, wikitext_subset, CONTEXT)["word_perplexity"]
    assert math.isclose(reported, ours, rel_tol=1e-6)
