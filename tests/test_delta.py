"""`save_delta` / `load_delta`: only trained variables, by path, validated before any change."""

import json
import os

import keras
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import keras_peft
from keras_peft import Rule
from keras_peft.backends import keras3
from keras_peft.state import state_of
from tests.conftest import compile_fit, regression_data, tiny_mlp
from tests.helpers import tiny_bert_classifier


def lora_mlp(seed=0, widths=(8, 8), trained=True):
    model = tiny_mlp(seed=seed, widths=widths)
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, alpha=4, targets=r".*block_\d"))
    if trained:
        compile_fit(model, epochs=2)
    return model


def header(path):
    with safetensors.safe_open(str(path), framework="np") as f:
        return json.loads(f.metadata()["keras_peft"]), sorted(f.keys())


def state(model):
    """Everything a failed load must leave alone."""
    return (
        [(v.path, v.trainable, v.numpy().tobytes()) for v in model.weights],
        [getattr(layer, "lora_enabled", None) for layer in model._flatten_layers()],
        keras_peft.is_wrapped(model),
    )


# ---------------------------------------------------------------- round trips
def test_lora_delta_round_trip_restores_predictions_rules_and_flags(tmp_path):
    model = lora_mlp()
    path = tmp_path / "run.safetensors"
    keras_peft.save_delta(model, path)

    meta, keys = header(path)
    trained = sorted(v.path for v in model.trainable_weights)
    assert keys == trained  # only the adapters and the head, by path
    assert meta["format"] == "keras_peft.delta" and meta["version"] == 2
    assert meta["lora"] == [
        {"layer": f"mlp/block_{i}", "adapter": "default", "rank": 2, "alpha": 4.0,
         "variant": "lora", "rslora": False, "dropout": 0.0, "init": "default",
         "implementation": "factored", "selected": True, "merged": False}
        for i in (0, 1)
    ]
    assert meta["rules"] == {p: r.get_config() for p, r in model.peft_rules.items()}
    assert meta["variables"]["mlp/block_0/lora_kernel_a"] == {
        "shape": [4, 2],
        "dtype": "float32",
        "trainable": True,
    }
    assert meta["keras_version"] == keras.__version__

    fresh = tiny_mlp(seed=0)  # the same base model, built again
    assert keras_peft.load_delta(fresh, path) is fresh
    x, _ = regression_data(8)
    np.testing.assert_allclose(fresh.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert keras_peft.get_rules(fresh) == keras_peft.get_rules(model)
    assert [(v.path, v.trainable) for v in fresh.weights] == [
        (v.path, v.trainable) for v in model.weights
    ]
    assert keras3.adapter_config(fresh.get_layer("block_0")).alpha == 4
    assert state_of(fresh).lora[-1]["layers"] == ["mlp/block_0", "mlp/block_1"]
    compile_fit(fresh)  # and it trains on


def test_bert_einsum_adapters_round_trip(tmp_path):
    model = tiny_bert_classifier()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2))
    rng = np.random.default_rng(0)
    for v in model.trainable_weights:  # stand-in for training
        v.assign(rng.normal(size=v.shape).astype("float32"))
    keras_peft.save_delta(model, tmp_path / "bert.safetensors")
    assert len(header(tmp_path / "bert.safetensors")[1]) == 10  # 4 layers x (A, B) + logits

    fresh = keras_peft.load_delta(tiny_bert_classifier(), tmp_path / "bert.safetensors")
    texts = ["the movie was good", "awful fun"]
    np.testing.assert_allclose(
        fresh.predict(texts, verbose=0), model.predict(texts, verbose=0), atol=1e-5
    )


