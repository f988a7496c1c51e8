"""What is specific to tf.keras (Keras 2) models: paths, TFRS, freezing by layer, errors.

The test process runs with TF_USE_LEGACY_KERAS=1 (tests/conftest.py), so
`tf.keras` is tf_keras and tensorflow-recommenders imports; one test checks a
fresh process without it.
"""

import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras

import keras_peft
from keras_peft import Rule
from keras_peft.tf_keras import MixedKerasError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USERS = np.array([f"u{i}" for i in range(12)])
ITEMS = np.array([f"m{i}" for i in range(20)])


def tower(vocab, name, regularizer=None):
    return tf_keras.Sequential([
        tf_keras.layers.StringLookup(vocabulary=vocab, mask_token=None, name="lookup"),
        tf_keras.layers.Embedding(len(vocab) + 1, 8, name="embedding"),
        tf_keras.layers.Dense(4, name="projection", kernel_regularizer=regularizer),
    ], name=name)


class TwoTower(tfrs.Model):
    def __init__(self, regularizer=None):
        super().__init__()
        self.query = tower(USERS, "query", regularizer)
        self.candidate = tower(ITEMS, "candidate")
        self.task = tfrs.tasks.Retrieval(metrics=tfrs.metrics.FactorizedTopK(
            candidates=tf.data.Dataset.from_tensor_slices(ITEMS).batch(8).map(self.candidate),
            ks=(1, 5)))

    def compute_loss(self, features, training=False):
        return self.task(self.query(features["user"]), self.candidate(features["item"]),
                         compute_metrics=not training)


def two_tower(seed=0, regularizer=None):
    tf_keras.utils.set_random_seed(seed)
    model = TwoTower(regularizer)
    model.query(USERS[:2])
    model.candidate(ITEMS[:2])
    return model


