from __future__ import annotations

import json

import numpy as np
import pytest

from kiln.runtime.metrics import OutputMetrics, failures, row_cosines


def test_identical_outputs_pass_every_gate():
    ref = np.random.default_rng(0).standard_normal((4, 7, 16)).astype(np.float32)
    m = OutputMetrics()
    m.add(ref, ref.copy())
    summary = m.summary()
    assert summary["max_abs_diff"] == 0 and summary["min_cosine"] > 0.999999 and summary["rows"] == 28
    assert failures({"out": summary}, {"min_cosine": 0.9999, "max_abs_diff": 1e-6}) == []


def test_failures_name_output_metric_value_and_limit():
    ref = np.ones((2, 4), np.float32)
    out = ref.copy()
    out[1] = [1, -1, 1, -1]
    m = OutputMetrics()
    m.add(ref, out)
    assert failures({"logits": m.summary()}, {"min_cosine": 0.99, "max_abs_diff": 0.5}) == [
        "logits min_cosine 0 < 0.99", "logits max_abs_diff 2 > 0.5"]


def test_nan_outputs_always_fail():
    ref = np.ones((2, 3), np.float32)
    out = ref.copy()
    out[0, 0] = np.nan
    m = OutputMetrics()
    m.add(ref, out)
    failed = failures({"y": m.summary()}, {"max_abs_diff": 1.0})
    assert failed[0] == "y has 1 NaN/Inf values" and "y max_abs_diff nan > 1" in failed


def test_row_cosines_treat_two_zero_rows_as_equal():
    assert row_cosines(np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32)).tolist() == [1.0]
    assert row_cosines(np.zeros((1, 3), np.float32), np.ones((1, 3), np.float32)).tolist() == [0.0]


def test_padding_rows_are_left_out_of_token_outputs_only():
    ref = np.ones((2, 3, 4), np.float32)
    out = ref.copy()
    out[1, 2] = -1.0  # garbage in a padded position
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    m = OutputMetrics()
    m.add(ref, out, mask)
    assert m.summary()["rows"] == 5 and m.summary()["min_cosine"] == 1.0 and m.summary()["max_abs_diff"] == 0
    pooled = OutputMetrics()
    pooled.add(ref[:, 0], out[:, 0], mask)  # [batch, hidden]: the mask does not apply
    assert pooled.summary()["rows"] == 2


# ---- batch axes: rows never mix samples; outputs without a batch axis compare whole ------------


def test_rows_of_an_output_batched_on_its_last_axis_are_its_samples():
    """[4, batch]: a row is one sample's 4 values, not one feature across the batch."""
    ref = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    out = ref.copy()
    out[:, 1] = -out[:, 1]  # sample 1 flipped: its cosine is -1, the others 1
    m = OutputMetrics()
    m.add(ref, out, batch_axis=1)
    summary = m.summary()
    assert summary["rows"] == 3
    assert np.isclose(summary["min_cosine"], -1.0) and np.isclose(summary["mean_cosine"], 1 / 3)


def test_padding_follows_the_output_batch_axis():
    """An output [sequence, batch, hidden] is masked by attention_mask [batch, sequence]."""
    ref = np.ones((3, 2, 4), np.float32)
    out = ref.copy()
    out[2, 1] = -1.0  # sample 1's last position, which is padding
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    m = OutputMetrics()
    m.add(ref, out, mask, batch_axis=1)
    assert m.summary()["rows"] == 5 and m.summary()["min_cosine"] == 1.0 and m.summary()["max_abs_diff"] == 0


def test_an_output_without_a_batch_axis_is_compared_whole():
    m = OutputMetrics()
    m.add(np.array(2.0, np.float32), np.array(2.5, np.float32), np.ones((1, 1)), batch_axis=None)
    summary = m.summary()
    assert summary["rows"] == 1 and summary["max_abs_diff"] == 0.5


def test_a_batch_axis_the_output_does_not_have_is_a_value_error():
    with pytest.raises(ValueError, match="shape \\[3\\] has no axis 1, where the manifest puts the batch"):
        OutputMetrics().add(np.ones((3,), np.float32), np.ones((3,), np.float32), batch_axis=1)


def test_integer_outputs_count_mismatches_and_fail_an_fp32_artifact_whatever_the_gates():
    # labels 1 vs 2 differ by 1.0: a loose max_abs_diff or cosine would pass them; the count does not
    metrics = OutputMetrics()
    metrics.add(np.array([0, 1, 2, 2], dtype=np.int64), np.array([0, 1, 2, 1], dtype=np.int64))
    summary = metrics.summary()
    assert summary["mismatched"] == 1
    assert failures({"label": summary}, {"max_abs_diff": 2.0}, exact_integers=True) == [
        "label has 1 integer values unlike the reference's (an fp32 artifact's integer outputs must match exactly)"]
    assert failures({"label": summary}, {"max_abs_diff": 2.0}) == []  # a quantized artifact may flip a label: its gates decide


