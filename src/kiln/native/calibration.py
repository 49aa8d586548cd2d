"""Streaming activation calibration for int8 quantization.

Batches are fed one at a time (HistogramObserver.update); memory is one batch plus O(bins) per tensor,
never the whole data set (onnxruntime's calibrators keep every batch's outputs until the end).

Conventions (the numpy twins in kiln.native.twins define the kernels bit for bit)
- Histogram of |x| over [0, range] with `bins` equal bins (bins even): bin width = range / bins and
  bin = (|x| / range) * bins computed in float32 in that order, truncated, clamped to bins - 1.
  So |x| == range and +-Inf land in the last bin. NaNs are counted (nan_count), never binned.
- range: set by the first batch holding a non-NaN value to its largest finite |x| (1.0 if that is 0
  or there is none). When a later batch's finite abs max exceeds range, range doubles k times
  (the smallest k that fits) and the histogram is re-binned by merging adjacent pairs k times:
  bin j of the new histogram = old bins 2j + 2j+1, the upper half becomes 0. Counts are integers, so
  this is exact, and because doubling range halves t exactly in float32, every value that was not
  clamped sits exactly where a histogram taken at the new range would put it. The clamped ones
  (|x| with fl(|x| / range) == 1, and Inf) keep following the last bin down; so the histogram is
  "each value's bin at its batch's range, shifted right by the later doublings" (reference_stream).
- Thresholds are symmetric (|x| <= threshold), for symmetric int8 scale = threshold / 127:
  minmax: (min, max) of the data; percentile(p): the lower edge of the first bin where the cumulative
  count reaches p% of the binned values (onnxruntime's convention, so the two agree within a bin); entropy: TensorRT's KL-divergence search, see
  entropy_threshold. Percentile and entropy are capped at the largest finite |x| seen.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from kiln import _native
from kiln.native import twins

F32 = np.float32


def _f32_batch(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"calibration batches must be float32, got {x.dtype}")
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _finite_absmax(x: np.ndarray, lo: float, hi: float) -> float:
    """Largest finite |x| of a batch whose NaN-skipping min/max are lo, hi (0.0 if none)."""
    if math.isfinite(lo) and math.isfinite(hi):
        return float(max(-lo, hi))
    finite = np.abs(x[np.isfinite(x)])  # rare path (an Inf in the batch): a temporary of the batch size
    return float(finite.max()) if finite.size else 0.0


def grow_range(range_: float, absmax: float) -> tuple[float, int]:
    """(new range, k): range doubled in float32 the smallest k times so that absmax <= range."""
    r, k = F32(range_), 0
    while r < F32(absmax):
        r, k = r * F32(2), k + 1
        if not np.isfinite(r):
            raise OverflowError(f"calibration range would exceed float32 max (abs max {absmax})")
    return float(r), k


def merge_pairs(bins: np.ndarray, k: int) -> np.ndarray:
    """The histogram after k doublings of its range: adjacent pairs merged k times, the same length."""
    bins = np.asarray(bins, np.uint64)
    n = bins.size
    for _ in range(min(k, n.bit_length() + 1)):  # after log2(n) merges everything is in bin 0 already
        half = bins.reshape(-1, 2).sum(axis=1, dtype=np.uint64)
        bins = np.concatenate([half, np.zeros(n - half.size, np.uint64)])
    return bins


class HistogramObserver:
    """Running min / max / NaN count and |x| histogram of one tensor over a stream of batches."""

    def __init__(self, bins: int = 2048):
        if bins < 2 or bins % 2 or bins >= 1 << 24:
            raise ValueError(f"bins must be even and in [2, 2**24), got {bins}")
        self.bins = np.zeros(bins, np.uint64)
        self.range = 0.0  # 0: not set yet (no non-NaN value seen)
        self.min = math.inf
        self.max = -math.inf
        self.absmax = 0.0  # largest finite |x| seen
        self.nan_count = 0

    @property
    def bin_width(self) -> float:
        return self.range / self.bins.size

    def update(self, x) -> HistogramObserver:
        x = _f32_batch(x)
        counted = None  # this batch's histogram at the current range, from the same read as min / max
        if self.range > 0.0:
            counted = np.zeros_like(self.bins)
            lo, hi, nans = _native.minmax_abs_histogram(x, self.range, counted)
        else:
            lo, hi, nans = _native.minmax_update(x, math.inf, -math.inf, 0)
        self.nan_count += nans
        if nans == x.size:
            return self  # nothing to bin
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        absmax = _finite_absmax(x, lo, hi)
        self.absmax = max(self.absmax, absmax)
        if self.range == 0.0:
            self.range = absmax if absmax > 0 else 1.0
        elif absmax > self.range:  # the counts above clamped the new values: bin again at the grown range
            self.range, k = grow_range(self.range, absmax)
            self.bins = merge_pairs(self.bins, k)
            counted = None
        if counted is None:
            _native.abs_histogram_accumulate(x, self.range, self.bins)
        else:
            self.bins += counted
        return self

    # ---------------------------------------------------------------- thresholds

    def minmax(self) -> tuple[float, float]:
        return self.min, self.max

    def percentile(self, p: float = 99.99) -> float:
        return min(percentile_threshold(self.bins, self.bin_width, p), self.absmax)

    def entropy(self, num_quantized_bins: int = 128) -> float:
        return min(entropy_threshold(self.bins, self.bin_width, num_quantized_bins), self.absmax)

    def mse(self, levels: int = 255) -> float:
        return min(mse_threshold(self.bins, self.bin_width, levels), self.absmax)

    def threshold(self, method: str = "entropy", **kw) -> float:
        """Symmetric threshold T (|x| <= T): 'minmax' gives max(|min|, |max|)."""
        if method == "minmax":
            return max(-self.min, self.max, 0.0)
        if method == "mse":
            return self.mse(**kw)
        if method == "percentile":
            return self.percentile(**kw)
        if method == "entropy":
            return self.entropy(**kw)
        raise ValueError(f"unknown calibration method {method!r}: use minmax, percentile, entropy or mse")

    # ---------------------------------------------------------------- state

    def state(self) -> dict:
        return {"min": self.min, "max": self.max, "absmax": self.absmax, "range": self.range,
                "nan_count": self.nan_count, "bins": self.bins.copy()}

    @classmethod
    def from_state(cls, s: dict) -> HistogramObserver:
        obs = cls(int(np.asarray(s["bins"]).size))
        obs.bins = np.asarray(s["bins"], np.uint64).copy()
        obs.min, obs.max, obs.absmax, obs.range = (float(s[k]) for k in ("min", "max", "absmax", "range"))
        obs.nan_count = int(s["nan_count"])
        return obs


def percentile_threshold(bins: np.ndarray, bin_width: float, p: float) -> float:
    """Lower edge of the first bin whose cumulative count is >= p% of the total (0.0 if empty), as
    onnxruntime's compute_percentile: the true quantile lies within one bin above it."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    cum = np.cumsum(np.asarray(bins, np.uint64))
    if cum.size == 0 or cum[-1] == 0:
        return 0.0
    j = int(np.argmax(cum.astype(np.float64) >= float(cum[-1]) * p / 100.0))
    return j * bin_width


