"""The XGBoost classifier of manifests/xgboost_breast_cancer.toml: scikit-learn's own breast cancer
data set (shipped inside scikit-learn, nothing downloaded), a seeded split, and gradient-boosted
trees fitted on all but the last 100 shuffled rows, which are the validation data
(manifests/data/breast_cancer.npz, written by manifests/data/make_tree_data.py)."""

from __future__ import annotations

import numpy as np

HELD_OUT = 100


def _shuffled():
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(features))
    return features[order], labels[order]


def build():
    """A fitted XGBClassifier; one thread and a fixed seed, so every build fits the same trees."""
    from xgboost import XGBClassifier

    features, labels = _shuffled()
    model = XGBClassifier(n_estimators=30, max_depth=3, learning_rate=0.3, random_state=0, n_jobs=1)
    return model.fit(features[:-HELD_OUT].astype(np.float32), labels[:-HELD_OUT])


def held_out_features() -> np.ndarray:
    """The 100 rows the model never saw, as the float32 matrix the ONNX model takes."""
    return _shuffled()[0][-HELD_OUT:].astype(np.float32)
