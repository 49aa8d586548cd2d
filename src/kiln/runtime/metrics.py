"""Validation metrics: how far an artifact's outputs are from the reference outputs.

Per output: max_abs_diff and max_rel_diff (native kernel, exact), and the cosine similarity of each
row along the last axis (one per token for last_hidden_state, one per sample for pooled outputs),
summarized as mean_cosine and min_cosine over all rows of all batches. An output's batch axis is
moved first before rows are cut, so a row never mixes samples (a state [2, batch, 8] gives one row
per layer per sample); an output without a batch axis is compared whole. distribution() gives the
rows' spread (1 - cosine and max |diff| per row) as fixed-bin histograms for the HTML report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln import _native

# Gates more data can only make worse (a minimum, a maximum): one batch failing them fails the whole set.
MONOTONE_GATES = ("min_cosine", "max_abs_diff", "max_rel_diff")
GATES = {  # metric -> (comparison, words for a failure)
    "min_cosine": (lambda value, limit: value >= limit, "<"),
    "mean_cosine": (lambda value, limit: value >= limit, "<"),
    "max_abs_diff": (lambda value, limit: value <= limit, ">"),
    "max_rel_diff": (lambda value, limit: value <= limit, ">"),
}
# Histogram edges of the per-row errors: 1e-12 .. 1e2, two bins per decade. Parsed from decimal text
# so every machine gets the same doubles (10 ** 0.5 need not round alike everywhere).
HISTOGRAM_EDGES = tuple(float(f"{10 ** (k / 2):.6g}") for k in range(-24, 5))


@dataclass
class OutputMetrics:
    """Running metrics of one output across batches: holds only scalars and the row cosines."""

    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    nonfinite: int = 0
    mismatched: int | None = None  # integer outputs (class labels, token ids): values that differ at all
    cosines: list[np.ndarray] = field(default_factory=list)
    row_max_abs: list[np.ndarray] = field(default_factory=list)  # per row, cut as the cosines are

    def add(self, ref: np.ndarray, out: np.ndarray, padding: np.ndarray | None = None, batch_axis: int | None = 0) -> None:
        """padding: optional mask over the leading axes, batch first (e.g. attention_mask [batch,
        sequence]); rows where it is 0 are padding, whose values no caller uses, and are left out.
        batch_axis: where the output's samples lie (None: it has none; padding then does not apply)."""
        if np.shape(ref) != np.shape(out):
            raise ValueError(f"shape {list(np.shape(out))} differs from the reference's {list(np.shape(ref))}")
        ref, out = (_batch_first(np.asarray(a), batch_axis) for a in (ref, out))
        if batch_axis is None:
            padding = None
        if padding is not None and ref.ndim > padding.ndim and ref.shape[: padding.ndim] == padding.shape:
            keep = padding.reshape(-1) != 0
            ref, out = (np.ascontiguousarray(a.reshape(keep.size, -1)[keep]) for a in (ref, out))
        if ref.dtype.kind in "biu":
            # a label is right or wrong: a cosine or a float32 difference of classes 1 and 2 says little
            differ = ref != out
            if padding is not None and differ.shape == padding.shape:  # one id per position: padded ones say nothing
                differ &= padding != 0
            self.mismatched = (self.mismatched or 0) + int(np.count_nonzero(differ))
        ref32, out32 = (np.require(a, dtype=np.float32, requirements="C") for a in (ref, out))
        max_abs, max_rel, nonfinite = _native.diff_stats(ref32, out32)
        self.max_abs_diff = max(self.max_abs_diff, max_abs) if not np.isnan(max_abs) else float("nan")
        self.max_rel_diff = max(self.max_rel_diff, max_rel) if not np.isnan(max_rel) else float("nan")
        self.nonfinite += nonfinite
        self.cosines.append(row_cosines(ref32, out32))
        self.row_max_abs.append(row_max_abs_diffs(ref32, out32))

    def extend(self, later: OutputMetrics) -> None:
        """Fold in another instance's batches as if they had been added after this one's: the same
        numbers, bit for bit, as adding every batch to one instance in that order."""
        self.max_abs_diff = max(self.max_abs_diff, later.max_abs_diff) if not np.isnan(later.max_abs_diff) else float("nan")
        self.max_rel_diff = max(self.max_rel_diff, later.max_rel_diff) if not np.isnan(later.max_rel_diff) else float("nan")
        self.nonfinite += later.nonfinite
        if later.mismatched is not None:
            self.mismatched = (self.mismatched or 0) + later.mismatched
        self.cosines += later.cosines
        self.row_max_abs += later.row_max_abs

    def summary(self) -> dict[str, float | int]:
        cos = np.concatenate(self.cosines) if self.cosines else np.ones(1)
        return {
            "max_abs_diff": float(self.max_abs_diff), "max_rel_diff": float(self.max_rel_diff),
            "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "rows": int(cos.size), "nonfinite": int(self.nonfinite),
        } | ({"mismatched": self.mismatched} if self.mismatched is not None else {})


    def distribution(self) -> dict[str, Any]:
        """The rows' errors as two histograms on HISTOGRAM_EDGES: of 1 - cosine and of max |diff|.
        JSON-ready: the edges, the row count and per histogram "counts" (one per bin, a value v in
        [edges[i], edges[i+1])) and the rows outside the bins: "zero" (exactly 0), "underflow" (below
        1e-12 but not 0, e.g. a cosine rounded just above 1), "overflow" (1e2 or more, inf) and "nan"."""
        cos = np.concatenate(self.cosines) if self.cosines else np.ones(0)
        diffs = np.concatenate(self.row_max_abs) if self.row_max_abs else np.zeros(0)
        # row_cosines scores a row with a NaN as cosine 0; here it is a NaN row, as its max |diff| is
        one_minus = np.where(np.isnan(diffs), np.nan, 1.0 - cos)
        return {"edges": list(HISTOGRAM_EDGES), "rows": int(cos.size),
                "one_minus_cosine": histogram(one_minus), "max_abs_diff": histogram(diffs)}