def test_batchnorm_statistics_of_trainable_layers_are_saved(tmp_path):
    """`fit` updates moving statistics even when the rules freeze gamma and beta."""

    def cnn():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((6, 6, 2)),
                keras.layers.Conv2D(4, 3, name="conv"),
                keras.layers.BatchNormalization(name="bn"),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(1, name="head"),
            ],
            name="cnn",
        )

    model = cnn()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets="cnn/conv"))
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(16, 6, 6, 2)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, np.ones((16, 1)), epochs=1, verbose=0)
    keras_peft.save_delta(model, tmp_path / "cnn.safetensors")
    assert header(tmp_path / "cnn.safetensors")[1] == sorted(
        [
            "cnn/conv/lora_kernel_a",
            "cnn/conv/lora_kernel_b",
            "cnn/bn/moving_mean",
            "cnn/bn/moving_variance",
            "cnn/head/kernel",
            "cnn/head/bias",
        ]
    )
    fresh = keras_peft.load_delta(cnn(), tmp_path / "cnn.safetensors")
    np.testing.assert_allclose(fresh.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_unwrapped_model_saves_trainable_weights_and_loads_without_wrapping(tmp_path):
    model = tiny_mlp()
    model.get_layer("block_0").trainable = False
    compile_fit(model)
    keras_peft.save_delta(model, tmp_path / "plain.safetensors")
    meta, keys = header(tmp_path / "plain.safetensors")
    assert meta["rules"] is None and meta["lora"] == []
    assert keys == sorted(v.path for v in model.trainable_weights)
    fresh = keras_peft.load_delta(tiny_mlp(), tmp_path / "plain.safetensors")
    assert not keras_peft.is_wrapped(fresh)
    for a, b in zip(fresh.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_lora_delta_is_a_small_fraction_of_the_full_weights(tmp_path):
    def wide():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [keras.Input((256,))]
            + [keras.layers.Dense(512, activation="relu", name=f"block_{i}") for i in range(3)]
            + [keras.layers.Dense(10, name="head")],
            name="wide",
        )

    model = wide()
    keras_peft.wrap(model, keras_peft.lora(model, rank=4, targets=r".*block_\d"))
    keras_peft.save_delta(model, tmp_path / "delta.safetensors")
    full = wide()
    full.save_weights(str(tmp_path / "full.weights.h5"))
    ratio = os.path.getsize(tmp_path / "delta.safetensors") / os.path.getsize(
        tmp_path / "full.weights.h5"
    )
    assert ratio < 0.05, ratio


# ------------------------------------------------------------------- atomic
def test_crash_mid_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "run.safetensors"
    keras_peft.save_delta(lora_mlp(trained=False), path)
    old = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        keras_peft.save_delta(lora_mlp(), path)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["run.safetensors"]  # no temp file left behind


def test_merged_model_refuses_to_save(tmp_path):
    model = lora_mlp(trained=False)
    keras_peft.merge(model)
    with pytest.raises(ValueError, match=r"'mlp' is merged.*keras_peft.unmerge\(model\) first"):
        keras_peft.save_delta(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# --------------------------------------------- failures leave the model unchanged
@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
    path = tmp_path_factory.mktemp("delta") / "run.safetensors"
    keras_peft.save_delta(lora_mlp(), path)
    return path.read_bytes()


@pytest.fixture
def saved(tmp_path, saved_once):
    """A fresh copy of a trained LoRA MLP's delta, free to damage."""
    path = tmp_path / "run.safetensors"
    path.write_bytes(saved_once)
    return path


def _damage(path, how):
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) - 7])
    elif how == "garbage":
        path.write_bytes(b"this is not a safetensors file" * 4)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "bitflip":  # last byte of the data: only the checksum can tell
        path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0x40]))
    elif how == "foreign":  # a valid safetensors file, but not a delta
        safetensors.numpy.save_file({"w": np.ones(2, "float32")}, str(path))


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", r"Cannot read delta file '.*run.safetensors': .*truncated, corrupted"),
        ("garbage", r"Cannot read delta file '.*run.safetensors': .*header"),
        ("empty", r"Cannot read delta file '.*run.safetensors'"),
        ("bitflip", r"do not match the checksum.*corrupted"),
        ("foreign", r"not a keras_peft delta"),
    ],
)
def test_damaged_file_raises_and_leaves_model_unchanged(saved, how, message):
    _damage(saved, how)
    model = tiny_mlp()
    before = state(model)
    with pytest.raises(keras_peft.DeltaFileError, match=message):
        keras_peft.load_delta(model, saved)
    assert state(model) == before


