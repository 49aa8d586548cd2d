"""SafeTensors files, read and written by kiln: the call shapes of `safetensors.numpy`, faster.

    load_file(path, copy=True) -> dict[str, np.ndarray]     save_file(tensors, path, metadata=None)
    load(data: bytes) -> dict                               save(tensors, metadata=None) -> bytes
    with safe_open(path) as f: f.keys(), f.metadata(), f.get_tensor(name)

Reading: the JSON header is parsed by Python's json (strict, duplicates refused); every offset rule
is checked by the native kernel kiln._native.check_layout with overflow-checked arithmetic, before
any tensor byte is touched. `copy=True` (the default) reads the data with two threads of pread
straight into one new buffer (page cache -> array, one copy); `copy=False` returns read-only
zero-copy views of a memory map. Every violation raises SafetensorError (a ValueError) naming the
rule and the tensor; nothing crashes and nothing reads out of bounds.

Writing: one native call (kiln._native.write_file) streams the header and every tensor straight from
the arrays into a temp file next to the target (never the whole file in memory; arrays that are not
C-contiguous little-endian are converted first, others are not copied), then rename. The file is
sized with fallocate and written with 8 MiB pwritev calls on the calling thread (more threads or a
mapping do not help: csrc/bindings_safetensors.inc says why, benchmarks/bench_safetensors.py measures). Order is the package's (descending dtype in its enum
order, which puts wider items first so every tensor stays aligned, then by name) and the header is
padded to 8 bytes: same tensors, same bytes as safetensors.numpy.save_file.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from kiln import _native
from kiln.base.temps import temp_path

MAX_HEADER = 100_000_000  # bytes, as the reference implementation
READ_CHUNK = 64 << 20
READ_THREADS = 2

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The package's Dtype enum order: it writes tensors by descending dtype, then by name. Widths only
# fall as the rank does, so every tensor stays aligned to its item size.
_FILE_ORDER = {name: rank for rank, name in enumerate(
    ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"])}

LAYOUT_RULES = {  # kiln::LayoutRule codes -> (rule, what it means)
    1: ("shape overflow", "the product of the shape's non-zero dims does not fit a signed 64-bit index"),
    2: ("size overflow", "element count times item size does not fit a signed 64-bit size"),
    3: ("offsets reversed", "data_offsets begin is after end"),
    4: ("size mismatch", "data_offsets span differs from dtype size x shape"),
    5: ("not at start", "the first tensor does not start at byte 0 of the data"),
    6: ("hole", "bytes between the previous tensor's end and this tensor's begin"),
    7: ("overlap", "this tensor begins before the previous one ends"),
    8: ("not sorted", "internal: tensors not in offset order"),
    9: ("out of bounds", "data_offsets end is past the end of the file"),
    10: ("trailing bytes", "the tensors do not cover the data to the end of the file"),
}


class SafetensorError(ValueError):
    """A file (or tensors to save) breaking a rule of the SafeTensors format."""


# ---- header ------------------------------------------------------------------------------------

class _Header:
    """A validated header: tensor entries in offset order, metadata, where the data starts."""

    def __init__(self, source: str, header_len: int, entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]], metadata: dict[str, str] | None):
        self.source = source
        self.data_start = 8 + header_len
        self.entries = entries  # name -> (dtype, shape, begin, end), in offset order
        self.metadata = metadata


def _parse_header(prefix: bytes, total_len: int, source: str, read_header) -> _Header:
    if total_len < 8 or len(prefix) < 8:
        raise SafetensorError(f"{source}: header length: file has {total_len} bytes, fewer than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > MAX_HEADER:
        raise SafetensorError(f"{source}: header too large: {header_len} bytes, the limit is {MAX_HEADER}")
    if 8 + header_len > total_len:
        raise SafetensorError(f"{source}: header length: {header_len} bytes claimed but the file has {total_len - 8} after the length")
    raw = read_header(header_len)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SafetensorError(f"{source}: header is not UTF-8 (byte {err.start})") from None
    if not text.startswith("{"):
        raise SafetensorError(f"{source}: header start: JSON header must start with '{{', found {text[:1]!r}")
    try:
        parsed = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise SafetensorError(f"{source}: header is not valid JSON: {err.msg} at char {err.pos}") from None
    except RecursionError:
        raise SafetensorError(f"{source}: header is not valid JSON: nested too deeply") from None
    except SafetensorError as err:  # from the hooks, which do not know the file
        raise SafetensorError(f"{source}: {err}") from None
    if not isinstance(parsed, dict):
        raise SafetensorError(f"{source}: header must be a JSON object")
    metadata = _metadata(parsed.pop("__metadata__", None), source)
    entries = {name: _entry(name, info, source) for name, info in parsed.items()}
    ordered = _check_offsets(entries, total_len - 8 - header_len, source)
    return _Header(source, header_len, ordered, metadata)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise SafetensorError(f"duplicate name: {key!r} appears twice in the header")
        result[key] = value
    return result


def _no_constant(name: str):
    raise SafetensorError(f"header holds {name}, which is not JSON")


def _metadata(value: Any, source: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise SafetensorError(f"{source}: __metadata__ must map strings to strings")
    return value


def _entry(name: str, info: Any, source: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
    where = f"{source}: tensor {name!r}"
    if "\x00" in name:
        raise SafetensorError(f"{where}: name contains NUL")
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        keys = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise SafetensorError(f"{where}: entry must have exactly dtype, shape, data_offsets; found {keys}")
    dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise SafetensorError(f"{where}: unknown dtype {info['dtype']!r}; known: {', '.join(DTYPES)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise SafetensorError(f"{where}: shape must be a list of non-negative 64-bit integers, found {shape!r}"[:300])
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise SafetensorError(f"{where}: data_offsets must be [begin, end] non-negative 64-bit integers, found {offsets!r}"[:300])
    return dtype, tuple(shape), offsets[0], offsets[1]


def _is_u64(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 64


def _check_offsets(entries: dict, buffer_len: int, source: str) -> dict:
    names = list(entries)
    items = list(entries.values())
    begins = np.array([e[2] for e in items], np.uint64)
    ends = np.array([e[3] for e in items], np.uint64)
    order = np.lexsort((ends, begins)).astype(np.int64)
    rule, index = _native.check_layout(
        np.array([e[0].itemsize for e in items], np.uint64), np.array([len(e[1]) for e in items], np.uint64),
        np.array([d for e in items for d in e[1]], np.uint64), begins, ends, order, buffer_len,
    )
    if rule:
        name, meaning = LAYOUT_RULES[rule]
        who = f"tensor {names[index]!r} (data_offsets [{items[index][2]}, {items[index][3]}], {_NAMES[items[index][0]]} {list(items[index][1])})" if index >= 0 else f"data of {buffer_len} bytes"
        raise SafetensorError(f"{source}: {name}: {who}: {meaning}")
    return {names[i]: items[i] for i in order}


# ---- reading -----------------------------------------------------------------------------------

def load_file(path: str | os.PathLike, copy: bool = True) -> dict[str, np.ndarray]:
    """All tensors of a file. copy=False: read-only views of a memory map (zero copy)."""
    with safe_open(path) as f:
        if not copy:
            return {name: f.get_tensor(name, copy=False) for name in f.keys()}
        data = f._read_all()
        return {name: _view(data, entry) for name, entry in f._header.entries.items()}


def load(data: bytes) -> dict[str, np.ndarray]:
    header = _parse_header(data[:8], len(data), "<bytes>", lambda n: data[8 : 8 + n])
    buffer = np.frombuffer(data, np.uint8, offset=header.data_start).copy()
    return {name: _view(buffer, entry) for name, entry in header.entries.items()}


def _view(buffer: np.ndarray, entry: tuple) -> np.ndarray:
    dtype, shape, begin, end = entry
    return buffer[begin:end].view(dtype).reshape(shape)


class safe_open:
    """Lazy access: the header is read and checked on open; tensors are read when asked for."""

    def __init__(self, path: str | os.PathLike, framework: str = "np", device: str = "cpu"):
        if framework not in ("np", "numpy") or device != "cpu":
            raise ValueError(f"kiln.native.safetensors reads numpy arrays on cpu; got framework={framework!r}, device={device!r}")
        self.path = str(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(self._fd).st_size
            self._header = _parse_header(os.pread(self._fd, 8, 0), size, self.path, lambda n: os.pread(self._fd, n, 8))
        except BaseException:
            os.close(self._fd)
            raise
        self._map: mmap.mmap | None = None

    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def keys(self) -> list[str]:
        return list(self._header.entries)

    def metadata(self) -> dict[str, str] | None:
        return self._header.metadata

    def get_tensor(self, name: str, copy: bool = True) -> np.ndarray:
        try:
            entry = self._header.entries[name]
        except KeyError:
            raise SafetensorError(f"{self.path}: no tensor named {name!r}") from None
        dtype, shape, begin, end = entry
        if not copy:
            return _view(np.frombuffer(self._mapped(), np.uint8, offset=self._header.data_start), entry)
        out = np.empty(end - begin, np.uint8)
        _pread_into(self._fd, out, self._header.data_start + begin)
        return out.view(dtype).reshape(shape)

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)  # kept alive by the views
        return self._map

    def _read_all(self) -> np.ndarray:
        size = os.fstat(self._fd).st_size - self._header.data_start
        out = np.empty(size, np.uint8)
        _pread_into(self._fd, out, self._header.data_start, threads=READ_THREADS)
        return out


def _pread_into(fd: int, out: np.ndarray, offset: int, threads: int = 1) -> None:
    """Fill `out` from the file at `offset`. Large reads go to several threads (pread releases the
    GIL), so copying from the page cache and first-touching the new pages use every core."""
    view = memoryview(out).cast("B")
    chunks = [(start, min(start + READ_CHUNK, len(view))) for start in range(0, len(view), READ_CHUNK)]
    errors: list[BaseException] = []

    def work(mine: list[tuple[int, int]]) -> None:
        try:
            for start, end in mine:
                done = start
                while done < end:
                    got = os.preadv(fd, [view[done:end]], offset + done)
                    if got == 0:
                        raise SafetensorError(f"file shrank while reading (at byte {offset + done})")
                    done += got
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)

    if threads <= 1 or len(chunks) <= 1:
        work(chunks)
    else:
        pool = [threading.Thread(target=work, args=(chunks[k::threads],)) for k in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    if errors:
        raise errors[0]


# ---- writing -----------------------------------------------------------------------------------

def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Writes a temp file beside `path` in one native call (header and tensors straight from the
    arrays, no whole-file buffer), then renames it into place: an error leaves `path` as it was and
    no temp file behind, and raises OSError("cannot write <path>: <why>") with the errno."""
    path = Path(path)
    header, ordered = _prepare(tensors, metadata)
    data = [array.reshape(-1).view(np.uint8) for _, array in ordered]
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            err, call = _native.write_file(fd, header, data)
        finally:
            os.close(fd)
        if err:
            raise OSError(err, f"{os.strerror(err)} ({call} of the temp file)")
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from None
        raise


