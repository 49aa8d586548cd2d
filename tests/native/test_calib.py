"""Streaming calibration: kiln._native's calib kernels against their numpy twins (kiln.native.twins)
bit for bit, the streamed histogram against one-shot twins, and the thresholds (kiln.native.calibration)
against known distributions and onnxruntime's entropy search."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kiln import _native
from kiln.native import calibration as cal
from kiln.native import twins as ref

SIZES = [0, 1, 7, 31, 40, 1000, 4097, 65537]  # 31, 40: the AVX2 loops take 32 values a round
BIG = (1 << 20) + 4099  # above kParallelMinElements: the bindings split the work across threads


def same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def activations(seed: int, n: int, specials: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3)).astype(np.float32)
    if specials and n:
        k = max(1, n // 50)
        pick = rng.integers(0, n, (6, k))
        x[pick[0]] = np.nan
        x[pick[1]] = np.inf
        x[pick[2]] = -np.inf
        x[pick[3]] = -0.0
        x[pick[4]] = 0.0
        x[pick[5]] = rng.choice(np.float32([3e38, -3e38, 1e-45, -1e-40]), k)
    return x


def native_minmax(x, lo=np.inf, hi=-np.inf, nans=0):
    lo, hi, nans = _native.minmax_update(x, lo, hi, nans)
    return np.float32(lo), np.float32(hi), nans


def native_hist(x, range_, nbins, bins=None, simd=True):
    bins = np.zeros(nbins, np.uint64) if bins is None else bins.copy()
    _native.abs_histogram_accumulate(x, range_, bins, simd)
    return bins


def finite_absmax(x) -> float:
    v = np.abs(x[np.isfinite(x)])
    return float(v.max()) if v.size and v.max() > 0 else 1.0


# ---------------------------------------------------------------- kernels vs twins

@pytest.mark.parametrize("n", SIZES + [BIG])
@pytest.mark.parametrize("seed", range(3))
def test_minmax_matches_the_twin(seed, n):
    x = activations(seed, n, specials=seed != 0)
    assert all(same(a, b) for a, b in zip(native_minmax(x), ref.minmax_update(x)))
    # a running update from earlier bounds
    assert all(same(a, b) for a, b in zip(native_minmax(x, -0.5, 0.5, 3), ref.minmax_update(x, -0.5, 0.5, 3)))


def test_minmax_zero_signs_and_all_nan():
    for x in ([0.0, -0.0], [-0.0, 0.0], [np.nan, -0.0, 0.0, np.nan], [np.nan] * 5, []):
        x = np.array(x, np.float32)
        got, want = native_minmax(x), ref.minmax_update(x)
        assert all(same(a, b) for a, b in zip(got, want)), x
    big = np.zeros(BIG, np.float32)
    big[: BIG // 2] = -0.0  # threads see -0 first in index order: the first occurrence wins
    assert same(native_minmax(big)[0], np.float32(-0.0)) and same(ref.minmax_update(big)[0], np.float32(-0.0))
    assert native_minmax(np.full(9, np.nan, np.float32))[2] == 9


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "scalar"])
@pytest.mark.parametrize("nbins", [1, 2, 7, 128, 2048])
@pytest.mark.parametrize("n", SIZES + [BIG])
@pytest.mark.parametrize("seed", range(3))
def test_histogram_matches_the_twin(seed, n, nbins, simd):
    x = activations(seed, n)
    r = finite_absmax(x)
    got = native_hist(x, r, nbins, simd=simd)
    assert same(got, ref.abs_histogram_accumulate(x, r, np.zeros(nbins, np.uint64)))
    assert int(got.sum()) == int((~np.isnan(x)).sum())
    start = np.arange(nbins, dtype=np.uint64)  # accumulates onto existing counts
    assert same(native_hist(x, r, nbins, start, simd), ref.abs_histogram_accumulate(x, r, start))


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "scalar"])
@pytest.mark.parametrize("n", SIZES + [BIG])
@pytest.mark.parametrize("seed", range(3))
def test_fused_minmax_histogram_equals_the_two_kernels(seed, n, simd):
    """One read for both: the twins' min / max (zero signs and NaN counts included) and histogram;
    at a range below the data's abs max the values above it are counted in the last bin."""
    x = activations(seed, n, specials=seed != 0)
    for r in (finite_absmax(x), finite_absmax(x) / 3):
        bins = np.arange(2048, dtype=np.uint64)
        lo, hi, nans = _native.minmax_abs_histogram(x, r, bins, simd)
        assert all(same(a, b) for a, b in zip((np.float32(lo), np.float32(hi), nans), ref.minmax_update(x)))
        assert same(bins, ref.abs_histogram_accumulate(np.minimum(np.abs(x), np.float32(r)), r, np.arange(2048, dtype=np.uint64)))
    with pytest.raises(ValueError, match="range"):
        _native.minmax_abs_histogram(x, 0.0, np.zeros(4, np.uint64))


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "scalar"])
def test_histogram_edges(simd):
    x = np.array([0.0, -0.0, 1.0, -1.0, 0.5, 0.49999997, np.inf, -np.inf, np.nan, 0.25] * 2, np.float32)  # 8 + 8 + 4
    got = native_hist(x, 1.0, 4, simd=simd)
    assert got.tolist() == [4, 4, 2, 8]  # 0.5 -> bin 2, |x| == range and Inf -> last bin, NaN skipped
    assert same(got, ref.abs_histogram_accumulate(x, 1.0, np.zeros(4, np.uint64)))
    with pytest.raises(ValueError, match="range"):
        native_hist(x, 0.0, 4)
    with pytest.raises(ValueError, match="bins"):
        native_hist(x, 1.0, 0)
    with pytest.raises(TypeError):
        native_hist(x.astype(np.float64), 1.0, 4)
    with pytest.raises(TypeError):
        _native.abs_histogram_accumulate(x, 1.0, np.zeros(4, np.int64))


