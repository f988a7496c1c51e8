"""`GradualUnfreezing`: stages, frozen weights, optimizer slots, resuming."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_peft
from keras_peft import Rule
from keras_peft.state import state_of
from keras_peft.strategies.unfreezing import FROZEN_NOTE
from tests.conftest import changed, regression_data, snapshot

STEM = {"net/embed/kernel", "net/embed/bias"}
B0 = {"net/block_0/kernel", "net/block_0/bias"}
B1 = {"net/block_1/kernel", "net/block_1/bias"}
HEAD = {"net/head/kernel", "net/head/bias"}
STAGES = [HEAD, HEAD | B1, HEAD | B1 | B0, HEAD | B1 | B0 | STEM]  # trainable at stage s


def net(seed=0):
    """A stem (`embed`), two blocks and a head."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, name="embed"),
        keras.layers.Dense(8, activation="tanh", name="block_0"),
        keras.layers.Dense(8, activation="tanh", name="block_1"),
        keras.layers.Dense(1, name="head"),
    ], name="net")


def compiled(rules=None):
    model = keras_peft.wrap(net(), rules or {".*": Rule()})
    model.compile(optimizer=keras.optimizers.Adam(1e-2, name="adam"), loss="mse")
    return model


def fit(model, callbacks, epochs, initial_epoch=0, batch_size=32):
    x, y = regression_data()
    model.fit(x, y, batch_size=batch_size, epochs=epochs, initial_epoch=initial_epoch,
              verbose=0, shuffle=False, callbacks=callbacks)


def trainable(model):
    return {v.path for v in model.trainable_weights}


