"""Writes the example manifests' validation arrays (run from the repository root):

    python manifests/data/make_example_data.py

iris.npz: the 50 held-out iris rows (manifests/models/iris.py); tinycnn.npz: 16 seeded images
(manifests/models/tinycnn.py). Both are committed; this script says how they were made."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from models import iris, tinycnn  # noqa: E402

np.savez(HERE / "iris.npz", features=iris.held_out_features())
np.savez(HERE / "tinycnn.npz", image=tinycnn.validation_images())
