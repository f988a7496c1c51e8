"""keras-peft's factored adapters: each variant against a numpy computation of its formula,
merge/unmerge, saving, and the options' guards."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_peft
from keras_peft import Rule
from keras_peft.adapters import AdapterConfig, is_adapted, pissa_factors
from keras_peft.backends import keras3
from tests.conftest import changed, snapshot, tiny_mlp
from tests.helpers import tiny_bert_classifier

RNG = np.random.default_rng(0)
KINDS = "embed|conv|mix|dense"


def every_kind(seed=0):
    """Embedding -> Conv2D -> EinsumDense (two output axes) -> Dense(relu) -> head."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(10, 4, name="embed")(ids)
    h = keras.layers.Reshape((2, 3, 4))(h)
    h = keras.layers.Conv2D(5, 2, padding="same", name="conv")(h)
    h = keras.layers.Reshape((6, 5))(h)
    h = keras.layers.EinsumDense("btd,dhk->bthk", (6, 2, 3), bias_axes="hk", name="mix")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(3, activation="relu", name="dense")(h)
    return keras.Model(ids, keras.layers.Dense(1, name="head")(h), name="kinds")


def ids(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 10, size=(n, 6)).astype("int32")


def randomize(model, scale=0.3):
    """Nonzero adapters (B starts at zero) so the formulas are tested for real."""
    for layer in model.layers:
        if is_adapted(layer):
            for name, v in layer._peft_variables.items():
                if name.endswith(("_a", "_b", "_magnitude")):
                    v.assign(v.numpy() + scale * RNG.standard_normal(v.shape).astype("float32"))


def layer_io(model, name, x):
    """The input and output of layer `name` when `model` runs on `x`."""
    layer = model.get_layer(name)
    probe = keras.Model(model.input, [layer.input, layer.output])
    return [np.asarray(t) for t in probe(x)]


def numpy_reference(layer, x, config):
    """The layer's output from its variables, by the variant's formula, in float64."""
    p = "lora_embeddings" if isinstance(layer, keras.layers.Embedding) else "lora_kernel"
    v = {n: np.asarray(t, np.float64) for n, t in layer._peft_variables.items()}
    w = np.asarray(keras3.lora_base_variable(layer), np.float64)
    a, b = v[f"{p}_a"], v[f"{p}_b"]
    if isinstance(layer, keras.layers.Conv2D):  # A: 1x1 to r channels, B: k x k from r
        delta = np.einsum("ir,hwro->hwio", a, b).reshape(-1, w.shape[-1])
    else:
        delta = a @ b
    if isinstance(layer, keras.layers.EinsumDense):  # "btd,dhk->bthk": W as (d, h*k)
        w_mat = w.reshape(w.shape[0], -1)
    else:
        w_mat = w.reshape(-1, w.shape[-1])
    eff = w_mat + config.scale * delta
    if config.variant == "dora":
        eff = eff * (v[f"{p}_magnitude"] / np.linalg.norm(eff, axis=0))
    if isinstance(layer, keras.layers.Embedding):
        return eff[x]
    if isinstance(layer, keras.layers.Conv2D):  # same padding, stride 1, kernel 2x2
        xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        k = eff.reshape(w.shape)
        y = sum(np.einsum("nhwc,co->nhwo", xp[:, i:i + x.shape[1], j:j + x.shape[2]], k[i, j])
                for i in range(2) for j in range(2))
        return y + np.asarray(layer.bias)
    if isinstance(layer, keras.layers.EinsumDense):
        return np.einsum("btd,dhk->bthk", x, eff.reshape(w.shape)) + np.asarray(layer.bias)
    return np.maximum(x @ eff + np.asarray(layer.bias), 0)  # Dense, relu


VARIANTS = [
    dict(),
    dict(variant="dora"),
    dict(rslora=True, alpha=4),
    dict(init="pissa"),
    dict(variant="dora", init="pissa", alpha=3),
]


@pytest.mark.parametrize("options", VARIANTS,
                         ids=lambda o: ",".join(map(str, o.values())) or "lora")
