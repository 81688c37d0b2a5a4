"""Attamba: chunk-compressed attention with SSM keys/values.

The public API for notebooks and scripts::

    import attamba
    config = attamba.load_config(["model=attamba", "chunking.size=16"])
    model = attamba.build_model(config)
    loss_of = torch.compile(attamba.NextTokenLoss(model))  # the trainer's objective, compiled with the model
    gen = attamba.Generator(model)

``build_model``, ``NextTokenLoss`` and ``Generator`` are imported on first use, so tools that only
need configs or tracking (sweep launchers, MLflow readers) don't pay for torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from attamba.config import Config

if TYPE_CHECKING:
    from attamba.inference import Generator
    from attamba.models import NextTokenLoss, build_model

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def load_config(overrides: Sequence[str] = ()) -> Config:
    """Compose ``conf/`` with Hydra override strings and return the validated, typed config."""
    from hydra import compose, initialize_config_dir

    from attamba.config import from_dictconfig, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = compose(config_name="config", overrides=list(overrides))
    return from_dictconfig(composed)


def __getattr__(name: str) -> Any:
    if name == "build_model":
        from attamba.models import build_model
        return build_model
    if name == "NextTokenLoss":
        from attamba.models import NextTokenLoss
        return NextTokenLoss
    if name == "Generator":
        from attamba.inference import Generator
        return Generator
    raise AttributeError(f"module 'attamba' has no attribute {name!r}")


__all__ = ["Config", "Generator", "NextTokenLoss", "build_model", "load_config"]
