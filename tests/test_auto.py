"""`auto`: Auto-RGN statistics, lr scales, budgets, and that nothing about the model changes."""

import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_peft
from keras_peft import Rule
from keras_peft.state import state_of
from tests.conftest import changed, compile_fit, regression_data, snapshot, tiny_mlp
from tests.helpers import tiny_bert_classifier

BODY = ["mlp/block_0/kernel", "mlp/block_0/bias", "mlp/block_1/kernel", "mlp/block_1/bias"]
HEAD = ["mlp/head/kernel", "mlp/head/bias"]


def biased_mlp(seed=0):
    """tiny_mlp with non-zero biases (a zero bias has ||w|| = 0)."""
    model = tiny_mlp(seed)
    for i, layer in enumerate(model.layers):
        layer.bias.assign(np.full(layer.bias.shape, 0.1 * (i + 1), "float32"))
    return model


def linear_model():
    keras.utils.set_random_seed(3)
    init = keras.initializers.Constant
    return keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(2, name="block_0", bias_initializer=init(0.1)),
        keras.layers.Dense(2, name="block_1", bias_initializer=init(-0.2)),
        keras.layers.Dense(1, name="head", bias_initializer=init(0.3)),
    ], name="lin")


def hand_gradients(model, x, y):
    """Gradients of mean((out - y)^2) for the 3-layer linear model, by the chain rule."""
    w0, b0, w1, b1, w2, b2 = (v.numpy().astype("float64") for v in model.weights)
    h1 = x @ w0 + b0
    h2 = h1 @ w1 + b1
    d = 2 * (h2 @ w2 + b2 - y) / len(x)
    dh2 = d @ w2.T
    dh1 = dh2 @ w1.T
    return [x.T @ dh1, dh1.sum(0), h1.T @ dh2, dh2.sum(0), h2.T @ d, d.sum(0)]


def test_stats_match_hand_computed_relative_gradient_norms():
    model = linear_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3))
    y = rng.normal(size=(8, 1))
    result = keras_peft.auto(model, (x.astype("float32"), y.astype("float32")), loss="mse",
                             batch_size=4, num_batches=2, min_lr_scale=1e-4, verbose=0)
    assert result.num_batches == 2
    # Mean over the two batches of each gradient's norm, over the weight's norm.
    grads = [hand_gradients(model, x[:4], y[:4]), hand_gradients(model, x[4:], y[4:])]
    grad_norms = [np.mean([np.linalg.norm(g[i]) for g in grads]) for i in range(6)]
    weight_norms = [np.linalg.norm(v.numpy()) for v in model.weights]
    rgn = [g / w for g, w in zip(grad_norms, weight_norms)]
    body_max = max(rgn[:4])
    for i, stat in enumerate(result.stats):
        assert stat["path"] == model.weights[i].path
        assert stat["params"] == math.prod(model.weights[i].shape)
        np.testing.assert_allclose(stat["grad_norm"], grad_norms[i], rtol=1e-4)
        np.testing.assert_allclose(stat["weight_norm"], weight_norms[i], rtol=1e-6)
        np.testing.assert_allclose(stat["rgn"], rgn[i], rtol=1e-4)
        expected_scale = 1.0 if i >= 4 else max(1e-4, rgn[i] / body_max)  # head: 1.0
        np.testing.assert_allclose(stat["lr_scale"], expected_scale, rtol=1e-4)
        assert stat["trainable"] is True
    # Rules: one per variable path, exact (escaped), with the statistic as the note.
    assert list(result.rules) == [re.escape(v.path) for v in model.weights]
    rule = result.rules[re.escape("lin/block_1/kernel")]
    assert rule.note == f"rgn={result.stats[2]['rgn']:.3g}"
    assert result.rules[re.escape("lin/head/bias")].note.endswith("(head)")