def ratings(n=96):
    i = np.arange(n)
    return tf.data.Dataset.from_tensor_slices(
        {"user": USERS[i % 12], "item": ITEMS[(i * 7 + i // 12) % 20]}).batch(16)


def values(model):
    return {p: v.numpy().copy() for p, v in zip(keras_peft.variable_paths(model), model.weights)}


# --------------------------------------------------------------------- paths
def test_paths_are_structural_unique_and_stable_across_rebuilds():
    model = two_tower()
    names = [v.name for v in model.weights]
    assert names.count("embedding/embeddings:0") == 2  # what tf.keras itself calls them
    paths = keras_peft.variable_paths(model)
    assert paths[:6] == [
        "query/embedding/embeddings", "query/projection/kernel", "query/projection/bias",
        "candidate/embedding/embeddings", "candidate/projection/kernel",
        "candidate/projection/bias"]
    # The TFRS task's layers are auto-named (retrieval, retrieval_1, ...) by tf.keras.
    assert re.fullmatch(r"retrieval(_\d+)?/factorized_top_k/streaming(_\d+)?/counter", paths[6])
    again = two_tower()  # auto-named differently (two_tower_1, ...), same tower paths
    assert keras_peft.variable_paths(again)[:6] == paths[:6]


def test_sibling_layers_with_one_name_raise_duplicate_path_error():
    class Twin(tf_keras.Model):
        def __init__(self):
            super().__init__(name="twin")
            self.a = tf_keras.layers.Dense(2, name="same")
            self.b = tf_keras.layers.Dense(2, name="same")

        def call(self, x):
            return self.b(self.a(x))

    model = Twin()
    model(np.ones((1, 2), "float32"))
    with pytest.raises(keras_peft.DuplicatePathError, match="share the path 'same/kernel'"):
        keras_peft.wrap(model, {".*": Rule()})


# --------------------------------------------------------------------- TFRS
def test_tfrs_freeze_a_tower_and_scale_the_other():
    model = keras_peft.wrap(two_tower(), {"candidate/.*": Rule(trainable=False),
                                          "query/projection/.*": Rule(lr_scale=0.1)})
    before = values(model)
    model.compile(optimizer=tf_keras.optimizers.Adagrad(0.1))
    history = model.fit(ratings(), epochs=2, verbose=0)
    assert set(history.history) >= {"loss", "regularization_loss", "total_loss"}
    after = values(model)
    moved = {p for p in before if not np.array_equal(before[p], after[p])}
    assert moved == {"query/embedding/embeddings", "query/projection/kernel",
                     "query/projection/bias"}
    # Adagrad keeps an accumulator for the query tower's variables only.
    assert sorted(v.name for v in model.optimizer.variables) == sorted([
        "iteration:0", "Adagrad/accumulator/embedding/embeddings:0",
        "Adagrad/accumulator/projection/kernel:0", "Adagrad/accumulator/projection/bias:0"])
    metrics = model.evaluate(ratings(), return_dict=True, verbose=0)
    assert "factorized_top_k/top_5_categorical_accuracy" in metrics


def test_tfrs_step_equals_tfrs_own_step_with_regularization():
    regularizer = tf_keras.regularizers.L2(0.1)
    wrapped = keras_peft.wrap(two_tower(regularizer=regularizer), {".*": Rule()})
    plain = two_tower(regularizer=regularizer)
    logs = []
    for model in (wrapped, plain):
        model.compile(optimizer=tf_keras.optimizers.SGD(0.05))
        logs.append(model.fit(ratings(), epochs=2, verbose=0).history)
    for key in ("loss", "regularization_loss", "total_loss"):
        np.testing.assert_allclose(logs[0][key], logs[1][key], rtol=1e-5)
    assert logs[0]["regularization_loss"][0] > 0
    for w, p in zip(wrapped.weights, plain.weights):
        np.testing.assert_allclose(w.numpy(), p.numpy(), rtol=1e-5, atol=1e-6)


def test_tfrs_lora_on_embedding_tables_and_delta(tmp_path):
    model = two_tower()
    rules = keras_peft.lora(model, rank=2, targets=r"(query|candidate)/embedding",
                            rest=Rule(trainable=False))
    query_before = model.query(USERS).numpy()
    keras_peft.wrap(model, rules)
    np.testing.assert_allclose(model.query(USERS).numpy(), query_before, atol=1e-6)  # B = 0
    # A (rows x 2) and B (2 x 8) per table: 13 users and 21 items, with the OOV row.
    assert keras_peft.report(model).trainable_params == (13 * 2 + 2 * 8) + (21 * 2 + 2 * 8)
    before = values(model)
    model.compile(optimizer=tf_keras.optimizers.Adam(0.05))
    model.fit(ratings(), epochs=2, verbose=0)
    after = values(model)
    assert {p for p in before if not np.array_equal(before[p], after[p])} == {
        "query/embedding/lora_embeddings_a", "query/embedding/lora_embeddings_b",
        "candidate/embedding/lora_embeddings_a", "candidate/embedding/lora_embeddings_b"}
    path = os.fspath(tmp_path / "adapters.safetensors")
    keras_peft.save_delta(model, path)
    restored = keras_peft.load_delta(two_tower(), path)
    np.testing.assert_allclose(restored.query(USERS).numpy(), model.query(USERS).numpy(),
                               atol=1e-6)
    assert keras_peft.get_rules(restored) == keras_peft.get_rules(model)



def test_lora_savedmodel_serves_the_adapted_model_and_hdf5_is_refused(tmp_path):
    model = tf_keras.Sequential([
        tf_keras.Input((4,)), tf_keras.layers.Dense(8, name="block_0"),
        tf_keras.layers.Dense(8, name="block_1"), tf_keras.layers.Dense(1, name="head"),
    ], name="net")
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r".*block_\d"))
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    model.fit(x, x.sum(1, keepdims=True), epochs=2, verbose=0)
    b = [v for v in model.weights if "lora_kernel_b" in v.name]
    assert b and all(np.abs(v.numpy()).max() > 0 for v in b)  # the adapters change outputs
    model.save(str(tmp_path / "served"))  # a SavedModel folder
    served = tf_keras.models.load_model(str(tmp_path / "served"))
    np.testing.assert_allclose(served.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-5)
    for name in ("model.h5", "model.hdf5"):
        with pytest.raises(ValueError, match=rf"legacy HDF5 format.*filepath='.*{name}'"):
            model.save(str(tmp_path / name))
        assert not (tmp_path / name).exists()


def test_a_class_with_its_own_train_step_is_refused():
    class Custom(tf_keras.Sequential):
        def train_step(self, data):  # pragma: no cover - never runs
            return {}

    model = Custom([tf_keras.Input((2,)), tf_keras.layers.Dense(1, name="d")])
    with pytest.raises(TypeError, match="defines its own `train_step`"):
        keras_peft.wrap(model, {".*": Rule()})


# ---------------------------------------------------------- layer trainable
def mlp():
    tf_keras.utils.set_random_seed(0)
    return tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(8, name="body"),
                                tf_keras.layers.BatchNormalization(name="bn"),
                                tf_keras.layers.Dense(1, name="head")], name="net")


