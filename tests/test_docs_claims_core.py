"""What docs/concepts.md, docs/getting-started.md and docs/faq.md promise about `wrap`.

Each test quotes the sentence it checks. Claims that other tests already assert
(tests/test_model.py, test_rules.py, test_bad_inputs.py, ...) or that a page's
own code block asserts (tests/test_docs_examples.py runs them) are not repeated.
"""

import keras
import numpy as np
import pytest

import keras_peft
from keras_peft import Rule
from tests.conftest import changed, compile_fit, regression_data, snapshot, tiny_mlp


class TwoDense(keras.Model):
    """A subclassed model: `body` then `head`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.body = keras.layers.Dense(3, name="body")
        self.head = keras.layers.Dense(1, name="head")

    def call(self, x):
        return self.head(self.body(x))


def two_dense(kind, name="net"):
    """`body` (Dense 3) then `head` (Dense 1) as a Sequential, functional or subclassed model."""
    keras.utils.set_random_seed(0)
    if kind == "sequential":
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="body"),
                                 keras.layers.Dense(1, name="head")], name=name)
    if kind == "functional":
        inputs = keras.Input((4,))
        hidden = keras.layers.Dense(3, name="body")(inputs)
        return keras.Model(inputs, keras.layers.Dense(1, name="head")(hidden), name=name)
    model = TwoDense(name=name)
    model(np.ones((1, 4), "float32"))
    return model


# ------------------------------------------------------------ path matching
def test_sequential_and_subclassed_paths_start_with_the_model_name_functional_do_not():
    """concepts.md:11-13: "Layers of a `Sequential` or subclassed model have the model's
    name in front; layers of a functional model do not." """
    names = ["body/kernel", "body/bias", "head/kernel", "head/bias"]
    assert keras_peft.variable_paths(two_dense("sequential")) == [f"net/{p}" for p in names]
    assert keras_peft.variable_paths(two_dense("subclassed")) == [f"net/{p}" for p in names]
    assert keras_peft.variable_paths(two_dense("functional")) == names


def test_unmatched_variables_keep_their_flag_and_the_optimizers_learning_rate():
    """concepts.md:17-18: "**Unmatched variables keep their state**: the `trainable` flag
    they had, and the optimizer's own learning rate." """

    def model():
        m = tiny_mlp()
        m.get_layer("block_0").kernel.trainable = False  # frozen before wrap, by hand
        return m

    wrapped = keras_peft.wrap(model(), {r".*head/.*": Rule()})  # block_* match no rule
    assert not wrapped.get_layer("block_0").kernel.trainable
    before = snapshot(wrapped)
    compile_fit(wrapped, epochs=2)
    assert changed(before, wrapped) == set(before) - {"mlp/block_0/kernel"}
    plain = compile_fit(model(), epochs=2)  # the same optimizer, no keras-peft
    for w, p in zip(wrapped.weights, plain.weights):
        np.testing.assert_allclose(w.numpy(), p.numpy(), rtol=1e-5, atol=1e-6, err_msg=w.path)


# ----------------------------------------------------------------- freezing
def test_a_frozen_layer_still_passes_gradients_to_the_layers_below():
    """concepts.md:55-56: "no gradient is computed for it (backpropagation still flows
    *through* its layer to the layers below, if those train)" """
    model = keras_peft.wrap(tiny_mlp(), {r".*block_1/.*": Rule(trainable=False)})
    before = snapshot(model)
    compile_fit(model)
    assert changed(before, model) == {"mlp/block_0/kernel", "mlp/block_0/bias",
                                      "mlp/head/kernel", "mlp/head/bias"}


# ------------------------------------------------------ lr_scale, grad_scale
def test_lr_scale_under_plain_sgd_is_sgd_with_a_scaled_learning_rate():
    """concepts.md:91-92: "this is exactly the step the same optimizer would take with
    `learning_rate * lr_scale`, under SGD, ..." (momentum, Adam, AdamW and schedules are
    tested in tests/test_model.py)."""
    wrapped = keras_peft.wrap(tiny_mlp(), {".*": Rule(lr_scale=0.25)})
    compile_fit(wrapped, keras.optimizers.SGD(0.1), epochs=2)
    reference = compile_fit(tiny_mlp(), keras.optimizers.SGD(0.025), epochs=2)
    start = snapshot(tiny_mlp())
    for w, r in zip(wrapped.weights, reference.weights):
        np.testing.assert_allclose(w.numpy(), r.numpy(), rtol=1e-5, atol=1e-6, err_msg=w.path)
        assert not np.array_equal(w.numpy(), start[w.path])  # it did train


