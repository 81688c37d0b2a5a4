"""Shared test fixtures: deterministic torch, paths to ../shared data when present."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which is chosen when triton.jit
# decorates them: the variable must be set before attamba.ops.ssm_triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_reads_scalars_under_numpy_2_4() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element arrays, which NumPy 2.4 no longer turns
    into ints: a loop bound read from memory fails (triton-lang/triton#9171, fixed after 3.6)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_reads_scalars_under_numpy_2_4()

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
PERFORMANCE = REPO_ROOT / "docs" / "performance.md"
SHARED = Path(os.environ.get("ATTAMBA_SHARED", REPO_ROOT.parent / "shared"))
WIKITEXT2_TEST = SHARED / "data" / "wikitext-2" / "wiki.test.raw"
PAPER_RUNS = SHARED / "data" / "attamba-paper-runs.tar.gz"


@pytest.fixture
def compile_without_interpreter():
    """Runs a Python program that compiles Triton kernels for a GPU target (no GPU needed) outside
    Triton's interpreter, and fails the test with its error: the code generator and ptxas check
    what the interpreter does not."""
    def run(program: str) -> None:
        environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
        result = subprocess.run([sys.executable, "-c", program], env=environment, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


def require_shared(path: Path) -> Path:
    """Skip (saying why) when the shared data that CI has is absent from this clone."""
    if not path.exists():
        pytest.skip(f"{path} not found: this test needs the project's shared data next to the clone")
    return path
