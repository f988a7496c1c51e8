"""`lora`: adapters as rules (keras-peft's, and Keras' own with implementation="keras");
`merge` and `unmerge`. The variants' formulas are tested in test_adapters.py."""

import keras
import numpy as np
import pytest

import keras_peft
from keras_peft import Rule
from keras_peft.adapters import is_adapted
from keras_peft.backends import keras3
from keras_peft.state import state_of
from tests.conftest import changed, compile_fit, regression_data, snapshot, tiny_mlp
from tests.helpers import tiny_bert_classifier

QV = [f"transformer_layer_{i}/self_attention_layer/{n}" for i in (0, 1) for n in ("query", "value")]
ADAPTERS = {f"{p}/lora_kernel_{ab}" for p in QV for ab in "ab"}
TEXTS = ["the movie was good", "the movie was bad", "great fun", "awful movie"] * 2
LABELS = np.array([1, 0, 1, 0] * 2)


def every_kind(seed=0):
    """Embedding -> Conv1D -> EinsumDense -> Dense: one layer of each LoRA kind."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(10, 4, name="embed")(tokens)
    h = keras.layers.Conv1D(4, 3, padding="same", name="conv")(h)
    h = keras.layers.EinsumDense("btd,de->bte", (None, 4), bias_axes="e", name="mix")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dense(3, name="dense")(h)
    return keras.Model(tokens, keras.layers.Dense(1, name="head")(h), name="kinds")


def tokens(n=8, seed=0):
    return np.random.default_rng(seed).integers(0, 10, size=(n, 6)).astype("int32")


def effective(layer):
    """The weight an adapted layer computes with (either implementation)."""
    if is_adapted(layer):
        return keras.ops.convert_to_numpy(layer.effective_weight())
    return (layer.embeddings if isinstance(layer, keras.layers.Embedding) else layer.kernel).numpy()


def state(model):
    """Everything an error must leave alone: paths, values, flags."""
    return [(v.path, v.trainable, v.numpy().tobytes()) for v in model.weights]


# ---------------------------------------------------------------- training
def test_bert_lora_trains_only_adapters_and_head_base_kernels_bit_identical():
    model = tiny_bert_classifier()
    rules = keras_peft.lora(model, rank=2)
    assert list(rules.values()) == [
        Rule(note="lora"),
        Rule(trainable=False),
        Rule(),
        Rule(trainable=False),
    ]
    assert [r.note for r in rules.values()] == ["lora", "lora base", "head", "frozen"]
    keras_peft.wrap(model, rules)
    assert set(keras_peft.lora_layer_paths(model)) >= set(QV)
    assert {v.path for v in model.trainable_weights} == ADAPTERS | {"logits/kernel", "logits/bias"}

    layers = keras_peft.lora_layer_paths(model)
    before_effective = {p: effective(layers[p]) for p in QV}
    before = snapshot(model)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2, name="adam"),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(TEXTS, LABELS, batch_size=4, epochs=1, verbose=0)

    # Only adapters and head change. (Some A matrices barely move here: A gets
    # no gradient while B is zero, and this tiny model's last-layer query
    # gradients are ~1e-12; every B and every effective kernel does move.)
    moved = changed(before, model)
    assert moved <= ADAPTERS | {"logits/kernel", "logits/bias"}
    assert moved >= {p for p in ADAPTERS if p.endswith("_b")} | {"logits/kernel", "logits/bias"}
    for p in QV:
        base = keras3.lora_base_variable(layers[p])
        np.testing.assert_array_equal(base.numpy(), before[base.path])  # bit-identical
        assert not np.allclose(effective(layers[p]), before_effective[p])  # effective moved
    slots = {v.path for v in model.optimizer.variables} - {"adam/iteration", "adam/learning_rate"}
    slot_owners = {s.removeprefix("adam/").rsplit("_", 1)[0] for s in slots}
    assert slot_owners == {p.replace("/", "_") for p in ADAPTERS | {"logits/kernel", "logits/bias"}}


def test_adapters_are_float32_with_their_shapes_and_record():
    model = every_kind()
    rules = keras_peft.lora(model, rank=2, alpha=8, targets="embed|conv|mix|dense")
    shapes = {v.path: tuple(v.shape) for v in model.weights if "lora" in v.path}
    assert shapes == {
        "embed/lora_embeddings_a": (10, 2),
        "embed/lora_embeddings_b": (2, 4),
        "conv/lora_kernel_a": (4, 2),  # a 1x1 convolution to the rank's channels,
        "conv/lora_kernel_b": (3, 2, 4),  # then the layer's kernel size from them
        "mix/lora_kernel_a": (4, 2),
        "mix/lora_kernel_b": (2, 4),
        "dense/lora_kernel_a": (4, 2),
        "dense/lora_kernel_b": (2, 3),
    }
    assert {v.dtype for v in model.weights if "lora" in v.path} == {"float32"}
    assert state_of(model).lora == [
        {
            "rank": 2,
            "alpha": 8.0,
            "variant": "lora",
            "rslora": False,
            "dropout": 0.0,
            "init": "default",
            "implementation": "factored",
            "adapter": "default",
            "targets": "embed|conv|mix|dense",
            "layers": ["embed", "conv", "mix", "dense"],
        }
    ]
    assert keras3.adapter_config(model.get_layer("dense")).scale == 4
    keras_peft.wrap(model, rules)
    assert {v.path for v in model.trainable_weights} == set(shapes) | {"head/kernel", "head/bias"}


def test_alpha_defaults_to_rank_and_rest_none_leaves_others_undecided():
    model = tiny_mlp()
    rules = keras_peft.lora(model, rank=3, targets=r".*block_0", rest=None)
    assert keras3.adapter_config(model.get_layer("block_0")).alpha == 3
    assert ".*" not in rules
    plan = keras_peft.wrap(model, rules).peft_plan.by_path()
    assert plan["mlp/block_1/kernel"].pattern is None  # a later rule set decides


def test_lora_then_fit_on_plain_keras_without_wrap():
    """Without wrap, Keras' own flags apply: lora freezes the base kernels, as enable_lora."""
    model = tiny_mlp()
    keras_peft.lora(model, rank=2, targets=r".*block_\d")
    before = snapshot(model)
    compile_fit(model)
    assert {"mlp/block_0/kernel", "mlp/block_1/kernel"}.isdisjoint(changed(before, model))


