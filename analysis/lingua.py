"""Import Meta Lingua dump directories (the paper's published runs) as MLflow runs.

A dump holds ``config.yaml``, ``metrics.jsonl`` (one training record per logged
step) and ``metrics.eval.jsonl`` (lm-eval results per evaluated step). Each
becomes one run with our param names, tags and metric names, so that imported
and native runs mix in every table and figure:

* params: ``model.family`` (from the config's shape, not the run's name),
  ``model.*``, ``chunking.strategy|size|leading_tokens``, ``train.*``, ``optim.*``,
  and the full Lingua config under ``lingua.*``;
* ``model.match`` and the matched ``chunking.size`` of transformer baselines, inferred
  within a study (the config's wandb project): a width of ``dim / P`` for a chunk size
  ``P`` of the study's Attamba runs is the paper's iso-KV rule; other narrowed widths
  are FLOP-matched; an explicit full width is the parameter-matched point;
* metrics: see ``TRAIN_METRICS`` / ``EVAL_TASKS`` / ``EVAL_METRICS`` (WikiText-2:
  ``PAPER_EVAL_METRICS``, the paper's per-token perplexity), at their Lingua steps,
  plus ``model/kv_bytes_per_token`` from :mod:`attamba.accounting`.

Re-importing is idempotent: a dump is known by its original ``dump_dir`` and its
files' fingerprint; an unchanged dump is skipped, a changed one replaces its run.
Missing, empty or truncated files give a :class:`LinguaImportWarning` and import
whatever is there.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from mlflow.tracking import MlflowClient

from attamba import accounting
from attamba.config import STRATEGIES, ChunkingConfig, ModelConfig, flatten
from attamba.tracking import TAG_CONFIG_HASH, TAG_FAMILY, TAG_SWEEP, RunTracker, config_hash, ensure_store

CONFIG_FILE = "config.yaml"
TRAIN_FILE = "metrics.jsonl"
EVAL_FILE = "metrics.eval.jsonl"

TRAIN_METRICS = {
    "loss/out": "train/loss",
    "optim/lr": "train/lr",
    "optim/grad_norm": "train/grad_norm",
    "speed/wps": "speed/tokens_per_s",
    "memory/max_active_gib": "mem/peak_gib",
}
EVAL_TASKS = {"wikitext": "wikitext2"}  # other lm-eval tasks keep their own name
EVAL_METRICS = {
    "word_perplexity,none": "word_perplexity",
    "byte_perplexity,none": "byte_perplexity",
    "bits_per_byte,none": "bits_per_byte",
}
# The paper's patched lm-eval reported one per-token perplexity under all three WikiText names (its
# "byte perplexity" is the same number, "bits per byte" its log2): it is our paper_perplexity
# (attamba.evaluate), not lm-eval's word perplexity, and is imported under that name alone.
PAPER_EVAL_METRICS = {"wikitext": {"word_perplexity,none": "paper_perplexity"}}
# Lingua's chunk_strat names; strategies we do not implement keep a descriptive name.
LINGUA_STRATEGIES = {"cyclic_pl": "cyclic", "uniform": "uniform", "random": "random",
                     "cyclic_pl_rand": "cyclic_random"}
RECURRENT_MODEL_TYPES = {"hawk": "hawk", "minGRU": "mingru"}

TAG_SOURCE = "attamba.source"
TAG_DUMP = "attamba.lingua.dump_dir"
TAG_FINGERPRINT = "attamba.lingua.fingerprint"
KV_BYTES_PER_VALUE = 2  # the paper's runs cache bf16 keys and values
METRICS_PER_FLUSH = 1000


class LinguaImportWarning(UserWarning):
    """A dump could only be imported in part (missing, empty or malformed file, unknown layout)."""


def _warn(directory: Path, message: str) -> None:
    warnings.warn(f"{directory}: {message}", LinguaImportWarning, stacklevel=3)


# ----------------------------------------------------------------------------- reading


@dataclass
class LinguaDump:
    """One dump directory's contents, read as far as its files go."""

    path: Path
    config: dict[str, Any]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    fingerprint: str

    @property
    def model(self) -> dict[str, Any]:
        return self.config.get("model") or {}

    @property
    def dump_id(self) -> str:
        """The original run's dump_dir (unique per Lingua run), else this directory's path."""
        return str(self.config.get("dump_dir") or self.path.resolve())

    @property
    def study(self) -> str:
        """The group of runs trained to be compared: the wandb project, else the parent folder."""
        wandb = (self.config.get("logging") or {}).get("wandb") or {}
        return str(wandb.get("project") or self.path.resolve().parent.name)


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        _warn(directory, f"no {CONFIG_FILE}: imported without params")
        return {}
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        _warn(directory, f"{CONFIG_FILE} is empty or not a mapping: imported without params")
        return {}
    return config


