"""kiln.native.safetensors.save_file's native writer (kiln._native.write_file): the same bytes as
the safetensors package for empty dicts, zero-size tensors, thousands of small tensors (gathered into
pwritev calls of at most IOV_MAX pieces) and tensors split across 8 MiB runs, and a failed write that
leaves the previous file and no temp file behind, with a one-line error naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as reference

from kiln import _native
from kiln.native import safetensors as st


def small_mixed(count: int) -> dict[str, np.ndarray]:
    """Many small tensors of every width the package can write, some empty, some 0-d."""
    rng = np.random.default_rng(11)
    dtypes = [np.float32, np.float16, np.int64, np.uint8, np.bool_, np.int16, np.float64, ml_dtypes.bfloat16]
    out = {}
    for i in range(count):
        dtype = np.dtype(dtypes[i % len(dtypes)])
        shape = [(), (0,), (3,), (2, 5), (7, 0, 2), (int(rng.integers(1, 40)),)][i % 6]
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
        out[f"block.{i}.w"] = raw.astype(bool).reshape(shape) if dtype == np.bool_ else raw.view(dtype).reshape(shape)
    return out


def large(mib: int) -> dict[str, np.ndarray]:
    """Tensors that span several 8 MiB runs, with sizes that are not multiples of a run or a page."""
    rng = np.random.default_rng(5)
    out = {f"m{i}": rng.standard_normal((1024, 1024 + 3 * i), dtype=np.float32) for i in range(mib // 4)}
    out["odd"] = rng.integers(0, 255, size=12_345, dtype=np.uint8)
    out["half"] = rng.standard_normal(10_001).astype(np.float16)
    return out


@pytest.mark.parametrize("tensors,metadata", [
    ({}, None),
    ({}, {"format": "np"}),
    ({"empty": np.zeros((0, 4), np.float32), "none": np.zeros(0, np.uint8)}, None),
    ({"empty": np.zeros((0, 4), np.float32), "x": np.arange(6, dtype=np.int32).reshape(2, 3)}, {"a": "b"}),
    (small_mixed(3000), {"producer": "kiln"}),  # > IOV_MAX pieces: several runs, each one pwritev
    (large(20), None),  # tensors split across 8 MiB runs
], ids=["empty-dict", "empty-dict-metadata", "only-zero-size", "zero-size-and-data", "3000-small", "20MiB"])
def test_save_file_writes_the_packages_bytes(tmp_path: Path, tensors, metadata):
    st.save_file(tensors, tmp_path / "kiln.safetensors", metadata=metadata)
    reference.save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
    assert (tmp_path / "kiln.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kiln.safetensors", "ref.safetensors"]  # no temp left


def test_the_native_writer_fills_an_open_file_with_the_packages_bytes(tmp_path: Path):
    tensors = {**large(20), **small_mixed(50)}
    header, ordered = st._prepare(tensors, {"k": "v"})
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert _native.write_file(fd, header, [a.reshape(-1).view(np.uint8) for _, a in ordered]) == (0, "")
    finally:
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == reference.save(tensors, metadata={"k": "v"})


# A child process: one case fails inside pwritev (a tensor whose second page is unreadable: EFAULT
# after the header and part of the data are written), one fails sizing the file (RLIMIT_FSIZE: EFBIG).
FAILING_SAVE = textwrap.dedent("""
    import ctypes, json, mmap, resource, signal, sys
    import numpy as np
    from kiln.native import safetensors as st
    path, case = sys.argv[1], sys.argv[2]
    if case == "unreadable-tensor":
        page = mmap.PAGESIZE
        buf = mmap.mmap(-1, 2 * page)
        libc = ctypes.CDLL(None, use_errno=True)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert libc.mprotect(ctypes.c_void_p(addr + page), ctypes.c_size_t(page), 0) == 0
        tensors = {"a": np.ones(1000, np.float32), "z": np.frombuffer(buf, np.uint8)}
    else:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        tensors = {"big": np.ones(1 << 20, np.float32)}
    try:
        st.save_file(tensors, path)
    except OSError as err:
        print(json.dumps([err.errno, str(err)]))
""")


@pytest.mark.parametrize("case,errno_name", [("unreadable-tensor", "EFAULT"), ("file-size-limit", "EFBIG")])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, case, errno_name):
    import errno

    old = {"old": np.arange(5, dtype=np.int64)}
    st.save_file(old, tmp_path / "a.safetensors")
    before = (tmp_path / "a.safetensors").read_bytes()
    proc = subprocess.run([sys.executable, "-c", FAILING_SAVE, str(tmp_path / "a.safetensors"), case],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code, message = json.loads(proc.stdout)
    assert code == getattr(errno, errno_name)
    assert message.startswith(f"[Errno {code}] cannot write {tmp_path / 'a.safetensors'}: ") and "\n" not in message
    assert (tmp_path / "a.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_an_unwritable_destination_names_the_file(tmp_path: Path):
    target = tmp_path / "missing" / "a.safetensors"
    with pytest.raises(OSError, match=f"cannot write {target}: No such file or directory"):
        st.save_file({"x": np.zeros(3)}, target)
