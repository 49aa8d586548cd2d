"""Validation and example data: text tokenized with the model's tokenizer, .npz/.npy arrays or .csv
tables;
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
from kiln.runtime.tokenizer import TOKENIZER_FILES, load_tokenizer  # noqa: F401 (both re-exported: callers look load_tokenizer up here)


def batches(data_file: Path, source_files: list[Path] | None, inputs: list[dict], batch_size: int, max_length: int, max_samples: int | None,
            facts: dict | None = None, by_length_after: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The batches of a data file: text tokenized with the source's tokenizer, or arrays. `facts`
    (the step's, for the report) learns how the text was read (a pad token borrowed from eos).
    by_length_after: text only, see text_batches."""
    if data_file.suffix == ".txt":
        tokenizer = load_tokenizer(source_files[0].parent, facts)
        return text_batches(data_file, tokenizer, inputs, batch_size, max_length, max_samples, by_length_after)
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


def text_batches(path: Path, tokenizer: Any, inputs: list[dict], batch_size: int, max_length: int, max_samples: int | None,
                 by_length_after: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches of batch_size lines, each padded to its longest. by_length_after = K: the first K
    lines (rounded up to whole batches) keep the file's order, the rest are batched in order of
    their token count (ties in file order), so a batch pads its lines by a few tokens rather than to
    the longest line of a random 32: bert's 240 validation sentences are 17,824 token positions in
    file order, 7,712 so (the model runs 2-3x less). The first batches keep mixed lengths on
    purpose: an artifact that ignores the attention mask still meets real padding there."""
    lines = by_length(read_text_lines(path, max_samples), tokenizer, batch_size, max_length, by_length_after)
    words = unknown = 0
    for start in range(0, len(lines), batch_size):
        encoded = tokenizer(lines[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        counted = _word_tokens(encoded, tokenizer)
        words, unknown = words + counted[0], unknown + counted[1]
        yield {spec["name"]: _take(encoded, spec, path) for spec in inputs}
    if not words or unknown == words:
        # A tokenizer that does not fit the text (or a stand-in made from config.json) turns every
        # word into one token: the source and the artifact then agree on garbage and validation
        # would pass by accident.
        what = "no tokens but special ones" if not words else f"the unknown token {tokenizer.unk_token!r} for every one of its {words} word tokens"
        raise StepError(str(path), f"the model's tokenizer gives {what}: it does not read this text, so nothing real would be validated; check the tokenizer files of the model folder")


def by_length(lines: list[str], tokenizer: Any, batch_size: int, max_length: int, after: int | None) -> list[str]:
    """The lines in batching order (see text_batches)."""
    if after is None:
        return lines
    kept = min(len(lines), -(-max(after, 1) // batch_size) * batch_size)
    rest = lines[kept:]
    if not rest:
        return lines
    encoded = tokenizer(rest, truncation=True, max_length=max_length)
    ids = encoded["input_ids"] if "input_ids" in encoded else next(iter(encoded.values()))
    order = sorted(range(len(rest)), key=lambda i: (len(ids[i]), i))
    return lines[:kept] + [rest[i] for i in order]


def _word_tokens(encoded: Any, tokenizer: Any) -> tuple[int, int]:
    """(tokens that are not special or padding, how many of them are the unknown token)."""
    ids = np.asarray(encoded["input_ids"]) if "input_ids" in encoded else None
    if ids is None:
        return 1, 0  # not a token-id tokenizer: nothing to count, nothing to refuse
    unk = tokenizer.unk_token_id
    real = ~np.isin(ids, [i for i in tokenizer.all_special_ids if i != unk])  # [CLS], [SEP], padding...
    if "attention_mask" in encoded:
        real &= np.asarray(encoded["attention_mask"]) != 0
    return int(real.sum()), int((real & (ids == unk)).sum()) if unk is not None else 0


def _take(encoded: Any, spec: dict, path: Path) -> np.ndarray:
    if spec["name"] not in encoded:
        raise StepError(str(path), f"input {spec['name']!r}: the tokenizer does not produce it; it gives {sorted(encoded.keys())}")
    return np.ascontiguousarray(encoded[spec["name"]].astype(spec["dtype"]))


# The dynamic axis name that marks where the samples of a tensor lie (README: manifest reference).
BATCH = "batch"


def batch_axis(spec: dict) -> int | None:
    """The axis holding the samples of an input or output: where its shape names `batch`; axis 0
    when the manifest gives no shape (the data's first axis, as text data is tokenized); None when
    the shape has no `batch` (a scalar, a fixed tensor, a state with a fixed leading dim): such an
    input is fed whole to every batch, such an output compared whole."""
    shape = spec.get("shape")
    if shape is None:
        return 0
    return shape.index(BATCH) if BATCH in shape else None


def sample_count(feed: dict[str, np.ndarray], axes: dict[str, int | None]) -> int:
    """Samples in one batch, along the batch axis of its batched inputs (axes: input -> batch axis
    or None; a name it lacks is batched on axis 0); a feed without a batched input is one sample."""
    for name, value in feed.items():
        axis = axes.get(name, 0)
        if axis is not None:
            return int(value.shape[axis])
    return 1


def first_sample(feed: dict[str, np.ndarray], axes: dict[str, int | None]) -> dict[str, np.ndarray]:
    """The first sample of a batch as the model takes it: batched inputs cut to 1 on their batch
    axis (axes as in sample_count), the others whole."""
    return {name: contiguous(value if (axis := axes.get(name, 0)) is None else _cut(value, axis, 0, 1)) for name, value in feed.items()}


def contiguous(array: np.ndarray) -> np.ndarray:
    """A C-contiguous array of the same shape (np.ascontiguousarray turns a 0-d array into 1-d)."""
    return array if array.flags.c_contiguous else np.array(array, order="C")


def _cut(array: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    return array[(slice(None),) * axis + (slice(start, stop),)]


def array_batches(path: Path, inputs: list[dict], batch_size: int, max_samples: int | None) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch_size` samples cut along each input's batch axis; unbatched inputs go whole
    into every batch; without a batched input the file is one feed."""
    arrays = load_arrays(path, inputs)
    axes = {spec["name"]: batch_axis(spec) for spec in inputs}
    whole = {name: contiguous(a) for name, a in arrays.items() if axes[name] is None}
    batched = {name: a for name, a in arrays.items() if axes[name] is not None}
    if not batched:
        yield whole
        return
    name, array = next(iter(batched.items()))
    count = array.shape[axes[name]]
    count = min(count, max_samples) if max_samples else count
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)  # the last batch ends at max_samples, not past it
        feed = {name: contiguous(_cut(a, axes[name], start, stop)) for name, a in batched.items()} | whole
        yield {spec["name"]: feed[spec["name"]] for spec in inputs}  # in the manifest's order


def load_arrays(path: Path, inputs: list[dict]) -> dict[str, np.ndarray]:
    """The inputs' arrays from a .npz (or a .npy for a one-input model, or a .csv table), checked
    against the manifest: rank, fixed axes, dtype, and one sample count along every batched input's
    batch axis."""
    found = read_csv(path, inputs) if path.suffix == ".csv" else _read_numpy(path, inputs)
    arrays = {}
    for spec in inputs:
        if spec["name"] not in found:
            raise StepError(str(path), f"input {spec['name']!r} is missing; the file has {sorted(found)}")
        if found[spec["name"]].ndim == 0 and spec.get("shape") is None:
            raise StepError(str(path), f"input {spec['name']!r} is a scalar; expected an array whose first axis is the samples (or give the input shape = [] to feed it whole)")
        arrays[spec["name"]] = _check_array(found[spec["name"]], spec, path)
    counts = {spec["name"]: arrays[spec["name"]].shape[axis] for spec in inputs if (axis := batch_axis(spec)) is not None}
    if len(set(counts.values())) > 1:
        raise StepError(str(path), f"inputs have different sample counts {counts} along their batch axes; every batched input must hold the same samples")
    if counts and not next(iter(counts.values())):
        raise StepError(str(path), "validation data is empty: 0 samples")
    return arrays


def _read_numpy(path: Path, inputs: list[dict]) -> dict[str, np.ndarray]:
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
    return found


def read_csv(path: Path, inputs: list[dict]) -> dict[str, np.ndarray]:
    """A table with a header row, one sample per row. An input takes the columns its `columns` names,
    in that order ([samples, len(columns)], or [samples] for one column of a 1-D input); without
    `columns`, a 1-D input takes the column named like it, and the only input of a model every
    column. Cells are numbers; an empty cell is NaN (a missing value, which tree models route), and
    refused for an integer input."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: spreadsheets write a BOM
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise StepError(str(path), f"cannot read the table: {one_line(err)}") from None
    rows = [row for row in rows if row]  # an empty line is no sample; a row of empty cells is one, all missing
    if not rows:
        raise StepError(str(path), "the table is empty; expected a header row of column names, then one row per sample")
    header, body = [name.strip() for name in rows[0]], rows[1:]
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise StepError(str(path), f"columns {twice} appear more than once in the header; each column needs its own name")
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise StepError(str(path), f"row {number} has {len(row)} cells, the header {len(header)}")
    return {spec["name"]: _csv_columns(path, header, body, spec, len(inputs)) for spec in inputs}


def _csv_columns(path: Path, header: list[str], body: list[list[str]], spec: dict, input_count: int) -> np.ndarray:
    names = spec.get("columns")
    rank = len(spec["shape"]) if spec.get("shape") is not None else 2
    if names is None:
        if rank == 1 and spec["name"] in header:
            names = [spec["name"]]
        elif input_count == 1:
            names = header
        else:
            raise StepError(str(path), f"input {spec['name']!r}: no column is named so and the model has {input_count} inputs; name its columns with inputs.columns (the table has {header})")
    missing = [name for name in names if name not in header]
    if missing:
        raise StepError(str(path), f"input {spec['name']!r}: columns {missing} are not in the table; it has {header}")
    dtype = np.dtype(spec["dtype"])
    integer = dtype.kind in "biu"
    values = np.empty((len(body), len(names)), dtype=np.int64 if integer else np.float64)
    for j, name in enumerate(names):
        column = header.index(name)
        for i, row in enumerate(body):
            values[i, j] = _csv_number(path, row[column], i + 2, name, dtype)
    return values[:, 0] if rank == 1 and len(names) == 1 else values


def _csv_number(path: Path, cell: str, row: int, column: str, dtype: np.dtype):
    """One cell as the input's dtype would hold it: an integer within the dtype's range, or a finite
    number (empty or "NaN": missing). Python's own spellings beyond plain numbers ("1_000", "inf") are
    not data a table means."""
    text = cell.strip()
    if dtype.kind in "biu":
        info = np.iinfo(np.int64 if dtype.kind == "b" else dtype)
        low, high = (0, 1) if dtype.kind == "b" else (info.min, info.max)
        if text.lstrip("+-").isdigit() and low <= int(text) <= high:
            return int(text)
        allowed = f"an integer from {low} to {high} ({dtype.name})"
    else:
        try:
            value = float(text) if text and text.lower() != "nan" else np.nan
        except ValueError:
            value = None
        if value is not None and "_" not in text and (np.isnan(value) or np.isfinite(value)):
            return value
        allowed = "a finite number (or an empty cell or NaN for a missing value)"
    raise StepError(str(path), f"row {row}, column {column!r}: {cell!r} is not allowed; expected {allowed}")


def _check_array(array: np.ndarray, spec: dict, path: Path) -> np.ndarray:
    shape = spec.get("shape")
    if shape is not None and array.ndim != len(shape):
        raise StepError(str(path), f"input {spec['name']!r}: shape {list(array.shape)} has rank {array.ndim}, expected rank {len(shape)} {shape}")
    for axis, dim in enumerate(shape or []):
        if isinstance(dim, int) and array.shape[axis] != dim:
            raise StepError(str(path), f"input {spec['name']!r}: axis {axis} is {array.shape[axis]}, expected {dim} (shape {shape})")
    if not np.can_cast(array.dtype, spec["dtype"], casting="same_kind"):
        raise StepError(str(path), f"input {spec['name']!r}: dtype {array.dtype} cannot be used as {spec['dtype']}")
    target = np.dtype(spec["dtype"])
    if array.dtype.kind in "iu" and target.kind in "iu" and array.size and not np.can_cast(array.dtype, target, casting="safe"):
        info = np.iinfo(target)  # an int64 token id past int32 would wrap around, silently
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise StepError(str(path), f"input {spec['name']!r}: values from {low} to {high} do not fit {target.name} ({info.min} to {info.max})")
    return array.astype(spec["dtype"], copy=False)


def example_inputs(inputs: list[dict], seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded example inputs for export: dynamic axes get small sizes, values follow `range`; a
    scalar input (shape []) is a 0-d array."""
    rng = np.random.default_rng(seed)
    sizes = dict(sizes or {})
    out = {}
    for spec in inputs:
        shape = []
        for dim in spec.get("shape") or []:
            # A named axis has one size across all inputs: 2 for the batch (wherever it is), else 8.
            shape.append(dim if isinstance(dim, int) else sizes.setdefault(dim, 2 if dim == BATCH else 8))
        low, high = spec.get("range") or ((0, 2) if "int" in spec["dtype"] or spec["dtype"] == "bool" else (-1.0, 1.0))
        if "int" in spec["dtype"] or spec["dtype"] == "bool":
            values = rng.integers(int(low), int(high), size=shape)
        else:
            values = rng.uniform(low, high, size=shape)
        out[spec["name"]] = values.astype(spec["dtype"])
    return out