def test_every_kind_and_variant_matches_its_numpy_formula(options):
    model = every_kind()
    x = ids()
    before = model.predict(x, verbose=0)
    keras_peft.lora(model, rank=2, targets=KINDS, **options)
    # Step 0 is unchanged: B = 0, DoRA's m = ||W||, PiSSA's residual + s A B = W.
    np.testing.assert_allclose(model.predict(x, verbose=0), before, atol=2e-6)
    randomize(model)
    for name in ("embed", "conv", "mix", "dense"):
        layer = model.get_layer(name)
        config = keras3.adapter_config(layer)
        assert config == AdapterConfig(rank=2, alpha=options.get("alpha", 2),
                                       variant=options.get("variant", "lora"),
                                       rslora=options.get("rslora", False),
                                       init=options.get("init", "default"))
        inputs, outputs = layer_io(model, name, x)
        np.testing.assert_allclose(outputs, numpy_reference(layer, inputs, config),
                                   rtol=1e-4, atol=1e-5, err_msg=name)


def test_scales_rslora_and_flat_einsum_shapes():
    assert AdapterConfig(rank=16, alpha=32).scale == 2
    assert AdapterConfig(rank=16, alpha=32, rslora=True).scale == 8
    model = every_kind()
    keras_peft.lora(model, rank=2, targets="mix")
    shapes = {v.path: tuple(v.shape) for v in model.weights if "lora" in v.path}
    assert shapes == {"mix/lora_kernel_a": (5, 2), "mix/lora_kernel_b": (2, 6)}  # in x r, r x out


def test_pissa_takes_the_top_singular_directions_and_keeps_the_residual():
    model = every_kind()
    w = model.get_layer("dense").kernel.numpy().astype(np.float64)
    keras_peft.lora(model, rank=2, alpha=4, targets="dense", init="pissa")
    layer = model.get_layer("dense")
    a, b = (v.numpy() for v in keras3.lora_adapters(layer))
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(2 * a @ b, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)  # s = 4/2
    np.testing.assert_allclose(keras3.lora_base_variable(layer).numpy(), w - 2 * a @ b,
                               atol=1e-6)
    a0, b0 = pissa_factors(w, 2, 2.0)
    np.testing.assert_allclose(a, a0, atol=1e-6)
    np.testing.assert_allclose(b, b0, atol=1e-6)
    with pytest.raises(ValueError, match=r"init='pissa' takes the top rank=3 .* 3 x 1 weight"):
        keras_peft.lora(model, rank=3, targets="head", init="pissa")


def test_dora_norm_gets_no_gradient_and_magnitude_trains():
    model = every_kind()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets="dense", variant="dora"))
    names = {v.path for v in model.trainable_weights}
    assert names == {"dense/lora_kernel_a", "dense/lora_kernel_b", "dense/lora_kernel_magnitude",
                     "head/kernel", "head/bias"}
    layer = model.get_layer("dense")
    randomize(model)
    x = tf.random.normal((4, 36))
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(layer(x))
    grad_m = tape.gradient(y, layer.lora_kernel_magnitude).numpy()
    # With the norm constant, d y / d m_j = sum over the batch of relu'(.) * (x W')_j / n_j.
    eff = layer._peft_effective_matrix().numpy()
    pre = x.numpy() @ eff * (layer.lora_kernel_magnitude.numpy() / np.linalg.norm(eff, axis=0))
    expected = ((pre + layer.bias.numpy() > 0) * (x.numpy() @ eff)).sum(0) / np.linalg.norm(
        eff, axis=0)
    np.testing.assert_allclose(grad_m, expected, rtol=1e-4)