class Probe(keras.callbacks.Callback):
    """Records weights, optimizer slots and trainable paths (runs after the unfreezing)."""

    def __init__(self):
        super().__init__()
        self.weights, self.slots, self.at_batch = [], [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.at_batch.append(trainable(self.model))

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(snapshot(self.model))
        self.slots.append({v.path for v in self.model.optimizer.variables})


def slots_for(paths):
    return {f"adam/{p.replace('/', '_')}_{s}" for p in paths for s in ("momentum", "velocity")}


def test_blocks_unfreeze_one_per_epoch_from_the_top_with_optimizer_slots():
    model = compiled()
    start = snapshot(model)
    probe = Probe()
    fit(model, [keras_peft.gradual_unfreezing(every_epochs=1), probe], epochs=5)
    w = [start] + probe.weights  # w[e]: weights after e epochs
    # (a) A block is bit-identical until its stage, and changes in every epoch from then on.
    for epoch, wanted in enumerate(STAGES + [STAGES[-1]]):
        assert diff(w[epoch], w[epoch + 1]) == wanted, epoch
    # The trainable set seen by every step of each epoch (2 steps per epoch).
    assert probe.at_batch == [s for s in STAGES + [STAGES[-1]] for _ in range(2)]
    # (b) The optimizer got slots for each block as it was unfrozen, keeping the
    # old ones; (c) without recompiling: the step counter ran on through it all.
    assert [slots - {"adam/iteration", "adam/learning_rate"} for slots in probe.slots] == [
        slots_for(s) for s in STAGES + [STAGES[-1]]]
    assert int(model.optimizer.iterations.numpy()) == 10
    assert model.peft_rules == {".*": Rule()}  # the base policy alone at the end


def diff(a, b):
    """Paths whose values differ between two snapshots."""
    return {p for p in a if not np.array_equal(a[p], b[p])}


def test_stage_is_a_function_of_the_epoch_so_a_resumed_run_lands_on_it():
    model = compiled()
    callback = keras_peft.GradualUnfreezing(every_epochs=2)
    callback.set_model(model)
    callback.set_params({"epochs": 10, "steps": 2, "verbose": 0})
    callback.on_train_begin()
    assert [callback.stage_at(e) for e in range(9)] == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    # (d) on_epoch_begin(initial_epoch) puts the model in its stage at once.
    callback.on_epoch_begin(4)
    assert callback.stage == 2 and trainable(model) == STAGES[2]
    callback.on_epoch_begin(1)
    assert trainable(model) == STAGES[0]

    # The same through fit(initial_epoch=...): the first step already trains stage 2.
    model = compiled()
    start = snapshot(model)
    probe = Probe()
    fit(model, [keras_peft.GradualUnfreezing(every_epochs=2), probe], epochs=5, initial_epoch=4)
    assert probe.at_batch[0] == STAGES[2]
    assert changed(start, model) == STAGES[2]


def test_every_steps_counts_global_steps_across_epochs_and_resumes():
    model = compiled()
    probe = Probe()
    # 64 samples, batch 16: 4 steps per epoch; a stage every 3 steps.
    fit(model, [keras_peft.gradual_unfreezing(every_steps=3), probe], epochs=2, batch_size=16)
    assert probe.at_batch == [STAGES[min(step // 3, 3)] for step in range(8)]

    model = compiled()
    probe = Probe()
    fit(model, [keras_peft.gradual_unfreezing(every_steps=3), probe], epochs=3,
        initial_epoch=1, batch_size=16)
    assert probe.at_batch == [STAGES[min(step // 3, 3)] for step in range(4, 12)]


def test_every_steps_with_unknown_epoch_length_cannot_resume():
    model = compiled()
    x, y = regression_data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).filter(lambda a, b: True)
    with pytest.raises(ValueError, match="cannot tell the global step when resuming at epoch 1"):
        model.fit(ds, epochs=2, initial_epoch=1, verbose=0,
                  callbacks=[keras_peft.gradual_unfreezing(every_steps=3)])


def test_base_policy_keeps_deciding_what_is_unfrozen():
    model = net()
    base = keras_peft.layerwise_lr_decay(model, 0.5)
    keras_peft.wrap(model, base)
    model.compile(optimizer="adam", loss="mse")
    callback = keras_peft.GradualUnfreezing()
    callback.set_model(model)
    callback.on_train_begin()
    with _no_shadow_warning():
        callback.on_epoch_begin(1)
    rules = model.peft_rules
    frozen_pattern = next(iter(rules))
    assert rules[frozen_pattern] == Rule(trainable=False)
    assert rules[frozen_pattern].note == FROZEN_NOTE
    assert {p for p in ("net/embed/kernel", "net/block_0/bias", "net/block_1/bias")
            if re.fullmatch(frozen_pattern, p)} == {"net/embed/kernel", "net/block_0/bias"}
    assert list(rules)[1:] == list(base) and list(rules.values())[1:] == list(base.values())
    assert state_of(model).scales == {p: (0.5, 1.0) for p in B1}
    callback.on_epoch_begin(3)
    assert model.peft_rules == base and trainable(model) == STAGES[3]
    assert state_of(model).scales["net/embed/kernel"] == (0.125, 1.0)


class _no_shadow_warning:
    """Fails if a 'shadowed rule' warning escapes (the frozen rule shadows base rules)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.log = self._cm.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        assert not [w for w in self.log if "earlier rule" in str(w.message)]


def test_base_rules_that_leave_parts_undecided_or_frozen():
    """Variables no base rule decides are given back when unfrozen; what the base
    freezes stays frozen."""
    model = compiled({r".*block_0/.*": Rule(lr_scale=0.5)})  # the rest undecided
    callback = keras_peft.GradualUnfreezing()
    callback.set_model(model)
    callback.on_train_begin()
    callback.on_epoch_begin(0)
    assert trainable(model) == STAGES[0]
    callback.on_epoch_begin(3)
    assert trainable(model) == STAGES[3]

    model = compiled({r".*block_1/.*": Rule(trainable=False), ".*": Rule()})
    callback = keras_peft.GradualUnfreezing()
    callback.set_model(model)
    callback.on_train_begin()
    assert [callback._apply(s, 0) or trainable(model) for s in range(4)] == [
        HEAD, HEAD, HEAD | B0, HEAD | B0 | STEM]



def test_a_base_policy_that_freezes_every_block_is_refused_not_run_as_a_no_op():
    """With head_only as the base, 'unfreezing' a block gives it back to a policy that
    freezes it: the schedule would print stages and train only the head."""
    model = keras_peft.wrap(net(), keras_peft.head_only(net()))
    model.compile(optimizer="adam", loss="mse")
    rules, before = dict(model.peft_rules), snapshot(model)
    with pytest.raises(ValueError, match=r"(?s)GradualUnfreezing would unfreeze nothing.*"
                                         r"block_0, block_1.*\{'\.\*': keras_peft\.Rule\(\)\}"):
        fit(model, [keras_peft.gradual_unfreezing()], epochs=2)
    assert model.peft_rules == rules and changed(before, model) == set()

    partly = compiled({r".*block_1/.*": Rule(trainable=False), ".*": Rule()})
    with pytest.warns(UserWarning, match=r"freezes block\(s\) \['block_1'\] itself"):
        fit(partly, [keras_peft.gradual_unfreezing()], epochs=1)


def test_a_second_run_takes_the_original_base_policy():
    model = compiled({r".*head/.*": Rule(lr_scale=2.0), ".*": Rule()})
    first = keras_peft.GradualUnfreezing()
    fit(model, [first], epochs=2)  # ends at stage 1: the model carries the frozen rule
    assert next(iter(model.peft_rules.values())).note == FROZEN_NOTE
    second = keras_peft.GradualUnfreezing()
    probe = Probe()
    fit(model, [second, probe], epochs=3, initial_epoch=2)
    assert second.base_rules == first.base_rules == {r".*head/.*": Rule(lr_scale=2.0),
                                                     ".*": Rule()}
    assert probe.at_batch[0] == STAGES[2]


def test_verbose_prints_one_line_per_stage(capsys):
    model = compiled()
    fit(model, [keras_peft.gradual_unfreezing(verbose=1)], epochs=4)
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    head = "head, neck and the top {} of 2 blocks trainable."
    last = "everything unfrozen (the base rules alone)."
    assert lines == [
        "Epoch 1: GradualUnfreezing starts: stage 0/3, " + head.format(0),
        "Epoch 2: GradualUnfreezing unfroze 'block_1': stage 1/3, " + head.format(1),
        "Epoch 3: GradualUnfreezing unfroze 'block_0': stage 2/3, " + head.format(2),
        "Epoch 4: GradualUnfreezing unfroze 'stem': stage 3/3, " + last,
    ]
    fit(compiled(), [keras_peft.gradual_unfreezing()], epochs=1)
    assert capsys.readouterr().out == ""


def test_unwrapped_model_raises_at_train_begin():
    model = net()
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match=re.escape(
            "GradualUnfreezing needs a model wrapped by keras_peft: model 'net' is not.")):
        fit(model, [keras_peft.gradual_unfreezing()], epochs=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"every_epochs": 0}, "`every_epochs` must be an int >= 1. Received: every_epochs=0."),
    ({"every_epochs": True}, "`every_epochs` must be an int >= 1. Received: every_epochs=True."),
    ({"every_steps": 0}, "`every_steps` must be an int >= 1. Received: every_steps=0."),
    ({"every_epochs": 2, "every_steps": 5},
     "Give `every_epochs` or `every_steps`, not both. Received: every_epochs=2, every_steps=5."),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        keras_peft.gradual_unfreezing(**kwargs)


def test_schedule_questions_before_training_raise():
    with pytest.raises(RuntimeError, match="has not seen its model yet"):
        keras_peft.GradualUnfreezing().stage_at(3)


def test_block_names_choose_the_blocks():
    model = compiled()
    callback = keras_peft.GradualUnfreezing(block_names=["embed", "block_0", "block_1"])
    callback.set_model(model)
    callback.on_train_begin()
    assert callback.num_stages == 3  # three blocks, no stem
    assert [callback._apply(s, 0) or trainable(model) for s in range(4)] == STAGES
    assert callback.stage_at(10) == 3


def test_keras_hub_task_on_raw_strings():
    from tests.helpers import tiny_bert_classifier

    model = keras_peft.wrap(tiny_bert_classifier(), {".*": Rule()})
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    texts = ["the movie was good", "the movie was bad", "great fun", "awful movie"] * 2
    before = snapshot(model)
    model.fit(texts, np.array([1, 0, 1, 0] * 2), batch_size=8, epochs=2, verbose=0,
              callbacks=[keras_peft.gradual_unfreezing()])
    layer_1 = {p for p in before if p.startswith("transformer_layer_1/")}
    assert len(layer_1) == 16
    assert changed(before, model) == {"logits/kernel", "logits/bias", "pooled_dense/kernel",
                                      "pooled_dense/bias"} | layer_1
