"""Named adapters: several per layer, selection, disabling, deletion, weighted combinations,
per-adapter merge and checkpoints, on Keras 3 and tf.keras."""

import keras
import numpy as np
import pytest

import keras_peft
from keras_peft.adapters.layer import AdapterSelectionError
from tests.conftest import changed, snapshot
from tests.test_lora_adapters import KINDS, every_kind

RNG = np.random.default_rng(0)


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="relu", name="block_0"),
        keras.layers.Dense(8, activation="relu", name="block_1"),
        keras.layers.Dense(1, name="head"),
    ], name="mlp")


def data(n=32):
    x = RNG.normal(size=(n, 4)).astype("float32")
    return x, x[:, :1] * 2.0


def paths(variables):
    return sorted(v.path for v in variables)


def nonzero(model, names):
    """Random adapter values (B starts at zero), so each adapter changes the output."""
    for info in keras_peft.adapters(model).values():
        if info.name not in names:
            continue
        for layer in keras_peft.all_layers(model):
            if info.name in getattr(layer, "_peft_adapters", {}):
                for k, v in layer._peft_adapters[info.name].by_key.items():
                    if k in ("a", "b"):
                        v.assign(0.3 * RNG.standard_normal(v.shape).astype("float32"))


def two_adapters(model_fn=mlp, targets=r".*block_\d", **kw):
    model = model_fn()
    rules_a = keras_peft.lora(model, rank=2, targets=targets, adapter="a", **kw)
    rules_b = keras_peft.lora(model, rank=2, targets=targets, adapter="b", **kw)
    return model, rules_a, rules_b


def test_named_adapters_have_their_own_variables_and_the_newest_is_selected():
    model, _, _ = two_adapters()
    names = [v.path for v in model.layers[0].weights]
    assert names == ["mlp/block_0/kernel", "mlp/block_0/bias", "mlp/block_0/lora_kernel_a__a",
                     "mlp/block_0/lora_kernel_b__a", "mlp/block_0/lora_kernel_a__b",
                     "mlp/block_0/lora_kernel_b__b"]
    info = keras_peft.adapters(model)
    assert list(info) == ["a", "b"]
    assert info["a"].layers == ("mlp/block_0", "mlp/block_1")
    assert info["a"].parameters == (4 * 2 + 2 * 8) + (8 * 2 + 2 * 8)
    assert (info["a"].selected, info["b"].selected) == (False, True)
    # unwrapped Keras 3: the adapters' own flags follow the selection
    assert [p for p in paths(model.trainable_weights) if "lora" in p] == [
        "mlp/block_0/lora_kernel_a__b", "mlp/block_0/lora_kernel_b__b",
        "mlp/block_1/lora_kernel_a__b", "mlp/block_1/lora_kernel_b__b"]


def test_fit_trains_only_the_selected_adapter_and_switching_trains_the_other():
    model, _, rules_b = two_adapters()
    keras_peft.wrap(model, rules_b)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x, y = data()
    before = snapshot(model)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    moved = changed(before, model)
    assert {p for p in moved if "lora" in p} == {
        f"mlp/block_{i}/lora_kernel_{m}__b" for i in (0, 1) for m in "ab"}
    keras_peft.set_adapter(model, "a")  # the rules cover every adapter of their layers
    before = snapshot(model)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    moved = changed(before, model)
    assert {p for p in moved if "lora" in p} == {
        f"mlp/block_{i}/lora_kernel_{m}__a" for i in (0, 1) for m in "ab"}
    plan = model.peft_plan.by_path()
    assert plan["mlp/block_0/lora_kernel_a__b"].rule.note == "adapter 'b' not selected"
    assert plan["mlp/block_0/lora_kernel_a__b"].trainable is False


def test_several_selected_adapters_add_up_and_the_output_switches_with_the_selection():
    model, _, _ = two_adapters(targets=r".*block_0")
    nonzero(model, {"a", "b"})
    layer, x = model.layers[0], data(4)[0]
    w, bias = np.asarray(layer._kernel), np.asarray(layer.bias)

    def delta(n):
        a = layer._peft_adapters[n]
        return np.asarray(a.by_key["a"]) @ np.asarray(a.by_key["b"]) * a.config.scale

    for selection, d in ((["a"], delta("a")), (["b"], delta("b")),
                         (["a", "b"], delta("a") + delta("b"))):
        keras_peft.set_adapter(model, selection)
        expected = np.maximum(x @ (w + d) + bias, 0)
        np.testing.assert_allclose(np.asarray(layer(x)), expected, atol=1e-5)