def test_missing_file_raises(tmp_path):
    with pytest.raises(keras_peft.DeltaFileError, match=r"'.*nope.safetensors': it does not exist"):
        keras_peft.load_delta(tiny_mlp(), tmp_path / "nope.safetensors")


def test_delta_of_another_model_raises_and_leaves_model_unchanged(saved):
    keras.utils.set_random_seed(0)
    other = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, name="enc"),
            keras.layers.Dense(1, name="out"),
        ],
        name="other",
    )
    before = state(other)
    with pytest.raises(
        keras_peft.DeltaMismatchError, match=r"layer 'mlp/block_0' is not in the model"
    ):
        keras_peft.load_delta(other, saved)
    assert state(other) == before

    relabelled = _mlp_with_layer_names("layer_a", "layer_b", "head", name="mlp")
    before = state(relabelled)
    with pytest.raises(keras_peft.DeltaMismatchError, match=r"'mlp/block_0' is not in the model"):
        keras_peft.load_delta(relabelled, saved)
    assert state(relabelled) == before


def _mlp_with_layer_names(*names, name=None, widths=(8, 8, 1)):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,))] + [
        keras.layers.Dense(w, activation="tanh", name=n) for n, w in zip(names, widths)],
        name=name)


def test_a_delta_loads_onto_the_same_architecture_under_another_model_name(tmp_path):
    """Paths are relative to the model: its own name (made unique by Keras per process,
    `sequential` then `sequential_1`) is not part of the architecture."""
    def unnamed():  # the same code, run twice in one process
        return _mlp_with_layer_names("block_0", "block_1", "head")

    model = unnamed()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r".*block_\d"))
    compile_fit(model, epochs=2)
    keras_peft.save_delta(model, tmp_path / "run.safetensors")
    again = unnamed()
    assert again.name != model.name  # e.g. 'sequential_1' after 'sequential'
    restored = keras_peft.load_delta(again, tmp_path / "run.safetensors")
    x, _ = regression_data(8)
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)
    rename = lambda p: p.replace(f"{model.name}/", f"{again.name}/")  # noqa: E731
    assert {v.path for v in restored.trainable_weights} == {
        rename(v.path) for v in model.trainable_weights}
    assert len(restored.peft_rules) == len(model.peft_rules)


class SubclassedNet(keras.Model):
    def __init__(self, width=8, head="head", **kwargs):
        super().__init__(**kwargs)
        self.body = keras.layers.Dense(width, name="body")
        self.top = keras.layers.Dense(1, name=head)

    def call(self, x):
        return self.top(self.body(x))


def _subclassed(**kwargs):
    keras.utils.set_random_seed(0)
    model = SubclassedNet(**kwargs)
    model(np.zeros((1, 4), "float32"))
    return model


def test_a_subclassed_model_renamed_by_keras_loads_and_other_architectures_do_not(tmp_path):
    model = _subclassed()
    keras_peft.wrap(model, keras_peft.head_only(model))
    compile_fit(model)
    keras_peft.save_delta(model, tmp_path / "head.safetensors")
    again = _subclassed()  # 'subclassed_net_1': Keras made the name unique
    assert again.name != model.name
    keras_peft.load_delta(again, tmp_path / "head.safetensors")
    np.testing.assert_array_equal(again.top.kernel.numpy(), model.top.kernel.numpy())

    for other, what in ((_subclassed(width=16), "another shape"),
                        (_subclassed(head="out"), "does not have")):
        before = state(other)
        if what == "another shape":
            other.top.kernel.assign(np.zeros((16, 1), "float32"))
            before = state(other)
        with pytest.raises(keras_peft.DeltaMismatchError, match=what):
            keras_peft.load_delta(other, tmp_path / "head.safetensors")
        assert state(other) == before


def test_unknown_paths_name_the_first_few(tmp_path):
    model = tiny_mlp()
    keras_peft.wrap(model, keras_peft.head_only(model))
    keras_peft.save_delta(model, tmp_path / "head.safetensors")
    renamed = _mlp_with_layer_names("block_0", "block_1", "out", name="net")
    before = state(renamed)
    with pytest.raises(
        keras_peft.DeltaMismatchError,
        match=r"saved from model 'mlp' \(Sequential\)\) has 2 of 2 variables that "
        r"this model \('net'\) does not have, e.g. \['mlp/head/kernel', "
        r"'mlp/head/bias'\].*'net/out/kernel'",
    ):
        keras_peft.load_delta(renamed, tmp_path / "head.safetensors")
    assert state(renamed) == before


