"""Runs keras-peft under `tf.distribute.MirroredStrategy` on two logical CPUs (for
tests/test_distribute.py, in its own process: logical devices must be set up before
TensorFlow starts).

    python tests/distribute_worker.py OUT.json

For each scenario it trains the same tiny model twice on the same global batches, once
on the default (single-device) strategy and once mirrored over two replicas, and writes
per scenario: the largest weight difference between the two runs, whether each frozen
variable is bit-identical to its initial value on every replica, and what the scenario
counts (skipped steps, decisions).
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tensorflow as tf

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_peft  # noqa: E402
from keras_peft import Rule  # noqa: E402

BATCH, STEPS, EPOCHS = 16, 4, 2


def data(nan=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * STEPS, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")).astype("float32")
    if nan:
        x[BATCH + 3] = np.nan  # one example of the second batch (on one replica)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)


def build():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,))] + [
        keras.layers.Dense(8, activation="tanh", name=f"block_{i}") for i in range(3)
    ] + [keras.layers.Dense(1, name="head")], name="mlp")


def replica_values(variable) -> list:
    """The variable's value on each replica (one value off a distribution strategy)."""
    inner = getattr(variable, "value", variable)
    values = getattr(inner, "values", None)
    return [np.asarray(v.numpy()) for v in values] if values else [variable.numpy()]


SCENARIOS = {
    # name: (rules(model), wrap kwargs, callbacks(), data kwargs)
    "frozen_and_lr_scale": (
        lambda m: {".*block_0.*": Rule(trainable=False), ".*block_1.*": Rule(lr_scale=0.5),
                   ".*": Rule()}, {}, lambda: [], {}),
    "lora": (lambda m: keras_peft.lora(m, rank=2, targets=r".*block_\d"), {}, lambda: [], {}),
    "skip_nonfinite": (lambda m: {".*": Rule()}, {"skip_nonfinite": True}, lambda: [],
                       {"nan": True}),
    "gradual_unfreezing": (lambda m: {".*": Rule()}, {},
                           lambda: [keras_peft.GradualUnfreezing(every_steps=2),
                                    keras_peft.TrainingStatistics(every_steps=2)], {}),
    "lisa": (lambda m: {".*": Rule()}, {},
             lambda: [keras_peft.LayerwiseSampling(num_blocks=1, every_steps=2)], {}),
}


def run(strategy, name):
    make_rules, wrap_kw, make_callbacks, data_kw = SCENARIOS[name]
    with strategy.scope():
        model = build()
        initial = {v.path: v.numpy() for v in model.weights}
        keras_peft.wrap(model, make_rules(model), **wrap_kw)
        model.compile(optimizer=keras.optimizers.AdamW(1e-2, name="adamw"), loss="mse")
    callbacks = make_callbacks()
    model.fit(data(**data_kw), epochs=EPOCHS, verbose=0, callbacks=callbacks)
    frozen = [v for v in model.weights if not v.trainable and v.path in initial
              and not any(isinstance(c, (keras_peft.GradualUnfreezing,
                                         keras_peft.LayerwiseSampling)) for c in callbacks)]
    facts = {
        "frozen_identical": {v.path: all(np.array_equal(r, initial[v.path])
                                         for r in replica_values(v)) for v in frozen},
        "replicas_agree": all(all(np.array_equal(r, replica_values(v)[0])
                                  for r in replica_values(v)) for v in model.weights),
        "skipped": int(model.peft_skipped_steps),
        "decisions": len(keras_peft.decisions(model)),
        "statistics": [[e["steps"], e["groups"]["head"]["grad_norm"]] for c in callbacks
                       if isinstance(c, keras_peft.TrainingStatistics) for e in c.history],
    }
    return {v.path: v.numpy() for v in model.weights}, model, facts


def main(out):
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {"replicas": mirrored.num_replicas_in_sync}
    for name in SCENARIOS:
        single, _, single_facts = run(tf.distribute.get_strategy(), name)
        weights, model, facts = run(mirrored, name)
        results[name] = {
            "max_abs_diff": max(float(np.abs(weights[p] - single[p]).max()) for p in single),
            "single": single_facts, "mirrored": facts,
        }
        if name == "lora":  # a delta saved from the distributed model loads onto a fresh one
            path = os.path.join(tempfile.mkdtemp(), "delta.safetensors")
            keras_peft.save_delta(model, path)
            fresh = build()
            keras_peft.load_delta(fresh, path)
            x = np.random.default_rng(1).normal(size=(8, 4)).astype("float32")
            results[name]["delta_prediction_diff"] = float(np.abs(
                fresh.predict(x, verbose=0) - model.predict(x, verbose=0)).max())
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
