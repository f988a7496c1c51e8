"""`wrap(..., skip_nonfinite=True)`: NaN/Inf steps change nothing, are counted, and stop runs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_peft
from keras_peft import Rule
from keras_peft.state import state_of
from tests.conftest import regression_data, snapshot, tiny_mlp

BATCH = 16
NAN_BATCH = 2  # of 4 batches per epoch


def nan_data(batches=(NAN_BATCH,), value=np.nan):
    x, y = regression_data()
    x = x.copy()
    for b in batches:
        x[b * BATCH:(b + 1) * BATCH] = value
    return x, y


def optimizer_state(model):
    return {v.path: np.array(v.numpy()) for v in model.optimizer.variables}


class Probe(keras.callbacks.Callback):
    """Weights, optimizer variables and logs after every batch."""

    def __init__(self):
        super().__init__()
        self.weights, self.slots, self.logs = [], [], []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append(snapshot(self.model))
        self.slots.append(optimizer_state(self.model))
        self.logs.append(dict(logs or {}))


def fit(model, x, y, epochs=1, optimizer=None, jit_compile=False, run_eagerly=False, **kw):
    model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-2, name="adam"), loss="mse",
                  jit_compile=jit_compile, run_eagerly=run_eagerly)
    probe = Probe()
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=False,
                        callbacks=[probe, *kw.pop("callbacks", [])], **kw)
    return probe, history


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("mode", ["graph", "xla", "eager"])
def test_nan_batch_is_skipped_bit_identically_and_training_continues(mode):
    rules = {r".*block_0/.*": Rule(lr_scale=0.5), ".*": Rule()}  # lr_scale reads before/after
    model = keras_peft.wrap(tiny_mlp(), rules, skip_nonfinite=True)
    x, y = nan_data()
    probe, history = fit(model, x, y, epochs=2, jit_compile=mode == "xla",
                         run_eagerly=mode == "eager")
    before, after = NAN_BATCH - 1, NAN_BATCH
    assert_same(probe.weights[before], probe.weights[after])
    assert_same(probe.slots[before], probe.slots[after])  # iterations included
    assert int(probe.slots[after]["adam/iteration"]) == NAN_BATCH
    # Training continues: the next batch changes every weight again.
    assert all(
        not np.array_equal(probe.weights[after][p], probe.weights[after + 1][p])
        for p in probe.weights[after]
    )
    assert [int(log["skipped_steps"]) for log in probe.logs] == [0, 0, 1, 1, 1, 1, 2, 2]
    assert history.history["skipped_steps"] == [1, 2]
    assert np.isfinite(history.history["loss"]).all()  # the NaN batch is left out of the mean
    assert model.peft_skipped_steps == 2
    assert int(model.optimizer.iterations) == 6
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)


def test_loss_mean_leaves_the_skipped_batch_out():
    x, y = nan_data()
    model = keras_peft.wrap(tiny_mlp(), {".*": Rule()}, skip_nonfinite=True)
    _, history = fit(model, x, y, optimizer=keras.optimizers.SGD(0.0))  # weights never move
    keep = np.r_[0:NAN_BATCH * BATCH, (NAN_BATCH + 1) * BATCH:len(x)]
    pred = tiny_mlp()(x[keep]).numpy()
    expected = np.mean([np.mean((pred[i:i + BATCH] - y[keep][i:i + BATCH]) ** 2)
                        for i in range(0, len(keep), BATCH)])
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=1e-6)


class SqrtScale(keras.layers.Layer):
    """y = sqrt(x^2 * w): finite output, but d/dw is 0/0 = NaN where x == 0."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="w")

    def call(self, x):
        return tf.sqrt(tf.square(x) * self.w)


def sqrt_model(dtype=None):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((4,)), SqrtScale(name="sqrt", dtype=dtype),
        keras.layers.Dense(1, name="head", dtype=dtype),
    ], name="sqrtnet")


def test_nonfinite_gradient_with_finite_loss_is_skipped():
    model = keras_peft.wrap(sqrt_model(), {".*": Rule()}, skip_nonfinite=True)
    x, y = nan_data(value=0.0)  # zeros: finite loss, NaN gradient for sqrt/w
    probe, history = fit(model, x, y)
    assert np.isfinite(history.history["loss"][0])
    assert_same(probe.weights[NAN_BATCH - 1], probe.weights[NAN_BATCH])
    assert_same(probe.slots[NAN_BATCH - 1], probe.slots[NAN_BATCH])
    assert history.history["skipped_steps"] == [1]


def test_without_the_option_a_nan_batch_corrupts_the_weights():
    model = keras_peft.wrap(tiny_mlp(), {".*": Rule()})
    _, history = fit(model, *nan_data())
    assert "skipped_steps" not in history.history
    assert not np.isfinite(model.get_layer("head").kernel.numpy()).all()


def test_consecutive_bad_steps_stop_training_with_a_message():
    model = keras_peft.wrap(tiny_mlp(), {".*": Rule()}, skip_nonfinite=True,
                            max_consecutive_nonfinite=3)
    x, y = regression_data(n=16 * 10)
    x = x.copy()
    x[2 * BATCH:] = np.nan  # batches 2..9 are all NaN
    with pytest.warns(RuntimeWarning, match=(
            r"stopping training: the last 3 training steps had a non-finite loss or "
            r"gradient \(NaN or Inf\) and were skipped \(max_consecutive_nonfinite=3; "
            r"3 skipped in all\)\. The weights and optimizer state are those of the last "
            r"finite step")):
        probe, history = fit(model, x, y, epochs=3)
    assert len(probe.logs) == 5  # 2 good steps, 3 bad ones, then it stopped
    assert len(history.history["loss"]) == 1
    assert model.stop_training
    assert_same(probe.weights[1], snapshot(model))
    assert int(model.optimizer.iterations) == 2


