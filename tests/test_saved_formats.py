"""Saved-file formats: files written by an older keras-peft still load (issue 14).

The fixtures in tests/fixtures/saved_formats/ were written by keras-peft at
commit d0401c9 (tests/fixtures/make_saved_formats.py says how, and regenerates
them). Each test loads one file with the current code and checks the
predictions on a fixed input, the rules, the trainable variables, that the
model is wrapped, and that one more `fit` step changes exactly the trainable
variables. The builders below are copies of the script's: a delta or a weights
file is loaded onto a model built in code, as a user would.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_peft
from keras_peft import Rule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "saved_formats")
LORA_TARGETS = r"block_\d"


# ----------------------------------------- builders (copied from make_saved_formats.py)
def base_weights(shapes, seed=0):
    """Deterministic values for the base model (independent of Keras' initializers)."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=s) * 0.5).astype("float32") for s in shapes]


def keras3_base(seed=0):
    """Functional `net`: Dense `block_0` (tanh), `block_1` (tanh), `head`."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((4,), name="x")
    x = keras.layers.Dense(8, activation="tanh", name="block_0")(x)
    x = keras.layers.Dense(8, activation="tanh", name="block_1")(x)
    outputs = keras.layers.Dense(1, name="head")(x)
    model = keras.Model(inputs, outputs, name="net")
    model.set_weights(base_weights([v.shape for v in model.weights], seed))
    return model


def lora_rules(model):
    """LoRA rank 2 on the blocks (adds the adapters); the head trains at `lr_scale=0.5`."""
    rules = keras_peft.lora(model, rank=2, targets=LORA_TARGETS)
    assert [r.note for r in rules.values()].count("head") == 1, rules
    return {p: Rule(lr_scale=0.5, note="head") if r.note == "head" else r
            for p, r in rules.items()}


def tf_keras_base(seed=0):
    """tf_keras Sequential `net`: Dense `block_0` (tanh), `block_1` (tanh), `head`."""
    tf_keras = pytest.importorskip("tf_keras")
    tf_keras.utils.set_random_seed(seed)
    model = tf_keras.Sequential([
        tf_keras.Input((4,)),
        tf_keras.layers.Dense(8, activation="tanh", name="block_0"),
        tf_keras.layers.Dense(8, activation="tanh", name="block_1"),
        tf_keras.layers.Dense(1, name="head"),
    ], name="net")
    model.set_weights(base_weights([tuple(v.shape) for v in model.weights], seed))
    return model


# --------------------------------------------------------------------- helpers
def expected(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


def fixture(name):
    path = os.path.join(FIXTURES, name)
    assert os.path.exists(path), f"missing fixture {path}: see tests/fixtures/make_saved_formats.py"
    return path


def paths_of(model):
    return dict(zip((id(v) for v in model.weights), keras_peft.variable_paths(model)))


def values(model):
    paths = paths_of(model)
    return {paths[id(v)]: np.array(v.numpy()) for v in model.weights}


def one_batch(n=16, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def check_loaded(model, want):
    """The loaded model predicts, decides and trains as the saved one did."""
    assert keras_peft.is_wrapped(model)
    x = np.array(want["input"], "float32")
    np.testing.assert_allclose(np.asarray(model.predict(x, verbose=0)),
                               np.array(want["predictions"]), rtol=1e-5, atol=1e-5)
    rules = [[p, r.get_config()] for p, r in keras_peft.get_rules(model).items()]
    assert rules == want["rules"]  # patterns, rules and their order
    paths = paths_of(model)
    trainable = sorted(paths[id(v)] for v in model.trainable_weights)
    assert trainable == want["trainable_paths"]

    # One more step changes exactly the trainable variables.
    before = values(model)
    model.fit(*one_batch(), batch_size=16, epochs=1, verbose=0)
    after = values(model)
    assert set(after) == set(before)
    moved = sorted(p for p in before if not np.array_equal(before[p], after[p]))
    assert moved == want["trainable_paths"]
    for p in set(before) - set(moved):  # frozen: bit-identical
        assert before[p].tobytes() == after[p].tobytes(), p


def check_skips_nonfinite(model):
    """A NaN batch is skipped: nothing changes, one more skipped step is counted."""
    skipped = model.peft_skipped_steps
    before = values(model)
    x, y = one_batch()
    x[0, 0] = np.nan
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert model.peft_skipped_steps == skipped + 1
    after = values(model)
    assert all(np.array_equal(before[p], after[p]) for p in before)


# --------------------------------------------------------------------- Keras 3
def test_keras3_dot_keras_file_loads():
    want = expected("keras3_expected.json")
    model = keras.models.load_model(fixture("keras3_lora.keras"))
    assert model.get_config()["skip_nonfinite"] == want["skip_nonfinite"]
    assert model.peft_skipped_steps == want["skipped_steps_at_save"]
    assert int(model.optimizer.iterations.numpy()) == want["optimizer_iterations"]
    check_loaded(model, want)  # compiled from the file: Adam with its saved state
    check_skips_nonfinite(model)


def test_keras3_delta_loads_onto_a_base_model_built_in_code():
    want = expected("keras3_expected.json")
    model = keras_peft.load_delta(keras3_base(), fixture("keras3_lora.safetensors"))
    model.compile(optimizer=keras.optimizers.Adam(1e-2, name="adam"), loss="mse")
    check_loaded(model, want)


def test_keras3_weights_file_loads_into_a_model_wrapped_in_code():
    want = expected("keras3_expected.json")
    model = keras3_base()
    keras_peft.wrap(model, lora_rules(model), skip_nonfinite=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-2, name="adam"), loss="mse")
    fresh = np.asarray(model.predict(np.array(want["input"], "float32"), verbose=0))
    model.load_weights(fixture("keras3_lora.weights.h5"))
    assert not np.allclose(fresh, want["predictions"], atol=1e-3)  # the file did change it
    assert model.peft_skipped_steps == want["skipped_steps_at_save"]
    assert int(model.optimizer.iterations.numpy()) == want["optimizer_iterations"]
    check_loaded(model, want)
    check_skips_nonfinite(model)


# -------------------------------------------------------------------- tf.keras
def test_tf_keras_dot_keras_file_loads():
    tf_keras = pytest.importorskip("tf_keras")
    want = expected("tf_keras_expected.json")
    model = tf_keras.models.load_model(fixture("tf_keras_lora.keras"))
    assert int(model.optimizer.iterations.numpy()) == want["optimizer_iterations"]
    check_loaded(model, want)


def test_tf_keras_delta_loads_onto_a_base_model_built_in_code():
    tf_keras = pytest.importorskip("tf_keras")
    want = expected("tf_keras_expected.json")
    model = keras_peft.load_delta(tf_keras_base(), fixture("tf_keras_lora.safetensors"))
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2), loss="mse")
    check_loaded(model, want)


# ------------------------------------------------------------- a fresh process
LOAD_IN_FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras_peft
    kind, path, want = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
    if kind == "keras3":
        import keras
        model = keras.models.load_model(path)
    else:
        import tf_keras
        model = tf_keras.models.load_model(path)
    assert keras_peft.is_wrapped(model)
    got = model.predict(np.array(want["input"], "float32"), verbose=0)
    np.testing.assert_allclose(got, np.array(want["predictions"]), rtol=1e-5, atol=1e-5)
    print("LOADED")
""")


def load_in_fresh_process(kind, name, expected_name):
    """A user's script: `import keras_peft`, then load the file, nothing wrapped before."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(
        [sys.executable, "-c", LOAD_IN_FRESH_PROCESS, kind, fixture(name),
         os.path.join(FIXTURES, expected_name)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "LOADED" in done.stdout, done.stderr[-3000:]


def test_keras3_dot_keras_file_loads_in_a_fresh_process():
    load_in_fresh_process("keras3", "keras3_lora.keras", "keras3_expected.json")


def test_tf_keras_dot_keras_file_loads_in_a_fresh_process():
    pytest.importorskip("tf_keras")
    load_in_fresh_process("tf_keras", "tf_keras_lora.keras", "tf_keras_expected.json")
