"""Validation and example data: text tokenized with the model's tokenizer, or .npz/.npy arrays;
seeded example inputs for exporters.

Arrays are read with allow_pickle=False. Every batch is a dict input name -> numpy array in the
manifest's dtype. Errors name the data file and the tensor.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from kiln.errors import StepError, one_line


def batches(data_file: Path, source_files: list[Path] | None, inputs: list[dict], batch_size: int, max_length: int, max_samples: int | None) -> Iterator[dict[str, np.ndarray]]:
    """The batches of a data file: text tokenized with the source's tokenizer, or arrays."""
    if data_file.suffix == ".txt":
        tokenizer = load_tokenizer(source_files[0].parent)
        return text_batches(data_file, tokenizer, inputs, batch_size, max_length, max_samples)
    return array_batches(data_file, inputs, batch_size, max_samples)


def read_text_lines(path: Path, max_samples: int | None) -> list[str]:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise StepError(str(path), f"validation text is not UTF-8 (byte {err.start})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise StepError(str(path), "validation data is empty: expected at least one non-blank line")
    return lines[:max_samples] if max_samples else lines


def text_batches(path: Path, tokenizer: Any, inputs: list[dict], batch_size: int, max_length: int, max_samples: int | None) -> Iterator[dict[str, np.ndarray]]:
    lines = read_text_lines(path, max_samples)
    for start in range(0, len(lines), batch_size):
        encoded = tokenizer(lines[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        yield {spec["name"]: _take(encoded, spec, path) for spec in inputs}


def _take(encoded: Any, spec: dict, path: Path) -> np.ndarray:
    if spec["name"] not in encoded:
        raise StepError(str(path), f"input {spec['name']!r}: the tokenizer does not produce it; it gives {sorted(encoded.keys())}")
    return np.ascontiguousarray(encoded[spec["name"]].astype(spec["dtype"]))


def array_batches(path: Path, inputs: list[dict], batch_size: int, max_samples: int | None) -> Iterator[dict[str, np.ndarray]]:
    arrays = load_arrays(path, inputs)
    count = len(next(iter(arrays.values())))
    count = min(count, max_samples) if max_samples else count
    for start in range(0, count, batch_size):
        yield {name: np.ascontiguousarray(a[start : start + batch_size]) for name, a in arrays.items()}


def load_arrays(path: Path, inputs: list[dict]) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        # an .npz reads each array when asked: a pickled one or a damaged member fails here
        found = {name: loaded[name] for name in loaded.files} if not isinstance(loaded, np.ndarray) else None
    except ValueError as err:
        raise StepError(str(path), f"cannot read arrays ({one_line(err)}); object arrays (pickle) are refused") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise StepError(str(path), f"cannot read arrays: {one_line(err)}") from None
    if found is None:
        if len(inputs) != 1:
            raise StepError(str(path), f"a .npy holds one array but the model has {len(inputs)} inputs; use .npz with arrays named {[i['name'] for i in inputs]}")
        found = {inputs[0]["name"]: loaded}
    arrays = {}
    for spec in inputs:
        if spec["name"] not in found:
            raise StepError(str(path), f"input {spec['name']!r} is missing; the file has {sorted(found)}")
        if found[spec["name"]].ndim == 0:
            raise StepError(str(path), f"input {spec['name']!r} is a scalar; expected an array whose first axis is the samples")
        arrays[spec["name"]] = _check_array(found[spec["name"]], spec, path)
    counts = {name: len(a) for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise StepError(str(path), f"inputs have different sample counts {counts}; the first axis must match")
    if not next(iter(counts.values())):
        raise StepError(str(path), "validation data is empty: 0 samples")
    return arrays


def _check_array(array: np.ndarray, spec: dict, path: Path) -> np.ndarray:
    shape = spec.get("shape")
    if shape is not None and array.ndim != len(shape):
        raise StepError(str(path), f"input {spec['name']!r}: shape {list(array.shape)} has rank {array.ndim}, expected rank {len(shape)} {shape}")
    for axis, dim in enumerate(shape or []):
        if isinstance(dim, int) and array.shape[axis] != dim:
            raise StepError(str(path), f"input {spec['name']!r}: axis {axis} is {array.shape[axis]}, expected {dim} (shape {shape})")
    if not np.can_cast(array.dtype, spec["dtype"], casting="same_kind"):
        raise StepError(str(path), f"input {spec['name']!r}: dtype {array.dtype} cannot be used as {spec['dtype']}")
    return array.astype(spec["dtype"], copy=False)


def example_inputs(inputs: list[dict], seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded example inputs for export: dynamic axes get small sizes, values follow `range`."""
    rng = np.random.default_rng(seed)
    sizes = dict(sizes or {})
    out = {}
    for spec in inputs:
        shape = []
        for axis, dim in enumerate(spec.get("shape") or []):
            # A named axis has one size across all inputs: 2 if it leads (a batch), else 8.
            shape.append(dim if isinstance(dim, int) else sizes.setdefault(dim, 2 if axis == 0 else 8))
        low, high = spec.get("range") or ((0, 2) if "int" in spec["dtype"] or spec["dtype"] == "bool" else (-1.0, 1.0))
        if "int" in spec["dtype"] or spec["dtype"] == "bool":
            values = rng.integers(int(low), int(high), size=shape)
        else:
            values = rng.uniform(low, high, size=shape)
        out[spec["name"]] = values.astype(spec["dtype"])
    return out


def load_tokenizer(folder: Path):
    """The tokenizer of a Hugging Face model folder (text data is tokenized with the source's own)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at build time
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)