# ---------------------------------------------------------------- streaming

def batches(seed: int, specials: bool):
    """Batches of varying size whose scale grows, so the range doubles several times, some by many."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(12):
        n = int(rng.integers(0, 5000))
        x = (rng.standard_normal(n) * 2.0 ** (i * rng.uniform(0, 3))).astype(np.float32)
        if specials and n > 10:
            x[rng.integers(0, n, 3)] = [np.nan, np.inf, -0.0]
        out.append(x)
    out.insert(3, np.full(7, np.nan, np.float32))
    return out


@pytest.mark.parametrize("specials", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_streaming_equals_the_one_shot_twin(seed, specials):
    bs = batches(seed, specials)
    obs = cal.HistogramObserver(256)
    for x in bs:
        obs.update(x)
    assert same(obs.bins, cal.reference_stream(bs, 256))
    everything = np.concatenate(bs)
    lo, hi, nans = ref.minmax_update(everything)
    assert (obs.min, obs.max, obs.nan_count) == (lo, hi, nans)
    assert obs.absmax == float(np.abs(everything[np.isfinite(everything)]).max())
    assert obs.range >= obs.absmax and int(obs.bins.sum()) == everything.size - nans
    # against a histogram taken once at the final range, only the clamped values may sit elsewhere
    direct = ref.abs_histogram_accumulate(everything, obs.range, np.zeros(256, np.uint64))
    moved = np.abs(direct.astype(np.int64) - obs.bins.astype(np.int64)).sum() // 2
    clamped = len(bs) + int(np.isinf(everything).sum())  # at most: each batch's max and the Infs
    assert moved <= clamped


def test_rebinning_is_exact():
    """Doubling the range halves t exactly in float32: merged pairs = the histogram at 2 * range."""
    rng = np.random.default_rng(5)
    for r in (1.0, 0.1, 3.7e-3, 1234.5):
        x = (rng.uniform(-r, r, 100_000)).astype(np.float32)
        x = x[ref.abs_histogram_index(x, r, 2048) < 2047]  # off the clamp bin
        for k in (1, 2, 5):
            r2 = cal.grow_range(r, r * 2 ** k * 0.99)[0]
            assert r2 == np.float32(r) * 2 ** k
            assert same(cal.merge_pairs(native_hist(x, r, 2048), k), native_hist(x, r2, 2048))
    bins = np.arange(8, dtype=np.uint64)
    assert cal.merge_pairs(bins, 1).tolist() == [1, 5, 9, 13, 0, 0, 0, 0]
    assert cal.merge_pairs(bins, 40).tolist() == [28, 0, 0, 0, 0, 0, 0, 0]


def test_observer_first_batch_rules_and_bad_input():
    obs = cal.HistogramObserver(16)
    obs.update(np.full(3, np.nan, np.float32))
    assert obs.range == 0.0 and obs.nan_count == 3
    obs.update(np.zeros(4, np.float32))
    assert obs.range == 1.0 and obs.bins[0] == 4
    obs.update(np.array([3.0], np.float32))
    assert obs.range == 4.0 and obs.bins.sum() == 5
    with pytest.raises(TypeError, match="float32"):
        obs.update(np.zeros(3))
    with pytest.raises(ValueError, match="even"):
        cal.HistogramObserver(7)
    o = cal.HistogramObserver(16).update(np.float32([1.0]))
    with pytest.raises(OverflowError), np.errstate(over="ignore"):
        o.update(np.float32([3.4e38]))  # 2**128 is not a float32


# ---------------------------------------------------------------- thresholds

def test_percentile_on_uniform():
    rng = np.random.default_rng(0)
    x = rng.uniform(-4, 4, 1_000_000).astype(np.float32)
    obs = cal.HistogramObserver(2048).update(x[:1000])
    for i in range(1000, x.size, 99_999):
        obs.update(x[i:i + 99_999])
    for p in (50.0, 90.0, 99.0, 99.99):
        t = obs.percentile(p)
        assert abs(t - np.quantile(np.abs(x), p / 100)) <= obs.bin_width + 1e-6, p
        assert np.mean(np.abs(x) < t) < p / 100 <= np.mean(np.abs(x) < t + obs.bin_width)  # the bin holding the quantile
    lo, hi = obs.minmax()
    assert (lo, hi) == (x.min(), x.max()) and obs.threshold("minmax") == max(-lo, hi)


def gaussian_with_outliers(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(400_000).astype(np.float32)
    x[rng.integers(0, x.size, 40)] = rng.uniform(-60, 60, 40).astype(np.float32)
    return x


@pytest.mark.parametrize("seed", range(2))
def test_entropy_on_gaussian_with_outliers(seed):
    x = gaussian_with_outliers(seed)
    obs = cal.HistogramObserver(2048)
    for part in np.array_split(x, 7):
        obs.update(part)
    t = obs.entropy()
    assert np.quantile(np.abs(x), 0.99) < t < obs.absmax
    assert obs.threshold("entropy") == t


def kl_histograms():
    """|x| histograms the KL search meets: smooth, spiky, sparse (many empty bins), one-bin, tiny."""
    rng = np.random.default_rng(11)
    smooth = np.bincount(np.minimum((np.abs(rng.standard_normal(200_000)) * 300).astype(int), 2047), minlength=2048)
    spiky = smooth.copy()
    spiky[[5, 700, 2047]] += 50_000
    sparse = np.zeros(2048, np.int64)
    sparse[rng.integers(0, 2048, 60)] = rng.integers(1, 1000, 60)
    one = np.zeros(512, np.int64)
    one[3] = 7
    tiny = np.arange(256) % 3
    return [h.astype(np.uint64) for h in (smooth, spiky, sparse, one, tiny)]


@pytest.mark.parametrize("m", [128, 64])
def test_native_kl_curve_matches_the_twin(m):
    """Every candidate's KL agrees with the numpy twin to 1e-9 (the twin sums pairwise, the kernel in
    index order) and is infinite exactly where the twin's is; the chosen bin is the same."""
    for h in kl_histograms():
        curve = np.empty(h.size - m + 1)
        _native.entropy_kl_curve(h, m, curve)
        twin = np.array([ref.entropy_kl(h, i, m) for i in range(m, h.size + 1)])
        finite = np.isfinite(twin)
        assert np.array_equal(np.isfinite(curve), finite)
        np.testing.assert_allclose(curve[finite], twin[finite], rtol=1e-9, atol=1e-15)
        if finite.any():
            assert np.argmin(curve) == np.argmin(twin)


