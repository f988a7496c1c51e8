"""The adaptive callbacks: what they measure (against direct computation), what they decide,
which weights then change, errors at the start of fit, retraces, and exact resume."""

import gc
import json
import math
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_peft
from keras_peft import Rule
from keras_peft.adaptive import monitor as monitoring
from keras_peft.state import state_of
from tests.conftest import changed, regression_data, snapshot, tiny_mlp

WIDTHS = (8, 8, 8, 8)


def wrapped(seed=0, rules=None, widths=WIDTHS):
    model = tiny_mlp(seed=seed, widths=widths)
    keras_peft.wrap(model, rules or {".*": Rule()})
    return model


def fit(model, callbacks, epochs=1, batch_size=16, optimizer=None, **kw):
    model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-2), loss="mse")
    x, y = regression_data()
    return model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=False,
                     callbacks=callbacks, **kw)


def full_batch_gradients(model):
    x, y = regression_data()
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, model(x))
    return dict(zip((v.path for v in model.trainable_weights),
                    (g.numpy() for g in tape.gradient(loss, model.trainable_weights))))


# ------------------------------------------------------------------ measuring
def test_statistics_match_the_gradients_and_updates_computed_directly():
    model = wrapped()
    before = snapshot(model)
    grads = full_batch_gradients(model)
    stats = keras_peft.TrainingStatistics(every_steps=1)
    history = fit(model, [stats], batch_size=64, optimizer=keras.optimizers.SGD(0.1))
    (entry,) = stats.history
    assert entry["steps"] == 1
    for name in ("block_0", "block_3", "head"):
        paths = [p for p in grads if p.startswith(f"mlp/{name}/")]
        g = math.sqrt(sum(float(np.sum(grads[p] ** 2)) for p in paths))
        w = math.sqrt(sum(float(np.sum(model.get_layer(name).weights[i].numpy() ** 2))
                          for i in range(2)))
        got = entry["groups"][name]
        assert got["grad_norm"] == pytest.approx(g, rel=1e-5)
        assert got["update_ratio"] == pytest.approx(0.1 * g / w, rel=1e-4)  # SGD: 0.1 * g
        assert got["trainable"] == 1.0
        assert history.history[f"{name}/grad_norm"] == [pytest.approx(g, rel=1e-5)]
    assert changed(before, model) == set(before)  # measuring changes no training


def test_statistics_average_over_their_window_and_show_frozen_groups(tmp_path):
    model = wrapped(rules={".*block_0.*": Rule(trainable=False), ".*": Rule()})
    stats = keras_peft.TrainingStatistics(log_dir=tmp_path / "tb")
    history = fit(model, [stats], epochs=2)
    assert [e["steps"] for e in stats.history] == [4, 4]  # 64 examples / 16, per epoch
    first = stats.history[0]["groups"]
    assert first["block_0"]["grad_norm"] == 0.0 and first["block_0"]["trainable"] == 0.0
    assert first["block_1"]["grad_norm"] > 0
    assert len(history.history["head/update_ratio"]) == 2
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert state_of(model).monitor.enabled is False  # released at the end of fit


def test_statistics_measure_the_gradient_before_the_policys_grad_scale(mixed_precision):
    model = wrapped(rules={".*block_0/.*": Rule(grad_scale=10.0), ".*": Rule()})
    grads = full_batch_gradients(model)  # float32 math on a mixed-precision model
    stats = keras_peft.TrainingStatistics(every_steps=1, updates=False)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")  # a LossScaleOptimizer
    x, y = regression_data()
    model.fit(x, y, batch_size=64, epochs=6, verbose=0, callbacks=[stats])
    # The first steps overflow at the initial loss scale (the optimizer skips them and
    # halves the scale): they add nothing. Then the same gradient at each step (lr 0).
    measured = [e for e in stats.history if e["steps"] == 1]
    assert stats.history[0]["steps"] == 0 and measured
    entry = measured[-1]
    for name in ("block_0", "block_1"):
        g = math.sqrt(sum(float(np.sum(grads[p] ** 2)) for p in grads
                          if p.startswith(f"mlp/{name}/")))
        assert entry["groups"][name]["grad_norm"] == pytest.approx(g, rel=2e-2)
        assert entry["groups"][name]["update_ratio"] is None


