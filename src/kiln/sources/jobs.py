"""Exporters that run in a fresh child process (kiln.runtime.child) and load the source model there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.runtime.child import portable_code_paths, read_job
from kiln.sources import model_and_example


def source_job(params, inputs: dict, out, root) -> dict[str, Any]:
    """The job of an exporter child that loads the source model: the rule's params, the source's
    files, the workspace root and the output path."""
    return {"params": params.model_dump(), "files": [str(p) for p in inputs["source"]], "root": str(root), "out": str(out)}


def read_source_job(params_type, portable_paths=lambda params: True):
    """In an exporter child: (params, model, example args, output path), the model and its example
    inputs as every exporter uses them (TorchKind.model_and_example). Unless portable_paths(params)
    says no, the loaded code's file names are made machine-independent (portable_code_paths)."""
    job = read_job()
    params = params_type(**job["params"])
    model, args = model_and_example(params.source, [Path(f) for f in job["files"]], params.inputs, params.outputs, Path(job["root"]))
    if portable_paths(params):
        portable_code_paths(job["root"], model)
    return params, model, args, Path(job["out"])