def test_rules_cannot_train_what_a_frozen_layer_hides():
    model = mlp()
    model.get_layer("body").trainable = False
    with pytest.raises(keras_peft.FrozenLayerError,
                       match=r"have `trainable=False`: 'body' \(1 variable\)"):
        keras_peft.wrap(model, {r"body/kernel": Rule()})
    keras_peft.wrap(model, {r"head/.*": Rule(lr_scale=0.5)})  # undecided: stays hidden
    assert [v.name for v in model.trainable_weights] == [
        "bn/gamma:0", "bn/beta:0", "head/kernel:0", "head/bias:0"]
    rows = {r.layer: r.frozen_layer for r in keras_peft.report(model).rows}
    assert rows == {"body": "body", "bn": "", "head": ""}
    keras_peft.wrap(model, keras_peft.keep_frozen(model, {".*": Rule()}))  # the way out
    assert len(model.trainable_weights) == 4


def test_summary_trainable_column_tells_what_the_rules_train():
    model = keras_peft.wrap(mlp(), {r"body/.*": Rule(trainable=False)})
    lines = []
    model.summary(show_trainable=True, print_fn=lambda line, **kw: lines.append(line))
    rows = {line.split()[0]: line.split()[-1] for line in lines
            if line.split() and line.split()[0] in ("body", "bn", "head")}
    assert rows == {"body": "N", "bn": "Y", "head": "Y"}
    assert model.get_layer("body").trainable is True  # the flag itself is left alone


def test_batchnorm_statistics_are_never_trainable_and_keep_updating():
    model = keras_peft.wrap(mlp(), {r"bn/.*": Rule(trainable=False), ".*": Rule()})
    assert [v.name for v in model.trainable_weights] == [
        "body/kernel:0", "body/bias:0", "head/kernel:0", "head/bias:0"]
    mean = model.get_layer("bn").moving_mean.numpy().copy()
    gamma = model.get_layer("bn").gamma.numpy().copy()
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(3.0, 1.0, size=(32, 4)).astype("float32")
    model.fit(x, np.zeros((32, 1)), epochs=1, verbose=0)
    assert not np.array_equal(model.get_layer("bn").moving_mean.numpy(), mean)
    assert np.array_equal(model.get_layer("bn").gamma.numpy(), gamma)


def test_trainability_is_checked_once_per_fit_not_per_step(monkeypatch):
    """Listing tf.keras' trainable weights walks every layer: never do it every step."""
    calls = []
    original = keras_peft.tf_keras.TfKerasPeftModel._peft_signature
    monkeypatch.setattr(keras_peft.tf_keras.TfKerasPeftModel, "_peft_signature",
                        lambda self: calls.append(1) or original(self))
    model = keras_peft.wrap(mlp(), {r"body/.*": Rule(trainable=False)})
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    model.fit(x, x[:, :1], batch_size=4, epochs=2, verbose=0)  # 32 steps
    assert len(calls) <= 2
    # set_rules between fits takes effect without compile(); a layer's
    # `trainable` flag needs compile() again, as in tf.keras itself.
    model.set_rules({r"head/.*": Rule(trainable=False)})
    head = model.get_layer("head").kernel.numpy().copy()
    model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0)
    assert np.array_equal(model.get_layer("head").kernel.numpy(), head)
    model.set_rules({".*": Rule()})
    model.get_layer("head").trainable = False
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0)
    assert np.array_equal(model.get_layer("head").kernel.numpy(), head)


def test_legacy_optimizer_and_set_rules():
    model = keras_peft.wrap(mlp(), {r"body/.*": Rule(trainable=False)})
    model.compile(optimizer=tf_keras.optimizers.legacy.Adam(1e-2), loss="mse")
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model.fit(x, y, verbose=0)
    body = model.get_layer("body").kernel.numpy().copy()
    model.set_rules({".*": Rule()})
    model.fit(x, y, verbose=0)
    assert not np.array_equal(model.get_layer("body").kernel.numpy(), body)


# ------------------------------------------------------------------- mixing
def test_keras3_model_holding_a_tf_keras_layer_is_refused():
    class Mixed(keras.Model):
        def __init__(self):
            super().__init__(name="mixed")
            self.old = tf_keras.layers.Dense(2, name="old")
            self.new = keras.layers.Dense(2, name="new")

        def call(self, x):
            return self.new(self.old(x))

    model = Mixed()
    model(np.ones((1, 3), "float32"))
    with pytest.raises(MixedKerasError, match=r"holds a tf.keras \(Keras 2\) layer in `old`.*"
                       r"TF_USE_LEGACY_KERAS=1"):
        keras_peft.wrap(model, {".*": Rule()})


