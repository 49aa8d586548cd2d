"""kiln.schema.fields: the shared manifest pieces. Here: a tensor's batch axis, the axis its shape
names "batch" (README: manifest reference, batch axes)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kiln.schema.fields import BATCH, TensorSpec


@pytest.mark.parametrize("shape, axis", [
    (["batch", 4], 0),
    ([2, "batch", 8], 1),  # an RNN state: layers first
    (["sequence", 3, "batch"], 2),
    ([], None),  # a scalar is fed whole
    ([1, "sequence"], None),  # a fixed leading dim is not a batch
    (None, 0),  # no shape: the data's first axis
])
def test_the_batch_axis_is_where_the_shape_names_batch(shape, axis):
    assert TensorSpec(name="t", shape=shape).batch_axis == axis


def test_a_scalar_shape_is_accepted():
    assert TensorSpec(name="rate", dtype="int64", shape=[]).shape == []


def test_batch_on_two_axes_is_refused():
    with pytest.raises(ValidationError) as caught:
        TensorSpec(name="t", shape=[BATCH, 3, BATCH])
    error = caught.value.errors()[0]["ctx"]["error"]  # a CrossError: the manifest message names the key
    assert error.key == "shape" and error.allowed.startswith("'batch' on one axis at most")


@pytest.mark.parametrize("shape,columns,problem", [
    ([BATCH, 3], ["a", "b"], "3 column names, one per feature"),
    ([BATCH], ["a", "b"], "one column for shape"),
    ([BATCH, 2, 2], ["a", "b"], "a table row is one sample"),
    ([2, BATCH], ["a", "b"], "a table row is one sample"),
    ([BATCH, 2], ["a", "a"], "each column named once"),
])
def test_csv_columns_must_fit_the_inputs_shape(shape, columns, problem):
    with pytest.raises(ValidationError) as caught:
        TensorSpec(name="x", shape=shape, columns=columns)
    error = caught.value.errors()[0]["ctx"]["error"]  # the CrossError the manifest's message is made from
    assert error.key == "columns" and problem in error.allowed
    assert TensorSpec(name="x", shape=[BATCH, "features"], columns=["a", "b", "c"]).columns == ["a", "b", "c"]
