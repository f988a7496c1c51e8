"""A keras-hub BertTextClassifier (tiny random config, no download) wraps and trains."""

import keras
import keras_hub
import numpy as np

import keras_peft
from keras_peft import Rule
from tests.conftest import changed, snapshot
from tests.helpers import tiny_bert_classifier

TEXTS = ["the movie was good", "the movie was bad", "great fun", "awful movie"] * 4
LABELS = np.array([1, 0, 1, 0] * 4)


def test_bert_classifier_wraps_fits_raw_strings_and_round_trips(tmp_path):
    model = keras_peft.wrap(tiny_bert_classifier(), rules={
        r"transformer_layer_0/.*": Rule(trainable=False),
        r"transformer_layer_1/.*": Rule(lr_scale=0.5),
        r".*(embedding|embeddings_layer_norm)/.*": Rule(trainable=False),
        r".*": Rule(),
    })
    assert isinstance(model, keras_hub.models.BertTextClassifier)
    frozen = {v.path for v in model.weights if not v.trainable}
    assert "transformer_layer_0/self_attention_layer/query/kernel" in frozen
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], jit_compile=False,
    )
    before = snapshot(model)
    history = model.fit(TEXTS, LABELS, batch_size=4, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert changed(before, model) == set(before) - frozen
    assert model.predict(["the movie was fun"], verbose=0).shape == (1, 2)

    path = str(tmp_path / "bert.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras_hub.models.BertTextClassifier)
    assert keras_peft.get_rules(loaded) == keras_peft.get_rules(model)
    np.testing.assert_allclose(
        loaded.predict(TEXTS[:4], verbose=0), model.predict(TEXTS[:4], verbose=0), atol=1e-6)
    report = keras_peft.report(loaded)
    row = [r for r in report.rows if r.layer == "transformer_layer_1/self_attention_layer/query"]
    assert row[0].lr_scale == 0.5


def test_a_lora_bert_classifier_round_trips_through_model_save(tmp_path):
    """keras-hub rebuilds a backbone from its constructor arguments, without the LoRA
    adapters; the wrapped model's config records them, so the file loads with the exact
    adapters and its LoRA training goes on (Keras alone would give A = B = 0)."""
    model = tiny_bert_classifier()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    model.fit(TEXTS, LABELS, batch_size=4, epochs=2, verbose=0)
    model.save(tmp_path / "bert.keras")

    loaded = keras.models.load_model(tmp_path / "bert.keras")
    assert keras_peft.get_rules(loaded) == keras_peft.get_rules(model)
    saved = snapshot(model)
    assert snapshot(loaded).keys() == saved.keys()
    for path, value in snapshot(loaded).items():
        np.testing.assert_array_equal(value, saved[path], err_msg=path)
    adapters = {p for p in saved if "lora_kernel" in p}
    assert len(adapters) == 8  # 2 layers x (query, value) x (A, B)
    assert all(np.abs(saved[p]).max() > 0 for p in adapters)
    np.testing.assert_allclose(
        loaded.predict(TEXTS[:4], verbose=0), model.predict(TEXTS[:4], verbose=0), atol=1e-6)
    before = snapshot(loaded)
    loaded.fit(TEXTS, LABELS, batch_size=4, epochs=1, verbose=0)
    assert changed(before, loaded) == {v.path for v in loaded.trainable_weights} >= adapters