def save(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    header, ordered = _prepare(tensors, metadata)
    return header + b"".join(_bytes_of(a) for _, a in ordered)


def _bytes_of(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy (ml_dtypes types have no buffer format)."""
    return memoryview(array.reshape(-1).view(np.uint8))


def _prepare(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> tuple[bytes, list[tuple[str, np.ndarray]]]:
    """The header bytes and the arrays in file order, each C-contiguous little-endian."""
    arrays = {name: _as_stored(name, array) for name, array in _check_names(tensors)}
    ordered = sorted(arrays.items(), key=lambda item: (-_FILE_ORDER[_NAMES[item[1].dtype]], item[0]))
    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise SafetensorError("metadata must map strings to strings")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, array in ordered:
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data starts 8-aligned, so every tensor is aligned to its item size
    return struct.pack("<Q", len(text)) + text, ordered


def _check_names(tensors: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    for name, array in tensors.items():
        if not isinstance(name, str) or not name or "\x00" in name or name == "__metadata__":
            raise SafetensorError(f"tensor name {name!r} is not allowed (non-empty string, no NUL, not __metadata__)")
        yield name, array


def _as_stored(name: str, array: Any) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise SafetensorError(f"tensor {name!r}: expected a numpy array, got {type(array).__name__}")
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype not in _NAMES:
        raise SafetensorError(f"tensor {name!r}: dtype {array.dtype} cannot be stored; storable: {', '.join(str(d) for d in _NAMES)}")
    return array.astype(dtype, order="C", copy=False)  # not ascontiguousarray: it turns 0-d into 1-d
