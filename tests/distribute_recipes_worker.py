"""The BERT and segmentation recipes with `--distribution mirrored` over two logical CPU
devices, against the same runs without it (for tests/test_distribute.py, in its own
process: logical devices must be set up before TensorFlow starts).

    python tests/distribute_recipes_worker.py OUT_DIR bert|segmentation

Writes OUT_DIR/RECIPE.json: what each run recorded, and for BERT the largest difference
between the two runs' saved adapters. One recipe per process: two MirroredStrategy
collectives in one process after `clear_session` can mix up their instances.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "recipes")]

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import bert_text_classification as bert  # noqa: E402
import image_segmentation as segmentation  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402

from tests.helpers import VOCAB  # noqa: E402


def tiny_preset(folder):
    keras.utils.set_random_seed(0)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCAB)
    keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=8) \
        .save_to_preset(folder)
    keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCAB), num_layers=2, num_heads=2, hidden_dim=4,
        intermediate_dim=8, max_sequence_length=16).save_to_preset(folder)
    return folder


def sentiment_file(path):
    rng = np.random.default_rng(0)
    lines = ["sentence\tlabel"] + [
        f"the movie was {rng.choice(['good', 'great', 'fun'] if i % 2 else ['bad', 'awful'])}"
        f"\t{i % 2}" for i in range(80)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def bert_runs(out):
    preset, data = tiny_preset(os.path.join(out, "preset")), sentiment_file(
        os.path.join(out, "train.tsv"))
    runs = {}
    for kind in ("none", "mirrored"):
        runs[kind] = bert.main([
            "--preset", preset, "--data", data, "--strategy", "lora:2", "--pooling", "mean",
            "--sequence-length", "12", "--batch-size", "8", "--epochs", "2", "--dropout", "0",
            "--no-xla", "--verbose", "0", "--distribution", kind,
            "--output-dir", os.path.join(out, f"bert-{kind}")])
    deltas = {k: safetensors.numpy.load_file(r["delta_path"]) for k, r in runs.items()}
    return {
        "delta_max_abs_diff": max(float(np.abs(deltas["none"][n] - deltas["mirrored"][n]).max())
                                  for n in deltas["none"]),
        "delta_relative_diff": float(
            np.sqrt(sum(np.sum((deltas["none"][n] - deltas["mirrored"][n]) ** 2)
                        for n in deltas["none"]))
            / np.sqrt(sum(np.sum(deltas["none"][n] ** 2) for n in deltas["none"]))),
        "delta_keys_equal": sorted(deltas["none"]) == sorted(deltas["mirrored"]),
        "distribution": runs["mirrored"]["settings"].get("distribution"),
        "single_has_distribution": "distribution" in runs["none"]["settings"],
        "val_accuracy": {k: r["val_accuracy"] for k, r in runs.items()},
    }


def segmentation_runs(out):
    runs = {}
    for kind in ("none", "mirrored"):
        runs[kind] = segmentation.main([
            "--data", "synthetic", "--max-examples", "8", "--image-size", "32",
            "--backbone", "resnet_tiny", "--batch-size", "4", "--epochs", "1",
            "--steps-per-epoch", "2", "--strategy", "decoder", "--verbose", "0",
            "--panel-images", "0", "--distribution", kind,
            "--output-dir", os.path.join(out, f"segmentation-{kind}")])
    return {k: {"distribution": r["training"]["distribution"],
                "trainable_params": r["trainable_params"],
                "loss": r["training"]["history"]["loss"],
                "mean_iou": r["metrics"]["mean_iou"]} for k, r in runs.items()}


def main(out, recipe):
    results = {"bert": bert_runs, "segmentation": segmentation_runs}[recipe](out)
    with open(os.path.join(out, f"{recipe}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