ADAPTIVE = [
    pytest.param(lambda: keras.optimizers.AdamW(1e-2), id="adamw"),
    pytest.param(lambda: keras.optimizers.RMSprop(1e-2), id="rmsprop"),
    pytest.param(lambda: keras.optimizers.Lion(1e-3), id="lion"),
]


def test_adagrad_only_partly_normalises_grad_scale_away():
    """concepts.md: "Adagrad only partly: its accumulator starts at
    `initial_accumulator_value` (0.1 in Keras) ... `grad_scale=0.1` still shrinks its steps
    (to about half, measured on a tiny MLP)." """
    scaled = keras_peft.wrap(tiny_mlp(), {".*": Rule(grad_scale=0.1)})
    compile_fit(scaled, keras.optimizers.Adagrad(0.1), epochs=2)
    plain = compile_fit(tiny_mlp(), keras.optimizers.Adagrad(0.1), epochs=2)
    start = snapshot(tiny_mlp())
    ratios = [np.linalg.norm(s.numpy() - start[s.path]) / np.linalg.norm(p.numpy() - start[p.path])
              for s, p in zip(scaled.weights, plain.weights)]
    assert all(0.1 < r < 0.95 for r in ratios), ratios  # neither SGD's 0.1 nor Adam's 1.0


@pytest.mark.parametrize("optimizer_fn", ADAPTIVE)
def test_adaptive_optimizers_normalise_grad_scale_away(optimizer_fn):
    """concepts.md: "AdamW, RMSprop and Lion normalise the gradient's scale away in the same
    way." faq.md: "Adam, AdamW, RMSprop and Lion normalise a constant gradient scale
    away." (Adam: tests/test_model.py.)
    Under SGD, grad_scale=0.1 would make every step 10 times smaller."""
    scaled = keras_peft.wrap(tiny_mlp(), {".*": Rule(grad_scale=0.1)})
    compile_fit(scaled, optimizer_fn(), epochs=2)
    plain = keras_peft.wrap(tiny_mlp(), {".*": Rule()})
    compile_fit(plain, optimizer_fn(), epochs=2)
    start = snapshot(tiny_mlp())
    for s, p in zip(scaled.weights, plain.weights):
        ratio = (np.linalg.norm(s.numpy() - start[s.path])
                 / np.linalg.norm(p.numpy() - start[p.path]))
        assert 0.9 < ratio < 1.1, (s.path, ratio)


def test_grad_scale_acts_before_gradient_clipping():
    """concepts.md:104: "`grad_scale` is for SGD, for gradient clipping (it acts before
    clipping), and for experiments" """
    model = keras_peft.wrap(tiny_mlp(), {".*": Rule(grad_scale=1000.0)})
    before = snapshot(model)
    model.compile(optimizer=keras.optimizers.SGD(0.01, clipvalue=1e-3), loss="mse")
    x, y = regression_data()
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)  # one step
    # Scaled by 1000 first, every gradient is clipped to +-1e-3: each value moves by
    # exactly lr * clipvalue (clipping first would give steps up to 1000 times that).
    for v in model.weights:
        np.testing.assert_allclose(np.abs(v.numpy() - before[v.path]), 0.01 * 1e-3,
                                   rtol=1e-2, err_msg=v.path)


# ---------------------------------------------------------------- unwrapping
def test_unwrap_restores_flags_that_were_false_before_wrap():
    """getting-started.md:166-167: "`keras_peft.unwrap(model)` restores the model's class
    and the `trainable` flags its variables had before `wrap`." """
    model = tiny_mlp()
    model.get_layer("block_0").kernel.trainable = False
    flags = [v.trainable for v in model.weights]
    keras_peft.wrap(model, {".*": Rule()})
    assert all(v.trainable for v in model.weights)  # the rule trains it
    keras_peft.unwrap(model)
    assert type(model) is keras.Sequential
    assert [v.trainable for v in model.weights] == flags