def test_tf_keras_model_holding_a_keras3_layer_is_refused():
    class Mixed(tf_keras.Model):
        def __init__(self):
            super().__init__(name="mixed")
            self.new = keras.layers.Dense(2, name="new")
            self.old = tf_keras.layers.Dense(2, name="old")

        def call(self, x):
            return self.old(self.new(x))

    model = Mixed()
    model(np.ones((1, 3), "float32"))
    with pytest.raises(MixedKerasError, match="holds a Keras 3 layer in `new`"):
        keras_peft.wrap(model, {".*": Rule()})


def test_without_legacy_keras_tf_keras_models_work_and_tfrs_gets_told_what_to_do():
    """A fresh process without TF_USE_LEGACY_KERAS: tf_keras models still wrap and train."""
    code = textwrap.dedent("""
        import numpy as np, tensorflow as tf, tf_keras, keras_peft
        from keras_peft.tf_keras import legacy_keras_active, require_legacy_keras
        assert not legacy_keras_active()
        model = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(3, name="a"),
                                     tf_keras.layers.Dense(1, name="b")])
        keras_peft.wrap(model, {"a/.*": keras_peft.Rule(trainable=False)})
        a = model.get_layer("a").kernel.numpy().copy()
        b = model.get_layer("b").kernel.numpy().copy()
        model.compile(optimizer="adam", loss="mse")
        model.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)
        assert np.array_equal(model.get_layer("a").kernel.numpy(), a)
        assert not np.array_equal(model.get_layer("b").kernel.numpy(), b)
        try:
            require_legacy_keras()
        except RuntimeError as e:
            print("ERROR:", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["PYTHONPATH"] = ROOT
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ERROR: tensorflow-recommenders needs `tf.keras` to be Keras 2" in done.stdout
    assert "export TF_USE_LEGACY_KERAS=1" in done.stdout


def test_lora_refuses_a_layer_frozen_the_keras_way_before_any_change():
    model = mlp()
    model.get_layer("body").trainable = False
    weights = len(model.weights)
    with pytest.raises(keras_peft.FrozenLayerError, match=r"'body' \(1 variable\)"):
        keras_peft.lora(model, rank=2, targets="body")
    assert len(model.weights) == weights  # no adapter was added
    assert keras_peft.lora_layer_paths(model)["body"].__class__ is tf_keras.layers.Dense


def test_tf_keras_dense_embedding_conv_adapters_match_their_formulas_and_merge():
    """The same factored adapters as in Keras 3 (DoRA here), through the tf.keras backend."""
    tf_keras.utils.set_random_seed(0)
    ids = tf_keras.Input((4,), dtype="int32")
    h = tf_keras.layers.Embedding(10, 6, name="embed")(ids)
    h = tf_keras.layers.Reshape((2, 2, 6))(h)
    h = tf_keras.layers.Conv2D(3, 1, name="conv")(h)
    h = tf_keras.layers.Flatten()(h)
    h = tf_keras.layers.Dense(5, activation="relu", name="dense")(h)
    model = tf_keras.Model(ids, tf_keras.layers.Dense(1, name="head")(h), name="kinds")
    x = np.random.default_rng(0).integers(0, 10, (3, 4)).astype("int32")
    before = model.predict(x, verbose=0)
    keras_peft.lora(model, rank=2, targets="embed|conv|dense", variant="dora")
    np.testing.assert_allclose(model.predict(x, verbose=0), before, atol=1e-6)  # m = ||W||
    rng = np.random.default_rng(1)
    for name in ("embed", "conv", "dense"):
        for v in model.get_layer(name)._peft_variables.values():
            if v.trainable:
                v.assign(v.numpy() + 0.3 * rng.standard_normal(v.shape).astype("float32"))
    dense = model.get_layer("dense")
    w, b = dense.kernel.numpy(), dense.bias.numpy()
    eff = w + dense.lora_kernel_a.numpy() @ dense.lora_kernel_b.numpy()
    eff = eff * dense.lora_kernel_magnitude.numpy() / np.linalg.norm(eff, axis=0)
    probe = tf_keras.Model(model.input, [dense.input, dense.output])
    inputs, outputs = (t.numpy() for t in probe(x))
    np.testing.assert_allclose(outputs, np.maximum(inputs @ eff + b, 0), rtol=1e-4, atol=1e-5)
    adapted = model.predict(x, verbose=0)
    keras_peft.merge(model)
    np.testing.assert_allclose(model.predict(x, verbose=0), adapted, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense.kernel.numpy(), eff, rtol=1e-5, atol=1e-6)
    keras_peft.unmerge(model)
    np.testing.assert_allclose(dense.kernel.numpy(), w, rtol=1e-5, atol=1e-6)
