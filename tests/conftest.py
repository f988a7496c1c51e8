"""Shared fixtures and helpers: tiny models, fixed data, weight snapshots."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# tf.keras is Keras 2 (tf_keras) in the test process, so that tensorflow-recommenders
# imports; `import keras` stays Keras 3. It must be set before TensorFlow is first
# imported. keras_peft itself works either way (tests/test_tf_keras.py checks a
# process without it).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import keras
import numpy as np
import pytest

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_module(name: str):
    """bench/<name>.py, loaded by path (bench/ is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_mlp(seed=0, name="mlp", widths=(8, 8)):
    """Sequential MLP: Dense blocks `block_0`, `block_1`, ... then `head`."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((4,))]
    for i, w in enumerate(widths):
        layers.append(keras.layers.Dense(w, activation="tanh", name=f"block_{i}"))
    layers.append(keras.layers.Dense(1, name="head"))
    return keras.Sequential(layers, name=name)


def regression_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32") + 0.1).astype("float32")
    return x, y


def snapshot(model):
    return {v.path: np.array(v.numpy()) for v in model.weights}


def changed(before, model):
    """Paths whose values differ from `before`."""
    return {v.path for v in model.weights if not np.array_equal(before[v.path], v.numpy())}


def compile_fit(model, optimizer=None, epochs=1, batch_size=16, jit_compile=False, **fit_kw):
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(1e-2, name="adam"),
        loss="mse",
        jit_compile=jit_compile,
    )
    x, y = regression_data()
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=False, **fit_kw)
    return model


@pytest.fixture
def data():
    return regression_data()


@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")
