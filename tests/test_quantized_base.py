"""keras-peft's adapters on a base Keras quantized to int8 (QLoRA-style): the kernel stays
int8 and is dequantized where it is used; the adapters train in float."""

import keras
import numpy as np
import pytest

import keras_peft
from tests.conftest import changed, snapshot

RNG = np.random.default_rng(0)


def quantized(seed=0, mode="int8"):
    keras.utils.set_random_seed(seed)
    x = keras.Input((6, 4))
    h = keras.layers.EinsumDense("btd,dhk->bthk", (6, 2, 3), bias_axes="hk", name="mix")(x)
    h = keras.layers.Reshape((6, 6))(h)
    h = keras.layers.Dense(8, activation="relu", name="dense")(h)
    h = keras.layers.Flatten()(h)
    model = keras.Model(x, keras.layers.Dense(1, name="head")(h), name="q")
    model.quantize(mode)
    return model


def data(n=16):
    x = RNG.normal(size=(n, 6, 4)).astype("float32")
    return x, x[:, :1, 0] * 2.0


def test_adapters_on_int8_compute_with_the_dequantized_kernel_and_train_alone():
    model = quantized()
    rules = keras_peft.lora(model, rank=2, targets=r"mix|dense")
    dense = model.get_layer("dense")
    assert dense._kernel.dtype == "int8"
    x, y = data()
    # step 0 (B = 0): the dequantized kernel's output, by numpy
    probe = keras.Model(model.input, [dense.input, dense.output])
    inputs, outputs = (np.asarray(t) for t in probe(x))
    w = np.asarray(dense._kernel, np.float32) / np.asarray(dense.kernel_scale)
    np.testing.assert_allclose(outputs, np.maximum(inputs @ w + np.asarray(dense.bias), 0),
                               atol=1e-5)
    keras_peft.wrap(model, rules)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    before = snapshot(model)
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    moved = changed(before, model)
    assert {p for p in moved if "lora" in p} == {
        f"{n}/lora_kernel_{m}" for n in ("mix", "dense") for m in "ab"}
    assert "dense/kernel" not in moved and "mix/kernel" not in moved  # int8, frozen
    assert dense._kernel.dtype == "int8"


def test_int8_delta_loads_onto_a_fresh_quantized_base_and_named_adapters_switch(tmp_path):
    model = quantized()
    keras_peft.lora(model, rank=2, targets=r"mix|dense", adapter="a")
    rules = keras_peft.lora(model, rank=2, targets=r"mix|dense", adapter="b", variant="dora")
    keras_peft.wrap(model, rules)
    for layer in (model.get_layer("mix"), model.get_layer("dense")):
        for a in layer._peft_adapters.values():
            a.by_key["b"].assign(0.3 * RNG.standard_normal(a.by_key["b"].shape))
    x = data(4)[0]
    out = {}
    for n in "ab":
        keras_peft.set_adapter(model, n)
        out[n] = model.predict(x, verbose=0)
        keras_peft.save_delta(model, tmp_path / f"{n}.safetensors", adapter=n)
    assert not np.allclose(out["a"], out["b"], atol=1e-4)
    fresh = quantized()
    for n in "ab":
        keras_peft.load_delta(fresh, tmp_path / f"{n}.safetensors")
    for n in "ab":
        keras_peft.set_adapter(fresh, n)
        np.testing.assert_allclose(fresh.predict(x, verbose=0), out[n], atol=1e-5)


def test_quantized_base_guards():
    model = quantized()
    with pytest.raises(ValueError, match="init='pissa' would write a float residual"):
        keras_peft.lora(model, rank=2, targets="dense", init="pissa")
    keras_peft.lora(model, rank=2, targets="dense")
    with pytest.raises(ValueError, match="Cannot merge LoRA into quantized layers"):
        keras_peft.merge(model)
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
    keras_peft.lora(plain, rank=2, targets=".*d")
    with pytest.raises(ValueError, match="Quantize first"):
        plain.quantize("int8")
    int4 = quantized(mode="int4")
    with pytest.raises(ValueError, match="quantized to 'int4'; keras-peft's adapters take int8"):
        keras_peft.lora(int4, rank=2, targets="dense")
    keras_peft.lora(int4, rank=2, targets="dense", implementation="keras")  # Keras' own: works


def test_int8_model_with_adapters_round_trips_through_a_keras_file(tmp_path):
    model = quantized()
    wrapped = keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r"mix|dense"))
    model.get_layer("dense").lora_kernel_b.assign(0.3 * RNG.standard_normal((2, 8)))
    x = data(4)[0]
    wrapped.save(tmp_path / "q.keras")
    loaded = keras.models.load_model(tmp_path / "q.keras")
    assert loaded.get_layer("dense")._kernel.dtype == "int8"
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)