def mse_threshold(bins: np.ndarray, bin_width: float, levels: int = 255) -> float:
    """The threshold T (an upper bin edge) that minimizes the expected squared error of quantizing
    the histogrammed |x| to `levels` steps over [-T, T]: values above T are clipped, costing
    (|x| - T)^2 each, the rest round, costing step^2 / 12 each with step = 2T / levels (values at
    their bin centres). All 2048 candidates at once from suffix sums: the MSE calibrator of NVIDIA's
    pytorch-quantization, on kiln's histogram. It keeps an outlier channel's range when clipping it
    would cost more than the coarser steps, where percentile clips a fixed share regardless."""
    counts = np.asarray(bins, np.float64)
    if counts.size == 0 or counts.sum() == 0:
        return 0.0
    centres = (np.arange(counts.size) + 0.5) * bin_width
    edges = (np.arange(counts.size) + 1.0) * bin_width  # candidate T_j: the upper edge of bin j
    # suffix sums over the bins above each candidate: sum n, sum n c, sum n c^2
    s0 = np.concatenate([np.cumsum(counts[::-1])[::-1][1:], [0.0]])
    s1 = np.concatenate([np.cumsum((counts * centres)[::-1])[::-1][1:], [0.0]])
    s2 = np.concatenate([np.cumsum((counts * centres**2)[::-1])[::-1][1:], [0.0]])
    clipped = s2 - 2.0 * edges * s1 + edges**2 * s0
    rounded = (counts.sum() - s0) * (2.0 * edges / levels) ** 2 / 12.0
    return float(edges[int(np.argmin(clipped + rounded))])