# ------------------------------------------------------------------ guards
@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "4", None])
def test_rank_must_be_positive_int(rank):
    model = tiny_mlp()
    with pytest.raises(
        ValueError, match=rf"`rank` must be a positive integer.*Received: rank={rank!r}"
    ):
        keras_peft.lora(model, rank=rank, targets=".*")


@pytest.mark.parametrize("alpha", [0, -2, float("nan"), float("inf"), "8", True])
def test_alpha_must_be_positive_number(alpha):
    with pytest.raises(
        ValueError, match=r"`alpha` must be a positive number or None.*Received: alpha="
    ):
        keras_peft.lora(tiny_mlp(), rank=2, alpha=alpha, targets=".*")


def test_no_match_names_candidates_and_leaves_model_unchanged():
    model = tiny_mlp()
    before = state(model)
    with pytest.raises(
        keras_peft.LoraTargetError,
        match=r"(?s)targets='block_0' matched no layer.*'\.\*block_0\.\*' would match 1.*"
              r"mlp/block_0",
    ):
        keras_peft.lora(model, rank=2, targets="block_0")  # missing the model's prefix
    with pytest.raises(keras_peft.LoraTargetError, match=r"no layer path contains this one"):
        keras_peft.lora(tiny_bert_classifier(), rank=2, targets=".*bert_backbone")
    assert state(model) == before


