"""Typed configuration: one dataclass per Hydra group, validated on construction.

Hydra composes YAML from ``conf/`` on top of these schemas (registered in the
ConfigStore as ``base_config``); ``OmegaConf.to_object`` turns the result into
these dataclasses, which runs every ``__post_init__`` check. The library and the
trainer only ever see these objects, never a DictConfig.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

FAMILIES = ("attamba", "transformer", "mamba2")
STRATEGIES = ("uniform", "cyclic", "random", "pseudo")
SSM_IMPLS = ("auto", "reference", "blockdiag", "ssd", "triton", "tiled")
ATTN_IMPLS = ("auto", "reference", "flash", "flex", "fused")
COMPILE_SWITCHES = ("auto", "true", "false")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
INIT_DEPTHS = ("none", "current", "global")
MATCH_TARGETS = ("kv_cache", "flops", "params")
DEVICES = ("auto", "cpu", "cuda")
SOURCES = ("default", "jsonl", "mqar")
# RoPE turns positions into fp32 angles, and fp32 holds every integer only up to 2**24: past it,
# neighbouring positions share one rotation. The longest sequence a RoPE family can run.
ROPE_MAX_LENGTH = 2**24


def _require(ok: bool, setting: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{setting}: {message}")


def _require_choice(value: Any, setting: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, setting, f"got {value!r}, allowed values are {', '.join(allowed)}")


def _require_positive(value: int, setting: str) -> None:
    _require(isinstance(value, int) and value >= 1, setting, f"must be an integer >= 1, got {value!r}")


@dataclass
class SSMConfig:
    """The Mamba-2 block that replaces a key or value projection."""

    state_dim: int = 32
    hidden: int = 256
    heads: int = 8
    conv: int = 4  # depthwise conv width over [x, B, C]; 0 disables it
    a_min: float = 0.01  # A_log is initialised to log U(a_min, a_max)
    a_max: float = 2.0
    dt_min: float = 0.001
    dt_max: float = 0.1
    impl: str = "auto"  # auto | reference | blockdiag | ssd | triton | tiled
    recompute: bool = False  # recompute the block in the backward: GPU time for activation memory

    def __post_init__(self) -> None:
        _require_positive(self.state_dim, "model.ssm.state_dim")
        _require_positive(self.hidden, "model.ssm.hidden")
        _require_positive(self.heads, "model.ssm.heads")
        _require(self.hidden % self.heads == 0, "model.ssm.heads",
                 f"must divide model.ssm.hidden={self.hidden}, got {self.heads}")
        _require(self.conv == 0 or 2 <= self.conv <= 4, "model.ssm.conv",
                 f"must be 0 (off) or a width in 2..4, got {self.conv}")
        _require(0 < self.a_min <= self.a_max, "model.ssm.a_min",
                 f"need 0 < a_min <= a_max, got {self.a_min}, {self.a_max}")
        _require(0 < self.dt_min <= self.dt_max, "model.ssm.dt_min",
                 f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        _require_choice(self.impl, "model.ssm.impl", SSM_IMPLS)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class ModelConfig:
    family: str = "attamba"
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # GQA (transformer); None = n_heads
    attn_dim: Optional[int] = None  # q/k/v width (transformer); None = dim
    window: Optional[int] = None  # sliding-window attention (transformer); None = full
    ffn_dim_multiplier: float = 1.0
    ffn_multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    kv_residual: bool = True  # Attamba: k = SSM_k(x) + x
    kv_proj: bool = False  # Attamba: project x before the K/V SSMs
    ssm: SSMConfig = field(default_factory=SSMConfig)
    init_std: Optional[float] = None  # None = dim ** -0.5
    init_depth: str = "current"  # none | current | global depth scaling of output projections
    attn_impl: str = "auto"  # auto | reference | flash | flex | fused
    # A baseline declared by what it matches against the sweep's Attamba settings;
    # resolved to a concrete attn_dim at compose time (attamba.accounting).
    match: Optional[str] = None
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        _require_choice(self.family, "model.family", FAMILIES)
        for name in ("vocab_size", "dim", "n_layers", "n_heads"):
            _require_positive(getattr(self, name), f"model.{name}")
        _require(self.dim % self.n_heads == 0, "model.n_heads",
                 f"must divide model.dim={self.dim}, got {self.n_heads}")
        if self.attn_dim is not None:
            _require_positive(self.attn_dim, "model.attn_dim")
            _require(self.attn_dim % self.n_heads == 0, "model.attn_dim",
                     f"must be divisible by model.n_heads={self.n_heads}, got {self.attn_dim}")
        if self.family != "mamba2":  # RoPE rotates (even, odd) pairs of each head's features
            _require(self.head_dim % 2 == 0, "model.attn_dim" if self.attn_dim is not None else "model.n_heads",
                     f"heads of {self.head_dim} features ({self.width} / {self.n_heads} heads): "
                     "RoPE needs an even head width")
        if self.n_kv_heads is not None:
            _require_positive(self.n_kv_heads, "model.n_kv_heads")
            _require(self.n_heads % self.n_kv_heads == 0, "model.n_kv_heads",
                     f"must divide model.n_heads={self.n_heads}, got {self.n_kv_heads}")
        if self.window is not None:
            _require_positive(self.window, "model.window")
        _require_choice(self.init_depth, "model.init_depth", INIT_DEPTHS)
        _require_choice(self.attn_impl, "model.attn_impl", ATTN_IMPLS)
        if self.match is not None:
            _require_choice(self.match, "model.match", MATCH_TARGETS)
        if self.family == "attamba":
            _require(self.n_kv_heads in (None, self.n_heads), "model.n_kv_heads",
                     "Attamba keys/values are SSM outputs of width dim; GQA is a transformer option")
            _require(self.attn_dim in (None, self.dim), "model.attn_dim",
                     "Attamba attends at width dim; attn_dim narrows transformer baselines only")

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads

    @property
    def max_length(self) -> Optional[int]:
        """The longest sequence this model can run: RoPE families ``ROPE_MAX_LENGTH``; mamba2 has
        no positions, so no limit (None)."""
        return None if self.family == "mamba2" else ROPE_MAX_LENGTH

    @property
    def width(self) -> int:
        """Width of the query (and, before GQA, key/value) projections."""
        return self.attn_dim if self.attn_dim is not None else self.dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def ffn_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3 * self.ffn_dim_multiplier)
        return self.ffn_multiple_of * -(-hidden // self.ffn_multiple_of)


@dataclass
class ChunkingConfig:
    strategy: str = "cyclic"  # uniform | cyclic | random | pseudo
    size: int = 8  # P: tokens per chunk (mean spacing for `random`)
    leading_tokens: int = 8  # keys right before the query that are always visible
    seed: int = 0  # boundary draw of the `random` strategy

    def __post_init__(self) -> None:
        _require_choice(self.strategy, "chunking.strategy", STRATEGIES)
        _require(isinstance(self.size, int) and self.size >= 1, "chunking.size",
                 f"must be an integer >= 1, got {self.size!r}")
        _require(isinstance(self.leading_tokens, int) and self.leading_tokens >= 0,
                 "chunking.leading_tokens", f"must be an integer >= 0, got {self.leading_tokens!r}")


@dataclass
class DataConfig:
    source: str = "default"  # default (embedded corpus) | jsonl | mqar (synthetic recall, attamba.data.mqar)
    paths: list[str] = field(default_factory=list)  # jsonl / jsonl.gz files or globs
    # "bpe" (trained on the train split), a .model / tokenizer.json path, or "integers" (MQAR's own vocabulary)
    tokenizer: str = "bpe"
    vocab_size: int = 8192  # for the trained BPE; MQAR's vocabulary of integers
    root: str = "runs/data"  # where the embedded corpus and tokenizers are prepared
    val_fraction: float = 0.05  # share of documents held out (default corpus)
    val_docs: int = 64  # documents held out from the stream (jsonl)
    mqar_kv_pairs: int = 8  # key-value pairs per MQAR example, each queried once
    mqar_power_a: float = 0.01  # Zoology's power law of the query positions: 1 uniform, small near the pairs
    mqar_val_examples: int = 1000  # held-out MQAR examples scored at each evaluation

    def __post_init__(self) -> None:
        _require_choice(self.source, "data.source", SOURCES)
        _require_positive(self.vocab_size, "data.vocab_size")
        _require(0 < self.val_fraction < 1, "data.val_fraction",
                 f"must be in (0, 1), got {self.val_fraction}")
        if self.source == "jsonl":
            _require(len(self.paths) > 0, "data.paths", "data=jsonl needs at least one path")
        if self.source == "mqar":
            _require(self.tokenizer == "integers", "data.tokenizer",
                     f"data=mqar reads its own integer tokens: use data.tokenizer=integers, got {self.tokenizer!r}")
        else:
            _require(self.tokenizer != "integers", "data.tokenizer",
                     "integers is MQAR's vocabulary (data=mqar); text needs bpe or a tokenizer file")
        _require_positive(self.mqar_kv_pairs, "data.mqar_kv_pairs")
        _require(self.mqar_power_a > 0, "data.mqar_power_a", f"must be > 0, got {self.mqar_power_a}")
        _require_positive(self.mqar_val_examples, "data.mqar_val_examples")


@dataclass
class OptimConfig:
    weight_decay: float = 0.033
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0  # max gradient norm; 0 disables clipping
    lr_min_ratio: float = 1e-6  # cosine decays to lr * lr_min_ratio

    def __post_init__(self) -> None:
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.clip >= 0, "optim.clip", f"must be >= 0, got {self.clip}")
        _require(0 <= self.lr_min_ratio <= 1, "optim.lr_min_ratio",
                 f"must be in [0, 1], got {self.lr_min_ratio}")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step, over all ranks
    seq_len: int = 1024
    grad_accum: int = 1
    lr: float = 3e-3
    warmup: int = 100
    eval_every: int = 200
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # auto: compile on CUDA, not on the CPU (attamba.compilation.resolve_compile) | true | false
    compile: str = "auto"
    # auto: reduce-overhead on CUDA | default | reduce-overhead (CUDA graphs: no per-kernel launch
    # cost on the host) | max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "auto"
    # Inductor's and Triton's caches, shared by the runs of a sweep (unless set in the environment)
    compile_cache: str = "runs/compile-cache"
    # Checkpoints, resolved config and tokenizer. None = <checkpoint_root>/<config hash>, so
    # re-running the same command resumes (or skips, if finished) instead of training twice.
    output_dir: Optional[str] = None
    checkpoint_root: str = "runs/checkpoints"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every",
                     "checkpoint_every", "log_every"):
            _require_positive(getattr(self, name), f"train.{name}")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(self.warmup >= 0, "train.warmup", f"must be >= 0, got {self.warmup}")
        _require_choice(self.device, "train.device", DEVICES)
        self.compile = str(self.compile).lower()  # true/false typed on the command line arrive as bools
        _require_choice(self.compile, "train.compile", COMPILE_SWITCHES)
        _require_choice(self.compile_mode, "train.compile_mode", COMPILE_MODES)
        _require(self.batch_size % self.grad_accum == 0, "train.grad_accum",
                 f"must divide train.batch_size={self.batch_size}, got {self.grad_accum}")


@dataclass
class EvalConfig:
    wikitext2_path: Optional[str] = None  # lm-eval's wikitext-2-raw-v1 test file
    wikitext2_every: int = 0  # 0: only at the end
    val_batches: int = 16  # batches of the held-out split per validation
    context: Optional[int] = None  # rolling-window context; None = train.seq_len
    passkey: bool = False  # passkey retrieval at the end of training (attamba.evals.passkey)
    passkey_lengths: Optional[list[int]] = None  # prompt lengths; None = 1/4, 1/2, 1 and 2 x train.seq_len
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle position
    passkey_trials: int = 4  # prompts per length and depth

    def __post_init__(self) -> None:
        for length in self.passkey_lengths or []:
            _require_positive(length, "eval.passkey_lengths")
        _require(len(self.passkey_depths) > 0 and all(0 <= depth <= 1 for depth in self.passkey_depths),
                 "eval.passkey_depths", f"must be fractions in [0, 1], got {self.passkey_depths}")
        _require_positive(self.passkey_trials, "eval.passkey_trials")

    def __post_init__(self) -> None:  # checked with the rest, not when the first evaluation comes
        _require(isinstance(self.wikitext2_every, int) and self.wikitext2_every >= 0, "eval.wikitext2_every",
                 f"must be an integer >= 0 (0: only at the end), got {self.wikitext2_every!r}")
        _require_positive(self.val_batches, "eval.val_batches")
        if self.context is not None:
            _require_positive(self.context, "eval.context")


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///runs/mlflow.db"
    experiment: str = "attamba"
    run_name: Optional[str] = None
    sweep: Optional[str] = None  # set by sweeps: the parent run's name
    # How long training goes on while the store refuses writes (server down, disk full) before the
    # run stops with a checkpoint; README, "Sweeps, MLflow, figures", has the policy.
    unavailable_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _require(self.unavailable_timeout_s >= 0, "tracking.unavailable_timeout_s",
                 f"must be >= 0 seconds, got {self.unavailable_timeout_s!r}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.model.family == "attamba":
            _require(self.train.seq_len >= self.chunking.size, "train.seq_len",
                     f"must be >= chunking.size={self.chunking.size}, got {self.train.seq_len}")
        if self.data.source == "mqar":
            self._check_mqar()
        if self.eval.passkey:
            check_passkey_lengths(self.passkey_lengths, self.model.max_length)

    def _check_mqar(self) -> None:
        """Zoology's conditions on an MQAR example, and no evaluation that needs text."""
        seq_len, pairs = self.train.seq_len, self.data.mqar_kv_pairs
        _require(seq_len % 2 == 0, "train.seq_len", f"MQAR places queries at even offsets: must be even, got {seq_len}")
        _require(4 * pairs <= seq_len, "data.mqar_kv_pairs",
                 f"{pairs} pairs and their queries need train.seq_len >= {4 * pairs}, got {seq_len}")
        _require(self.data.vocab_size > seq_len, "data.vocab_size",
                 f"MQAR needs a vocabulary larger than train.seq_len={seq_len}, got {self.data.vocab_size}")
        _require(not self.eval.passkey, "eval.passkey", "data=mqar has no text to hide a passkey in")
        _require(self.eval.wikitext2_path is None, "eval.wikitext2_path",
                 "data=mqar's integer vocabulary cannot read WikiText-2")

    @property
    def passkey_lengths(self) -> list[int]:
        """The passkey prompt lengths: ``eval.passkey_lengths``, or 1/4, 1/2, 1 and 2 x ``train.seq_len``."""
        if self.eval.passkey_lengths is not None:
            return list(self.eval.passkey_lengths)
        seq_len = self.train.seq_len
        return sorted({max(1, seq_len // 4), max(1, seq_len // 2), seq_len, 2 * seq_len})


def check_passkey_lengths(lengths: list[int], max_length: Optional[int]) -> None:
    """Refuse passkey lengths that the model cannot run (``max_length``; None: no limit)."""
    for length in lengths:
        _require(max_length is None or length <= max_length, "eval.passkey_lengths",
                 f"{length} is beyond the {max_length} tokens this model supports")


def to_dict(config: Any) -> dict:
    """A plain nested dict of a config dataclass (for YAML, hashing and MLflow params)."""
    return dataclasses.asdict(config)


def flat_params(config: Any) -> dict[str, Any]:
    """A config dataclass as dotted-key parameters: what MLflow logs and the config hash reads."""
    return flatten(to_dict(config))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``: the dotted keys users type as overrides."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)


def from_dictconfig(composed: Any) -> Config:
    """The typed, validated :class:`Config` of a Hydra-composed DictConfig."""
    from omegaconf import OmegaConf

    run_keys = [key for key in composed if key not in ("hydra", "plan")]  # hydra/plan steer, they don't configure
    container = OmegaConf.to_container(OmegaConf.masked_copy(composed, run_keys), resolve=True, throw_on_missing=True)
    return from_dict(container)


def from_dict(tree: dict) -> Config:
    """Build (and so validate) a :class:`Config` from a nested dict such as :func:`to_dict` returns."""
    sections = typing.get_type_hints(Config)
    unknown = set(tree) - set(sections)
    if unknown:
        raise ValueError(f"unknown config sections {sorted(unknown)}; allowed: {sorted(sections)}")
    model = dict(tree.get("model", {}))
    ssm = _section(SSMConfig, "model.ssm", model.pop("ssm", {}))
    others = {name: _section(kind, name, tree.get(name, {})) for name, kind in sections.items() if name != "model"}
    return Config(model=_section(ModelConfig, "model", model, ssm=ssm), **others)


def _section(kind: type, name: str, values: dict, **built: Any):
    """``kind(**values)``, where a key ``kind`` does not have (say, ``+model.chunk_sise=8``) is an error naming it."""
    known = [field.name for field in dataclasses.fields(kind)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {name}.{close[0]}?" if close else f"{name} has {', '.join(known)}"
            raise ValueError(f"{name}.{key}: no such setting; {hint}")
    return kind(**values, **built)
