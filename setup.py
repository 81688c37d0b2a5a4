"""Installs ``attamba-lm-eval.pth`` into site-packages beside the package, for regular and editable
installs alike, so that ``lm_eval --model attamba`` finds our model (see attamba/evals/lm_eval_plugin.py).
Everything else about the package is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "attamba-lm-eval.pth"
ROOT = Path(__file__).resolve().parent


class BuildPyWithPth(build_py):
    """A regular install: the .pth goes into build_lib's top level, which becomes site-packages."""

    def run(self) -> None:
        super().run()
        self.copy_file(str(ROOT / PTH), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


class _WithPth:
    """An editable-install strategy of setuptools that also writes the .pth into the wheel."""

    def __init__(self, strategy) -> None:
        self.strategy = strategy

    def __call__(self, wheel, files, mapping) -> None:
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH, (ROOT / PTH).read_bytes())

    def __enter__(self) -> "_WithPth":
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc_info) -> object:
        return self.strategy.__exit__(*exc_info)


class EditableWheelWithPth(editable_wheel):
    """An editable install: its wheel holds only setuptools' own path hook, so the .pth is added to it
    (through ``_select_strategy``, setuptools' one place that decides what that wheel contains)."""

    def _select_strategy(self, name, tag, build_lib):
        return _WithPth(super()._select_strategy(name, tag, build_lib))


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
