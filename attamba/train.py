"""``attamba-train``: the Hydra entry point (``conf/config.yaml``), single runs and ``-m`` sweeps.

Turns the composed DictConfig into the typed :class:`Config`, resolves what is
decided at compose time (iso-matched baseline widths, the output directory),
and hands the result to :func:`attamba.trainer.train`.
"""

from __future__ import annotations

import dataclasses
import sys

import hydra
from omegaconf import DictConfig

from attamba import CONF_DIR
from attamba.config import (ChunkingConfig, Config, ModelConfig, SSMConfig, flat_params, from_dictconfig,
                            register_configs)


def resolve_match(config: Config) -> Config:
    """A baseline declared by what it matches (``model.match``) gets its ``attn_dim`` from accounting,
    against the Attamba model with this sweep point's dims and chunking."""
    from attamba.accounting import match_attn_dim

    model = config.model
    if model.match is None:
        return config
    if model.family != "transformer":
        raise ValueError(f"model.match: only transformer baselines are matched to Attamba, not {model.family!r}")
    reference = dataclasses.replace(model, family="attamba", attn_dim=None, n_kv_heads=None, window=None, match=None)
    matched = match_attn_dim(reference, config.chunking, config.train.seq_len, model.match, window=model.window)
    return dataclasses.replace(config, model=dataclasses.replace(model, attn_dim=matched.attn_dim))


def canonicalize(config: Config) -> Config:
    """Reset the settings a family ignores, so equal models get equal config hashes (a grid over
    chunk sizes trains the full transformer once, not once per size). A matched baseline keeps the
    chunking it was matched against: that is what the analysis groups it by."""
    model, defaults = config.model, ModelConfig()
    if model.family == "attamba":
        return config
    if model.family == "transformer":
        model = dataclasses.replace(model, ssm=SSMConfig(), kv_residual=defaults.kv_residual, kv_proj=defaults.kv_proj)
    else:
        model = dataclasses.replace(model, n_kv_heads=None, attn_dim=None, window=None, attn_impl=defaults.attn_impl,
                                    kv_residual=defaults.kv_residual, kv_proj=defaults.kv_proj)
    chunking = config.chunking if model.match is not None else ChunkingConfig()
    return dataclasses.replace(config, model=model, chunking=chunking)


def resolve_output_dir(config: Config) -> Config:
    """Default the output directory to one per configuration, so a rerun resumes instead of duplicating."""
    from attamba.tracking import config_hash

    if config.train.output_dir is not None:
        return config
    digest = config_hash(flat_params(config))
    output_dir = f"{config.train.checkpoint_root}/{digest}"
    return dataclasses.replace(config, train=dataclasses.replace(config.train, output_dir=output_dir))


def resolve_vocab(config: Config) -> Config:
    """The model's vocabulary is the tokenizer's: the BPE's configured size, or the given file's
    (loading it here also rejects an unloadable tokenizer before any job is submitted)."""
    from attamba.data import load_tokenizer

    data = config.data
    vocab = data.vocab_size if data.tokenizer == "bpe" else load_tokenizer(data.tokenizer).vocab_size
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab))


def resolve(composed: DictConfig) -> Config:
    """The typed, validated, fully resolved config of one run."""
    return resolve_output_dir(canonicalize(resolve_match(resolve_vocab(from_dictconfig(composed)))))


register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _app(composed: DictConfig) -> float | None:
    from attamba.trainer import train

    try:
        config = resolve(composed)
        if composed.get("plan"):  # as with -m: the plan of this one run, and nothing trained
            return print_plan(config)
        final = train(config)
    except ValueError as error:  # a bad setting: one clear line naming it, no traceback
        print(f"attamba-train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return final.get("eval/val/loss")


def print_plan(config: Config) -> None:
    from attamba.tracking import finished_config_hashes
    from launchers.sweep import SweepPoint, plan_table

    tracked = finished_config_hashes(config.tracking.uri, config.tracking.experiment)
    print(plan_table([SweepPoint(0, (), config)], tracked))
    print("plan only (+plan=true): nothing trained")


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