def test_switching_back_reuses_the_traced_predict_function_and_predicts_right():
    model, _, rules_b = two_adapters()
    keras_peft.wrap(model, rules_b)
    nonzero(model, {"a", "b"})
    x = data(4)[0]
    out_b, traced_b = model.predict(x, verbose=0), model.predict_function
    keras_peft.set_adapter(model, "a")
    assert model.predict_function is None  # a selection not traced yet
    out_a = model.predict(x, verbose=0)
    keras_peft.set_adapter(model, "b")
    assert model.predict_function is traced_b
    np.testing.assert_array_equal(model.predict(x, verbose=0), out_b)
    keras_peft.set_adapter(model, "a")
    np.testing.assert_array_equal(model.predict(x, verbose=0), out_a)
    keras_peft.merge(model)  # any other change forgets them
    keras_peft.unmerge(model)
    keras_peft.set_adapter(model, "b")
    assert model.predict_function is None


def test_set_adapter_guards():
    model, _, _ = two_adapters()
    with pytest.raises(ValueError, match=r"no adapter named 'c'; its adapters: \['a', 'b'\]"):
        keras_peft.set_adapter(model, "c")
    with pytest.raises(ValueError, match="adapter name or a non-empty list"):
        keras_peft.set_adapter(model, [])
    keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="d", variant="dora")
    with pytest.raises(AdapterSelectionError, match="DoRA adapter \\('d'\\).*computes alone"):
        keras_peft.set_adapter(model, ["a", "d"])
    assert keras_peft.adapters(model)["d"].selected  # unchanged by the refused call


def test_rules_made_before_an_adapter_existed_refuse_to_select_it_untrained():
    model = mlp()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="a"))
    keras_peft.lora(model, rank=2, targets=r".*block_1", adapter="b")  # other layers
    keras_peft.set_adapter(model, "a")
    with pytest.raises(ValueError, match="would compute without training"):
        keras_peft.set_adapter(model, "b")
    assert keras_peft.adapters(model)["a"].selected  # put back


def test_train_head_false_leaves_everything_outside_the_adapter_frozen():
    model = mlp()
    rules = keras_peft.lora(model, rank=2, targets=r".*(block_\d|head)", adapter="t",
                            train_head=False)
    assert "head" not in [r.note for r in rules.values()]
    keras_peft.wrap(model, rules)
    assert all(v.path.endswith("__t") for v in model.trainable_weights)
    with pytest.raises(ValueError, match="`train_head` must be True or False"):
        keras_peft.lora(mlp(), rank=2, targets=r".*block_0", train_head="no")


def test_lora_adapter_name_guards():
    model = mlp()
    with pytest.raises(ValueError, match="An adapter name must be"):
        keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="bad name")
    with pytest.raises(ValueError, match="An adapter name must be"):
        keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="a__b")
    with pytest.raises(ValueError, match="named adapters need keras-peft's layers"):
        keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="k", implementation="keras")
    keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="a")
    with pytest.raises(ValueError, match="give the new one another name"):
        keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="a")


def test_disable_adapters_runs_the_base_model_and_switches_back():
    model = mlp()
    x = data(4)[0]
    base = model.predict(x, verbose=0)
    keras_peft.lora(model, rank=2, targets=r".*block_\d", adapter="a")
    nonzero(model, {"a"})
    adapted = model.predict(x, verbose=0)
    assert not np.allclose(adapted, base, atol=1e-4)
    with keras_peft.disable_adapters(model):
        np.testing.assert_allclose(model.predict(x, verbose=0), base, atol=1e-6)
    np.testing.assert_allclose(model.predict(x, verbose=0), adapted, atol=1e-6)
    keras_peft.merge(model)
    with (pytest.raises(ValueError, match="merged into its base weights"),
          keras_peft.disable_adapters(model)):
        pass
    with pytest.raises(ValueError, match="no adapters to disable"), \
            keras_peft.disable_adapters(mlp()):
        pass


def test_delete_adapter_removes_its_variables_and_rules_and_training_goes_on():
    model, _, rules_b = two_adapters()
    keras_peft.wrap(model, rules_b)
    model.compile(optimizer="adam", loss="mse")
    x, y = data()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    keras_peft.delete_adapter(model, "b")
    assert all("__b" not in v.path for v in model.weights)
    assert list(keras_peft.adapters(model)) == ["a"]
    assert not keras_peft.adapters(model)["a"].selected  # b was the selected one
    keras_peft.set_adapter(model, "a")
    before = snapshot(model)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert "mlp/block_0/lora_kernel_b__a" in changed(before, model)
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        keras_peft.delete_adapter(model, "b")
    keras_peft.merge(model)
    with pytest.raises(ValueError, match="is merged into the base weights"):
        keras_peft.delete_adapter(model, "a")


