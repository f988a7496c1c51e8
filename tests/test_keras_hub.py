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
