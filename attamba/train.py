"""``attamba-train``: the Hydra entry point (``conf/config.yaml``), single runs and ``-m`` sweeps.

Turns the composed DictConfig into the typed :class:`Config`, resolves what is
decided at compose time (iso-matched baseline widths, the output directory),
and hands the result to :func:`attamba.trainer.train`.

Exit status, for single runs and ``-m`` sweeps alike:

* 0: trained to the end (or nothing left to do);
* 1: a run failed (a diverged loss, a full disk, ...); its MLflow run is FAILED with the reason;
* 2: refused before training: a bad setting (ours or Hydra's) or a run already in progress;
  nothing tracked changed;
* 130 / 143: stopped by SIGINT / SIGTERM; the run is KILLED and the same command resumes it.
"""

from __future__ import annotations

import dataclasses
import errno
import signal
import sys
import threading

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
    """The model's vocabulary is the tokenizer's: the BPE's configured size, or that of the given
    file (loading it here also rejects an unloadable tokenizer before any job is submitted) or of
    MQAR's integers."""
    from attamba.data import build_tokenizer

    data = config.data
    vocab = data.vocab_size if data.tokenizer == "bpe" else build_tokenizer(data).vocab_size
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab))


def resolve(composed: DictConfig) -> Config:
    """The typed, validated, fully resolved config of one run."""
    return resolve_output_dir(canonicalize(resolve_match(resolve_vocab(from_dictconfig(composed)))))


EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM

register_configs()


def stop_on_sigterm() -> threading.Event:
    """SIGTERM asks the run to stop at its next step, with a checkpoint (as a sweep's preemption
    does); a second SIGTERM ends the process at once."""
    requested = threading.Event()

    def handle(signum: int, frame) -> None:
        requested.set()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, handle)
    return requested


def fail(message: str, code: int) -> SystemExit:
    print(f"attamba-train: {message}", file=sys.stderr, flush=True)
    return SystemExit(code)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _app(composed: DictConfig) -> float | None:
    from attamba.checkpoint import NoSpaceLeft
    from attamba.tracking import TrackingUnavailable
    from attamba.trainer import RunFailed, TrainingDiverged, train
    from launchers.job import any_rank

    try:
        config = resolve(composed)
        if composed.get("plan"):  # as with -m: the plan of this one run, and nothing trained
            return print_plan(config)
        sigterm = stop_on_sigterm()
        final = train(config, stop_requested=lambda: any_rank(sigterm.is_set()))
    except (TrainingDiverged, RunFailed) as error:  # the run is FAILED with this reason
        raise fail(f"error: {error}; the MLflow run is FAILED", EXIT_FAILED) from None
    except ValueError as error:  # a bad setting: one clear line naming it, no traceback
        raise fail(f"error: {error}", EXIT_REFUSED) from None
    except TrackingUnavailable as error:  # the run stopped with a checkpoint; its line says what to do
        raise fail(f"error: {error}", EXIT_FAILED) from None
    except NoSpaceLeft as error:  # the run is FAILED with this reason
        raise fail(f"error: {error.strerror}; the MLflow run is FAILED", EXIT_FAILED) from None
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise fail(f"error: {error}", EXIT_FAILED) from None
    except KeyboardInterrupt:
        raise fail("interrupted: its MLflow run is KILLED; run the same command to resume from its last "
                   "checkpoint", EXIT_SIGINT) from None
    if "preempted_at_step" in final:
        raise fail(f"stopped by SIGTERM at step {int(final['preempted_at_step'])}: checkpoint saved, the MLflow "
                   "run is KILLED; run the same command to resume", EXIT_SIGTERM)
    return final.get("eval/val/loss")


def print_plan(config: Config) -> None:
    from attamba.tracking import finished_config_hashes
    from launchers.sweep import SweepPoint, plan_table

    tracked = finished_config_hashes(config.tracking.uri, config.tracking.experiment)
    print(plan_table([SweepPoint(0, (), config)], tracked))
    print("plan only (+plan=true): nothing trained")


def main() -> None:
    try:
        _app()
    except SystemExit as exit_:
        # Hydra ends a bad override or config group with exit 1, raised while handling its error
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if exit_.code == 1 and isinstance(exit_.__context__, (HydraException, OmegaConfBaseException)):
            raise SystemExit(EXIT_REFUSED) from None
        raise


if __name__ == "__main__":
    main()