def _matrix_delta(layer, name):
    """`s * A @ B` of adapter `name` in the layer's matrix view, float64."""
    spec = layer._peft_spec
    a = layer._peft_adapters[name]
    d = spec.delta_weight(layer, np.asarray(a.by_key["a"], np.float64),
                          np.asarray(a.by_key["b"], np.float64), layer._peft_weight_shape)
    return a.config.scale * np.asarray(spec.factor_matrix(layer, d))


@pytest.mark.parametrize("layer_name", ["embed", "conv", "mix", "dense"])
def test_add_weighted_adapter_methods_match_their_numpy_definitions(layer_name):
    model = every_kind()
    keras_peft.lora(model, rank=2, alpha=4, targets=KINDS, adapter="a")
    keras_peft.lora(model, rank=2, alpha=2, targets=KINDS, adapter="b")
    nonzero(model, {"a", "b"})
    weights = {"a": 0.7, "b": -0.4}
    for method in ("cat", "svd", "linear"):
        keras_peft.add_weighted_adapter(model, weights, f"m_{method}", method=method,
                                        rank=4 if method == "svd" else None)
    layer = model.get_layer(layer_name)
    total = 0.7 * _matrix_delta(layer, "a") - 0.4 * _matrix_delta(layer, "b")
    np.testing.assert_allclose(_matrix_delta(layer, "m_cat"), total, atol=1e-5)
    assert layer._peft_adapters["m_cat"].config.rank == 4
    # svd at rank 4 >= rank(total): exact; at rank 1: numpy's best rank-1 approximation
    np.testing.assert_allclose(_matrix_delta(layer, "m_svd"), total, atol=1e-5)
    keras_peft.add_weighted_adapter(model, weights, "m_svd1", method="svd", rank=1)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    np.testing.assert_allclose(_matrix_delta(layer, "m_svd1"), s[0] * np.outer(u[:, 0], vt[0]),
                               atol=1e-5)
    # linear: A = sum sqrt(|w| s) A_i, B = sum sign(w) sqrt(|w| s) B_i (with cross terms)
    fa = {n: np.asarray(layer._peft_adapters[n].by_key["a"], np.float64) for n in "ab"}
    fb = {n: np.asarray(layer._peft_adapters[n].by_key["b"], np.float64) for n in "ab"}
    c = {"a": np.sqrt(0.7 * 2.0), "b": np.sqrt(0.4 * 1.0)}
    lin = layer._peft_adapters["m_linear"]
    np.testing.assert_allclose(np.asarray(lin.by_key["a"]), c["a"] * fa["a"] + c["b"] * fa["b"],
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(lin.by_key["b"]), c["a"] * fb["a"] - c["b"] * fb["b"],
                               atol=1e-5)
    # the combined adapters are added, not selected
    assert keras_peft.adapters(model)["b"].selected
    assert not keras_peft.adapters(model)["m_cat"].selected


def test_add_weighted_adapter_guards():
    model, _, _ = two_adapters()
    keras_peft.lora(model, rank=3, targets=r".*block_\d", adapter="r3")
    keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="one")
    keras_peft.lora(model, rank=2, targets=r".*block_\d", adapter="d", variant="dora")
    cases = [
        (({"a": 1.0}, "b"), "has an adapter named 'b' already"),
        (({"a": 1.0, "zz": 1.0}, "n"), "no adapter named 'zz'"),
        (({}, "n"), "non-empty dict"),
        (({"a": float("nan")}, "n"), "finite number"),
        (({"a": 1.0, "one": 1.0}, "n"), "on different layers"),
        (({"a": 1.0, "d": 1.0}, "n"), "is DoRA"),
    ]
    for (weights, name), message in cases:
        with pytest.raises(ValueError, match=message):
            keras_peft.add_weighted_adapter(model, weights, name)
    with pytest.raises(ValueError, match="needs one rank; these have ranks \\[2, 3\\]"):
        keras_peft.add_weighted_adapter(model, {"a": 1.0, "r3": 1.0}, "n", method="linear")
    with pytest.raises(ValueError, match="`method` must be one of"):
        keras_peft.add_weighted_adapter(model, {"a": 1.0}, "n", method="ties")
    assert "n" not in keras_peft.adapters(model)