def test_model_weights_flags_and_optimizer_unchanged():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, name="block_0"),
        keras.layers.BatchNormalization(name="block_0_bn"),
        keras.layers.Dropout(0.5, name="block_0_drop"),
        keras.layers.Dense(8, activation="tanh", name="block_1"),
        keras.layers.Dense(1, name="head"),
    ], name="bnnet")
    keras_peft.wrap(model, {r".*block_1/.*": Rule(trainable=False), ".*": Rule(lr_scale=0.5)})
    compile_fit(model)
    before = snapshot(model)
    flags = [v.trainable for v in model.weights]
    optimizer = model.optimizer
    state = {v.path: v.numpy().copy() for v in optimizer.variables}
    rules = model.peft_rules

    result = keras_peft.auto(model, regression_data(), budget=0.5, verbose=0)

    assert changed(before, model) == set()  # BatchNorm moving statistics included
    assert [v.trainable for v in model.weights] == flags
    assert model.optimizer is optimizer
    assert {v.path: v.numpy().tolist() for v in optimizer.variables} == {
        p: s.tolist() for p, s in state.items()}
    assert model.peft_rules == rules
    # Frozen block_1 was measured too (every trainable-capable variable), the
    # moving statistics were not (they get no rule).
    measured = [s["path"] for s in result.stats]
    assert "bnnet/block_1/kernel" in measured
    assert not any("moving" in p for p in measured)
    assert len(measured) == 8


def test_compiled_loss_is_used_and_an_explicit_loss_wins():
    x, y = regression_data()
    explicit = keras_peft.auto(tiny_mlp(), (x, y), loss="mse", verbose=0)
    model = tiny_mlp()
    model.compile(optimizer="sgd", loss="mse")
    compiled = keras_peft.auto(model, (x, y), verbose=0)
    np.testing.assert_allclose([s["rgn"] for s in compiled.stats],
                               [s["rgn"] for s in explicit.stats], rtol=1e-5)
    mae = keras_peft.auto(model, (x, y), loss="mae", verbose=0)
    assert not np.allclose([s["grad_norm"] for s in mae.stats],
                           [s["grad_norm"] for s in compiled.stats])
    as_function = keras_peft.auto(model, (x, y), loss=keras.losses.mean_absolute_error, verbose=0)
    np.testing.assert_allclose([s["grad_norm"] for s in as_function.stats],
                               [s["grad_norm"] for s in mae.stats], rtol=1e-5)


def test_dataset_generator_and_tuple_give_the_same_stats():
    x, y = regression_data()
    from_tuple = keras_peft.auto(tiny_mlp(), (x, y), loss="mse", batch_size=16, verbose=0)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    from_ds = keras_peft.auto(tiny_mlp(), ds, loss="mse", verbose=0)
    gen = ((x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16))
    from_gen = keras_peft.auto(tiny_mlp(), gen, loss="mse", verbose=0)
    for other in (from_ds, from_gen):
        np.testing.assert_allclose([s["rgn"] for s in other.stats],
                                   [s["rgn"] for s in from_tuple.stats], rtol=1e-5)
    assert from_tuple.num_batches == 4


