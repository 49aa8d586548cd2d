"""Writes the example manifests' validation arrays (run from the repository root; the output folder
defaults to manifests/data):

    python manifests/data/make_example_data.py [output-folder]

iris.npz: the 50 held-out iris rows (manifests/models/iris.py); tinycnn.npz: 16 seeded images
(manifests/models/tinycnn.py) and tinycnn_calibration.npz, 16 others (seed 1); tiny_vit.npz: 16 seeded images as tiny-vit's pixel_values;
tiny_stateful.npz: 16 seeded audio frames, their GRU states [2, 16, 16] (batch on axis 1) and one
0-d int64 sample rate (manifests/models/make_example_models.py). All are committed; this script
says how they were made, and writes the same bytes every time."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from models import iris, make_example_models, tinycnn  # noqa: E402


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "iris.npz", features=iris.held_out_features())
    np.savez(out / "tinycnn.npz", image=tinycnn.validation_images())
    np.savez(out / "tinycnn_calibration.npz", image=tinycnn.validation_images(seed=1))  # other images than validation
    np.savez(out / "tiny_vit.npz", pixel_values=make_example_models.vit_pixel_values())
    np.savez(out / "tiny_stateful.npz", **make_example_models.stateful_arrays())


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