def test_merge_one_adapter_keeps_predictions_and_unmerge_restores_the_weight():
    model, _, _ = two_adapters(targets=r".*block_0")
    nonzero(model, {"a", "b"})
    keras_peft.set_adapter(model, ["a", "b"])
    x = data(4)[0]
    before, kernel = model.predict(x, verbose=0), np.asarray(model.layers[0]._kernel)
    keras_peft.merge(model, adapter="a")
    info = keras_peft.adapters(model)
    assert info["a"].merged and not info["b"].merged
    np.testing.assert_allclose(model.predict(x, verbose=0), before, atol=1e-5)
    with pytest.raises(ValueError, match="merged already"):
        keras_peft.merge(model, adapter="a")
    with pytest.raises(ValueError, match="is merged into the base weights"):
        keras_peft.set_adapter(model, "b")
    keras_peft.unmerge(model, adapter="a")
    np.testing.assert_allclose(np.asarray(model.layers[0]._kernel), kernel, atol=1e-6)
    keras_peft.set_adapter(model, "b")
    with pytest.raises(ValueError, match="is not selected"):
        keras_peft.merge(model, adapter="a")


def test_one_adapter_deltas_load_onto_a_fresh_base_and_predict_the_same(tmp_path):
    model, _, _ = two_adapters()
    nonzero(model, {"a", "b"})
    x = data(4)[0]
    expected = {}
    for n in "ab":
        keras_peft.set_adapter(model, n)
        expected[n] = model.predict(x, verbose=0)
        keras_peft.save_delta(model, tmp_path / f"{n}.safetensors", adapter=n)
    import safetensors
    with safetensors.safe_open(tmp_path / "a.safetensors", "np") as f:
        assert sorted(f.keys()) == [f"mlp/block_{i}/lora_kernel_{m}__a"
                                    for i in (0, 1) for m in "ab"]
    fresh = mlp()
    keras_peft.load_delta(fresh, tmp_path / "a.safetensors")
    keras_peft.load_delta(fresh, tmp_path / "b.safetensors")
    assert list(keras_peft.adapters(fresh)) == ["a", "b"]
    assert keras_peft.adapters(fresh)["b"].selected  # the last loaded, alone
    for n in "ab":
        keras_peft.set_adapter(fresh, n)
        np.testing.assert_allclose(fresh.predict(x, verbose=0), expected[n], atol=1e-6)
    other = mlp()
    keras_peft.load_delta(other, tmp_path / "a.safetensors", adapter="a")
    with pytest.raises(keras_peft.DeltaMismatchError, match="no adapter named 'z'"):
        keras_peft.load_delta(mlp(), tmp_path / "a.safetensors", adapter="z")


def test_whole_delta_keeps_every_adapter_and_the_selection(tmp_path):
    model, _, rules_b = two_adapters()
    keras_peft.wrap(model, rules_b)
    nonzero(model, {"a", "b"})
    keras_peft.save_delta(model, tmp_path / "all.safetensors")
    fresh = keras_peft.load_delta(mlp(), tmp_path / "all.safetensors")
    assert [i.selected for i in keras_peft.adapters(fresh).values()] == [False, True]
    x = data(4)[0]
    for n in "ab":
        keras_peft.set_adapter(model, n)
        keras_peft.set_adapter(fresh, n)
        np.testing.assert_allclose(fresh.predict(x, verbose=0), model.predict(x, verbose=0),
                                   atol=1e-6)


def test_keras_file_round_trips_every_adapter_and_the_selection(tmp_path):
    model, _, rules_b = two_adapters()
    wrapped = keras_peft.wrap(model, rules_b)
    nonzero(model, {"a", "b"})
    keras_peft.set_adapter(model, "a")
    wrapped.compile(optimizer="adam", loss="mse")
    path = tmp_path / "m.keras"
    wrapped.save(path)
    loaded = keras.models.load_model(path)
    assert [i.selected for i in keras_peft.adapters(loaded).values()] == [True, False]
    x = data(4)[0]
    for n in "ab":
        keras_peft.set_adapter(model, n)
        keras_peft.set_adapter(loaded, n)
        np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                                   atol=1e-6)


def test_tf_keras_named_adapters_switch_and_train_the_selected_one():
    import tf_keras as tfk

    tfk.utils.set_random_seed(0)
    model = tfk.Sequential([tfk.layers.Dense(8, activation="relu", name="block_0",
                                             input_shape=(4,)),
                            tfk.layers.Dense(1, name="head")], name="net")
    keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="a")
    rules = keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="b")
    keras_peft.wrap(model, rules)
    nonzero(model, {"a", "b"})
    x, y = data()
    outputs = {}
    for n in "ab":
        keras_peft.set_adapter(model, n)
        outputs[n] = model.predict(x, verbose=0)
    assert not np.allclose(outputs["a"], outputs["b"], atol=1e-4)
    model.compile(optimizer="adam", loss="mse")
    layer = model.layers[0]
    a_before = np.asarray(layer.lora_kernel_b__a)
    b_before = np.asarray(layer.lora_kernel_b__b)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)  # "b" selected
    np.testing.assert_array_equal(np.asarray(layer.lora_kernel_b__a), a_before)
    assert not np.allclose(np.asarray(layer.lora_kernel_b__b), b_before)


