"""One worker of a two-process `tf.distribute.MultiWorkerMirroredStrategy` cluster on
127.0.0.1, for tests/test_multiworker.py. tf.keras (Keras 2) models: Keras 3's `fit`
cannot run under this strategy (TensorFlow issue 72388, docs/scaling.md).

    python tests/multiworker_worker.py INDEX PORT0 PORT1 OUT_DIR [--crash-at-epoch N]

Each scenario trains the same tiny model twice on the same global batches: under the
cluster (this worker feeds its half of every global batch) and on one device in this
process. It writes OUT_DIR/worker-INDEX.json: per scenario the largest weight difference
between the two, a checksum of the weights (the two workers must agree), whether the
frozen variables kept their initial values, and the decisions. The chief saves the LoRA
scenario's delta and loads it onto a fresh model. The `backup` scenario trains 3 epochs
with `BackupAndRestore`; with `--crash-at-epoch N` worker 1 dies as epoch N begins
(after the backup of epoch N-1), and a second run of both workers resumes from it.
"""

import hashlib
import json
import os
import sys
import tempfile
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
INDEX, PORTS, OUT = int(sys.argv[1]), sys.argv[2:4], sys.argv[4]
CRASH_AT = int(sys.argv[sys.argv.index("--crash-at-epoch") + 1]) \
    if "--crash-at-epoch" in sys.argv else None
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": [f"127.0.0.1:{p}" for p in PORTS]},
    "task": {"type": "worker", "index": INDEX}})
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tensorflow as tf  # noqa: E402

STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()

import numpy as np  # noqa: E402
import tf_keras  # noqa: E402

import keras_peft  # noqa: E402
from keras_peft import Rule  # noqa: E402

GLOBAL_BATCH, STEPS = 16, 4
RNG = np.random.default_rng(0)
X = RNG.normal(size=(GLOBAL_BATCH * STEPS, 4)).astype("float32")
Y = X @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")


def worker_data(context):
    """This worker's half of every global batch, in order: the cluster's step s sees the
    same 16 examples as the single-device step s."""
    size = context.get_per_replica_batch_size(GLOBAL_BATCH)
    w = context.input_pipeline_id
    rows = np.concatenate([np.arange(s * GLOBAL_BATCH + w * size, s * GLOBAL_BATCH + (w + 1) * size)
                           for s in range(STEPS)])
    return tf.data.Dataset.from_tensor_slices((X[rows], Y[rows])).batch(size).repeat()


def build():
    tf.keras.utils.set_random_seed(0)
    return tf_keras.Sequential([tf_keras.Input((4,))] + [
        tf_keras.layers.Dense(8, activation="tanh", name=f"block_{i}") for i in range(3)
    ] + [tf_keras.layers.Dense(1, name="head")], name="mlp")


class ChangeRules(tf_keras.callbacks.Callback):
    """A policy changed mid-training: block_0 unfreezes as epoch 1 begins."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            self.model.set_rules({".*": Rule()})


class Epochs(tf_keras.callbacks.Callback):
    """The epochs this `fit` ran (a resumed one starts after the backup's), and the wall
    time of each step."""

    def __init__(self):
        super().__init__()
        self.seen, self.step_seconds = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.step_seconds.append(time.perf_counter() - self._start)


class Crash(tf_keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == CRASH_AT and INDEX == 1:
            os._exit(3)  # a killed worker: no cleanup, no final backup


SCENARIOS = {
    # name: (rules(model), callbacks(), epochs)
    "frozen_and_lr_scale": (lambda m: {".*block_0.*": Rule(trainable=False),
                                       ".*block_1.*": Rule(lr_scale=0.5), ".*": Rule()},
                            lambda: [], 2),
    "lora": (lambda m: keras_peft.lora(m, rank=2, targets=r".*block_\d"), lambda: [], 2),
    "rules_changed": (lambda m: {".*block_0.*": Rule(trainable=False), ".*": Rule()},
                      lambda: [ChangeRules()], 2),
    "backup": (lambda m: {".*block_0.*": Rule(trainable=False), ".*": Rule(lr_scale=0.5)},
               lambda: [tf_keras.callbacks.BackupAndRestore(os.path.join(OUT, "backup")),
                        Crash()], 3),
}


def run(strategy, name, distributed: bool):
    make_rules, make_callbacks, epochs = SCENARIOS[name]
    with strategy.scope():
        model = build()
        initial = {v.name: v.numpy() for v in model.weights}
        keras_peft.wrap(model, make_rules(model))
        trained = {v.name for v in model.trainable_weights}
        frozen = [v.name for v in model.weights if v.name not in trained]
        model.compile(optimizer=tf_keras.optimizers.Adam(1e-2), loss="mse")
    data = strategy.distribute_datasets_from_function(worker_data) if distributed else \
        tf.data.Dataset.from_tensor_slices((X, Y)).batch(GLOBAL_BATCH).repeat()
    epochs_run = Epochs()
    callbacks = make_callbacks() if distributed else \
        [c for c in make_callbacks() if isinstance(c, ChangeRules)]
    model.fit(data, epochs=epochs, steps_per_epoch=STEPS, verbose=0,
              callbacks=[*callbacks, epochs_run])
    weights = {v.name: v.numpy() for v in model.weights}
    later = epochs_run.step_seconds[1:]  # the first step traces
    model.step_ms_median = 1000 * float(np.median(later)) if later else None
    return model, weights, {
        "frozen_identical": {n: bool(np.array_equal(weights[n], initial[n])) for n in frozen},
        "decisions": len(keras_peft.decisions(model)),
        "epochs_run": epochs_run.seen,
    }


def main():
    results = {"workers": STRATEGY.cluster_resolver.cluster_spec().num_tasks("worker")}
    names = ["backup"] if CRASH_AT is not None else list(SCENARIOS)
    for name in names:
        model, mirrored, facts = run(STRATEGY, name, distributed=True)
        one, single, single_facts = run(tf.distribute.OneDeviceStrategy("/cpu:0"), name, False)
        digest = hashlib.sha256(b"".join(mirrored[n].tobytes() for n in sorted(mirrored)))
        results[name] = {
            "max_abs_diff": max(float(np.abs(mirrored[n] - single[n]).max()) for n in single),
            "checksum": digest.hexdigest(), "mirrored": facts, "single": single_facts,
            "step_ms_median": {"two_workers": model.step_ms_median,
                               "one_device": one.step_ms_median}}
        if name == "lora":
            x = np.random.default_rng(1).normal(size=(8, 4)).astype("float32")
            predicted = model.predict(x, verbose=0)  # on both workers: predict is collective
            if INDEX == 0:  # the chief saves; a fresh model loads it
                path = os.path.join(tempfile.mkdtemp(), "delta.safetensors")
                keras_peft.save_delta(model, path)
                fresh = keras_peft.load_delta(build(), path)
                results[name]["delta_prediction_diff"] = float(np.abs(
                    fresh.predict(x, verbose=0) - predicted).max())
    with open(os.path.join(OUT, f"worker-{INDEX}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
