"""What docs/reliability.md and docs/tf-keras.md promise: weight files, backups, NaN steps,
tf.keras LoRA and what is Keras 3 only.

Each test quotes the sentence it checks. Claims that other tests already assert
(tests/test_checkpoint.py, test_backup.py, test_nonfinite.py, test_tf_keras.py,
test_keras_versions.py, ...) or that a page's own code block asserts are not repeated.
"""

import inspect
import os

import h5py
import keras
import numpy as np
import pytest
import tf_keras

import keras_peft
from keras_peft import Rule
from tests.conftest import changed, compile_fit, regression_data, snapshot, tiny_mlp


# --------------------------------------------------------------- weight files
def test_model_checkpoint_weight_files_carry_the_rules_and_flags(tmp_path):
    """reliability.md:39-44: "A wrapped model therefore writes a `keras_peft_state` group
    into every Keras weights file (`save_weights`, `BackupAndRestore`,
    `ModelCheckpoint(save_weights_only=True)`, ...). ... it restores the rules and every
    trainable flag" """
    rules = {r".*block_0/.*": Rule(trainable=False), r".*head/.*": Rule(lr_scale=0.5)}
    model = keras_peft.wrap(tiny_mlp(), rules)
    path = str(tmp_path / "checkpoint.weights.h5")
    compile_fit(model, callbacks=[keras.callbacks.ModelCheckpoint(path, save_weights_only=True)])
    with h5py.File(path) as f:
        assert "keras_peft_state" in f
    other = keras_peft.wrap(tiny_mlp(seed=3), {".*": Rule()})
    other.load_weights(path)
    assert other.peft_rules == model.peft_rules
    assert [v.trainable for v in other.weights] == [v.trainable for v in model.weights]
    assert other.peft_plan.by_path()["mlp/head/kernel"].lr_scale == 0.5
    for a, b in zip(other.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_peft_backup_and_restore_takes_the_arguments_of_keras_callback(tmp_path):
    """reliability.md:66: "`keras_peft.BackupAndRestore` takes the same arguments." (and
    Keras' `delete_checkpoint`: "delete the backups when `fit` completes")."""
    ours = inspect.signature(keras_peft.BackupAndRestore.__init__).parameters
    theirs = inspect.signature(keras.callbacks.BackupAndRestore.__init__).parameters
    assert [(p.name, p.default) for p in ours.values()] == [
        (p.name, p.default) for p in theirs.values()]

    def fit(backup_dir, **kwargs):
        model = keras_peft.wrap(tiny_mlp(), {".*": Rule()})
        compile_fit(model, callbacks=[keras_peft.BackupAndRestore(backup_dir, **kwargs)])

    fit(tmp_path / "kept", delete_checkpoint=False)
    assert "backup.json" in os.listdir(tmp_path / "kept")
    fit(tmp_path / "deleted")  # default: delete_checkpoint=True
    assert not os.path.exists(tmp_path / "deleted" / "backup.json")


# ---------------------------------------------------------------- NaN steps
def test_a_skipped_step_leaves_the_epochs_metrics_alone():
    """reliability.md:190-191: "A step with a NaN or Inf ...: leaves the epoch's loss and
    metrics alone (no `loss: nan` for the rest of the epoch)" (the loss:
    tests/test_nonfinite.py)."""
    x, y = regression_data()
    x = x.copy()
    x[32:48] = np.nan  # batch 2 of 4
    model = keras_peft.wrap(tiny_mlp(), {".*": Rule()}, skip_nonfinite=True)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", metrics=["mae"])
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    keep = np.r_[0:32, 48:64]
    prediction = tiny_mlp()(x[keep]).numpy()  # SGD(0): the weights never move
    assert history.history["skipped_steps"] == [1]
    np.testing.assert_allclose(history.history["mae"][0],
                               np.mean(np.abs(prediction - y[keep])), rtol=1e-5)


# ------------------------------------------------------------ tf.keras LoRA
def scorer(rows=50, dim=4):
    """The tf-keras.md example's model: Embedding `items` -> pool -> hidden -> head."""
    tf_keras.utils.set_random_seed(0)
    return tf_keras.Sequential([
        tf_keras.Input((3,), dtype="int32"),
        tf_keras.layers.Embedding(rows, dim, name="items"),
        tf_keras.layers.GlobalAveragePooling1D(name="pool"),
        tf_keras.layers.Dense(4, activation="relu", name="hidden"),
        tf_keras.layers.Dense(1, name="head"),
    ], name="scorer")


def adapters(layer):
    by_name = {v.name.split("/")[-1].split(":")[0]: v for v in layer.weights}
    return by_name["embeddings"], by_name["lora_embeddings_a"], by_name["lora_embeddings_b"]


def test_tf_keras_embedding_lora_starts_unchanged_and_adds_alpha_over_rank_a_b():
    """tf-keras.md:172-175: "adds two adapter variables to each matched `Embedding` ...
    `lora_embeddings_a`/`_b` (A `he_uniform`, B zeros, as in Keras 3, so the layer starts
    unchanged), and the layer computes with `W + alpha / rank * A @ B`" """
    model = scorer()
    ids = np.array([[1, 5, 7], [0, 49, 5]], "int32")
    start = model.get_layer("items")(ids).numpy()
    keras_peft.lora(model, rank=2, alpha=6, targets="items")
    layer = model.get_layer("items")
    table, a, b = adapters(layer)
    assert not b.numpy().any() and a.numpy().any()
    np.testing.assert_array_equal(layer(ids).numpy(), start)
    b.assign(np.random.default_rng(0).normal(size=b.shape).astype("float32"))
    expected = (table.numpy() + 6 / 2 * a.numpy() @ b.numpy())[ids]
    np.testing.assert_allclose(layer(ids).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_tf_keras_embedding_lora_trains_only_the_rows_of_the_ids_in_a_batch():
    """tf-keras.md:176-178: "For an embedding table the update is looked up row by row
    (`lookup(W, ids) + alpha / rank * lookup(A, ids) @ B`), so only the rows of the ids in
    a batch get gradients." """
    model = scorer()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets="items",
                                           rest=Rule(trainable=False)))
    table, a, _ = adapters(model.get_layer("items"))
    table_before, a_before = table.numpy().copy(), a.numpy().copy()
    model.compile(optimizer=tf_keras.optimizers.SGD(0.5), loss="mse")
    ids = np.array([[1, 2, 3], [3, 4, 5]] * 4, "int32")
    model.fit(ids, np.ones((8, 1)), epochs=2, verbose=0)
    moved = np.flatnonzero(np.abs(a.numpy() - a_before).max(axis=1))
    assert moved.tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(table.numpy(), table_before)


