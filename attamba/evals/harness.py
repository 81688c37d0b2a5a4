"""lm-evaluation-harness as the engine for any task it offers, on our models.

:class:`AttambaLM` is lm-eval's ``LM`` API over a model built by :func:`attamba.build_model`,
registered as lm-eval's model ``attamba``:

* ``loglikelihood``: the continuation's summed log-probability after ``[BOS] + context``
  (and whether it is the greedy continuation), at most ``context`` tokens read;
* ``loglikelihood_rolling``: the rolling windows of :mod:`attamba.evaluate`, so a document's
  ΣLL is the one our own WikiText-2 evaluation sums;
* ``generate_until``: greedy decoding through the cached :class:`attamba.inference.Generator`.

From the command line (the ``attamba`` model is registered when lm-eval's registry is
imported, see :mod:`attamba.evals.lm_eval_plugin`)::

    lm_eval --model attamba --model_args run=<run id | run name | checkpoint dir> \\
        --tasks wikitext2 --include_path attamba/evals/tasks \\
        --metadata '{"wikitext2_path": "../shared/data/wikitext-2/wiki.test.raw"}'

From Python, :func:`run_tasks` returns the metrics as ``eval/<task>/<metric>``.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import simple_parse_args_string

from attamba.data.tokenizer import Tokenizer
from attamba.evals.runs import load_run
from attamba.evaluate import Window, rolling_windows, score_windows
from attamba.inference import Generator
from attamba.models import LanguageModel

TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # our task definitions (wikitext2)
DEFAULT_CONTEXT = 1024  # the paper's training length; pass a run's own (load_run's config) when known
DEFAULT_MAX_GEN_TOKS = 256
MODEL_ARGS = ("run", "tracking_uri", "context", "batch_size", "device")


@register_model("attamba")
class AttambaLM(LM):
    """lm-eval's view of one of our language models and its tokenizer, reading ``context`` tokens at most."""

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, context: int = DEFAULT_CONTEXT,
                 batch_size: int = 8) -> None:
        super().__init__()
        if not isinstance(context, int) or context < 2:
            raise ValueError(f"context: must be an integer >= 2, got {context!r}")
        self.model, self.tokenizer, self.context, self.batch_size = model, tokenizer, context, batch_size
        parameter = next(model.parameters(), None)
        self._device = parameter.device if parameter is not None else torch.device("cpu")

    @classmethod
    def from_run(cls, run: str, tracking_uri: str | None = None, device: str = "cpu", context: int | None = None,
                 batch_size: int = 8) -> AttambaLM:
        """The latest checkpoint of ``run`` (a run id, run name or checkpoint directory), read at
        ``context`` tokens (default: the run's ``eval.context``, else its ``train.seq_len``)."""
        config, model, tokenizer = load_run(run, tracking_uri, device)
        return cls(model, tokenizer, context or config.eval.context or config.train.seq_len, batch_size)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> AttambaLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> AttambaLM:
        """``--model_args run=...[,tracking_uri=...,context=...,batch_size=...,device=...]``; other keys
        (``wikitext2_path``, ``tokenizer``) are task metadata that lm-eval hands to the tasks."""
        args = {key: value for key, value in (additional_config or {}).items() if value is not None}
        if str(args.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            args.pop("device")  # lm-eval's own default, not asked for: this machine has no GPU
        args.update({key: value for key, value in arg_dict.items() if key in MODEL_ARGS})
        if not args.get("run"):
            raise ValueError("run: the attamba model needs --model_args run=<run id | run name | checkpoint dir>")
        batch_size = args.get("batch_size", 8)
        return cls.from_run(str(args["run"]), tracking_uri=args.get("tracking_uri"),
                            device=str(args.get("device") or "cpu"),
                            context=int(args["context"]) if args.get("context") else None,
                            batch_size=int(batch_size) if str(batch_size).isdigit() else 8)

    # ------------------------------------------------------------------ lm-eval's request types

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``[BOS] + context`` and continuation tokens, cut where lm-eval cuts: trailing spaces of the
        context go with the continuation, and the continuation is what encoding the pair adds."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        prefix = self.tokenizer.encode(context) if context else []
        return [self.tokenizer.bos_id] + prefix, whole[len(prefix):]

    def _continuation_window(self, context: str, continuation: str) -> Window:
        prefix, targets = self._encode_pair(context, continuation)
        # As lm-eval's HF model: the last `context` tokens before the end are read; a continuation
        # longer than that is scored on its last `context` tokens.
        inputs = (prefix + targets)[-(self.context + 1):-1]
        return inputs, targets[-len(inputs):]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        windows = [self._continuation_window(*request.args) for request in requests]
        return score_windows(self.model, windows, self.tokenizer.bos_id, self.batch_size, self.device)

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        windows, owners = [], []
        for index, request in enumerate(requests):
            document = rolling_windows(self.tokenizer.encode(request.args[0]), self.tokenizer.bos_id, self.context)
            windows.extend(document)
            owners.extend([index] * len(document))
        scores = score_windows(self.model, windows, self.tokenizer.bos_id, self.batch_size, self.device)
        per_document: list[list[float]] = [[] for _ in requests]
        for owner, (loglikelihood, _) in zip(owners, scores):
            per_document[owner].append(loglikelihood)
        return [math.fsum(values) for values in per_document]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        return [self._greedy(context, dict(settings)) for context, settings in (request.args for request in requests)]

    def _greedy(self, context: str, settings: dict[str, Any]) -> str:
        """Greedy decoding (lm-eval's sampling settings are ignored) until a stop string, EOS or
        ``max_gen_toks`` tokens; the text before the first stop string."""
        until = settings.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        new_tokens = int(settings.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        prompt = ([self.tokenizer.bos_id] + self.tokenizer.encode(context))[-max(1, self.context - new_tokens):]
        generator = Generator(self.model)
        logits = generator.prefill(torch.tensor([prompt], device=self.device), all_logits=False,
                                  capacity=len(prompt) + new_tokens)[:, -1]
        produced: list[int] = []
        text = ""
        for _ in range(new_tokens):
            token = logits.argmax(-1, keepdim=True)
            if token.item() == self.tokenizer.eos_id:
                break
            produced.append(token.item())
            text = self.tokenizer.decode(produced)
            if any(stop in text for stop in until):
                break
            logits = generator.step(token)[:, -1]
        cut = min((text.index(stop) for stop in until if stop in text), default=len(text))
        return text[:cut]


# ---------------------------------------------------------------------------------------- run_tasks


def metric_name(task: str, key: str) -> str:
    """``eval/<task>/<metric>`` of lm-eval's ``"<metric>,<filter>"`` key (the filter kept unless ``none``)."""
    metric, _, filtered = key.partition(",")
    return f"eval/{task}/{metric}" + (f"/{filtered}" if filtered and filtered != "none" else "")


def save_hf_tokenizer(tokenizer: Tokenizer, directory: Path) -> Path:
    """``tokenizer`` as a directory ``transformers.AutoTokenizer.from_pretrained`` loads: RULER's
    synthetic tasks size their prompts with it, so they see our model's token counts."""
    from attamba.data.tokenizer import BOS, EOS

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory)
    kind = "PreTrainedTokenizerFast" if tokenizer.kind == "tokenizers" else "LlamaTokenizer"
    settings = {"tokenizer_class": kind, "bos_token": BOS, "eos_token": EOS, "add_bos_token": False,
                "model_max_length": 1 << 30}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    return directory


def run_tasks(model: LanguageModel, tokenizer: Tokenizer, tasks: Sequence[str], device: str | torch.device,
              context: int = DEFAULT_CONTEXT, limit: int | None = None,
              metadata: dict[str, Any] | None = None) -> dict[str, float]:
    """Run lm-eval ``tasks`` (its own and ours in ``TASKS_DIR``) on ``model``; metrics as
    ``eval/<task>/<metric>``. ``metadata`` reaches the tasks: ``wikitext2_path`` for ``wikitext2``;
    for RULER, ``max_seq_lengths`` defaults to ``[context]`` and ``tokenizer`` to ours (saved for
    ``transformers``). ``ValueError("tasks: ...")`` names an unknown task before anything runs."""
    with tempfile.TemporaryDirectory(prefix="attamba-tokenizer-") as scratch:
        metadata = {"max_seq_lengths": [context], **(metadata or {})}
        metadata.setdefault("tokenizer", str(save_hf_tokenizer(tokenizer, Path(scratch))))
        manager = TaskManager(include_path=str(TASKS_DIR), metadata=metadata)
        unknown = [task for task in tasks if task not in manager.all_tasks]
        if unknown or not tasks:
            raise ValueError(f"tasks: unknown lm-eval task(s) {', '.join(unknown)}" if unknown
                             else "tasks: name at least one lm-eval task")
        lm = AttambaLM(model.to(device).eval(), tokenizer, context=context)
        results = simple_evaluate(lm, tasks=list(tasks), task_manager=manager, limit=limit, bootstrap_iters=0,
                                  log_samples=False)
    return {metric_name(task, key): float(value)
            for task, values in results["results"].items() for key, value in values.items() if _is_score(key, value)}


def _is_score(key: str, value: Any) -> bool:
    """A metric value of lm-eval's results: not a standard error, not its ``sample_len`` count, and not
    RULER's -1 for a sequence length it was not asked to run."""
    metric = key.partition(",")[0]
    if "_stderr" in metric or metric == "sample_len" or not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return not (metric.isdigit() and value == -1)
