"""kiln.runtime.data: validation / calibration data as batches, and seeded example inputs.

Covers array_batches / load_arrays on .npz and .npy files (batching, max_samples, the cast to the
manifest's dtype) and the one-line StepErrors that name the data file and the tensor for every way a
file can be wrong; read_text_lines for text data; example_inputs, which exporters trace with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.errors import StepError
from kiln.runtime.data import array_batches, batch_axis, example_inputs, first_sample, load_arrays, read_text_lines, sample_count

IDS = {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}
MASK = {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]}
FEATURES = {"name": "features", "dtype": "float32", "shape": ["batch", 6]}


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _step_error(path: Path, inputs: list[dict]) -> str:
    """The message of the StepError load_arrays raises: one line, starting with the data file."""
    with pytest.raises(StepError) as caught:
        load_arrays(path, inputs)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    return message


# ---- batches ---------------------------------------------------------------------------------


def test_npz_batches_cover_every_sample_in_order_and_in_the_manifest_dtype(tmp_path: Path):
    ids = np.arange(10 * 5, dtype=np.int32).reshape(10, 5)
    path = _npz(tmp_path / "d.npz", input_ids=ids, attention_mask=np.ones((10, 5), np.int8), unused=np.zeros(3))
    got = list(array_batches(path, [IDS, MASK], batch_size=4, max_samples=None))
    assert [len(b["input_ids"]) for b in got] == [4, 4, 2]
    assert all(sorted(b) == ["attention_mask", "input_ids"] for b in got)  # arrays the model does not take stay out
    assert all(b[name].dtype == np.int64 for b in got for name in b)
    assert np.array_equal(np.concatenate([b["input_ids"] for b in got]), ids)


def test_max_samples_cuts_the_data(tmp_path: Path):
    path = _npz(tmp_path / "d.npz", features=np.arange(10 * 6, dtype=np.float32).reshape(10, 6))
    got = list(array_batches(path, [FEATURES], batch_size=4, max_samples=8))
    assert [len(b["features"]) for b in got] == [4, 4]
    assert got[1]["features"][-1, 0] == 7 * 6  # the eighth sample, not a later one
    assert sum(len(b["features"]) for b in array_batches(path, [FEATURES], 4, max_samples=100)) == 10


def test_max_samples_cuts_inside_the_last_batch(tmp_path: Path):
    path = _npz(tmp_path / "d.npz", features=np.arange(10 * 6, dtype=np.float32).reshape(10, 6))
    got = list(array_batches(path, [FEATURES], batch_size=4, max_samples=5))
    assert [len(b["features"]) for b in got] == [4, 1]
    assert got[1]["features"][0, 0] == 4 * 6  # the fifth sample


# ---- batch axes: where the shape names "batch"; inputs without it go whole into every batch ----

X = {"name": "x", "dtype": "float32", "shape": ["batch", 4]}
STATE = {"name": "state", "dtype": "float32", "shape": [2, "batch", 8]}
SCALE = {"name": "scale", "dtype": "float32", "shape": []}


def _stateful(path: Path, samples: int = 10) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = {"x": np.arange(samples * 4, dtype=np.float32).reshape(samples, 4),
              "state": np.arange(2 * samples * 8, dtype=np.float32).reshape(2, samples, 8),
              "scale": np.array(0.5, np.float32)}
    return _npz(path, **arrays), arrays


def test_an_input_batched_on_axis_1_is_split_on_axis_1(tmp_path: Path):
    path, arrays = _stateful(tmp_path / "d.npz")
    got = list(array_batches(path, [X, STATE, SCALE], batch_size=4, max_samples=None))
    assert [b["state"].shape for b in got] == [(2, 4, 8), (2, 4, 8), (2, 2, 8)]
    assert [b["x"].shape for b in got] == [(4, 4), (4, 4), (2, 4)]
    assert np.array_equal(np.concatenate([b["state"] for b in got], axis=1), arrays["state"])
    assert np.array_equal(got[1]["state"], arrays["state"][:, 4:8])  # samples 4..7 of both layers
    assert all(b["state"].flags.c_contiguous for b in got)
    assert list(got[0]) == ["x", "state", "scale"]  # the manifest's order


def test_a_scalar_input_goes_whole_into_every_batch_as_a_0d_array(tmp_path: Path):
    path, _ = _stateful(tmp_path / "d.npz")
    got = list(array_batches(path, [X, STATE, SCALE], batch_size=4, max_samples=None))
    assert all(b["scale"].shape == () and b["scale"].dtype == np.float32 and b["scale"] == 0.5 for b in got)


def test_max_samples_counts_along_the_batch_axis(tmp_path: Path):
    path, arrays = _stateful(tmp_path / "d.npz")
    got = list(array_batches(path, [X, STATE, SCALE], batch_size=4, max_samples=6))
    assert [b["state"].shape[1] for b in got] == [4, 2] and [len(b["x"]) for b in got] == [4, 2]
    assert np.array_equal(got[1]["state"], arrays["state"][:, 4:6])


def test_without_a_batched_input_the_file_is_one_feed(tmp_path: Path):
    fixed = {"name": "image", "dtype": "float32", "shape": [1, 3, 5]}
    path = _npz(tmp_path / "d.npz", image=np.ones((1, 3, 5), np.float32), scale=np.array(2.0))
    (feed,) = array_batches(path, [fixed, SCALE], batch_size=1, max_samples=None)
    assert feed["image"].shape == (1, 3, 5) and feed["scale"].shape == ()


def test_sample_counts_are_compared_along_each_batch_axis(tmp_path: Path):
    path = _npz(tmp_path / "d.npz", x=np.ones((10, 4), np.float32), state=np.ones((2, 9, 8), np.float32), scale=np.array(1.0))
    message = _step_error(path, [X, STATE, SCALE])
    assert "different sample counts" in message and "'x': 10" in message and "'state': 9" in message


def test_a_state_whose_batch_axis_has_the_samples_of_axis_0_is_refused(tmp_path: Path):
    """[samples, 2, 8] for a [2, batch, 8] input: axis 0 is not the declared 2 layers."""
    path = _npz(tmp_path / "d.npz", x=np.ones((10, 4), np.float32), state=np.ones((10, 2, 8), np.float32), scale=np.array(1.0))
    assert "input 'state': axis 0 is 10, expected 2" in _step_error(path, [X, STATE, SCALE])


def test_a_scalar_input_given_an_array_names_the_tensor_and_ranks(tmp_path: Path):
    path = _npz(tmp_path / "d.npz", x=np.ones((10, 4), np.float32), state=np.ones((2, 10, 8), np.float32), scale=np.ones(10))
    assert "input 'scale': shape [10] has rank 1, expected rank 0 []" in _step_error(path, [X, STATE, SCALE])


def test_batch_axis_is_where_the_shape_names_batch():
    assert batch_axis(STATE) == 1 and batch_axis(X) == 0
    assert batch_axis(SCALE) is None and batch_axis({"name": "w", "shape": [3, "sequence"]}) is None
    assert batch_axis({"name": "anything"}) == 0  # no shape: the data's first axis


def test_the_runtime_batch_name_is_the_schemas():
    from kiln.runtime import data
    from kiln.schema import fields

    assert data.BATCH == fields.BATCH == "batch"


def test_sample_count_and_first_sample_follow_the_batch_axes():
    feed = {"x": np.zeros((3, 4)), "state": np.arange(2 * 3 * 8).reshape(2, 3, 8), "scale": np.array(1.0)}
    axes = {"x": 0, "state": 1, "scale": None}
    assert sample_count(feed, axes) == 3
    assert sample_count({"scale": np.array(1.0)}, {"scale": None}) == 1
    assert sample_count({"ids": np.zeros((5, 2))}, {}) == 5  # a name without an axis: axis 0
    first = first_sample(feed, axes)
    assert first["x"].shape == (1, 4) and first["scale"].shape == ()
    assert np.array_equal(first["state"], feed["state"][:, :1]) and first["state"].flags.c_contiguous


def test_a_npy_file_feeds_a_single_input(tmp_path: Path):
    path = tmp_path / "d.npy"
    np.save(path, np.arange(3 * 6, dtype=np.float64).reshape(3, 6))
    (batch,) = array_batches(path, [FEATURES], batch_size=8, max_samples=None)
    assert list(batch) == ["features"] and batch["features"].dtype == np.float32 and batch["features"].shape == (3, 6)


def test_batches_are_c_contiguous_even_from_a_fortran_order_file(tmp_path: Path):
    """Runtimes take the buffer as is: a strided view would be read wrong or copied per call."""
    path = tmp_path / "d.npy"
    np.save(path, np.asfortranarray(np.arange(7 * 6, dtype=np.float32).reshape(7, 6)))
    got = list(array_batches(path, [FEATURES], batch_size=3, max_samples=None))
    assert all(b["features"].flags.c_contiguous for b in got)
    assert np.array_equal(np.concatenate([b["features"] for b in got]), np.arange(42, dtype=np.float32).reshape(7, 6))


def test_a_value_that_fits_the_same_kind_is_cast(tmp_path: Path):
    """float64 data feeds a float32 input, int64 ids an int32 one (same kind: values may round)."""
    path = _npz(tmp_path / "d.npz", features=np.full((2, 6), 0.1, np.float64), input_ids=np.ones((2, 4), np.int64))
    arrays = load_arrays(path, [FEATURES, {**IDS, "dtype": "int32"}])
    assert arrays["features"].dtype == np.float32 and arrays["input_ids"].dtype == np.int32


# ---- errors: one line, naming the file and the tensor -----------------------------------------


def test_a_missing_input_is_named_with_what_the_file_has(tmp_path: Path):
    path = _npz(tmp_path / "d.npz", input_ids=np.ones((2, 4), np.int64), mask=np.ones((2, 4), np.int64))
    assert "input 'attention_mask' is missing; the file has ['input_ids', 'mask']" in _step_error(path, [IDS, MASK])


def test_a_npy_file_for_a_model_with_two_inputs_asks_for_npz(tmp_path: Path):
    path = tmp_path / "d.npy"
    np.save(path, np.ones((2, 4), np.int64))
    message = _step_error(path, [IDS, MASK])
    assert "a .npy holds one array but the model has 2 inputs" in message and "['input_ids', 'attention_mask']" in message


def test_wrong_rank_names_the_tensor_and_both_shapes(tmp_path: Path):
    path = _npz(tmp_path / "d.npz", features=np.zeros((4, 2, 3), np.float32))
    assert "input 'features': shape [4, 2, 3] has rank 3, expected rank 2 ['batch', 6]" in _step_error(path, [FEATURES])


def test_a_wrong_fixed_axis_names_the_axis(tmp_path: Path):
    path = _npz(tmp_path / "d.npz", features=np.zeros((4, 5), np.float32))
    assert "input 'features': axis 1 is 5, expected 6" in _step_error(path, [FEATURES])


@pytest.mark.parametrize("array, dtype", [
    (np.full((2, 6), 0.5, np.float64), "int64"),  # floats would be truncated into ids
    (np.zeros((2, 6), np.complex64), "float32"),
    (np.array([["a"] * 6] * 2), "float32"),
    (np.ones((2, 6), np.int64), "bool"),
])
def test_a_dtype_that_cannot_be_cast_is_refused(tmp_path: Path, array: np.ndarray, dtype: str):
    path = _npz(tmp_path / "d.npz", features=array)
    assert f"input 'features': dtype {array.dtype} cannot be used as {dtype}" in _step_error(path, [{**FEATURES, "dtype": dtype}])


def test_inputs_with_different_sample_counts_are_refused(tmp_path: Path):
    path = _npz(tmp_path / "d.npz", input_ids=np.ones((3, 4), np.int64), attention_mask=np.ones((2, 4), np.int64))
    message = _step_error(path, [IDS, MASK])
    assert "different sample counts" in message and "'input_ids': 3" in message and "'attention_mask': 2" in message


def test_empty_data_is_refused(tmp_path: Path):
    path = _npz(tmp_path / "d.npz", features=np.zeros((0, 6), np.float32))
    assert "validation data is empty: 0 samples" in _step_error(path, [FEATURES])


@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_a_pickled_object_array_is_refused(tmp_path: Path, suffix: str):
    path = tmp_path / f"d{suffix}"
    objects = np.array([{"run": "code"}, None], dtype=object)
    np.savez(path, features=objects) if suffix == ".npz" else np.save(path, objects, allow_pickle=True)
    assert "object arrays (pickle) are refused" in _step_error(path, [FEATURES])


def _truncated(path: Path) -> Path:
    np.savez(path, features=np.zeros((50, 6), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _flipped(path: Path) -> Path:
    np.savez(path, features=np.zeros((50, 6), np.float32))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the stored member: its CRC no longer matches
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("damage, expected", [
    (_truncated, "File is not a zip file"),
    (_flipped, "Bad CRC-32"),
    (lambda p: p.write_bytes(b""), "No data left in file"),
])
def test_a_damaged_file_is_a_step_error_not_a_crash(tmp_path: Path, damage, expected):
    path = tmp_path / "d.npz"
    damage(path)
    message = _step_error(path, [FEATURES])
    assert "cannot read arrays" in message and expected in message


def test_a_missing_file_is_a_step_error(tmp_path: Path):
    assert "cannot read arrays" in _step_error(tmp_path / "nowhere.npz", [FEATURES])



def test_a_scalar_array_is_a_step_error(tmp_path: Path):
    path = tmp_path / "d.npy"
    np.save(path, np.float32(1.0))
    assert "features" in _step_error(path, [{"name": "features", "dtype": "float32"}])


# ---- text -------------------------------------------------------------------------------------


def test_text_lines_are_stripped_and_blank_lines_dropped(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_text("  first line \n\n   \nsecond\r\n\tthird\n\n", encoding="utf-8")
    assert read_text_lines(path, None) == ["first line", "second", "third"]
    assert read_text_lines(path, 2) == ["first line", "second"]  # max_samples counts texts, not file lines


def test_text_that_is_not_utf8_names_the_byte(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(StepError) as caught:
        read_text_lines(path, None)
    assert str(caught.value) == f"{path}: validation text is not UTF-8 (byte 8)"


@pytest.mark.parametrize("text", ["", "\n\n", "   \n\t\n"])
def test_text_without_a_nonblank_line_is_empty(tmp_path: Path, text: str):
    path = tmp_path / "t.txt"
    path.write_text(text)
    with pytest.raises(StepError, match="validation data is empty: expected at least one non-blank line"):
        read_text_lines(path, None)


# ---- example inputs ---------------------------------------------------------------------------


def test_example_inputs_are_seeded():
    specs = [IDS, MASK, FEATURES]
    first, again = example_inputs(specs, seed=3), example_inputs(specs, seed=3)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(example_inputs([FEATURES], seed=0)["features"], example_inputs([FEATURES], seed=1)["features"])


def test_a_named_axis_has_one_size_across_inputs():
    got = example_inputs([IDS, {"name": "states", "dtype": "float32", "shape": ["batch", "sequence", 4]},
                          {"name": "lengths", "dtype": "int64", "shape": ["batch"]}])
    assert got["input_ids"].shape == (2, 8) and got["states"].shape == (2, 8, 4) and got["lengths"].shape == (2,)
    sized = example_inputs([IDS, MASK], sizes={"sequence": 5})
    assert sized["input_ids"].shape == sized["attention_mask"].shape == (2, 5)


def test_the_example_batch_size_goes_on_the_batch_axis():
    got = example_inputs([{"name": "frames", "dtype": "float32", "shape": ["sequence", "batch", 3]}, STATE, SCALE])
    assert got["frames"].shape == (8, 2, 3) and got["state"].shape == (2, 2, 8)
    assert got["scale"].shape == () and got["scale"].dtype == np.float32


def test_example_values_respect_range_and_dtype():
    got = example_inputs([
        {"name": "ids", "dtype": "int64", "shape": [4, 50], "range": [3, 7]},
        {"name": "small", "dtype": "uint8", "shape": [200]},
        {"name": "flag", "dtype": "bool", "shape": [200]},
        {"name": "x", "dtype": "float32", "shape": [200], "range": [10.0, 10.5]},
        {"name": "y", "dtype": "float16", "shape": [200]},
    ])
    ids = got["ids"]
    assert ids.dtype == np.int64 and ids.min() >= 3 and ids.max() <= 6 and set(np.unique(ids)) == {3, 4, 5, 6}
    assert got["small"].dtype == np.uint8 and set(np.unique(got["small"])) == {0, 1}  # ints default to [0, 2)
    assert got["flag"].dtype == np.bool_ and got["flag"].any() and not got["flag"].all()
    assert got["x"].dtype == np.float32 and 10.0 <= got["x"].min() and got["x"].max() < 10.5
    assert got["y"].dtype == np.float16 and -1.0 <= got["y"].min() and got["y"].max() <= 1.0 and got["y"].std() > 0.1


# ---- text batches: a tokenizer that does not read the text ---------------------------------


def _wordpiece(folder: Path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sources"))
    from hf_models import wordpiece_tokenizer
    from transformers import AutoTokenizer

    wordpiece_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def test_text_the_tokenizer_reads_gives_its_batches(tmp_path: Path):
    from kiln.runtime.data import text_batches

    data = tmp_path / "words.txt"
    data.write_text("kiln builds the model\nzzz qqq the text\n")
    feeds = list(text_batches(data, _wordpiece(tmp_path / "tok"), [IDS, MASK], 8, 16, None))
    assert len(feeds) == 1 and feeds[0]["input_ids"].shape[0] == 2


def test_text_whose_every_word_is_unknown_to_the_tokenizer_is_refused(tmp_path: Path):
    """The reference and the artifact would agree on [UNK] [UNK] ...: nothing real is validated."""
    from kiln.runtime.data import text_batches

    data = tmp_path / "foreign.txt"
    data.write_text("zzz qqq\nxxyyzz wwvv\n")
    with pytest.raises(StepError) as caught:
        list(text_batches(data, _wordpiece(tmp_path / "tok"), [IDS, MASK], 1, 16, None))
    message = str(caught.value)
    assert message.startswith(f"{data}: ") and "'[UNK]'" in message and "4 word tokens" in message and "\n" not in message


# ---- .csv tables -------------------------------------------------------------------------------

TABLE = "mean radius,mean texture,target\n14.1,19.3,0\n20.6,,1\n9.5,12.4,1\n"


def _csv(path: Path, text: str = TABLE) -> Path:
    path.write_text(text)
    return path


def test_a_csv_input_takes_the_columns_it_names_in_that_order(tmp_path: Path):
    features = {"name": "features", "dtype": "float32", "shape": ["batch", 2], "columns": ["mean texture", "mean radius"]}
    got = load_arrays(_csv(tmp_path / "v.csv"), [features])["features"]
    assert got.dtype == np.float32 and got.shape == (3, 2)
    np.testing.assert_array_equal(got[[0, 2]], np.array([[19.3, 14.1], [12.4, 9.5]], np.float32))
    assert np.isnan(got[1, 0]) and got[1, 1] == np.float32(20.6)  # an empty cell is a missing value


def test_a_row_of_empty_cells_is_a_sample_with_every_value_missing(tmp_path: Path):
    got = load_arrays(_csv(tmp_path / "v.csv", "a,b\n1,2\n,\nNaN,4\n"), [{"name": "x", "dtype": "float32", "shape": ["batch", 2]}])["x"]
    assert got.shape == (3, 2) and np.isnan(got[1]).all() and np.isnan(got[2, 0]) and got[2, 1] == 4


def test_a_one_dimensional_input_takes_its_own_column_and_an_only_input_every_column(tmp_path: Path):
    path = _csv(tmp_path / "v.csv", "a,b\n1,2\n3,4\n")
    both = load_arrays(path, [{"name": "x", "dtype": "float32", "shape": ["batch", 2]}])["x"]
    np.testing.assert_array_equal(both, [[1, 2], [3, 4]])
    got = load_arrays(path, [{"name": "a", "dtype": "int64", "shape": ["batch"]}, {"name": "b", "dtype": "float32", "shape": ["batch"]}])
    assert got["a"].dtype == np.int64 and got["a"].tolist() == [1, 3] and got["b"].tolist() == [2.0, 4.0]
    batches = list(array_batches(path, [{"name": "x", "dtype": "float32", "shape": ["batch", 2]}], batch_size=1, max_samples=None))
    assert [b["x"].tolist() for b in batches] == [[[1, 2]], [[3, 4]]]


@pytest.mark.parametrize("text,inputs,problem", [
    (TABLE, [{"name": "features", "dtype": "float32", "shape": ["batch", 2]}],
     "axis 1 is 3, expected 2"),  # every column, target included: the manifest must name the features
    (TABLE, [{"name": "f", "dtype": "float32", "shape": ["batch", 2], "columns": ["mean radius", "area"]}],
     "input 'f': columns ['area'] are not in the table; it has ['mean radius', 'mean texture', 'target']"),
    ("a,b\n1,x\n", [{"name": "f", "dtype": "float32", "shape": ["batch", 2]}],
     "row 2, column 'b': 'x' is not allowed; expected a finite number (or an empty cell or NaN for a missing value)"),
    ("a,b\n1,1e400\n", [{"name": "f", "dtype": "float32", "shape": ["batch", 2]}], "row 2, column 'b': '1e400' is not allowed"),
    ("a,b\n1,-Infinity\n", [{"name": "f", "dtype": "float32", "shape": ["batch", 2]}], "row 2, column 'b': '-Infinity' is not allowed"),
    ("a,b\n1,1_000\n", [{"name": "f", "dtype": "float32", "shape": ["batch", 2]}], "row 2, column 'b': '1_000' is not allowed"),
    ("a\n4294967297\n", [{"name": "a", "dtype": "int32", "shape": ["batch"]}],
     "row 2, column 'a': '4294967297' is not allowed; expected an integer from -2147483648 to 2147483647 (int32)"),
    ("a\n99999999999999999999\n", [{"name": "a", "dtype": "int64", "shape": ["batch"]}], "'99999999999999999999' is not allowed; expected an integer from"),
    ("a,a\n1,2\n", [{"name": "f", "dtype": "float32", "shape": ["batch", 2]}], "columns ['a'] appear more than once in the header"),
    ("a\n1\n\n", [{"name": "a", "dtype": "int64", "shape": ["batch"]}], None),
    ("a\n1.5\n", [{"name": "a", "dtype": "int64", "shape": ["batch"]}], "row 2, column 'a': '1.5' is not allowed; expected an integer from"),
    ("a,b\n1\n", [{"name": "f", "dtype": "float32", "shape": ["batch", 2]}], "row 2 has 1 cells, the header 2"),
    ("", [{"name": "f", "dtype": "float32", "shape": ["batch", 2]}], "the table is empty"),
    ("a,b\n1,2\n", [{"name": "x", "dtype": "float32", "shape": ["batch"]}, {"name": "y", "dtype": "float32", "shape": ["batch"]}],
     "input 'x': no column is named so and the model has 2 inputs; name its columns with inputs.columns"),
])
def test_a_bad_csv_is_one_line_naming_the_file_row_and_column(tmp_path: Path, text: str, inputs: list[dict], problem: str | None):
    path = _csv(tmp_path / "v.csv", text)
    if problem is None:  # blank lines are skipped, not read as samples
        assert load_arrays(path, inputs)["a"].tolist() == [1]
        return
    assert problem in _step_error(path, inputs)


def test_integers_that_do_not_fit_the_inputs_dtype_are_refused_not_wrapped(tmp_path: Path):
    path = _npz(tmp_path / "d.npz", ids=np.array([[1, 2**32 + 1]], np.int64))
    assert "input 'ids': values from 1 to 4294967297 do not fit int32" in _step_error(path, [{"name": "ids", "dtype": "int32", "shape": ["batch", 2]}])
    fits = _npz(tmp_path / "e.npz", ids=np.array([[1, 2]], np.int64))
    assert load_arrays(fits, [{"name": "ids", "dtype": "int32", "shape": ["batch", 2]}])["ids"].dtype == np.int32


class _CountingTokenizer:
    """A stand-in tokenizer: one token per word, plus the two special ones."""

    def __call__(self, lines, truncation=True, max_length=128):
        return {"input_ids": [[0] * min(max_length, len(line.split()) + 2) for line in lines]}


def test_text_after_the_first_batches_is_batched_by_length_ties_in_file_order():
    from kiln.runtime.data import by_length

    lines = ["a b c d e", "a", "a b c", "a b", "x y z w v u", "b", "c d", "q"]
    ordered = by_length(lines, _CountingTokenizer(), batch_size=2, max_length=128, after=3)
    # 3 rounds up to two whole batches: the first four lines stay; the rest by token count, ties in order
    assert ordered == ["a b c d e", "a", "a b c", "a b", "b", "q", "c d", "x y z w v u"]
    assert sorted(ordered) == sorted(lines)


def test_without_by_length_the_file_order_is_kept_and_truncation_counts():
    from kiln.runtime.data import by_length

    lines = ["a b c d e f", "a b c d", "a"]
    assert by_length(lines, _CountingTokenizer(), 1, 128, None) == lines
    # cut to 4 tokens, the two long lines tie and keep their order
    assert by_length(lines, _CountingTokenizer(), 1, 4, 0) == ["a b c d e f", "a", "a b c d"]