def test_dropout_only_on_the_adapter_path():
    model = tiny_mlp()
    keras_peft.lora(model, rank=2, targets=r".*block_0", dropout=0.5)
    layer = model.get_layer("block_0")
    layer.lora_kernel_b.assign(np.ones((2, 8), "float32"))
    x = np.ones((64, 4), "float32")
    inference = np.asarray(layer(x, training=False))
    trained = np.asarray(layer(x, training=True))
    full = np.tanh(x @ layer.kernel.numpy() + x @ layer.lora_kernel_a.numpy()
                   @ layer.lora_kernel_b.numpy() + layer.bias.numpy())
    np.testing.assert_allclose(inference, full, rtol=1e-5, atol=1e-6)
    assert not np.allclose(trained, inference)  # the adapter's input was dropped
    # ... and only the adapter's: without it, the layer is its plain self in training too.
    layer.lora_kernel_b.assign(np.zeros((2, 8), "float32"))
    np.testing.assert_allclose(np.asarray(layer(x, training=True)),
                               np.tanh(x @ layer.kernel.numpy() + layer.bias.numpy()), atol=1e-6)


def test_loraplus_trains_b_at_ratio_times_the_learning_rate():
    def one_step(ratio):
        model = tiny_mlp()
        rules = keras_peft.lora(model, rank=2, targets=r".*block_0", loraplus_ratio=ratio)
        model.get_layer("block_0").lora_kernel_b.assign(np.full((2, 8), 0.1, "float32"))
        keras_peft.wrap(model, rules)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        before = snapshot(model)
        model.fit(np.ones((8, 4)), np.zeros((8, 1)), batch_size=8, epochs=1, verbose=0)
        after = snapshot(model)
        return rules, {p: after[p] - before[p] for p in before}

    _, plain = one_step(None)
    rules16, plus = one_step(16)
    assert list(rules16.items())[:2] == [
        (r"mlp/block_\d+/lora_kernel_b", Rule(lr_scale=16.0, note="lora B (LoRA+)")),
        (r"mlp/block_\d+/lora_kernel_a", Rule(note="lora"))]
    b, a = "mlp/block_0/lora_kernel_b", "mlp/block_0/lora_kernel_a"
    np.testing.assert_allclose(plus[b], 16 * plain[b], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(plus[a], plain[a], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match=r"`loraplus_ratio` must be a positive number"):
        keras_peft.lora(tiny_mlp(), rank=2, targets=".*", loraplus_ratio=0)


@pytest.mark.parametrize("options", VARIANTS[:2] + VARIANTS[4:], ids=["lora", "dora", "dora-pissa"])
def test_merge_is_exact_and_unmerge_restores_the_base(options):
    model = every_kind()
    keras_peft.lora(model, rank=2, targets=KINDS, **options)
    randomize(model)
    x = ids()
    adapted = model.predict(x, verbose=0)
    bases = {n: keras3.lora_base_variable(model.get_layer(n)).numpy() for n in KINDS.split("|")}
    keras_peft.merge(model)
    np.testing.assert_allclose(model.predict(x, verbose=0), adapted, rtol=1e-5, atol=1e-5)
    keras_peft.unmerge(model)
    for name, base in bases.items():
        np.testing.assert_allclose(keras3.lora_base_variable(model.get_layer(name)).numpy(), base,
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(model.predict(x, verbose=0), adapted, rtol=1e-5, atol=1e-5)


def test_model_save_and_load_model_keep_the_adapters(tmp_path):
    model = every_kind()
    keras_peft.lora(model, rank=2, targets=KINDS, variant="dora", init="pissa")
    randomize(model)
    x = ids()
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert [v.path for v in loaded.weights] == [v.path for v in model.weights]
    for name in KINDS.split("|"):
        assert keras3.adapter_config(loaded.get_layer(name)) == keras3.adapter_config(
            model.get_layer(name))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    # The adapters keep training after the round trip (Keras' LoRA reloads A = B = 0).
    assert np.abs(loaded.get_layer("dense").lora_kernel_a.numpy()).sum() > 0


def test_wrapped_keras_hub_model_round_trips_and_trains_only_adapters(tmp_path):
    model = tiny_bert_classifier()
    rules = keras_peft.lora(model, rank=2, targets="all-linear", variant="dora")
    layers = {p.split("/", 1)[1] for p in keras_peft.lora_layer_paths(model)
              if is_adapted(keras_peft.lora_layer_paths(model)[p])}
    assert layers == {f"{part}" for part in (
        "self_attention_layer/query", "self_attention_layer/key", "self_attention_layer/value",
        "self_attention_layer/attention_output", "feedforward_intermediate_dense",
        "feedforward_output_dense")}
    adapted = [p for p, layer in keras_peft.lora_layer_paths(model).items() if is_adapted(layer)]
    assert len(adapted) == 12 and not any("pooled" in p or "logits" in p for p in adapted)
    keras_peft.wrap(model, rules)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True))
    texts = ["the movie was good", "awful movie", "great fun", "bad"] * 2
    before = snapshot(model)
    model.fit(texts, np.array([1, 0, 1, 0] * 2), batch_size=4, epochs=1, verbose=0)
    moved = changed(before, model)
    assert moved and all("lora" in p or p.startswith("logits") for p in moved)
    expected = model.predict(texts, verbose=0)
    model.save(tmp_path / "bert.keras")
    loaded = keras.models.load_model(tmp_path / "bert.keras")
    np.testing.assert_allclose(loaded.predict(texts, verbose=0), expected, atol=1e-5)


