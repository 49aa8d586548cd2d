"""kiln._native.diff_stats against its numpy twin kiln.native.twins.diff_stats, bit for bit."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kiln import _native
from kiln.native import twins as reference

SPECIALS = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-38, 65504.0, 3.4e38, -3.4e38, np.inf, -np.inf, 1.0, -1.0], np.float32)


def same(a: tuple, b: tuple) -> bool:
    return all(np.array(x, np.float32).tobytes() == np.array(y, np.float32).tobytes() for x, y in zip(a[:2], b[:2])) and a[2] == b[2]


@pytest.mark.parametrize("seed", range(5))
def test_random_arrays_match_the_twin(seed):
    rng = np.random.default_rng(seed)
    ref = (rng.standard_normal(10_007) * 10.0 ** rng.integers(-8, 8, 10_007)).astype(np.float32)
    out = (ref + rng.standard_normal(ref.size).astype(np.float32) * 1e-3).astype(np.float32)
    assert same(_native.diff_stats(ref, out), reference.diff_stats(ref, out))


def test_edge_values_match_the_twin():
    ref, out = np.meshgrid(SPECIALS, SPECIALS)
    ref, out = np.ascontiguousarray(ref.ravel()), np.ascontiguousarray(out.ravel())
    with np.errstate(all="ignore"):
        expected = reference.diff_stats(ref, out)
    assert same(_native.diff_stats(ref, out), expected)
    assert np.isnan(expected[0])  # inf - inf


def test_nan_propagates_and_is_counted():
    ref = np.zeros(4, np.float32)
    out = np.array([0, np.nan, 0, np.inf], np.float32)
    got = _native.diff_stats(ref, out)
    assert np.isnan(got[0]) and np.isnan(got[1]) and got[2] == 2
    with np.errstate(all="ignore"):
        assert same(got, reference.diff_stats(ref, out))


def test_empty_arrays():
    empty = np.zeros(0, np.float32)
    assert _native.diff_stats(empty, empty) == reference.diff_stats(empty, empty) == (0.0, 0.0, 0)


def test_wrong_dtype_layout_or_size_is_rejected_before_any_work():
    a = np.zeros(8, np.float32)
    with pytest.raises(TypeError):
        _native.diff_stats(a, np.zeros(8, np.float64))
    with pytest.raises(TypeError):
        _native.diff_stats(a, np.zeros(16, np.float32)[::2])
    with pytest.raises(ValueError, match="ref has 8 elements but out has 4"):
        _native.diff_stats(a, np.zeros(4, np.float32))


def test_many_threads_at_once_give_the_single_thread_result():
    rng = np.random.default_rng(7)
    ref = rng.standard_normal(1 << 20).astype(np.float32)
    out = (ref * 1.0001).astype(np.float32)
    expected = reference.diff_stats(ref, out)
    results = []
    threads = [threading.Thread(target=lambda: results.append(_native.diff_stats(ref, out))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(same(r, expected) for r in results)
