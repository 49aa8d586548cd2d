"""Workspaces with tiny Keras models for the tensorflow source and the tflite format's tests (tests/ is
on sys.path: import by module name). Weights are seeded (keras.utils.set_random_seed), data is seeded
numpy: every build is the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import Workspace, new_workspace

# Factories: a conv net on NHWC images (two named outputs, so names and order matter), a dense model on
# feature vectors, models with two inputs and two outputs of one shape (pair, dict_pair,
# unnamed_pair), and a model with an op LiteRT has no builtin kernel for. Layer widths keep a
# weight tensor of 1024+ elements in each, the size below which TF leaves weights unquantized.
KMODELS = '''
import keras


def convnet():
    keras.utils.set_random_seed(0)
    image = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(image)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(image, [keras.layers.Dense(5, name="logits")(x), keras.layers.Dense(2, name="aux")(x)])


def pair():
    """Two inputs and two outputs of one shape: fed or labelled by position against a manifest that
    lists them in another order, every tensor would still fit, and be wrong."""
    a = keras.Input((6,), name="a")
    b = keras.Input((6,), name="b")
    return keras.Model([a, b], [keras.layers.Add(name="sum")([a, b]), keras.layers.Subtract(name="diff")([a, b])])


def dict_pair():
    """pair() with dict inputs and outputs, keyed by other names than its Input tensors'."""
    a = keras.Input((6,), name="tensor_a")
    b = keras.Input((6,), name="tensor_b")
    return keras.Model({"a": a, "b": b}, {"sum": keras.layers.Add()([a, b]), "diff": keras.layers.Subtract()([a, b])})


def unnamed_pair():
    """Two outputs whose layers carry Keras' automatic names only."""
    keras.utils.set_random_seed(4)
    x = keras.Input((6,), name="features")
    return keras.Model(x, [keras.layers.Dense(3)(x), keras.layers.Dense(3)(x)])


def dense():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(3)])


class Inverse(keras.layers.Layer):
    def call(self, x):
        import tensorflow as tf

        return tf.linalg.inv(x)  # MatrixInverse: a TensorFlow op without a LiteRT builtin kernel


def flex():
    keras.utils.set_random_seed(2)
    x = keras.Input((4, 4), name="features")
    return keras.Model(x, keras.layers.Dense(4)(Inverse()(x)))


def flex_head():
    """flex() with a layer whose name starts with "Flex" and a capital, as a Flex op's (it lands among the file's tensor names)."""
    keras.utils.set_random_seed(2)
    x = keras.Input((4, 4), name="features")
    return keras.Model(x, keras.layers.Dense(4, name="FlexHead")(Inverse()(x)))


def small():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])  # 18 weights: below TF's quantization size


class Twice(keras.layers.Layer):
    def call(self, x):
        return 2 * x


def custom():
    """A model with a custom layer class, which a .keras file names but does not hold."""
    x = keras.Input((6,), name="features")
    return keras.Model(x, Twice()(x))


def mixed():
    """dense() computing in float16 (Keras' mixed precision), its variables float32."""
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(32, activation="tanh", dtype="mixed_float16", name="half"),
                             keras.layers.Dense(3, dtype="float32")])


def not_a_model():
    return 42
'''

CONVNET_MANIFEST = '''
[model]
name = "{name}"

[source]
kind = "tensorflow"
{source}

[[inputs]]
name = "image"
shape = ["batch", 16, 16, 3]

[[outputs]]
name = "logits"
shape = ["batch", 5]

[[outputs]]
name = "aux"
shape = ["batch", 2]

{targets}

[validation]
data = "data/images.npz"
batch_size = 8

[calibration]
data = "data/calibration.npz"
batch_size = 8
'''

DENSE_MANIFEST = '''
[model]
name = "{name}"

[source]
kind = "tensorflow"
{source}

[[inputs]]
name = "features"
shape = ["batch", 6]

[[outputs]]
name = "scores"
shape = ["batch", 3]

{targets}

[validation]
data = "data/features.npz"
batch_size = 16
'''

FLEX_MANIFEST = '''
[model]
name = "flex"

[source]
kind = "tensorflow"
factory = "kmodels:flex"

[[inputs]]
name = "features"
shape = ["batch", 4, 4]

[[outputs]]
name = "y"
shape = ["batch", 4, 4]

[targets.tflite]
format = "tflite"

[validation]
data = "data/matrices.npz"
batch_size = 4
'''


# inputs and outputs in the other order than pair()'s: b before a, diff before sum
PAIR_MANIFEST = '''
[model]
name = "{name}"

[source]
kind = "tensorflow"
factory = "kmodels:{factory}"

[[inputs]]
name = "b"
shape = ["batch", 6]

[[inputs]]
name = "a"
shape = ["batch", 6]

[[outputs]]
name = "diff"
shape = ["batch", 6]

[[outputs]]
name = "sum"
shape = ["batch", 6]

{targets}

[validation]
data = "data/pairs.npz"
batch_size = 8
'''


def targets(**tables: str) -> str:
    """[targets.<name>] tables from name=body pairs."""
    return "\n".join(f"[targets.{name}]\n{body}\n" for name, body in tables.items())


def keras_workspace(root: Path, manifests: dict[str, str]) -> Workspace:
    """A workspace with the factories (kmodels.py at its root) and seeded data for every model here."""
    ws = new_workspace(root, manifests)
    (ws.root / "kmodels.py").write_text(KMODELS)
    data = ws.root / "manifests/data"
    rng = np.random.default_rng(3)
    np.savez(data / "images.npz", image=rng.standard_normal((24, 16, 16, 3)).astype(np.float32))
    np.savez(data / "calibration.npz", image=rng.standard_normal((32, 16, 16, 3)).astype(np.float32))
    np.savez(data / "features.npz", features=rng.standard_normal((40, 6)).astype(np.float32))
    matrices = rng.standard_normal((8, 4, 4)) + 4 * np.eye(4)  # well conditioned: the inverse is tame
    np.savez(data / "matrices.npz", features=matrices.astype(np.float32))
    # a and b far apart (a ~ 100, b ~ 1): a swapped input or output is off by ~100, not by rounding
    np.savez(data / "pairs.npz", a=(100 + rng.standard_normal((16, 6))).astype(np.float32), b=rng.standard_normal((16, 6)).astype(np.float32))
    return ws


def save_keras_model(ws: Workspace, factory: str, path: Path, saved_model: bool = False) -> None:
    """Call kmodels.<factory>() in this process and save it as a .keras file or (model.export) a SavedModel."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"kmodels_{factory}", ws.root / "kmodels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = getattr(module, factory)()
    if saved_model:
        model.export(str(path), verbose=False)
    else:
        model.save(str(path))
