"""Hydra discovers launchers only under ``hydra_plugins``; the logic lives in ``launchers/``."""