def test_monitor_sums_skip_a_nonfinite_step():
    model = tiny_mlp(widths=(8,))
    keras_peft.wrap(model, {".*": Rule()}, skip_nonfinite=True)
    x, y = regression_data(32)
    x[16] = np.nan  # the second batch of 16
    stats = keras_peft.TrainingStatistics(every_steps=None)
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=16, verbose=0, shuffle=False, callbacks=[stats])
    (entry,) = stats.history
    assert entry["steps"] == 1 and math.isfinite(entry["groups"]["block_0"]["grad_norm"])


def test_window_is_a_difference_of_sums():
    start = {"grad_sq": np.array([1.0, 4.0]), "update_sq": np.array([0.0, 1.0]), "steps": 2}
    end = {"grad_sq": np.array([3.0, 12.0]), "update_sq": np.array([2.0, 3.0]), "steps": 4}
    window = monitoring.Window(start, end)
    assert window.grad_norm([0, 1]) == pytest.approx(math.sqrt(10 / 2))
    assert window.update_norm([1]) == pytest.approx(1.0)


# ----------------------------------------------------------------- AutoFreeze
class ScriptedWindows:
    """Replaces a callback's `window()` with gradient norms given per group per window."""

    def __init__(self, callback, norms_per_window):
        self.callback, self.norms = callback, list(norms_per_window)
        callback.window = self

    def __call__(self, name="read"):
        norms = self.norms.pop(0)
        cb = self.callback
        n = len(cb.model.weights)
        grad_sq = np.zeros(n)
        for group, value in norms.items():
            idx = cb.indices(cb.group(group))
            grad_sq[idx[0]] = value ** 2
        return monitoring.Window(None, {"grad_sq": grad_sq, "update_sq": np.zeros(n),
                                        "steps": 1})