def test_report_lists_each_adapter_and_a_preview_freezes_the_unselected_one():
    model, _, rules_b = two_adapters()
    text = str(keras_peft.report(model, rules_b))
    assert "adapters: 2" in text
    assert "  a: lora r=2 scale=1 on 2 layer(s), 56 params, not selected" in text
    assert "  b: lora r=2 scale=1 on 2 layer(s), 56 params, selected" in text
    preview = keras_peft.report(model, rules_b)
    # dry run: a's variables match the lora rule but stay frozen, as wrap would do
    assert preview.trainable_params == 56 + 9
    keras_peft.wrap(model, rules_b)
    assert keras_peft.report(model).trainable_params == 56 + 9


def tiny_gpt2(seed=0):
    """A keras-hub `GPT2CausalLM` from a tiny random config and an in-memory vocabulary."""
    import keras_hub

    chars = ["<|endoftext|>", "Ġ", "a", "i", "r", "p", "l", "n", "e", "t", "o", "ai", "air"]
    tokenizer = keras_hub.models.GPT2Tokenizer(
        vocabulary={c: i for i, c in enumerate(chars)}, merges=["a i", "ai r"])
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer=tokenizer,
                                                             sequence_length=8)
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(chars), num_layers=2, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=8)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)


def test_causal_lm_trains_switches_generates_and_reloads_two_adapters(tmp_path):
    lm = tiny_gpt2()
    texts = {"one": ["airplane at airport", "air plane"], "two": ["tent on a rail", "pole"]}
    tokens = lm.preprocessor.generate_preprocess(["airplane at"])
    batch = {k: np.asarray(v) for k, v in tokens.items()}
    logits = {}
    for name, strings in texts.items():
        rules = keras_peft.lora(lm, rank=2, targets="all-linear", adapter=name)
        keras_peft.wrap(lm, rules)
        lm.compile(optimizer=keras.optimizers.Adam(5e-2),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   sampler="greedy")
        before = snapshot(lm)
        lm.fit(strings, epochs=2, batch_size=2, verbose=0)
        moved = {p for p in changed(before, lm)}
        assert moved and all(p.endswith(f"__{name}") or p.startswith("layer_norm/")
                             for p in moved), sorted(moved)[:5]
        keras_peft.save_delta(lm, tmp_path / f"{name}.safetensors", adapter=name)
    assert len(keras_peft.adapters(lm)["one"].layers) == 12  # every Dense/EinsumDense in blocks
    for name in texts:
        keras_peft.set_adapter(lm, name)
        logits[name] = np.asarray(lm.backbone(batch) @ np.asarray(
            lm.backbone.token_embedding.embeddings).T)
        assert isinstance(lm.generate(["airplane"], max_length=8)[0], str)
    assert not np.allclose(logits["one"], logits["two"], atol=1e-4)
    fresh = tiny_gpt2()
    fresh.backbone.get_layer("layer_norm").set_weights(
        lm.backbone.get_layer("layer_norm").get_weights())  # the head trained outside adapters
    for name in texts:
        keras_peft.load_delta(fresh, tmp_path / f"{name}.safetensors")
    for name in texts:
        keras_peft.set_adapter(fresh, name)
        got = np.asarray(fresh.backbone(batch) @ np.asarray(
            fresh.backbone.token_embedding.embeddings).T)
        np.testing.assert_allclose(got, logits[name], atol=1e-5)


def test_weights_file_restores_the_adapters_values_and_selection(tmp_path):
    model, _, rules_b = two_adapters()
    keras_peft.wrap(model, rules_b)
    nonzero(model, {"a", "b"})
    keras_peft.set_adapter(model, "a")
    x = data(4)[0]
    expected = model.predict(x, verbose=0)
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    other, _, rules = two_adapters(model_fn=lambda: mlp(seed=1))
    keras_peft.wrap(other, rules)  # selects "b"
    other.load_weights(path)
    assert [i.selected for i in keras_peft.adapters(other).values()] == [True, False]
    np.testing.assert_allclose(other.predict(x, verbose=0), expected, atol=1e-6)
