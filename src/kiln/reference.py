"""numpy twins of the native kernels: readable, slow, and the definition of each result.

tests/native compares kiln._native with these bit for bit.
"""

from __future__ import annotations

import numpy as np


def diff_stats(ref: np.ndarray, out: np.ndarray, eps: float = 1e-6) -> tuple[float, float, int]:
    """(max |out-ref|, max |out-ref| / max(|ref|, eps), count of non-finite out), all in float32."""
    ref = np.asarray(ref, dtype=np.float32).ravel()
    out = np.asarray(out, dtype=np.float32).ravel()
    if ref.size == 0:
        return 0.0, 0.0, 0
    diff = np.abs(out - ref)
    rel = diff / np.maximum(np.abs(ref), np.float32(eps))
    return float(diff.max()), float(rel.max()), int((~np.isfinite(out)).sum())