def test_pissa_delta_loads_onto_a_fresh_base(tmp_path):
    model = every_kind()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=KINDS, init="pissa"))
    randomize(model)
    keras_peft.save_delta(model, tmp_path / "p.safetensors")
    fresh = keras_peft.load_delta(every_kind(), tmp_path / "p.safetensors")
    x = ids()
    np.testing.assert_allclose(fresh.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-5)
    assert keras3.adapter_config(fresh.get_layer("conv")).init == "pissa"


def test_option_guards_leave_the_model_unchanged():
    model = every_kind()
    before = [(v.path, v.numpy().tobytes()) for v in model.weights]
    with pytest.raises(ValueError, match=r"`variant` must be one of 'lora', 'dora'.*"
                                         r"Received: variant='vera'"):
        keras_peft.lora(model, rank=2, targets=KINDS, variant="vera")
    with pytest.raises(ValueError, match=r"`init` must be one of .*Received: init='olora'"):
        keras_peft.lora(model, rank=2, targets=KINDS, init="olora")
    with pytest.raises(ValueError, match=r"`dropout` must be a number in \[0, 1\)"):
        keras_peft.lora(model, rank=2, targets=KINDS, dropout=1.0)
    with pytest.raises(ValueError, match=r"implementation='keras'\) has only rank and alpha; "
                                         r"variant='dora'"):
        keras_peft.lora(model, rank=2, targets=KINDS, variant="dora", implementation="keras")
    with pytest.raises(ValueError, match=r"`implementation` must be one of"):
        keras_peft.lora(model, rank=2, targets=KINDS, implementation="peft")
    assert [(v.path, v.numpy().tobytes()) for v in model.weights] == before


def test_layers_a_flat_adapter_cannot_serve_are_refused_before_any_change():
    keras.utils.set_random_seed(0)
    x = keras.Input((4, 6))
    h = keras.layers.EinsumDense("abc,bcd->abd", (4, 4), name="per_position")(x)
    h = keras.layers.Conv1D(4, 2, groups=2, name="grouped")(h)
    model = keras.Model(x, keras.layers.Dense(1, name="head")(h))
    with pytest.raises(ValueError, match=r"'per_position': its equation 'abc,bcd->abd' has "
                                         r"kernel axes .*implementation='keras'"):
        keras_peft.lora(model, rank=2, targets="per_position|head")
    assert not any(is_adapted(layer) for layer in model.layers)
    with pytest.raises(ValueError, match=r"'grouped': it is a grouped convolution"):
        keras_peft.lora(model, rank=2, targets="grouped")
    rules = keras_peft.lora(model, rank=2, targets="per_position", implementation="keras")
    assert Rule(note="lora") in rules.values()
