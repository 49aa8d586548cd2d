"""The Keras conv net of manifests/keras_convnet.toml: NHWC images [batch, 24, 24, 3] -> 10 class
logits. Two conv / batch-norm / ReLU blocks, max and global average pooling, one dense layer. Weights
and batch-norm statistics are seeded (not trained): what kiln checks is that every format computes
the same function as the Keras model.

Its data (validation and calibration images, the same smooth seeded images as tinycnn's, in NHWC) is
written by running this file from the repository root; it writes the same bytes every time:

    python manifests/models/keras_convnet.py [output-folder]      # default: manifests/data
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SIZE = 24


def build():
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((SIZE, SIZE, 3), name="image")
    x = image
    for filters, pool in ((16, keras.layers.MaxPooling2D()), (32, keras.layers.GlobalAveragePooling2D())):
        x = keras.layers.Conv2D(filters, 3, padding="same")(x)
        x = keras.layers.BatchNormalization()(x)
        x = pool(keras.layers.ReLU()(x))
    model = keras.Model(image, keras.layers.Dense(10, name="logits")(x))
    rng = np.random.default_rng(0)  # non-trivial batch-norm statistics, so folding them is really tested
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.8, 1.2, n), rng.uniform(-0.1, 0.1, n), rng.uniform(-0.2, 0.2, n), rng.uniform(0.5, 1.5, n)])
    return model


def images(count: int, seed: int) -> np.ndarray:
    """Smooth seeded NHWC images (low-resolution noise upsampled, plus a per-image gradient),
    normalized like camera images: more like real inputs than white noise, and reproducible."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.0, 1.0, (count, SIZE // 8, SIZE // 8, 3))
    pictures = np.kron(coarse, np.ones((1, 8, 8, 1)))
    ramp = np.linspace(0.0, 1.0, SIZE)
    pictures += rng.uniform(-0.3, 0.3, (count, 1, 1, 1)) * ramp[None, :, None, None]
    return ((pictures - 0.5) / 0.25).astype(np.float32)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "keras_convnet.npz", image=images(16, seed=0))
    np.savez(out / "keras_convnet_calibration.npz", image=images(16, seed=1))  # apart from the validation images


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "data")