def histogram(values: np.ndarray) -> dict[str, Any]:
    """Counts of values on HISTOGRAM_EDGES, with the zero, underflow, overflow and NaN rows apart."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    edges = np.asarray(HISTOGRAM_EDGES)
    nan = np.isnan(values)
    finite = values[~nan]
    inside = finite[(finite >= edges[0]) & (finite < edges[-1])]
    bins = np.searchsorted(edges, inside, side="right") - 1
    return {"counts": [int(c) for c in np.bincount(bins, minlength=edges.size - 1)],
            "zero": int(np.count_nonzero(finite == 0)),
            "underflow": int(np.count_nonzero((finite < edges[0]) & (finite != 0))),
            "overflow": int(np.count_nonzero(finite >= edges[-1])), "nan": int(np.count_nonzero(nan))}


def row_max_abs_diffs(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """max |ref - out| of each row along the last axis (the rows row_cosines cuts), in float64; a
    row with a NaN on either side is NaN (np.max keeps NaN), inf - inf too."""
    a = ref.reshape(-1, ref.shape[-1] if ref.ndim else 1).astype(np.float64)
    b = out.reshape(-1, out.shape[-1] if out.ndim else 1).astype(np.float64)
    if a.shape[1] == 0:  # rows of no values differ nowhere
        return np.zeros(a.shape[0])
    with np.errstate(invalid="ignore"):
        return np.abs(a - b).max(axis=1)


def _batch_first(array: np.ndarray, batch_axis: int | None) -> np.ndarray:
    if batch_axis is not None and batch_axis >= array.ndim:
        raise ValueError(f"shape {list(array.shape)} has no axis {batch_axis}, where the manifest puts the batch")
    moved = np.moveaxis(array, batch_axis, 0) if batch_axis else array
    return np.require(moved, requirements="C")  # keeps a 0-d array 0-d


def row_cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Cosine of each row along the last axis, in float64. Two zero rows agree (1.0)."""
    a = ref.reshape(-1, ref.shape[-1] if ref.ndim else 1).astype(np.float64)
    b = out.reshape(-1, out.shape[-1] if out.ndim else 1).astype(np.float64)
    dot = (a * b).sum(axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, cos)


def failures(metrics: dict[str, dict], thresholds: dict[str, float | None], exact_integers: bool = False) -> list[str]:
    """Human-readable failed gates, e.g. 'last_hidden_state min_cosine 0.9981 < 0.9999'. With
    exact_integers (an fp32 artifact) an integer output must equal the reference's everywhere,
    whatever the thresholds say."""
    failed = []
    for output, values in metrics.items():
        if values["nonfinite"]:
            failed.append(f"{output} has {values['nonfinite']} NaN/Inf values")
        if exact_integers and values.get("mismatched"):
            failed.append(f"{output} has {values['mismatched']} integer values unlike the reference's (an fp32 artifact's integer outputs must match exactly)")
        for metric, limit in thresholds.items():
            if limit is None or metric not in values:
                continue
            passes, word = GATES[metric]
            value = values[metric]
            if np.isnan(value) or not passes(value, limit):
                failed.append(f"{output} {metric} {value:.6g} {word} {limit:g}")
    return failed