# ---------------------------------------------------------------------- FAQ
def test_rules_passed_to_a_reloaded_sequential_are_taken_as_written(tmp_path):
    """faq.md:26-33: "a Sequential reloaded from a `.keras` file loses the prefix. ...
    Rules you pass yourself to a reloaded model are taken as written." """
    tiny_mlp().save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    flags = [v.trainable for v in loaded.weights]
    with pytest.raises(keras_peft.UnmatchedRuleError, match=r"'mlp/block_0/\.\*' matched no"):
        keras_peft.wrap(loaded, {r"mlp/block_0/.*": Rule(trainable=False)})
    assert not keras_peft.is_wrapped(loaded)
    assert [v.trainable for v in loaded.weights] == flags
    keras_peft.wrap(loaded, {r"block_0/.*": Rule(trainable=False)})
    assert {v.path for v in loaded.weights if not v.trainable} == {"block_0/kernel",
                                                                   "block_0/bias"}


def test_batchnorm_set_untrainable_before_wrapping_keeps_its_statistics():
    """faq.md:51-53: "To freeze statistics too, set `layer.trainable = False` on those
    layers before wrapping (Keras then runs them in inference mode)." (strategies.md:86-87
    says the same.)"""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="body"),
                              keras.layers.BatchNormalization(name="bn"),
                              keras.layers.Dense(1, name="head")], name="bnnet")
    model.get_layer("bn").trainable = False
    keras_peft.wrap(model, {r".*head/.*": Rule(lr_scale=0.5)})
    before = snapshot(model)
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(3.0, 1.0, size=(64, 4)).astype("float32")
    model.fit(x, np.zeros((64, 1)), epochs=1, verbose=0)
    assert changed(before, model) == {"bnnet/body/kernel", "bnnet/body/bias",
                                      "bnnet/head/kernel", "bnnet/head/bias"}


CLONE_KINDS = ["sequential", "functional"]


@pytest.mark.parametrize("kind", CLONE_KINDS)
def test_clone_model_of_a_wrapped_model_is_a_plain_model_to_wrap_again(kind):
    """faq.md: "For a wrapped Sequential or functional model it returns a plain Keras
    model (every variable trainable again), not a wrapped one. Wrap the clone, e.g.
    `keras_peft.wrap(clone, keras_peft.get_rules(model))`" """
    model = two_dense(kind)
    keras_peft.wrap(model, {r".*body/.*": Rule(trainable=False)})
    clone = keras.models.clone_model(model)
    assert not keras_peft.is_wrapped(clone)
    assert not isinstance(clone, keras_peft.PeftModel)
    assert all(v.trainable for v in clone.weights)
    keras_peft.wrap(clone, keras_peft.get_rules(model))
    assert [v.path.rsplit("/", 2)[-2:] for v in clone.trainable_weights] == [
        ["head", "kernel"], ["head", "bias"]]
    before = snapshot(clone)
    compile_fit(clone)
    assert {p.rsplit("/", 2)[-2] for p in changed(before, clone)} == {"head"}


def test_clone_model_of_a_wrapped_subclassed_model_comes_back_wrapped_with_its_rules():
    """faq.md: "A wrapped subclassed model is cloned through its config, so the clone comes
    back wrapped, with the same rules (and new weights)." """
    model = two_dense("subclassed")
    keras_peft.wrap(model, {r".*body/.*": Rule(trainable=False)})
    clone = keras.models.clone_model(model)
    assert clone is not model and keras_peft.is_wrapped(clone)
    assert keras_peft.get_rules(clone) == keras_peft.get_rules(model)
    assert [v.path.rsplit("/", 2)[-2:] for v in clone.trainable_weights] == [
        ["head", "kernel"], ["head", "bias"]]
    before = snapshot(clone)
    compile_fit(clone)
    assert {p.rsplit("/", 2)[-2] for p in changed(before, clone)} == {"head"}