def test_native_kl_curve_bad_arguments():
    h = np.ones(256, np.uint64)
    with pytest.raises(ValueError, match="kl has 3 elements, expected 129"):
        _native.entropy_kl_curve(h, 128, np.empty(3))
    with pytest.raises(ValueError, match="need 1 <= num_quantized_bins <= len"):
        _native.entropy_kl_curve(h, 300, np.empty(1))


def test_entropy_compared_with_onnxruntime():
    """onnxruntime's own search on a signed symmetric histogram of the same data and bin width: the same
    family of threshold, not the same number (see kiln.native.calibration.entropy_threshold)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    x = gaussian_with_outliers(3)
    nbins = 2048
    obs = cal.HistogramObserver(nbins).update(x)
    ours = obs.entropy()
    hist, edges = np.histogram(x, 2 * nbins, range=(-obs.range, obs.range))
    collector = HistogramCollector("entropy", True, 2 * nbins, 128, 99.99, "same")
    lo, hi = collector.get_entropy_threshold((hist, edges.astype(np.float32), np.float32(x.min()), np.float32(x.max())), 128)
    theirs = max(-float(lo), float(hi))
    print("entropy threshold: kiln", ours, "onnxruntime", theirs, "bin width", obs.bin_width)
    # Not within a bin: onnxruntime's variant (Q spread over zero bins too, int64 Q, 2i+1 signed bins)
    # lands wider (6.77 here vs our 4.29 for N(0, 1) with outliers). Both must be sane thresholds.
    q99 = np.quantile(np.abs(x), 0.99)
    assert q99 < ours < theirs < obs.absmax


def test_empty_histogram_thresholds():
    obs = cal.HistogramObserver(256)
    assert obs.percentile() == 0.0 and obs.entropy() == 0.0


# ---------------------------------------------------------------- container

def test_calibration_round_trips(tmp_path):
    c = cal.Calibration(bins=256)
    for seed in range(3):
        c.update_all({"a/out": activations(seed, 3000), "b": np.abs(activations(seed + 9, 500, False))})
    text = c.to_json()
    again = cal.Calibration.from_json(text)
    assert again.to_json() == text  # byte-deterministic
    c.to_npz(tmp_path / "c.npz")
    back = cal.Calibration.from_npz(tmp_path / "c.npz")
    assert back.to_json() == text
    for name in ("a/out", "b"):
        assert same(back[name].bins, c[name].bins) and back[name].bins.dtype == np.uint64
    assert c.thresholds("percentile", p=99.0) == back.thresholds("percentile", p=99.0)
    assert c.thresholds("mse") == back.thresholds("mse")
    with pytest.raises(ValueError, match="unknown"):
        c.thresholds("kl")


# ---------------------------------------------------------------- threads

def test_many_threads_at_once_give_the_single_thread_result():
    x = activations(11, BIG)
    r = finite_absmax(x)
    want_h = ref.abs_histogram_accumulate(x, r, np.zeros(2048, np.uint64))
    want_m = ref.minmax_update(x)
    results = []
    lock = threading.Lock()

    def run(i):
        out = native_hist(x, r, 2048) if i % 2 else native_minmax(x)
        with lock:
            results.append((i, out))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    for i, out in results:
        assert same(out, want_h) if i % 2 else all(same(a, b) for a, b in zip(out, want_m))


def test_mse_threshold_is_the_brute_force_minimum_and_clips_only_rare_outliers():
    from kiln.native.calibration import mse_threshold

    rng = np.random.default_rng(4)
    bins = np.histogram(np.abs(rng.standard_normal(100_000)), bins=256, range=(0, 8))[0].astype(np.uint64)
    width = 8 / 256

    def cost(t: float) -> float:  # the same model, summed bin by bin
        c = (np.arange(256) + 0.5) * width
        n = bins.astype(np.float64)
        return float((n * np.where(c > t, (c - t) ** 2, (2 * t / 255) ** 2 / 12)).sum())

    t = mse_threshold(bins, width)
    assert t == min(((j + 1) * width for j in range(256)), key=cost)
    assert 2.0 < t < 5.0  # a Gaussian's tail is clipped, its body kept
    heavy = bins.copy()
    heavy[250] += 20_000  # a fifth of the data out there: the range must reach it
    assert mse_threshold(heavy, width) >= 250 * width


def test_minmax_simd_path_keeps_the_sequential_zero_signs_and_nan_counts():
    """The AVX2 min/max reduces eight lanes in any order; a zero result's sign must still be the one
    a strict compare in index order keeps, whatever the starting lo / hi."""
    rng = np.random.default_rng(1)
    values = np.array([0.0, -0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 2.5], np.float32)
    for _ in range(2000):
        x = rng.choice(values, int(rng.integers(1, 80)))
        for lo, hi in ((np.inf, -np.inf), (0.0, -0.0), (-0.0, 0.0), (1.0, -1.0), (-2.0, 3.0)):
            got = _native.minmax_update(x, lo, hi, 0)
            want = ref.minmax_update(x, np.float32(lo), np.float32(hi), 0)
            assert got[2] == want[2]
            for g, w in zip(got[:2], want[:2]):
                assert np.float32(g).tobytes() == np.float32(w).tobytes(), (x, lo, hi, got, want)