def test_a_good_step_resets_the_consecutive_count():
    model = keras_peft.wrap(tiny_mlp(), {".*": Rule()}, skip_nonfinite=True,
                            max_consecutive_nonfinite=2)
    x, y = nan_data(batches=(0, 2))  # bad, good, bad, good: never 2 in a row
    _, history = fit(model, x, y, epochs=2)
    assert history.history["skipped_steps"] == [2, 4]
    assert len(history.history["loss"]) == 2


def loss_scale_optimizer(initial_scale):
    return keras.optimizers.LossScaleOptimizer(
        keras.optimizers.Adam(1e-2, name="adam"), initial_scale=initial_scale)


def test_mixed_precision_nan_loss_is_skipped_and_loss_scale_untouched(mixed_precision):
    model = keras_peft.wrap(tiny_mlp(), {".*": Rule()}, skip_nonfinite=True)
    optimizer = loss_scale_optimizer(2.0**10)
    probe, history = fit(model, *nan_data(), optimizer=optimizer)
    assert_same(probe.weights[NAN_BATCH - 1], probe.weights[NAN_BATCH])
    assert_same(probe.slots[NAN_BATCH - 1], probe.slots[NAN_BATCH])  # scale included
    assert float(optimizer.dynamic_scale.numpy()) == 2.0**10
    assert history.history["skipped_steps"] == [1]


def test_mixed_precision_overflow_still_lowers_the_loss_scale(mixed_precision):
    """Gradients that overflow at a huge scale: the optimizer halves it, nobody stops."""
    model = keras_peft.wrap(tiny_mlp(), {".*": Rule()}, skip_nonfinite=True,
                            max_consecutive_nonfinite=2)
    optimizer = loss_scale_optimizer(2.0**40)
    x, y = regression_data(n=16 * 40)
    _, history = fit(model, x, y, optimizer=optimizer)
    scale = float(optimizer.dynamic_scale.numpy())
    skipped = history.history["skipped_steps"][0]
    assert scale < 2.0**40 and skipped == np.log2(2.0**40 / scale) >= 2  # one halving per skip
    assert not model.stop_training  # overflow at a scale > 1 is the loss scale's business
    assert int(optimizer.iterations) == 40 - skipped > 0  # then it trained
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)


def test_mixed_precision_nan_gradient_at_scale_one_counts_toward_the_stop(mixed_precision):
    model = keras_peft.wrap(sqrt_model(), {".*": Rule()}, skip_nonfinite=True,
                            max_consecutive_nonfinite=3)
    x, y = regression_data(n=16 * 8)
    optimizer = loss_scale_optimizer(1.0)
    with pytest.warns(RuntimeWarning, match="the last 3 training steps"):
        fit(model, np.zeros_like(x), y, optimizer=optimizer)
    assert float(optimizer.dynamic_scale.numpy()) == 0.125  # halved by every skipped step
    assert model.peft_skipped_steps == 3


def test_option_is_saved_with_the_model_and_kept_by_rewrapping(tmp_path):
    model = keras_peft.wrap(tiny_mlp(), {".*": Rule()}, skip_nonfinite=True,
                            max_consecutive_nonfinite=4)
    assert model.get_config()["skip_nonfinite"] == {"max_consecutive": 4}
    keras_peft.wrap(model, {r".*head/.*": Rule(trainable=False)})  # None: keep
    assert state_of(model).nonfinite.max_consecutive == 4
    model.compile(optimizer="adam", loss="mse")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert state_of(loaded).nonfinite.max_consecutive == 4
    keras_peft.wrap(model, {".*": Rule()}, skip_nonfinite=False)
    assert "skip_nonfinite" not in model.get_config()
    assert model.peft_skipped_steps == 0


def test_bad_options_raise_and_leave_the_model_unwrapped():
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"must be True, False or None.*Received: "
                                         r"skip_nonfinite='yes'"):
        keras_peft.wrap(model, {".*": Rule()}, skip_nonfinite="yes")
    with pytest.raises(ValueError, match=r"must be an int >= 1.*max_consecutive_nonfinite=0"):
        keras_peft.wrap(model, {".*": Rule()}, skip_nonfinite=True, max_consecutive_nonfinite=0)
    with pytest.raises(ValueError, match=r"applies only with skip_nonfinite=True"):
        keras_peft.wrap(model, {".*": Rule()}, max_consecutive_nonfinite=5)
    assert not keras_peft.is_wrapped(model)


def test_custom_compute_metrics_with_extra_outputs_still_trains():
    class Custom(keras.Model):
        def compute_metrics(self, x, y, y_pred, sample_weight=None):
            logs = dict(super().compute_metrics(x, y, y_pred, sample_weight))
            logs["pred_mean"] = tf.reduce_mean(y_pred)
            return logs

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = Custom(inputs, keras.layers.Dense(1, name="head")(inputs), name="custom")
    keras_peft.wrap(model, {".*": Rule()}, skip_nonfinite=True)
    _, history = fit(model, *nan_data())
    assert history.history["skipped_steps"] == [1]
    assert "pred_mean" in history.history
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)
