"""The iris classifier of manifests/sklearn_iris.toml: scikit-learn's own iris data (shipped inside
scikit-learn, nothing downloaded), a seeded split, and a scaler + logistic regression fitted on the
first 100 shuffled rows. The other 50 rows are the validation data (manifests/data/iris.npz)."""

from __future__ import annotations

import numpy as np

TRAIN = 100


def _shuffled():
    from sklearn.datasets import load_iris

    features, labels = load_iris(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(features))
    return features[order], labels[order]


def build():
    """A fitted pipeline; lbfgs on a fixed split is deterministic, so every build fits the same model."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = _shuffled()
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(features[:TRAIN], labels[:TRAIN])


def held_out_features() -> np.ndarray:
    """The 50 rows the model never saw, as the float32 matrix the ONNX model takes."""
    return _shuffled()[0][TRAIN:].astype(np.float32)