def test_float_outputs_have_no_mismatch_count():
    metrics = OutputMetrics()
    metrics.add(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32))
    assert "mismatched" not in metrics.summary()


def test_padded_positions_of_an_integer_output_are_not_counted():
    metrics = OutputMetrics()
    ref = np.array([[5, 6, 0, 0]], dtype=np.int64)  # token ids, the last two positions padding
    out = np.array([[5, 6, 9, 9]], dtype=np.int64)
    metrics.add(ref, out, padding=np.array([[1, 1, 0, 0]]))
    assert metrics.summary()["mismatched"] == 0


def test_distribution_counts_each_rows_errors_in_its_log_bin():
    """Rows cut as the cosines are (padding left out): 1 - cosine and max |diff| per row, binned on
    1e-12 .. 1e2 at two bins per decade, with exact zeros, overflow and NaN rows apart."""
    from kiln.runtime.metrics import HISTOGRAM_EDGES

    ref = np.ones((2, 3, 4), np.float32)
    out = ref.copy()
    out[0, 1, 0] += 0.5     # max |diff| 0.5: bin [0.316, 1)
    out[0, 2, :] = -1.0     # cosine -1 (1 - cos = 2: bin [1, 3.16)), max |diff| 2: bin [1, 3.16)
    out[1, 0, 3] = 1000.0   # max |diff| 999: overflow
    out[1, 1, 1] = np.nan   # NaN row
    padding = np.array([[1, 1, 1], [1, 1, 0]])  # row [1, 2] is padding and counted nowhere
    out[1, 2, :] = np.nan
    m = OutputMetrics()
    m.add(ref, out, padding)
    dist = m.distribution()
    assert dist["edges"] == list(HISTOGRAM_EDGES) and len(dist["edges"]) == 29
    assert dist["edges"][0] == 1e-12 and dist["edges"][-1] == 100.0 and dist["edges"][2] == 1e-11
    assert dist["rows"] == 5

    def bin_of(value: float) -> int:
        return next(i for i, (lo, hi) in enumerate(zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:], strict=False)) if lo <= value < hi)

    diffs = dist["max_abs_diff"]
    expected = [0] * 28
    expected[bin_of(0.5)] += 1
    expected[bin_of(2.0)] += 1
    assert diffs == {"counts": expected, "zero": 1, "underflow": 0, "overflow": 1, "nan": 1}
    expected = [0] * 28
    expected[bin_of(1 - 4.5 / (2 * 5.25 ** 0.5))] += 1  # the 0.5 row: 1 - cos = 0.018
    expected[bin_of(2.0)] += 1                          # the opposite row
    expected[bin_of(1 - 1003 / (2 * 1000003 ** 0.5))] += 1  # the 1000 row: 1 - cos = 0.4985
    assert dist["one_minus_cosine"] == {"counts": expected, "zero": 1, "underflow": 0, "overflow": 0, "nan": 1}
    json.dumps(dist, allow_nan=False)  # plain ints and floats


def test_histogram_edges_underflow_and_overflow_are_exact():
    from kiln.runtime.metrics import histogram

    hist = histogram(np.array([0.0, 1e-13, -1e-16, 1e-12, 3.1e-12, 99.99, 100.0, np.inf, np.nan]))
    assert hist["zero"] == 1 and hist["underflow"] == 2 and hist["overflow"] == 2 and hist["nan"] == 1
    assert hist["counts"][0] == 2 and hist["counts"][-1] == 1 and sum(hist["counts"]) == 3  # 1e-12 and 3.1e-12 in [1e-12, 3.16e-12)


def test_extend_equals_adding_every_batch_to_one_instance():
    from kiln.runtime.metrics import OutputMetrics

    rng = np.random.default_rng(5)
    batches = [(rng.standard_normal((3 + i, 5)).astype(np.float32), rng.standard_normal((3 + i, 5)).astype(np.float32)) for i in range(4)]
    batches[2][1][0, 0] = np.nan
    one = OutputMetrics()
    merged = OutputMetrics()
    for ref, out in batches:
        one.add(ref, out)
        part = OutputMetrics()
        part.add(ref, out)
        merged.extend(part)
    a, b = one.summary(), merged.summary()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
    assert one.distribution() == merged.distribution()