def test_shape_mismatch_raises_and_leaves_model_unchanged(saved):
    wider = tiny_mlp(widths=(8, 16))  # same paths, block_1 and head are wider
    before = state(wider)
    with pytest.raises(
        keras_peft.DeltaMismatchError,
        match=r"2 variable\(s\) have another shape or dtype: "
        r"mlp/block_1/lora_kernel_b: file \(2, 8\) float32, model \(2, 16\) float32",
    ):
        keras_peft.load_delta(wider, saved)
    assert state(wider) == before


def test_model_with_other_adapters_raises_unchanged(saved):
    model = tiny_mlp()
    model.get_layer("block_1").enable_lora(3)
    before = state(model)
    with pytest.raises(
        keras_peft.DeltaMismatchError,
        match=r"layer 'mlp/block_1' already has LoRA \(lora r=3 .*\[keras\]",
    ):
        keras_peft.load_delta(model, saved)
    assert state(model) == before


def test_rules_that_do_not_fit_raise_unchanged(tmp_path):
    model = tiny_mlp()
    keras_peft.wrap(model, {r".*block_0/.*": Rule(trainable=False), r".*": Rule()})
    keras_peft.save_delta(model, tmp_path / "r.safetensors")
    keras.utils.set_random_seed(0)
    # The saved variables (block_1, head) with the same shapes, but no block_0:
    # the first saved rule would match nothing.
    target = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(8, name="block_1"),
            keras.layers.Dense(1, name="head"),
        ],
        name="mlp",
    )
    before = state(target)
    with pytest.raises(
        keras_peft.DeltaMismatchError,
        match=r"rules saved in delta file .* do not fit model 'mlp'.*'\.\*block_0/\.\*' "
        r"matched no variable",
    ):
        keras_peft.load_delta(target, tmp_path / "r.safetensors")
    assert state(target) == before


def test_loading_twice_into_the_same_model_reuses_its_adapters(saved):
    model = keras_peft.load_delta(tiny_mlp(), saved)
    values = [v.numpy() for v in model.weights]
    n = len(model.weights)
    keras_peft.load_delta(model, saved)
    assert len(model.weights) == n
    for a, b in zip(values, model.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_int8_base_model_round_trip(tmp_path):
    """QLoRA-style: int8 base weights stay out of the delta."""

    def base():
        model = tiny_mlp()
        model.quantize("int8")
        return model

    model = base()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r".*block_\d",
                                           implementation="keras"))
    compile_fit(model)
    keras_peft.save_delta(model, tmp_path / "q.safetensors")
    assert "mlp/block_0/kernel" not in header(tmp_path / "q.safetensors")[1]
    fresh = keras_peft.load_delta(base(), tmp_path / "q.safetensors")
    x, _ = regression_data(8)
    np.testing.assert_allclose(fresh.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_a_delta_loads_onto_the_same_sequential_reloaded_from_a_keras_file(tmp_path):
    """Built in code, a Sequential's paths start with its name ('mlp/block_0/...');
    reloaded with load_model they do not. The delta fits once the name is dropped."""
    tiny_mlp().save(tmp_path / "base.keras")
    model = tiny_mlp()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r".*block_\d"))
    compile_fit(model, epochs=2)
    keras_peft.save_delta(model, tmp_path / "run.safetensors")

    base = keras.models.load_model(tmp_path / "base.keras")
    assert base.weights[0].path == "block_0/kernel"
    restored = keras_peft.load_delta(base, tmp_path / "run.safetensors")
    x, _ = regression_data(8)
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)
    assert list(restored.peft_rules) == [p.removeprefix("mlp/") for p in model.peft_rules]
    assert {v.path for v in restored.trainable_weights} == {
        v.path.removeprefix("mlp/") for v in model.trainable_weights}