def test_rank_4_lora_on_a_10000_by_32_table_trains_40128_numbers():
    """tf-keras.md:178-179: "A rank-4 update of a 10,000 x 32 table trains 40,128 numbers
    instead of 320,000." (the page writes a multiplication sign for the x)"""
    model = scorer(rows=10_000, dim=32)
    keras_peft.wrap(model, keras_peft.lora(model, rank=4, targets="items",
                                           rest=Rule(trainable=False)))
    adapter_sizes = [int(np.prod(v.shape)) for v in model.trainable_weights if "lora" in v.name]
    assert sum(adapter_sizes) == 40_128
    assert int(np.prod(model.get_layer("items").embeddings.shape)) == 320_000


def test_keras_3_only_features_refuse_a_tf_keras_model():
    """tf-keras.md:115: "`auto`, `merge`/`unmerge` and `skip_nonfinite=True` are Keras 3
    only." They refuse a tf.keras model with an error rather than run on it."""
    model = scorer()
    with pytest.raises(ValueError, match=r"skip_nonfinite is available for Keras 3 models "
                                         r"only; this is a tf.keras \(Keras 2\) model"):
        keras_peft.wrap(model, {".*": Rule()}, skip_nonfinite=True)
    assert not keras_peft.is_wrapped(model)
    data = (np.zeros((4, 3), "int32"), np.zeros((4, 1), "float32"))
    with pytest.raises(ValueError, match=r"keras_peft.auto expects a built Keras 3 model"):
        keras_peft.auto(model, data, loss="mse", verbose=0)
    # merge/unmerge work on tf.keras too since keras-peft's own adapters (docs/adapters.md)
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets="items"))
    assert keras_peft.unmerge(keras_peft.merge(model)) is model


def test_keras_3_layer_trainable_after_compile_takes_effect_at_the_next_step():
    """tf-keras.md:102 (the Keras 3 column): "`layer.trainable = ...` after `compile()` |
    takes effect at the next step" (tf.keras' column: tests/test_tf_keras.py)."""
    model = keras_peft.wrap(tiny_mlp(), {r".*block_0/.*": Rule(lr_scale=0.5)})
    compile_fit(model)
    model.get_layer("head").trainable = False  # no compile() again
    before = snapshot(model)
    x, y = regression_data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    assert changed(before, model) == {"mlp/block_0/kernel", "mlp/block_0/bias",
                                      "mlp/block_1/kernel", "mlp/block_1/bias"}
