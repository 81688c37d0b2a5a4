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
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
INIT_DEPTHS = ("none", "current", "global")
MATCH_TARGETS = ("kv_cache", "flops", "params")
DEVICES = ("auto", "cpu", "cuda")


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
    source: str = "default"  # default (embedded corpus) | jsonl
    paths: list[str] = field(default_factory=list)  # jsonl / jsonl.gz files or globs
    tokenizer: str = "bpe"  # "bpe" (trained on the train split) or a .model / tokenizer.json path
    vocab_size: int = 8192  # for the trained BPE
    root: str = "runs/data"  # where the embedded corpus and tokenizers are prepared
    val_fraction: float = 0.05  # share of documents held out (default corpus)
    val_docs: int = 64  # documents held out from the stream (jsonl)

    def __post_init__(self) -> None:
        _require_choice(self.source, "data.source", ("default", "jsonl"))
        _require_positive(self.vocab_size, "data.vocab_size")
        _require(0 < self.val_fraction < 1, "data.val_fraction",
                 f"must be in (0, 1), got {self.val_fraction}")
        if self.source == "jsonl":
            _require(len(self.paths) > 0, "data.paths", "data=jsonl needs at least one path")


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
    compile: bool = False
    # default | reduce-overhead (CUDA graphs: no per-kernel launch cost on the host) |
    # max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"
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
        _require_choice(self.compile_mode, "train.compile_mode", COMPILE_MODES)
        _require(self.batch_size % self.grad_accum == 0, "train.grad_accum",
                 f"must divide train.batch_size={self.batch_size}, got {self.grad_accum}")


@dataclass
class EvalConfig:
    wikitext2_path: Optional[str] = None  # lm-eval's wikitext-2-raw-v1 test file
    wikitext2_every: int = 0  # 0: only at the end
    val_batches: int = 16  # batches of the held-out split per validation
    context: Optional[int] = None  # rolling-window context; None = train.seq_len


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///runs/mlflow.db"
    experiment: str = "attamba"
    run_name: Optional[str] = None
    sweep: Optional[str] = None  # set by sweeps: the parent run's name


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