def test_bad_targets_and_rest():
    with pytest.raises(ValueError, match=r"not a valid regular expression"):
        keras_peft.lora(tiny_mlp(), rank=2, targets="(")
    with pytest.raises(ValueError, match=r"non-empty regex string.*Received: targets=3"):
        keras_peft.lora(tiny_mlp(), rank=2, targets=3)
    with pytest.raises(ValueError, match=r"`rest` must be a keras_peft.Rule or None"):
        keras_peft.lora(tiny_mlp(), rank=2, targets=".*", rest=False)


def test_already_enabled_layer_raises_before_any_change():
    model = tiny_mlp()
    model.get_layer("block_1").enable_lora(2)
    before = state(model)
    with pytest.raises(
        ValueError, match=r"Layer 'mlp/block_1' already has LoRA adapters \(lora r=2 .*keras"
    ):
        keras_peft.lora(model, rank=4, targets=r".*block_\d")
    assert state(model) == before  # block_0 was not given adapters either


def test_constrained_layer_raises_before_any_change():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, name="a"),
            keras.layers.Dense(4, kernel_constraint="non_neg", name="b"),
            keras.layers.Dense(1, name="head"),
        ],
        name="c",
    )
    before = state(model)
    with pytest.raises(
        ValueError, match=r"Cannot enable LoRA on layer 'c/b': it has a weight constraint"
    ):
        keras_peft.lora(model, rank=2, targets="c/(a|b)")
    assert state(model) == before


def test_unbuilt_model_raises():
    with pytest.raises(ValueError, match=r"has no weights yet. Build it first"):
        keras_peft.lora(keras.Sequential([keras.layers.Dense(2)]), rank=2, targets=".*")


# ------------------------------------------------------------ merge/unmerge
def _trained_every_kind():
    model = every_kind()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, alpha=4, targets="embed|conv|mix|dense"))
    model.compile(optimizer=keras.optimizers.Adam(5e-2), loss="mse")
    model.fit(tokens(16), np.ones((16, 1)), epochs=2, verbose=0)
    return model


def test_merge_equals_adapted_model_and_unmerge_restores():
    model = _trained_every_kind()
    x = tokens()
    layers = {p: layer for p, layer in keras_peft.lora_layer_paths(model).items() if p != "head"}
    merged_values = {p: effective(layer) for p, layer in layers.items()}
    base = {p: keras3.lora_base_variable(layer).numpy() for p, layer in layers.items()}
    before = model.predict(x, verbose=0)  # traced with the adapters in

    assert keras_peft.merge(model) is model
    for p, layer in layers.items():
        assert not keras3.lora_active(layer)
        np.testing.assert_allclose(
            keras3.lora_base_variable(layer).numpy(), merged_values[p], atol=1e-6
        )
    np.testing.assert_allclose(model.predict(x, verbose=0), before, atol=1e-5)

    keras_peft.unmerge(model)
    for p, layer in layers.items():
        assert keras3.lora_active(layer)
        np.testing.assert_allclose(keras3.lora_base_variable(layer).numpy(), base[p], atol=1e-6)
    np.testing.assert_allclose(model.predict(x, verbose=0), before, atol=1e-5)


def test_merge_twice_and_unmerge_unmerged_raise():
    model = _trained_every_kind()
    with pytest.raises(ValueError, match=r"'kinds' is not merged, so there is nothing to unmerge"):
        keras_peft.unmerge(model)
    keras_peft.merge(model)
    values = snapshot(model)
    with pytest.raises(ValueError, match=r"'kinds' is merged already \(4 layers\).*unmerge"):
        keras_peft.merge(model)
    assert changed(values, model) == set()
    with pytest.raises(ValueError, match=r"has no LoRA adapters to merge.*keras_peft.lora"):
        keras_peft.merge(tiny_mlp())