def entropy_threshold(bins: np.ndarray, bin_width: float, num_quantized_bins: int = 128) -> float:
    """TensorRT's KL-divergence calibration on a histogram of |x| (as MXNet's _get_optimal_threshold).

    For each i in [num_quantized_bins, nbins]: P = bins[:i] with the outliers bins[i:] added to its
    last bin; Q = bins[:i] (without outliers) merged into num_quantized_bins levels of i //
    num_quantized_bins bins (the remainder joins the last level) and expanded back, each level's count
    spread evenly over its bins where P is nonzero (zero bins stay zero). Both are smoothed (eps 1e-4)
    and KL(P || Q) computed in float64 (native kernel, all candidates in parallel; the twin is
    kiln.native.twins.entropy_kl); the threshold is the upper edge i * bin_width of the i with the
    smallest KL (the first on ties). 0.0 for an empty histogram.

    onnxruntime's HistogramCollector.get_entropy_threshold differs: it bins signed x on a symmetric
    histogram and takes 2i+1 centre bins; it expands Q over all bins of a level (zeros too), leaves the
    remainder bins of Q at 0, and stores Q in int64 (truncating); it computes in float32.
    """
    h = np.ascontiguousarray(bins, np.uint64)
    n, m = h.size, num_quantized_bins
    if h.sum() == 0:
        return 0.0
    if n < m:
        raise ValueError(f"entropy calibration needs at least {m} bins, got {n}")
    kl = np.empty(n - m + 1, np.float64)
    _native.entropy_kl_curve(h, m, kl)
    return (m + int(np.argmin(kl))) * bin_width


def reference_stream(batches, nbins: int = 2048) -> np.ndarray:
    """One-shot numpy twin of a streamed histogram: the final range by the doubling rule, then every
    value's bin at the range its batch saw, shifted right by the doublings after it (merge_pairs)."""
    ranges, r = [], 0.0
    for x in batches:
        x = np.asarray(x, F32)
        v = x[np.isfinite(x)]
        absmax = float(np.abs(v).max()) if v.size else 0.0
        if np.isnan(x).all():
            ranges.append(None)
            continue
        r = (absmax if absmax > 0 else 1.0) if r == 0.0 else grow_range(r, absmax)[0]
        ranges.append(r)
    final = np.zeros(nbins, np.uint64)
    for x, rb in zip(batches, ranges):
        if rb is None:
            continue
        shift = int(round(math.log2(r / rb)))
        idx = twins.abs_histogram_index(x, rb, nbins) >> min(shift, 62)
        final += np.bincount(idx, minlength=nbins).astype(np.uint64)
    return final


class Calibration:
    """Observers by tensor name; thresholds; deterministic save / load (JSON or npz)."""

    def __init__(self, bins: int = 2048):
        self.bins = bins
        self.observers: dict[str, HistogramObserver] = {}

    def observer(self, name: str) -> HistogramObserver:
        """The tensor's observer, created empty on first use."""
        if name not in self.observers:
            self.observers[name] = HistogramObserver(self.bins)
        return self.observers[name]

    def update(self, name: str, x) -> None:
        self.observer(name).update(x)

    def update_all(self, batch: dict) -> None:
        for name, x in batch.items():
            self.update(name, x)

    def __getitem__(self, name: str) -> HistogramObserver:
        return self.observers[name]

    def thresholds(self, method: str = "entropy", **kw) -> dict[str, float]:
        return {name: obs.threshold(method, **kw) for name, obs in sorted(self.observers.items())}

    # Tensors in sorted name order; floats as repr (round-trips exactly); bins as integers.
    def to_json(self) -> str:
        tensors = {}
        for name, obs in sorted(self.observers.items()):
            s = obs.state()
            s["bins"] = [int(c) for c in s["bins"]]
            tensors[name] = s
        # Infinity (an observer with no value yet) is written as JSON's non-standard Infinity
        return json.dumps({"bins": self.bins, "tensors": tensors}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        d = json.loads(text)
        cal = cls(int(d["bins"]))
        cal.observers = {name: HistogramObserver.from_state(s) for name, s in d["tensors"].items()}
        return cal

    def to_npz(self, path) -> None:
        """Plain arrays only (loads with allow_pickle=False): names[i] goes with row i of the others."""
        names = sorted(self.observers)
        states = [self.observers[n].state() for n in names]
        scalars = {k: np.array([s[k] for s in states], np.float64) for k in ("min", "max", "absmax", "range")}
        np.savez(Path(path), names=np.array(names, dtype=np.str_), nbins=np.int64(self.bins),
                 nan_count=np.array([s["nan_count"] for s in states], np.int64),
                 bins=np.stack([s["bins"] for s in states]) if states else np.zeros((0, self.bins), np.uint64),
                 **scalars)

    @classmethod
    def from_npz(cls, path) -> Calibration:
        with np.load(Path(path), allow_pickle=False) as z:
            cal = cls(int(z["nbins"]))
            for i, name in enumerate(z["names"].tolist()):
                cal.observers[name] = HistogramObserver.from_state(
                    {k: z[k][i] for k in ("min", "max", "absmax", "range", "nan_count", "bins")})
        return cal
