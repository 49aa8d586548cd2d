from __future__ import annotations

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