def test_merged_weights_load_into_a_plain_base_model(tmp_path):
    """The serving path: a merged model's save_weights fits the model without LoRA."""
    model = tiny_mlp()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r".*block_\d"))
    compile_fit(model, epochs=2)
    x, _ = regression_data(8)
    expected = model.predict(x, verbose=0)
    keras_peft.merge(model)
    model.save_weights(str(tmp_path / "merged.weights.h5"))
    plain = tiny_mlp(seed=5)
    plain.load_weights(str(tmp_path / "merged.weights.h5"))
    np.testing.assert_allclose(plain.predict(x, verbose=0), expected, atol=1e-5)


def test_keras_load_model_zeroes_both_adapters(tmp_path):
    """Keras behaviour worth knowing: a saved LoRA model reloads with A = B = 0
    (the adapters merged into the kernel), so training its adapters further
    starts at a saddle point where both gradients are zero. keras-peft's own adapters
    keep their values (test_adapters.py)."""
    model = tiny_mlp()
    keras_peft.lora(model, rank=2, targets=r".*block_0", implementation="keras")
    model.get_layer("block_0").lora_kernel_b.assign(np.ones((2, 8)))
    model.save(str(tmp_path / "m.keras"))
    loaded = keras.models.load_model(str(tmp_path / "m.keras"))
    layer = loaded.get_layer("block_0")
    assert layer.lora_enabled
    assert not layer.lora_kernel_a.numpy().any() and not layer.lora_kernel_b.numpy().any()
    x, _ = regression_data(4)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_int8_layers_take_keras_adapters_and_refuse_merge():
    # keras-peft's own adapters on int8 are covered in test_quantized_base.py; Keras'
    # own LoRA on an int8 layer still works through implementation="keras".
    model = tiny_mlp()
    model.quantize("int8")
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r".*block_\d",
                                           implementation="keras"))
    assert {v.path for v in model.trainable_weights} == {
        f"mlp/block_{i}/lora_kernel_{ab}" for i in (0, 1) for ab in "ab"
    } | {"mlp/head/bias"}
    assert model.get_layer("block_0")._kernel.dtype == "int8"
    with pytest.raises(
        ValueError, match=r"Cannot merge LoRA into quantized layers \['mlp/block_0'"
    ):
        keras_peft.merge(model)


def test_lora_refuses_a_layer_frozen_the_keras_way_before_any_change():
    model = tiny_mlp()
    model.get_layer("block_0").trainable = False
    with pytest.raises(keras_peft.FrozenLayerError, match=r"'block_0' \(1 variable\)"):
        keras_peft.lora(model, rank=2, targets=r".*block_\d")
    assert not any(is_adapted(layer) for layer in model.layers)
    rules = keras_peft.lora(model, rank=2, targets=r".*block_1")  # the others are fine
    assert keras_peft.wrap(model, rules)


def test_a_list_of_targets_is_their_union_and_each_must_match():
    model = tiny_mlp()
    before = state(model)
    with pytest.raises(keras_peft.LoraTargetError, match=r"targets='hed' matched no layer"):
        keras_peft.lora(model, rank=2, targets=["all-linear", "hed"])  # a typo is not dropped
    assert state(model) == before
    for bad in ([], ["all-linear", ""], [r".*block_0", 3], {"all-linear"}):
        with pytest.raises(ValueError, match=r"or a list of them \(their union"):
            keras_peft.lora(model, rank=2, targets=bad)
    with pytest.raises(ValueError, match=r"targets='\(' is not a valid regular expression"):
        keras_peft.lora(model, rank=2, targets=["all-linear", "("])
    assert state(model) == before
    rules = keras_peft.lora(model, rank=2, targets=["all-linear", r".*head"], train_head=False)
    keras_peft.wrap(model, rules)
    assert [v.path for v in model.trainable_weights] == [
        f"mlp/{layer}/lora_kernel_{ab}" for layer in ("block_0", "block_1", "head")
        for ab in "ab"]
    assert state_of(model).lora[0]["targets"] == ["all-linear", r".*head"]
