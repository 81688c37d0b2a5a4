"""Makes ``lm_eval --model attamba`` work: registers our model whenever lm-eval's registry is imported.

lm-eval (0.4.13) finds models only in its own ``MODEL_MAPPING`` or among classes already
decorated with ``register_model``; it reads no entry points. So the package installs
``attamba-lm-eval.pth`` (see ``setup.py``), which Python runs at start-up: it calls
:func:`install`, which puts a finder on ``sys.meta_path`` that, once ``lm_eval.api.registry``
has been imported, registers ``attamba`` as a lazy placeholder for
:class:`attamba.evals.harness.AttambaLM`. Nothing of lm-eval or torch is imported before a
program imports lm-eval itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Sequence

REGISTRY_MODULE = "lm_eval.api.registry"
MODEL_NAME = "attamba"
MODEL_TARGET = "attamba.evals.harness:AttambaLM"


def register(registry_module: ModuleType) -> None:
    """Register ``attamba`` in an imported ``lm_eval.api.registry`` (unless it already is)."""
    if MODEL_NAME not in registry_module.model_registry:
        registry_module.model_registry.register(MODEL_NAME, target=MODEL_TARGET)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds ``lm_eval.api.registry`` as Python would, and runs :func:`register` after its module code."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None):
        if fullname != REGISTRY_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            register(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register ``attamba`` now if lm-eval's registry is already imported, else when it is."""
    if REGISTRY_MODULE in sys.modules:
        register(sys.modules[REGISTRY_MODULE])
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