def dead_block_mlp():
    """block_1 is a ReLU whose bias is so negative that it never fires: no gradient
    reaches block_1 or block_0, and block_2's kernel sees only zeros as input."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh", name="block_0",
                           bias_initializer=keras.initializers.Constant(0.1)),
        keras.layers.Dense(8, activation="relu", name="block_1",
                           bias_initializer=keras.initializers.Constant(-100.0)),
        keras.layers.Dense(8, activation="tanh", name="block_2",
                           bias_initializer=keras.initializers.Constant(0.1)),
        keras.layers.Dense(1, name="head"),
    ], name="mlp")


def test_zero_gradient_gets_min_lr_scale_and_is_never_selected_under_a_budget():
    x, y = regression_data()
    dead = ["mlp/block_0/kernel", "mlp/block_0/bias", "mlp/block_1/kernel", "mlp/block_1/bias",
            "mlp/block_2/kernel"]
    result = keras_peft.auto(dead_block_mlp(), (x, y), loss="mse", min_lr_scale=0.05, verbose=0)
    stats = {s["path"]: s for s in result.stats}
    for path in dead:
        assert stats[path]["grad_norm"] == 0 and stats[path]["rgn"] == 0
        assert stats[path]["lr_scale"] == 0.05 and stats[path]["trainable"]
    assert stats["mlp/block_2/bias"]["lr_scale"] == 1.0  # the only body variable that learns

    budgeted = keras_peft.auto(dead_block_mlp(), (x, y), loss="mse", budget=1.0, verbose=0)
    frozen = {s["path"] for s in budgeted.stats if not s["trainable"]}
    assert frozen == set(dead)  # room in the budget, but nothing to learn there
    assert all(budgeted.rules[re.escape(p)] == Rule(trainable=False) for p in dead)
    assert budgeted.rules[re.escape(dead[0])].note == "rgn=0 (not selected)"


@pytest.mark.parametrize("budget", [9, 10, 17, 30, 60, 90, 121, 0.25, 0.5, 1.0])
def test_budget_is_respected_head_first_then_greedy_by_rgn(budget):
    x, y = regression_data()
    model = biased_mlp()
    result = keras_peft.auto(model, (x, y), loss="mse", budget=budget, verbose=0)
    limit = budget if isinstance(budget, int) else math.floor(budget * 121)
    assert result.budget == limit
    assert result.trainable_params <= limit
    # The head (9 parameters) always trains, at full rate, and counts toward the budget.
    stats = {s["path"]: s for s in result.stats}
    assert all(stats[p]["trainable"] and stats[p]["lr_scale"] == 1.0 for p in HEAD)
    # Greedy by descending rgn, skipping what does not fit.
    left, expected = limit - 9, set(HEAD)
    for s in sorted((stats[p] for p in BODY), key=lambda s: -s["rgn"]):
        if s["params"] <= left:
            expected.add(s["path"])
            left -= s["params"]
    assert {p for p, s in stats.items() if s["trainable"]} == expected
    # Wrapped, the model trains exactly that.
    keras_peft.wrap(model, result.rules)
    assert keras_peft.report(model).trainable_params == result.trainable_params
    assert {v.path for v in model.trainable_weights} == expected


def test_wrapped_model_trains_the_selection_and_report_shows_rgn():
    x, y = regression_data()
    model = biased_mlp()
    result = keras_peft.auto(model, (x, y), loss="mse", budget=60, verbose=0)
    keras_peft.wrap(model, result.rules)
    before = snapshot(model)
    compile_fit(model)
    assert changed(before, model) == {s["path"] for s in result.stats if s["trainable"]}
    rows = {r.layer: r for r in keras_peft.report(model).rows}
    for layer in ("mlp/block_0", "mlp/block_1", "mlp/head"):
        assert re.search(r"rgn=[0-9.e+-]+", rows[layer].note), rows[layer].note
    assert "(head)" in rows["mlp/head"].note
    scales = {s["path"]: s["lr_scale"] for s in result.stats if s["trainable"]}
    assert state_of(model).scales == {p: (s, 1.0) for p, s in scales.items() if s != 1.0}



def test_the_result_goes_wherever_rules_go():
    """Like every other strategy: wrap(model, auto(...)) and combine(auto(...), ...)."""
    x, y = regression_data()
    model = biased_mlp()
    result = keras_peft.auto(model, (x, y), loss="mse", budget=60, verbose=0)
    assert dict(result) == result.rules and len(result) == len(result.rules)
    keras_peft.wrap(model, result)
    assert keras_peft.get_rules(model) == result.rules
    other = biased_mlp()
    combined = keras_peft.combine({r"mlp/head/.*": Rule(lr_scale=0.5)}, result)
    keras_peft.wrap(other, combined)
    assert other.peft_plan.by_path()["mlp/head/kernel"].lr_scale == 0.5


def test_table_and_verbose_output(capsys):
    x, y = regression_data()
    result = keras_peft.auto(biased_mlp(), (x, y), loss="mse", budget=30, num_batches=3,
                             batch_size=16, verbose=1)
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [f"auto: batch {i}/3 - loss: {v}" for i, v in
                       zip((1, 2, 3), [line.split("loss: ")[1] for line in out[:3]])]
    assert out[3] == ("auto: measured 6 variables on 3 batch(es); training 25 of 121 "
                      "parameters (budget 30).")
    keras_peft.auto(biased_mlp(), (x, y), loss="mse", verbose=0)
    assert capsys.readouterr().out == ""
    keras_peft.auto(biased_mlp(), (x, y), loss="mse")  # "auto": the summary line only
    assert len(capsys.readouterr().out.splitlines()) == 1

    lines = str(result).splitlines()
    assert lines[0].split() == ["path", "params", "grad_norm", "weight_norm", "rgn",
                                "lr_scale", "trainable"]
    assert lines[-1] == "measured on 3 batch(es); trainable params: 25 of 121 (budget 30)"
    frozen_row = next(line for line in lines if line.startswith("mlp/block_1/kernel"))
    assert frozen_row.split()[-2:] == ["-", "no"]


def test_keras_hub_task_with_raw_strings():
    texts = ["the movie was good", "the movie was bad", "great fun", "awful movie"] * 4
    labels = np.array([1, 0, 1, 0] * 4)
    model = tiny_bert_classifier()
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = snapshot(model)
    result = keras_peft.auto(model, (texts, labels), batch_size=4, budget=0.5, verbose=0)
    assert changed(before, model) == set()
    assert result.num_batches == 4
    assert result.trainable_params <= math.floor(0.5 * result.total_params)
    stats = {s["path"]: s for s in result.stats}
    assert stats["logits/kernel"]["trainable"] and stats["logits/kernel"]["lr_scale"] == 1.0
    assert stats["logits/kernel"]["grad_norm"] > 0
    assert stats["transformer_layer_0/self_attention_layer/query/kernel"]["weight_norm"] > 0
    # A tf.data dataset of raw strings is preprocessed the same way (as fit does).
    ds = tf.data.Dataset.from_tensor_slices((texts, labels)).batch(4)
    from_ds = keras_peft.auto(model, ds, budget=0.5, verbose=0)
    np.testing.assert_allclose([s["rgn"] for s in from_ds.stats],
                               [s["rgn"] for s in result.stats], rtol=1e-4)
    keras_peft.wrap(model, result.rules)
    assert {v.path for v in model.trainable_weights} == {
        s["path"] for s in result.stats if s["trainable"]}


@pytest.mark.parametrize("budget", [0, -5, 1.5, 0.0, True, "10%", float("nan")])
def test_bad_budget_raises(budget):
    with pytest.raises(ValueError, match=re.escape(
            "`budget` must be a number of parameters (an int >= 1) or a fraction of all "
            f"parameters (a float in (0, 1]). Received: budget={budget!r}.")):
        keras_peft.auto(tiny_mlp(), regression_data(), loss="mse", budget=budget)


def test_budget_smaller_than_the_head_raises():
    with pytest.raises(ValueError, match=re.escape(
            "`budget` (5 parameters) is smaller than the head, which always trains "
            "(9 parameters")):
        keras_peft.auto(tiny_mlp(), regression_data(), loss="mse", budget=5, verbose=0)


def test_no_loss_raises():
    with pytest.raises(ValueError, match="model 'mlp' is not compiled and no `loss=` was given"):
        keras_peft.auto(tiny_mlp(), regression_data())
    model = tiny_mlp()
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="is compiled without a loss and no `loss=`"):
        keras_peft.auto(model, regression_data())


def test_empty_and_wrong_data_raise():
    x, y = regression_data()
    with pytest.raises(ValueError, match="`data` gave no batches; it needs at least one"):
        keras_peft.auto(tiny_mlp(), (x[:0], y[:0]), loss="mse", verbose=0)
    with pytest.raises(ValueError, match="`data` gave no batches"):
        keras_peft.auto(tiny_mlp(), iter([]), loss="mse", verbose=0)
    with pytest.raises(ValueError, match=r"For arrays or lists, pass `\(x, y\)` as a tuple"):
        keras_peft.auto(tiny_mlp(), [x, y], loss="mse")
    with pytest.raises(ValueError, match="`batch_size` applies to data given as a tuple"):
        keras_peft.auto(tiny_mlp(), tf.data.Dataset.from_tensor_slices((x, y)).batch(8),
                        loss="mse", batch_size=8)


def test_other_bad_arguments_raise():
    data = regression_data()
    with pytest.raises(ValueError, match="`num_batches` must be an int >= 1. Received: "
                                         "num_batches=0."):
        keras_peft.auto(tiny_mlp(), data, loss="mse", num_batches=0)
    with pytest.raises(ValueError, match=r"`min_lr_scale` must be a number in \(0, 1\]"):
        keras_peft.auto(tiny_mlp(), data, loss="mse", min_lr_scale=0)
    with pytest.raises(ValueError, match="`verbose` must be 'auto', 0, 1 or 2"):
        keras_peft.auto(tiny_mlp(), data, loss="mse", verbose="yes")
    with pytest.raises(ValueError, match="expects a built Keras 3 model"):
        keras_peft.auto(keras.Sequential([keras.layers.Dense(2)]), data, loss="mse")
    with pytest.raises(ValueError, match="`loss` must be a loss name"):
        keras_peft.auto(tiny_mlp(), data, loss=3)


def test_non_finite_loss_raises():
    x, y = regression_data()
    y = y.copy()
    y[0] = np.nan
    with pytest.raises(ValueError, match="batch 1 gave a non-finite loss"):
        keras_peft.auto(tiny_mlp(), (x, y), loss="mse", verbose=0)
