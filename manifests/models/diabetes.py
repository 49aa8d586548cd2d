"""The LightGBM regressor of manifests/lightgbm_diabetes.toml: scikit-learn's own diabetes data set
(shipped inside scikit-learn, nothing downloaded), a seeded split, and gradient-boosted trees fitted
on all but the last 100 shuffled rows, which are the validation data (manifests/data/diabetes.npz,
written by manifests/data/make_tree_data.py)."""

from __future__ import annotations

import numpy as np

HELD_OUT = 100


def _shuffled():
    from sklearn.datasets import load_diabetes

    features, targets = load_diabetes(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(features))
    return features[order], targets[order]


def build():
    """A fitted LGBMRegressor; one thread and a fixed seed, so every build fits the same trees."""
    from lightgbm import LGBMRegressor

    features, targets = _shuffled()
    model = LGBMRegressor(n_estimators=50, num_leaves=15, learning_rate=0.1, random_state=0, n_jobs=1, deterministic=True, verbose=-1)
    return model.fit(features[:-HELD_OUT].astype(np.float32), targets[:-HELD_OUT])


def held_out_features() -> np.ndarray:
    """The 100 rows the model never saw, as the float32 matrix the ONNX model takes."""
    return _shuffled()[0][-HELD_OUT:].astype(np.float32)
