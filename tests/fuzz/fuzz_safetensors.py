"""atheris harness for kiln's SafeTensors reader.

    pip install atheris
    python tests/fuzz/fuzz_safetensors.py -max_total_time=600 tests/fuzz/corpus

Seeds: a valid file plus the hostile corpus (tests/hostile_safetensors.py). Every input must load
or raise SafetensorError; anything else (another exception, a crash, an out-of-bounds read under
AddressSanitizer) is a finding. With ASan: see docs/fuzzing.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

from kiln.native import safetensors as st

# instrument_all, not instrument_imports: an editable install loads kiln through a custom finder,
# which instrument_imports does not see (coverage then stays flat).
atheris.instrument_all()

SCRATCH = Path(tempfile.mkdtemp(prefix="kiln-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)) / "input.safetensors"


def check(data: bytes) -> None:
    try:
        loaded = st.load(data)
    except st.SafetensorError:
        loaded = None
    if loaded is not None:
        assert sum(a.nbytes for a in loaded.values()) <= len(data)
    if len(data) % 3 == 0:  # the file paths too (pread with threads, and mmap views)
        SCRATCH.write_bytes(data)
        for copy in (True, False):
            try:
                for array in st.load_file(SCRATCH, copy=copy).values():
                    array.tobytes()  # touch every byte of every view
            except st.SafetensorError:
                pass


def seed_corpus(folder: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hostile_safetensors import good_tensors, write_corpus

    if not folder.exists() or not any(folder.iterdir()):
        write_corpus(folder)
        (folder / "good.safetensors").write_bytes(st.save(good_tensors(), {"k": "v"}))


if __name__ == "__main__":
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    if corpus:
        seed_corpus(Path(corpus[0]))
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