def test_autofreeze_freezes_the_bottom_prefix_below_the_percentile():
    model = wrapped()
    auto = keras_peft.AutoFreeze(every_steps=1, percentile=50)
    windows = [
        {"block_0": 1.0, "block_1": 1.0, "block_2": 1.0},
        # rates 0.1, 0.9, 0.05: median 0.1; block_0 is not below it: nothing
        {"block_0": 1.1, "block_1": 1.9, "block_2": 0.95},
        # rates 0.0091, 0.0526, 0.4737 (vs the last window): median 0.0526: block_0 only
        # (block_1 equals the threshold, not below it)
        {"block_0": 1.11, "block_1": 1.8, "block_2": 0.5},
        # block_1 0.0, block_2 1.0: threshold 0.5: block_1 freezes; block_3 never (the top)
        {"block_1": 1.8, "block_2": 1.0},
    ]

    class Script(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            ScriptedWindows(auto, windows)

    before = {}

    class Watch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            before[batch] = snapshot(model)

    fit(model, [auto, Script(), Watch()])
    assert [(d["step"], d["groups"]) for d in auto.decisions] == [(2, ["block_0"]),
                                                                   (3, ["block_1"])]
    assert auto.decisions[0]["measurement"]["threshold"] == pytest.approx(0.8 / 15.2)
    assert auto.state["frozen"] == ["block_0", "block_1"]
    # After its decision (at step 2), block_0 no longer changes; the blocks above it do
    # (block_1 trains in step 3 and freezes after it).
    moved = changed(before[2], model)
    assert not any(p.startswith("mlp/block_0/") for p in moved)
    assert moved == {f"mlp/{layer}/{w}" for layer in ("block_1", "block_2", "block_3", "head")
                     for w in ("kernel", "bias")}
    assert [v.path for v in model.trainable_weights][:2] == ["mlp/block_2/kernel",
                                                              "mlp/block_2/bias"]


def test_autofreeze_on_real_gradients_keeps_the_top_blocks_and_a_prefix():
    model = wrapped()
    auto = keras_peft.AutoFreeze(every_steps=2, min_trainable_blocks=2)
    fit(model, [auto], epochs=4)
    frozen = auto.state["frozen"]
    assert frozen == ["block_0", "block_1"][: len(frozen)]  # a bottom prefix, never the top 2
    assert all(d["action"] == "freeze" for d in auto.decisions)
    assert keras_peft.decisions(model) == auto.decisions
    text = str(keras_peft.report(model))
    assert (f"adaptive decisions: {len(auto.decisions)}" in text) == bool(auto.decisions)


def test_autofreeze_freezes_lora_adapters_of_the_frozen_blocks():
    model = tiny_mlp(widths=WIDTHS)
    rules = keras_peft.lora(model, rank=2, targets=r".*block_\d")
    keras_peft.wrap(model, rules)
    auto = keras_peft.AutoFreeze(every_steps=1)
    windows = [{"block_0": 1.0, "block_1": 1.0, "block_2": 1.0},
               {"block_0": 1.0, "block_1": 1.5, "block_2": 2.0}]
    marks = {}

    class Script(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            ScriptedWindows(auto, windows + [{}] * 10)

        def on_train_batch_end(self, batch, logs=None):
            marks[batch] = snapshot(model)

    fit(model, [auto, Script()])
    assert auto.state["frozen"] == ["block_0"]
    moved = changed(marks[1], model)
    assert not any("block_0" in p for p in moved)
    assert any("block_1/lora_kernel_b" in p for p in moved)
    assert not any(p.endswith("block_1/kernel") for p in moved)  # base kernels stay frozen


# ------------------------------------------------------------------------ LISA
def test_lisa_trains_the_sampled_blocks_only_and_drops_the_others_optimizer_state():
    model = wrapped()
    lisa = keras_peft.LayerwiseSampling(num_blocks=2, every_steps=2, seed=3)
    marks, slots = {}, {}

    class Watch(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            marks[batch] = snapshot(model)

        def on_train_batch_end(self, batch, logs=None):
            slots[batch] = len(model.optimizer.variables)

    fit(model, [lisa, Watch()])  # 4 steps: 2 periods
    draws = [lisa.draw(k) for k in range(2)]
    for k in range(2):
        rng = np.random.default_rng([3, k])
        assert draws[k] == [f"block_{i}" for i in sorted(rng.choice(4, 2, replace=False))]
    assert [d["groups"] for d in lisa.decisions] == draws
    for batch in range(4):
        after = marks.get(batch + 1) or snapshot(model)
        moved = {p for p in after if not np.array_equal(after[p], marks[batch][p])}
        layers = {p.split("/")[1] for p in moved}
        assert layers == {*draws[batch // 2], "head"}, batch
    # Adam: 2 moments per trainable variable (2 blocks + head: 6), plus iterations and lr.
    assert slots[3] == 2 * 6 + 2


def _slots(model) -> dict:
    return {v.path: v.numpy().copy() for v in model.optimizer.variables}


def test_lisa_keeps_the_state_of_what_trains_across_a_switch_and_resets_a_block_drawn_again():
    def pattern(seed):  # period 0: X; period 1: another block; period 2: X again
        lisa = keras_peft.LayerwiseSampling(num_blocks=1, every_steps=1, seed=seed)
        lisa.blocks = types.SimpleNamespace(num_blocks=4, blocks=[
            types.SimpleNamespace(name=f"block_{i}") for i in range(4)])
        a, b, c = (lisa.draw(k)[0] for k in range(3))
        return a if a != b and a == c else None

    seed = next(s for s in range(100) if pattern(s))
    again = pattern(seed)
    model = wrapped()
    lisa = keras_peft.LayerwiseSampling(num_blocks=1, every_steps=1, seed=seed)
    ends, begins = {}, {}

    class Watch(keras.callbacks.Callback):  # after LISA: sees each step's optimizer
        def on_train_batch_begin(self, batch, logs=None):
            begins[batch] = _slots(model)

        def on_train_batch_end(self, batch, logs=None):
            ends[batch] = _slots(model)

    fit(model, [lisa, Watch()], optimizer=keras.optimizers.Adam(1e-2, name="adam"))  # 4 draws
    momentum = f"adam/mlp_{again}_kernel_momentum"
    assert np.abs(ends[0][momentum]).sum() > 0  # trained in period 0
    assert momentum not in begins[1]  # frozen in period 1: no slots
    np.testing.assert_array_equal(begins[2][momentum], 0.0)  # drawn again: zero moments
    head = "adam/mlp_head_kernel_momentum"  # trains throughout: state kept across switches
    np.testing.assert_array_equal(begins[1][head], ends[0][head])
    np.testing.assert_array_equal(begins[2]["adam/iteration"], 2)


def test_lisa_does_not_keep_the_optimizer_state_of_earlier_draws_alive():
    """Each draw rebuilds the optimizer and retraces the step. TensorFlow's gradient
    registry kept every earlier trace, and the slots it captured, alive: 12 draws
    held 12 more sets of slots (here 2 blocks x 2 x 256 KiB each)."""
    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except (ValueError, RuntimeError):
        pytest.skip("this TensorFlow does not report CPU memory")
    model = wrapped(widths=(256, 256, 256, 256))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    x, y = regression_data()
    lisa = keras_peft.LayerwiseSampling(num_blocks=2, every_steps=1, seed=0)

    def held_after(epochs):
        model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, callbacks=[lisa])
        gc.collect()
        return tf.config.experimental.get_memory_info("CPU:0")["current"]

    first = held_after(1)
    draws = len(lisa.decisions)
    later = held_after(3)  # 12 more steps, 12 more draws
    changes = sum(a["groups"] != b["groups"]
                  for a, b in zip(lisa.decisions[draws - 1:], lisa.decisions[draws:]))
    assert changes >= 6
    block_slots = 2 * 256 * 256 * 4  # Adam's two moments of one block kernel, in bytes
    assert later - first < block_slots, (first, later)


def test_a_wrapped_model_discarded_after_fit_leaves_no_memory_behind():
    """The same registry kept each discarded model's last trace, and its weights and
    slots, alive: a process that trains one model after another (the segmentation
    recipe's experiment) grew by a model each time."""
    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except (ValueError, RuntimeError):
        pytest.skip("this TensorFlow does not report CPU memory")
    x, y = regression_data()
    held = []
    for seed in range(4):
        model = wrapped(seed=seed, widths=(256, 256, 256, 256))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        model.fit(x, y, epochs=1, batch_size=64, verbose=0)
        del model
        gc.collect()
        held.append(tf.config.experimental.get_memory_info("CPU:0")["current"])
    one_model = 3 * 3 * 256 * 256 * 4  # 3 block kernels, with Adam's two moments, in bytes
    assert held[-1] - held[1] < one_model, held


def test_lisa_rejects_more_blocks_than_the_model_has():
    model = wrapped()
    with pytest.raises(ValueError, match=r"num_blocks=5.*has \(4\)"):
        fit(model, [keras_peft.LayerwiseSampling(num_blocks=5)])


# --------------------------------------------------------------------- plateau
def test_unfreeze_on_plateau_unfreezes_top_down_when_the_metric_stalls():
    model = wrapped()
    scores = [1.0, 0.5, 0.6, 0.7, 0.4, 0.45, 0.5]

    class Score(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["score"] = scores[epoch]

    plateau = keras_peft.UnfreezeOnPlateau("score", patience=2)
    trained = []

    class Watch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            trained.append(sorted({v.path.split("/")[1] for v in model.trainable_weights}))

    fit(model, [Score(), plateau, Watch()], epochs=7)
    assert [d["groups"] for d in plateau.decisions] == [["block_3"], ["block_2"]]
    assert [d["epoch"] for d in plateau.decisions] == [3, 6]
    assert trained[0] == ["head"] and trained[4] == ["block_3", "head"]
    assert plateau.decisions[0]["measurement"]["best"] == 0.5


def test_unfreeze_on_plateau_fails_at_the_first_epoch_when_the_metric_is_not_logged():
    model = wrapped()
    with pytest.raises(ValueError, match=r"monitors 'val_loss'.*logged: \['loss'\]"):
        fit(model, [keras_peft.UnfreezeOnPlateau()], epochs=2)


# -------------------------------------------------------------------- Auto-RGN
def test_adaptive_rgn_sets_the_measured_scales():
    model = wrapped()
    grads = full_batch_gradients(model)
    rgn = keras_peft.AdaptiveRGN(every_steps=1, smoothing=0.0, min_lr_scale=0.05)
    fit(model, [rgn], batch_size=64, optimizer=keras.optimizers.SGD(0.1))
    body = {p: g for p, g in grads.items() if not p.startswith("mlp/head/")}
    values = {v.path: v.numpy() for v in model.weights}
    rgns = {p: np.linalg.norm(g) / np.linalg.norm(values[p]) for p, g in body.items()}
    top = max(rgns.values())
    (decision,) = rgn.decisions
    for path, r in rgns.items():
        assert decision["measurement"]["scales"][path] == pytest.approx(max(0.05, r / top),
                                                                        rel=1e-4)
    # the decision names the tensor every scale is a ratio to, and what the floor caught
    top_path = decision["measurement"]["max_rgn_variable"]
    assert rgns[top_path] == pytest.approx(top, rel=1e-4)  # (a tie between biases is possible)
    floored = sum(r / top <= 0.05 for r in rgns.values())
    assert decision["measurement"]["measured_at_floor"] == floored
    assert (f"of {top_path}; {floored} of {len(rgns)} measured at the floor 0.05"
            in decision["text"])
    plan = {d.path: d for d in model.peft_plan}
    assert plan["mlp/head/kernel"].lr_scale == 1.0
    assert plan["mlp/block_2/kernel"].lr_scale == pytest.approx(
        decision["measurement"]["scales"]["mlp/block_2/kernel"])


def test_adaptive_rgn_smooths_from_the_base_policys_scales():
    model = wrapped(rules={"mlp/block_0/.*": Rule(lr_scale=0.2), ".*": Rule()})
    rgn = keras_peft.AdaptiveRGN(every_steps=4, smoothing=0.75)
    fit(model, [rgn])
    (decision,) = rgn.decisions
    scale = decision["measurement"]["scales"]["mlp/block_0/kernel"]
    assert 0.75 * 0.2 < scale <= 0.75 * 0.2 + 0.25  # 0.75 * before + 0.25 * measured (<= 1)


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("make, message", [
    (lambda: keras_peft.AutoFreeze(percentile=100), r"percentile.*\(0, 100\)"),
    (lambda: keras_peft.AutoFreeze(every_steps=0), r"every_steps.*>= 1"),
    (lambda: keras_peft.LayerwiseSampling(num_blocks=0), r"num_blocks.*>= 1"),
    (lambda: keras_peft.AdaptiveRGN(smoothing=1.0), r"smoothing.*\[0, 1\)"),
    (lambda: keras_peft.AdaptiveRGN(min_lr_scale=0), r"min_lr_scale"),
    (lambda: keras_peft.UnfreezeOnPlateau(mode="up"), r"mode"),
    (lambda: keras_peft.TrainingStatistics(every_steps=1.5), r"every_steps"),
])
def test_bad_settings_are_refused_when_the_callback_is_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_unwrapped_models_and_unknown_blocks_fail_at_the_start_of_fit():
    model = tiny_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="needs a model wrapped by keras_peft"):
        fit(model, [keras_peft.AutoFreeze()])
    assert not changed(before, model)
    model = wrapped()
    with pytest.raises(keras_peft.BlockInferenceError):
        fit(model, [keras_peft.AutoFreeze(block_names=["nope_0", "nope_1"])])
    with pytest.raises(ValueError, match=r"min_trainable_blocks.*more than the 4 blocks"):
        fit(model, [keras_peft.AutoFreeze(min_trainable_blocks=5)])


# -------------------------------------------------------------------- retraces
def _counting_traces(model) -> list:
    traces = []
    step = model.train_step

    def counting(data):
        traces.append(1)
        return step(data)

    model.train_step = counting
    return traces


def test_the_step_retraces_only_when_a_decision_changes_the_rules():
    plain = wrapped()
    baseline = _counting_traces(plain)
    fit(plain, [], epochs=3)  # Keras traces the first step (building the optimizer) twice
    model = wrapped()
    traces = _counting_traces(model)
    lisa = keras_peft.LayerwiseSampling(num_blocks=2, every_steps=4, seed=0)
    stats = keras_peft.TrainingStatistics(every_steps=1)
    fit(model, [lisa, stats], epochs=3)  # 12 steps, 3 draws, 12 measurements
    assert len(lisa.decisions) == 3 and len(stats.history) == 12
    assert len(traces) == len(baseline) + 2  # one more trace at each later draw


def test_adaptive_rgn_rescales_without_retracing():
    plain = wrapped()
    baseline = _counting_traces(plain)
    fit(plain, [], epochs=3)
    model = wrapped()
    traces = _counting_traces(model)
    rgn = keras_peft.AdaptiveRGN(every_steps=1)
    fit(model, [rgn], epochs=3)  # 12 steps, 12 re-estimations
    assert len(rgn.decisions) == 12
    assert len(traces) == len(baseline)


def test_live_scales_take_new_values_without_retracing():
    """A live `lr_scale` (a variable the step reads) scales the update like a Python one, and
    a policy that changes only its value is not traced again."""
    path = "mlp/block_1/kernel"
    steps = {}
    for live in (False, True):
        model = wrapped()
        if live:
            state_of(model).make_live(model, [path])
        traces = _counting_traces(model)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        x, y = regression_data()
        moved = []
        for scale in (0.5, 0.25, 1.0):
            model.set_rules({path: Rule(lr_scale=scale), ".*": Rule()})
            before = model.get_layer("block_1").kernel.numpy()
            model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
            moved.append(model.get_layer("block_1").kernel.numpy() - before)
        steps[live] = (moved, len(traces))
    for a, b in zip(steps[False][0], steps[True][0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert np.abs(steps[True][0][0]).max() > 0
    assert steps[False][1] >= 3  # each new Python scale is traced again
    assert steps[True][1] == 1  # the live one: traced once


def test_live_scales_refuse_tf_keras_models():
    import tf_keras

    model = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,))])
    keras_peft.wrap(model, {".*": Rule()})
    with pytest.raises(NotImplementedError, match="Keras 3"):
        state_of(model).make_live(model, [model.weights[0].name])


# ---------------------------------------------------------------------- resume
class Crash(keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__()
        self.at, self.seen = at, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.at:
            raise RuntimeError("crash")


def _run(make_callback, backup_dir, crash_at=None, adaptive_first=False):
    model = wrapped(seed=0)
    callback = make_callback()
    backup = keras_peft.BackupAndRestore(backup_dir, save_freq=1, delete_checkpoint=False)
    callbacks = [callback, backup] if adaptive_first else [backup, callback]
    if crash_at:
        callbacks.append(Crash(crash_at))
    try:
        fit(model, callbacks, epochs=3)
    except RuntimeError:
        return None
    return snapshot(model), json.loads(json.dumps(model.peft_rules, default=str)), \
        callback.decisions


@pytest.mark.parametrize("make, adaptive_first", [
    (lambda: keras_peft.AutoFreeze(every_steps=2), False),
    (lambda: keras_peft.LayerwiseSampling(num_blocks=2, every_steps=3, seed=1), True),
    (lambda: keras_peft.AdaptiveRGN(every_steps=3), False),
], ids=["autofreeze", "lisa", "rgn"])
def test_a_crash_and_resume_ends_with_the_same_weights_and_decisions(tmp_path, make,
                                                                     adaptive_first):
    reference = _run(make, tmp_path / "reference", adaptive_first=adaptive_first)
    assert _run(make, tmp_path / "run", crash_at=7, adaptive_first=adaptive_first) is None
    resumed = _run(make, tmp_path / "run", adaptive_first=adaptive_first)
    weights, rules, decisions = resumed
    ref_weights, ref_rules, ref_decisions = reference
    assert decisions == ref_decisions and ref_decisions
    assert rules == ref_rules
    for path, value in ref_weights.items():
        np.testing.assert_array_equal(weights[path], value, err_msg=path)
