"""A training run for tests/test_resume.py, in its own process (so that it can be SIGKILLed).

    python tests/resume_worker.py OUT --callback {none,keras,peft} [--backup DIR]
        [--kill-at-step N] [--kill-in-save K] [--resume]

The run exercises every piece of keras-peft state that a resume must bring
back: an `auto` decision, LoRA adapters, gradual unfreezing by steps (so the
optimizer is rebuilt mid-run with slots for newly trainable variables), a
Dropout layer (seeded randomness), and `skip_nonfinite` with one NaN batch
per epoch (its counter). `--resume` builds the model the same way but wraps
it with a plain policy, as a script that forgot the `auto` step would: the
policy in force must come back from the backup, not from the script.

Writes OUT/weights.npz, OUT/optimizer.npz and OUT/result.json when training ends.
"""

import argparse
import json
import os
import signal
import sys
import warnings

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras
import numpy as np

import keras_peft
from keras_peft import Rule

BATCH, STEPS_PER_EPOCH, EPOCHS = 16, 6, 4


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * STEPS_PER_EPOCH, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")).astype("float32")
    x_train = x.copy()
    x_train[BATCH:2 * BATCH] = np.nan  # batch 1 of every epoch: skipped
    return x, x_train, y


def build(resume: bool):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, name="embed"),
        keras.layers.Dense(8, activation="tanh", name="block_0"),
        keras.layers.Dropout(0.25, name="drop"),
        keras.layers.Dense(8, activation="tanh", name="block_1"),
        keras.layers.Dense(1, name="head"),
    ], name="net")
    x, _, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if resume:
            keras_peft.lora(model, rank=2, alpha=4, targets=r".*block_\d", rest=None)
            keras_peft.wrap(model, {".*": Rule()}, skip_nonfinite=True)
        else:
            decided = keras_peft.auto(model, (x[:32], y[:32]), loss="mse", num_batches=1,
                                      verbose=0).rules
            lora = keras_peft.lora(model, rank=2, alpha=4, targets=r".*block_\d", rest=None)
            keras_peft.wrap(model, keras_peft.combine(lora, decided), skip_nonfinite=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-2, name="adam"), loss="mse")
    return model


class Kill(keras.callbacks.Callback):
    """SIGKILLs this process at the end of training step `at` (counted from 1)."""

    def __init__(self, at):
        super().__init__()
        self.at, self.steps = at, 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_in_save(model, k):
    """SIGKILLs this process in the middle of writing its `k`-th weights file."""
    real, calls = model.save_weights, [0]

    def save_weights(filepath, *args, **kwargs):
        calls[0] += 1
        real(filepath, *args, **kwargs)
        if calls[0] == k:
            with open(filepath, "rb+") as f:  # as if the write stopped half-way
                f.truncate(os.path.getsize(filepath) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    model.save_weights = save_weights


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--callback", choices=["none", "keras", "peft"], default="none")
    parser.add_argument("--backup")
    parser.add_argument("--save-freq", default="epoch")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-in-save", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    save_freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)

    model = build(args.resume)
    callbacks = []
    if args.callback == "keras":
        callbacks.append(keras.callbacks.BackupAndRestore(args.backup, save_freq=save_freq))
    elif args.callback == "peft":
        callbacks.append(keras_peft.BackupAndRestore(args.backup, save_freq=save_freq))
    unfreezing = keras_peft.gradual_unfreezing(every_steps=5)
    callbacks.append(unfreezing)
    if args.kill_at_step:
        callbacks.append(Kill(args.kill_at_step))
    if args.kill_in_save:
        kill_in_save(model, args.kill_in_save)

    _, x_train, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = model.fit(x_train, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
                            verbose=0, callbacks=callbacks)
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, "weights.npz"), **{v.path: v.numpy() for v in model.weights})
    np.savez(os.path.join(args.out, "optimizer.npz"),
             **{v.path: v.numpy() for v in model.optimizer.variables})
    result = {
        "rules": {p: r.get_config() for p, r in model.peft_rules.items()},
        "trainable": [v.path for v in model.trainable_weights],
        "skipped_steps": model.peft_skipped_steps,
        "stage": unfreezing.stage,
        "epochs_run": len(history.history.get("loss", [])),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
    }
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
