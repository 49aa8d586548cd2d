"""kiln.native.safetensors: the safetensors.numpy call shapes, cross-tested with the safetensors package
in both directions for every dtype, and a hostile corpus that must raise, never crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as reference

from hostile_safetensors import good_tensors, mutation_cases, rule_cases, write_corpus
from kiln.native import safetensors as st
from kiln.native.safetensors import SafetensorError

DTYPES = [np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.float16, ml_dtypes.bfloat16, np.uint32, np.int32,
          np.float32, np.uint64, np.int64, np.float64, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]


# safetensors.numpy itself cannot handle float8 (it looks them up on numpy): cross-tests skip them.
CROSS_DTYPES = [d for d in DTYPES if "float8" not in np.dtype(d).name]


def all_dtypes(dtypes=CROSS_DTYPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    out = {}
    for i, dtype in enumerate(dtypes):
        raw = rng.integers(0, 256, size=(3, 5) if i % 2 else (7,), dtype=np.uint8)
        width = np.dtype(dtype).itemsize
        out[f"t{i}_{np.dtype(dtype).name}"] = np.frombuffer(np.resize(raw, raw.size * width).tobytes(), dtype).reshape(raw.shape) if dtype is not np.bool_ else raw.astype(bool)
    out["empty"] = np.zeros((0, 4), np.float32)
    out["scalar"] = np.array(2.5, np.float64)
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a)


def test_kiln_writes_what_safetensors_reads(tmp_path: Path):
    tensors = all_dtypes()
    st.save_file(tensors, tmp_path / "k.safetensors", metadata={"producer": "kiln"})
    assert same(reference.load_file(tmp_path / "k.safetensors"), tensors)
    from safetensors import safe_open as ref_open

    with ref_open(tmp_path / "k.safetensors", framework="np") as f:
        assert f.metadata() == {"producer": "kiln"}


def test_kiln_reads_what_safetensors_writes(tmp_path: Path):
    tensors = all_dtypes()
    reference.save_file(tensors, tmp_path / "r.safetensors", metadata={"a": "b"})
    assert same(st.load_file(tmp_path / "r.safetensors"), tensors)
    assert same(st.load_file(tmp_path / "r.safetensors", copy=False), tensors)
    assert same(st.load(reference.save(tensors)), tensors)
    with st.safe_open(tmp_path / "r.safetensors") as f:
        assert f.metadata() == {"a": "b"} and sorted(f.keys()) == sorted(tensors)


def test_every_dtype_round_trips_through_kiln(tmp_path: Path):
    tensors = all_dtypes(DTYPES)
    st.save_file(tensors, tmp_path / "k.safetensors")
    assert same(st.load_file(tmp_path / "k.safetensors"), tensors) and same(st.load(st.save(tensors)), tensors)


def test_same_tensors_same_bytes_whatever_the_order(tmp_path: Path):
    tensors = good_tensors()
    st.save_file(tensors, tmp_path / "a.safetensors")
    st.save_file(dict(reversed(list(tensors.items()))), tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes() == st.save(tensors)
    header_len = int.from_bytes((tmp_path / "a.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0


def test_views_are_read_only_and_copies_are_independent(tmp_path: Path):
    st.save_file(good_tensors(), tmp_path / "a.safetensors")
    view = st.load_file(tmp_path / "a.safetensors", copy=False)["w"]
    with pytest.raises(ValueError):
        view[0, 0] = 1
    copy = st.load_file(tmp_path / "a.safetensors")["w"]
    copy[0, 0] = 123.0
    assert st.load_file(tmp_path / "a.safetensors")["w"][0, 0] != 123.0


def test_lazy_access_reads_one_tensor(tmp_path: Path):
    st.save_file({"big": np.ones(1 << 20, np.float32), "small": np.arange(3, dtype=np.int32)}, tmp_path / "a.safetensors")
    with st.safe_open(tmp_path / "a.safetensors") as f:
        assert f.get_tensor("small").tolist() == [0, 1, 2]
        with pytest.raises(SafetensorError, match="no tensor named 'nope'"):
            f.get_tensor("nope")


def test_non_contiguous_and_big_endian_arrays_are_stored_correctly(tmp_path: Path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensors = {"t": a.T, "be": a.astype(">f4")}
    st.save_file(tensors, tmp_path / "a.safetensors")
    back = reference.load_file(tmp_path / "a.safetensors")
    assert np.array_equal(back["t"], a.T) and np.array_equal(back["be"], a) and back["be"].dtype == np.dtype("<f4")


@pytest.mark.parametrize("tensors,text", [
    ({"x": [1, 2]}, "expected a numpy array"),
    ({"x": np.array(["a"])}, "dtype <U1 cannot be stored"),
    ({"a\x00": np.zeros(1)}, "is not allowed"),
    ({"__metadata__": np.zeros(1)}, "is not allowed"),
])
def test_bad_tensors_to_save_are_refused_and_nothing_is_written(tmp_path: Path, tensors, text):
    with pytest.raises(SafetensorError, match=text):
        st.save_file(tensors, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_keeps_the_previous_file(tmp_path: Path):
    st.save_file(good_tensors(), tmp_path / "a.safetensors")
    before = (tmp_path / "a.safetensors").read_bytes()
    with pytest.raises(SafetensorError):
        st.save_file({"ok": np.zeros(2), "bad": np.array(["x"])}, tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == before and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("name,data,text", rule_cases(), ids=[c[0] for c in rule_cases()])
def test_each_format_rule_has_its_error(tmp_path: Path, name, data, text):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(SafetensorError) as caught:
        st.load_file(path)
    assert text in str(caught.value) and str(path) in str(caught.value)
    with pytest.raises(SafetensorError, match="<bytes>"):
        st.load(data)


@pytest.mark.parametrize("name,data,_", mutation_cases(), ids=[c[0] for c in mutation_cases()])
def test_truncated_and_bit_flipped_files_raise_or_load_within_bounds(tmp_path: Path, name, data, _):
    path = tmp_path / name
    path.write_bytes(data)
    try:
        loaded = st.load_file(path)
    except SafetensorError:
        return
    assert sum(a.nbytes for a in loaded.values()) <= len(data)  # a flip that kept the file valid


def test_the_whole_corpus_never_crashes_the_process(tmp_path: Path):
    """In a child process, so a segfault would show as a signal rather than kill pytest."""
    count = write_corpus(tmp_path / "corpus")
    assert count >= 25
    script = (
        "import sys, pathlib\nfrom kiln.native.safetensors import load_file, SafetensorError\n"
        "n = 0\nfor p in sorted(pathlib.Path(sys.argv[1]).iterdir()):\n"
        "    for copy in (True, False):\n"
        "        try: load_file(p, copy=copy)\n        except SafetensorError: n += 1\n"
        "print(n)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "corpus")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 2 * len(rule_cases())


def test_structured_header_mutations_load_within_bounds_or_raise():
    """A short run of the sanitizer mutation loop (tests/fuzz/mutate_headers.py), fixed seed."""
    script = Path(__file__).parents[1] / "fuzz" / "mutate_headers.py"
    proc = subprocess.run([sys.executable, str(script), "--seconds", "2", "--seed", "7"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 crashes" in proc.stdout