def _read_jsonl(directory: Path, name: str) -> list[dict[str, Any]]:
    """The JSON records of ``directory/name`` that carry a ``global_step``; the rest are warned about."""
    path = directory / name
    if not path.is_file():
        _warn(directory, f"no {name}: its metrics are missing from the run")
        return []
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves a truncated last line
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("global_step"), int):
            records.append(record)
        else:
            bad += 1
    if bad:
        _warn(directory, f"{name}: skipped {bad} malformed line(s)")
    if not records:
        _warn(directory, f"{name} holds no records: its metrics are missing from the run")
    return records


def _fingerprint(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, TRAIN_FILE, EVAL_FILE):
        path = directory / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<missing>") + b"\0")
    return digest.hexdigest()[:16]


def read_dump(directory: str | Path) -> LinguaDump:
    """Read one Lingua dump directory; a missing directory is a ``ValueError``."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"import-lingua DIR: {path} is not a directory")
    return LinguaDump(path=path, config=_read_config(path), train=_read_jsonl(path, TRAIN_FILE),
                      evals=_read_jsonl(path, EVAL_FILE), fingerprint=_fingerprint(path))


# ----------------------------------------------------------------------------- params


def model_family(config: dict[str, Any]) -> str | None:
    """The model family a Lingua config describes, from its keys: Attamba configs chunk tokens
    (``token_chunk``), Mamba configs have an SSM state but no chunks, transformers neither."""
    model = config.get("model") or {}
    if config.get("model_type") in RECURRENT_MODEL_TYPES:
        return RECURRENT_MODEL_TYPES[config["model_type"]]
    if "token_chunk" in model:
        return "attamba"
    if "state_dim" in model:
        return "mamba2"
    if "n_heads" in model:
        return "transformer"
    return None


def _strategy(model: dict[str, Any]) -> str:
    if model.get("pseudo_chunk"):
        return "pseudo"
    strategy = str(model.get("chunk_strat", "uniform"))
    return LINGUA_STRATEGIES.get(strategy, strategy)


def _shell_params(config: dict[str, Any]) -> dict[str, Any]:
    """The settings every family shares: model shell, training schedule, optimizer."""
    model, data = config.get("model") or {}, config.get("data") or {}
    optim, dist = config.get("optim") or {}, config.get("distributed") or {}
    grad_accum = int(config.get("grad_acc_steps") or 1)
    replicas = int(dist.get("dp_shard") or 1) * int(dist.get("dp_replicate") or 1)
    params = {
        "model.dim": model.get("dim"), "model.n_layers": model.get("n_layers"),
        "model.n_heads": model.get("n_heads"), "model.vocab_size": model.get("vocab_size"),
        "model.ffn_dim_multiplier": model.get("ffn_dim_multiplier") or 1.0,
        "model.ffn_multiple_of": model.get("multiple_of"), "model.norm_eps": model.get("norm_eps"),
        "model.rope_theta": model.get("rope_theta"), "model.tie_embeddings": model.get("weight_tying"),
        "train.steps": config.get("steps"), "train.seq_len": data.get("seq_len"),
        "train.grad_accum": grad_accum, "train.seed": config.get("seed"),
        "train.lr": optim.get("lr"), "train.warmup": optim.get("warmup"),
        "optim.weight_decay": optim.get("weight_decay"), "optim.beta1": optim.get("beta1"),
        "optim.beta2": optim.get("beta2"), "optim.eps": optim.get("epsilon"), "optim.clip": optim.get("clip"),
        "optim.lr_min_ratio": optim.get("lr_min_ratio"),
        "data.tokenizer": (data.get("tokenizer") or {}).get("path"),
    }
    if data.get("batch_size") is not None:  # Lingua's batch is per data-parallel rank and micro-step
        params["train.batch_size"] = int(data["batch_size"]) * replicas * grad_accum
    return params


def _family_params(family: str | None, model: dict[str, Any]) -> dict[str, Any]:
    if family == "attamba":
        size = int(model["token_chunk"])
        # Configs without leading_tokens predate the option; the paper labels them lead = P.
        lead = model.get("leading_tokens")
        return {
            "model.attn_dim": None, "model.window": None, "model.n_kv_heads": None,
            "model.kv_residual": model.get("residual_ssm"), "model.kv_proj": model.get("keep_wproj"),
            "model.ssm.state_dim": model.get("state_dim"), "model.ssm.heads": model.get("ssm_heads"),
            # Lingua's ssm_hiddim is the per-head width of the SSM's inner stream.
            "model.ssm.hidden": int(model["ssm_heads"]) * int(model["ssm_hiddim"])
            if model.get("ssm_heads") and model.get("ssm_hiddim") else None,
            "model.ssm.conv": model.get("conv_size"),
            "chunking.strategy": _strategy(model), "chunking.size": size,
            "chunking.leading_tokens": int(lead) if lead is not None else size,
        }
    if family == "transformer":
        return {"model.attn_dim": model.get("attn_dim"), "model.window": model.get("sliding_window"),
                "model.n_kv_heads": model.get("n_kv_heads"), "model.match": None,
                "chunking.strategy": None, "chunking.size": None, "chunking.leading_tokens": None}
    if family == "mamba2":
        return {"model.ssm.state_dim": model.get("state_dim"), "model.ssm.heads": model.get("n_heads"),
                "model.ssm.conv": model.get("conv_size")}
    return {}


def run_params(dump: LinguaDump) -> dict[str, Any]:
    """Our flattened params for one dump, before study-level matching; plus ``lingua.*`` originals."""
    family = model_family(dump.config)
    if dump.config and family is None:
        _warn(dump.path, "config.yaml describes no known model family")
    params: dict[str, Any] = {"model.family": family}
    if dump.config:
        params.update(_shell_params(dump.config))
        params.update(_family_params(family, dump.model))
        params.update({f"lingua.{key}": value for key, value in flatten(dump.config).items()})
    return params


def infer_matches(params_by_dump: dict[str, dict[str, Any]], study_by_dump: dict[str, str]) -> None:
    """Set ``model.match`` and ``chunking.size`` of the transformer baselines of each study, in place.

    Within a study, with ``Ps`` the chunk sizes of its (non-pseudo) Attamba runs:
    ``attn_dim == dim / P`` for a ``P`` in ``Ps`` is iso-KV at that ``P``; an explicit
    ``attn_dim == dim`` is the parameter-matched point; the remaining narrowed widths are
    FLOP-matched, paired widest-first with ``Ps`` smallest-first (costs fall as P grows)
    when there is one per chunk size, and left without a chunk size otherwise.
    """
    for study in sorted(set(study_by_dump.values())):
        members = [params_by_dump[dump] for dump, owner in study_by_dump.items() if owner == study]
        sizes = sorted({p["chunking.size"] for p in members
                        if p["model.family"] == "attamba" and p["chunking.strategy"] != "pseudo"})
        narrowed: list[dict[str, Any]] = []
        for p in members:
            width, dim = p.get("model.attn_dim"), p.get("model.dim")
            if p["model.family"] != "transformer" or width is None or p.get("model.window") is not None:
                continue
            if width == dim:
                p["model.match"] = "params"
            elif dim % width == 0 and dim // width in sizes:
                p["model.match"], p["chunking.size"] = "kv_cache", dim // width
            elif width < dim:
                p["model.match"] = "flops"
                narrowed.append(p)
        if len(narrowed) == len(sizes):
            for p, size in zip(sorted(narrowed, key=lambda p: -p["model.attn_dim"]), sizes):
                p["chunking.size"] = size


# ----------------------------------------------------------------------------- metrics


def kv_bytes_per_token(params: dict[str, Any]) -> float | None:
    """KV-cache bytes per token at the run's training context (bf16), or None when
    :mod:`attamba.accounting` has no model of the run's family or chunking strategy."""
    family = params.get("model.family")
    if family not in ("attamba", "transformer", "mamba2") or params.get("train.seq_len") is None:
        return None
    model = ModelConfig(family=family, dim=params["model.dim"], n_layers=params["model.n_layers"],
                        n_heads=params["model.n_heads"], vocab_size=params["model.vocab_size"],
                        attn_dim=params.get("model.attn_dim"), n_kv_heads=params.get("model.n_kv_heads"),
                        window=params.get("model.window"))
    if family == "attamba":
        if params["chunking.strategy"] not in STRATEGIES:
            return None
        chunking = ChunkingConfig(strategy=params["chunking.strategy"], size=params["chunking.size"],
                                  leading_tokens=params["chunking.leading_tokens"])
    else:
        chunking = ChunkingConfig()  # does not enter a transformer's or an SSM's cache
    return accounting.kv_bytes_per_token(model, chunking, int(params["train.seq_len"]), KV_BYTES_PER_VALUE)


