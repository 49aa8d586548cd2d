"""The Rule base class and the registry. One rule per file in build_rules/ (kiln.build_rules).

A rule declares its name, version (bump it when its output for the same inputs changes), the
tools whose versions enter its steps' keys, and typed Params. Heavy imports (torch, onnx...) go
inside run(), so planning a build never pays for them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from kiln.base.paths import state_dir


@dataclass(frozen=True)
class RunContext:
    """What a running rule may know besides its inputs: the workspace root and its step's name."""

    root: Path
    step: str

    def progress(self, done: int, total: int | None = None) -> None:
        """Tell the terminal how far the step is: `done` of `total` batches (total None: not known
        ahead). Cheap to call per batch: the build's display (kiln.engine.progress) reads what the
        last call wrote, whichever process or thread runs the step."""
        now = time.monotonic()
        path = progress_path(self.root, self.step)
        if done != total and now - _progress_written.get(path, 0.0) < _PROGRESS_EVERY_S:
            return
        _progress_written[path] = now
        with contextlib.suppress(OSError):  # the display is a nicety: it can never fail a step
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
            temp.write_text(f"{int(done)} {'' if total is None else int(total)}\n")
            os.replace(temp, path)  # the reader never sees half a line


_PROGRESS_EVERY_S = 0.1  # at most ten writes a second per step, however short its batches
_progress_written: dict[Path, float] = {}  # progress file -> when RunContext.progress last wrote it


def progress_path(root: Path, step: str) -> Path:
    """Where a running step's progress is ("<done> <total>"): one small file per step, so steps in
    doit's worker processes reach the parent's display as well as those in its threads."""
    return state_dir(root) / "progress" / (step.replace("/", "__") + ".txt")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# (base MiB, MiB per input MiB) of rules that hold a torch model: the model, plus the exporter's / runner's copies
TORCH_MODEL_MEMORY = (1024, 4.0)


class Rule:
    name: ClassVar[str]
    version: ClassVar[int]
    tools: ClassVar[tuple[str, ...]]
    Params: ClassVar[type[Params]]

    # Peak memory estimate: base + per_input x the bytes of the step's inputs. Torch rules load a
    # model (weights, activations, the exporter's copies) and override it; see kiln.resources.
    memory_base_mib: ClassVar[int] = 256
    memory_per_input: ClassVar[float] = 3.0
    # The tools run in a child process (kiln.runtime.child), not in the build's: such a step runs
    # beside an in-process torch step (kiln.execute.step's torch lock is about this process's torch).
    runs_in_child: ClassVar[bool] = False
    # Roughly how many seconds a first run takes on a small model (bert on 2 cores), for the order a
    # cold build starts steps in (kiln.plan.steps.critical_first); a step that ran before uses its
    # own last time instead. Never a limit, never part of a key.
    cost: ClassVar[float] = 1.0

    @classmethod
    def memory_mib(cls, params: dict[str, Any], input_bytes: int) -> int:
        """MiB this step reserves from the build's memory budget while it runs."""
        return int(cls.memory_base_mib + cls.memory_per_input * input_bytes / (1 << 20))

    @classmethod
    def tools_for(cls, params: dict[str, Any]) -> tuple[str, ...]:
        """The tools whose versions enter this step's key; a rule whose tools depend on its params
        (validate: onnxruntime for ONNX, torch for weights) narrows them here."""
        return cls.tools

    @classmethod
    def hardware_for(cls, params: dict[str, Any]) -> dict[str, Any] | None:
        """Facts about the machine that this step's output is specific to (a TensorRT engine: the
        GPU model, compute capability, TensorRT version), or None for portable outputs. They enter
        the step key, so moving to another GPU rebuilds with the reason "hardware changed"."""
        return None

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: Any, ctx: RunContext) -> dict[str, Any]:
        """Read inputs, write every output path (kiln renames them into place afterwards).
        Return facts for the report (metrics, sizes). Raise StepError for a user-fixable failure."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Rule]] = {}
_ALL_LOADED = False


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator used by each build_rules/<rule>.py. A second rule of the same name is a bug."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"two rules named {cls.name!r}: {_REGISTRY[cls.name].__module__} and {cls.__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def all_rules() -> dict[str, type[Rule]]:
    """Import every module of kiln.build_rules once; each registers its rule. (A module imported on
    its own registers only itself, so the registry being non-empty does not mean all are loaded.)"""
    global _ALL_LOADED
    if not _ALL_LOADED:
        import kiln.build_rules as package

        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{info.name}")
        _ALL_LOADED = True
    return _REGISTRY


def get_rule(name: str) -> type[Rule]:
    return all_rules()[name]
