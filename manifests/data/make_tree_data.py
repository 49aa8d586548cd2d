"""Writes the gradient-boosted-tree examples' validation arrays (run from the repository root; the
output folder defaults to manifests/data):

    python manifests/data/make_tree_data.py [output-folder]

breast_cancer.npz: the 100 held-out breast cancer rows (manifests/models/breast_cancer.py);
diabetes.npz: the 100 held-out diabetes rows (manifests/models/diabetes.py). Both are committed;
this script says how they were made, and writes the same bytes every time."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from models import breast_cancer, diabetes  # noqa: E402


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "breast_cancer.npz", features=breast_cancer.held_out_features())
    np.savez(out / "diabetes.npz", features=diabetes.held_out_features())


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