def _last_per_step(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, the last logged: a resumed Lingua run re-logs the steps since its checkpoint."""
    by_step = {record["global_step"]: record for record in records}
    return [by_step[step] for step in sorted(by_step)]


def train_metrics(records: Sequence[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """``(step, {our name: value})`` of the training records, one per step."""
    rows = []
    for record in _last_per_step(records):
        values = {ours: float(record[theirs]) for theirs, ours in TRAIN_METRICS.items()
                  if isinstance(record.get(theirs), (int, float))}
        if values:
            rows.append((record["global_step"], values))
    return rows


def eval_metrics(records: Sequence[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """``(step, {"eval/<task>/<metric>": value})`` of the lm-eval records, one per step."""
    rows = []
    for record in _last_per_step(records):
        values = {}
        for task, results in record.items():
            if not isinstance(results, dict):
                continue
            ours = EVAL_TASKS.get(task, task)
            names = PAPER_EVAL_METRICS.get(task, EVAL_METRICS)
            values.update({f"eval/{ours}/{name}": float(results[key]) for key, name in names.items()
                           if isinstance(results.get(key), (int, float))})
        if values:
            rows.append((record["global_step"], values))
    return rows


# ----------------------------------------------------------------------------- writing


@dataclass
class ImportResult:
    """What happened to one dump: ``imported``, ``replaced`` (its files changed) or ``unchanged``."""

    directory: Path
    run_id: str
    action: str
    run_name: str
    notes: list[str] = field(default_factory=list)


def _existing_runs(client: MlflowClient, experiment: str, dump_id: str) -> list[Any]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    literal = dump_id.replace("'", "\\'")
    return list(client.search_runs([found.experiment_id], f"tags.`{TAG_DUMP}` = '{literal}'"))


def _kv_metric(dump: LinguaDump, params: dict[str, Any]) -> float | None:
    """:func:`kv_bytes_per_token`, warning (not failing) when it cannot be computed."""
    try:
        kv = kv_bytes_per_token(params)
    except ValueError as error:  # a config our ModelConfig cannot express
        _warn(dump.path, f"no model/kv_bytes_per_token: {error}")
        return None
    if kv is None and dump.config:
        _warn(dump.path, f"no model/kv_bytes_per_token: attamba.accounting has no cache model for family "
                         f"{params.get('model.family')!r}, strategy {params.get('chunking.strategy')!r}")
    return kv


def _write_run(dump: LinguaDump, params: dict[str, Any], uri: str, experiment: str) -> str:
    tags = {TAG_SOURCE: "lingua", TAG_DUMP: dump.dump_id, TAG_FINGERPRINT: dump.fingerprint,
            TAG_FAMILY: params.get("model.family"), TAG_SWEEP: dump.study if dump.config else None,
            TAG_CONFIG_HASH: config_hash(params)}
    with RunTracker(uri, experiment, run_name=dump.path.name, tags=tags,
                    flush_every=METRICS_PER_FLUSH) as tracker:
        tracker.log_params(params)
        kv = _kv_metric(dump, params)
        if kv is not None:
            tracker.log_metrics({"model/kv_bytes_per_token": kv}, step=0)
        for step, values in train_metrics(dump.train) + eval_metrics(dump.evals):
            tracker.log_metrics(values, step=step)
        # Left to FINISHED by the block: a crash marks the run FAILED, and the next import replaces it.
    return tracker.run_id


def import_dumps(directories: Sequence[str | Path], uri: str, experiment: str) -> list[ImportResult]:
    """Import Lingua dump ``directories`` into ``experiment`` at tracking ``uri``; see the module doc."""
    if not directories:
        raise ValueError("import-lingua DIR: give at least one Lingua dump directory")
    ensure_store(uri)
    client = MlflowClient(tracking_uri=uri)
    dumps = [read_dump(directory) for directory in directories]
    params = {dump.dump_id: run_params(dump) for dump in dumps}
    infer_matches(params, {dump.dump_id: dump.study for dump in dumps if dump.config})
    results = []
    for dump in dumps:
        existing = _existing_runs(client, experiment, dump.dump_id)
        kept = [run for run in existing
                if run.data.tags.get(TAG_FINGERPRINT) == dump.fingerprint and run.info.status == "FINISHED"
                and run.data.params == _logged(params[dump.dump_id])]
        if kept:
            results.append(ImportResult(dump.path, kept[0].info.run_id, "unchanged", dump.path.name))
            continue
        for run in existing:
            client.delete_run(run.info.run_id)
        run_id = _write_run(dump, params[dump.dump_id], uri, experiment)
        results.append(ImportResult(dump.path, run_id, "replaced" if existing else "imported", dump.path.name))
    return results


def _logged(params: dict[str, Any]) -> dict[str, str]:
    """``params`` as MLflow stores them (strings), to tell whether a stored run is up to date."""
    return {key: str(value) for key, value in params.items()}
