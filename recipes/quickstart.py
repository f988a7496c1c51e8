"""Quick start: pretrain a small model on task A, then fine-tune it on task B.

Run it with `make demo` (which sets up .venv) or directly:

    python recipes/quickstart.py [--epochs 10] [--seed 0] [--batch-size 64]
                                 [--resume DIR] [--no-skip-nonfinite]

Both tasks are synthetic and generated deterministically with numpy. A fixed
random "teacher" network maps 32-dimensional inputs to a 2-D feature `z`
(whitened), and the class is the quadrant `z` falls in:

- task A ("pretraining", 20k examples, 4 classes): inputs ~ N(0, I);
- task B ("fine-tuning", 2k examples, same 4 classes): inputs shifted, and the
  quadrants turned 40 degrees, so the pretrained model gets only about half
  of task B right.

The pretrained body already computes the feature task B needs, so the
policy freezes its bottom block, lets the middle block adapt at half the
learning rate and trains the head at the full rate. The script prints
`keras_peft.report(model)`, task B's validation accuracy before and after
fine-tuning, the trainable/total parameter counts and the wall time.

Reliability (see docs/reliability.md): fine-tuning skips non-finite steps
(`skip_nonfinite=True`, turn off with `--no-skip-nonfinite`), and with
`--resume DIR` it backs up to DIR after every epoch; run the same command
again after a crash and fine-tuning resumes where the backup was taken,
ending exactly as an uninterrupted run would (pretraining, deterministic for
a seed, simply runs again). The fine-tuning batches are shuffled in an
order fixed by the seed and the epoch, so a resumed run sees the same ones.

`main(argv)` returns the same numbers as a dict, so tests can import it.
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import keras_peft

INPUT_DIM = 32
NUM_CLASSES = 4
ROTATION_DEGREES = 40.0  # how far task B's class boundaries turn from task A's
MARGIN = 0.2  # examples this close to a class boundary are left out


# ---------------------------------------------------------------------- data
def make_tasks(seed: int) -> dict[str, np.ndarray]:
    """Task A (20k examples) and task B (2k, shifted and rotated), from one teacher."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(INPUT_DIM, 8)) / np.sqrt(INPUT_DIM)
    b1 = rng.normal(scale=0.3, size=8)
    w2 = rng.normal(size=(8, 2)) / np.sqrt(8)
    shift_b = rng.normal(scale=0.5, size=INPUT_DIM)

    def teacher(x):
        return np.tanh(np.maximum(x @ w1 + b1, 0.0)) @ w2

    # Centre and whiten the teacher's output on task A's inputs, so the four
    # quadrants hold similar shares of the examples.
    reference = teacher(rng.normal(size=(20_000, INPUT_DIM)))
    center = np.median(reference, axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov((reference - center).T))
    whiten = eigenvectors @ np.diag(eigenvalues**-0.5) @ eigenvectors.T
    angle = np.deg2rad(ROTATION_DEGREES)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    def sample(n, turn=None, shift=0.0):
        x = rng.normal(size=(3 * n, INPUT_DIM)) + shift
        z = (teacher(x) - center) @ whiten
        if turn is not None:
            z = z @ turn.T
        keep = np.flatnonzero(np.abs(z).min(axis=1) > MARGIN)[:n]
        x, z = x[keep], z[keep]
        return x.astype("float32"), 2 * (z[:, 0] > 0) + (z[:, 1] > 0)

    data = {}
    data["xa"], data["ya"] = sample(20_000)
    data["xa_val"], data["ya_val"] = sample(2_000)
    data["xb"], data["yb"] = sample(2_000, rotation, shift_b)
    data["xb_val"], data["yb_val"] = sample(2_000, rotation, shift_b)
    return data


# --------------------------------------------------------------------- model
def block(name: str, units: int = 64) -> keras.Sequential:
    """Two Dense layers; their variables' paths are `<name>/dense_<i>/...`."""
    return keras.Sequential(
        [
            keras.layers.Dense(units, activation="relu", name="dense_1"),
            keras.layers.Dense(units, activation="relu", name="dense_2"),
        ],
        name=name,
    )


def build_model() -> keras.Model:
    inputs = keras.Input((INPUT_DIM,), name="x")
    features = block("middle")(block("bottom")(inputs))
    outputs = keras.layers.Dense(NUM_CLASSES, name="head")(features)
    return keras.Model(inputs, outputs, name="classifier")


class EpochShuffled(keras.utils.PyDataset):
    """Batches of `(x, y)` in an order that depends only on the seed and the epoch.

    Keras' own `shuffle=True` draws each epoch's order from a random state
    that depends on how many epochs this process has run, so a run resumed
    from a backup would see other batches than the one it replaces. The
    `on_epoch_begin` callback below sets the epoch (the true one, also after
    a resume) before Keras reads the epoch's first batch.
    """

    def __init__(self, x, y, batch_size: int, seed: int):
        super().__init__()
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.order = np.random.default_rng([self.seed, epoch]).permutation(len(self.x))

    def callback(self) -> keras.callbacks.Callback:
        return keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: self.set_epoch(e))

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, i: int):
        rows = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        return self.x[rows], self.y[rows]


def compile_model(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


# The fine-tuning policy: regexes are matched with re.fullmatch against
# variable paths (see keras_peft.variable_paths(model)); the first match wins.
RULES = {
    r"bottom/.*": keras_peft.Rule(trainable=False),  # frozen: no gradient, no slots
    r"middle/.*": keras_peft.Rule(lr_scale=0.5),  # adapts at half the learning rate
    r"head/.*": keras_peft.Rule(),  # trains at the full rate
}


# ----------------------------------------------------------------------- run
PRETRAIN_EPOCHS = 10


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pretrain a small classifier on task A, fine-tune it on task B "
        "with a keras-peft policy."
    )
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and weights (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument(
        "--resume", metavar="DIR", help="back up fine-tuning to DIR every epoch, and resume "
        "from DIR if an earlier run was interrupted (deleted when fine-tuning completes)")
    parser.add_argument(
        "--skip-nonfinite", action=argparse.BooleanOptionalAction, default=True,
        help="skip fine-tuning steps with a NaN/Inf loss or gradient (default on)")
    return parser.parse_args(argv)


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    logits = model.predict(x, batch_size=1024, verbose=0)
    return float(np.mean(np.argmax(logits, axis=1) == y))


def main(argv=None) -> dict:
    """Runs the recipe; returns accuracies, parameter counts and times."""
    args = parse_args(argv)
    start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    data = make_tasks(args.seed)

    # 1. Pretrain the whole model on task A (plain Keras).
    print(f"Pretraining on task A ({len(data['xa']):,} examples, {PRETRAIN_EPOCHS} epochs)...")
    model = build_model()
    compile_model(model, 1e-3)
    model.fit(data["xa"], data["ya"], epochs=PRETRAIN_EPOCHS, batch_size=args.batch_size, verbose=0)
    acc_a = accuracy(model, data["xa_val"], data["ya_val"])
    print(f"task A validation accuracy: {acc_a:.3f}\n")

    # 2. Wrap it with the fine-tuning policy and look at what will train.
    model = keras_peft.wrap(model, rules=RULES, skip_nonfinite=args.skip_nonfinite)
    table = keras_peft.report(model)
    print(f"{table}\n")

    # 3. Fine-tune on task B.
    compile_model(model, 3e-3)
    before = accuracy(model, data["xb_val"], data["yb_val"])
    bottom_before = [v.numpy() for v in model.get_layer("bottom").weights]
    print(f"Fine-tuning on task B ({len(data['xb']):,} examples, {args.epochs} epochs)...")
    tuned_at = time.perf_counter()
    batches = EpochShuffled(data["xb"], data["yb"], args.batch_size, args.seed)
    callbacks = [batches.callback()]
    if args.resume:  # first, so that the others see the restored state
        callbacks.insert(0, keras_peft.BackupAndRestore(args.resume))
    model.fit(
        batches,
        validation_data=(data["xb_val"], data["yb_val"]),
        epochs=args.epochs,
        shuffle=False,  # `batches` shuffles; Keras would reorder them with its own random state
        verbose=2,
        callbacks=callbacks,
    )
    finetune_s = time.perf_counter() - tuned_at
    after = accuracy(model, data["xb_val"], data["yb_val"])
    bottom_frozen = all(
        np.array_equal(old, v.numpy())
        for old, v in zip(bottom_before, model.get_layer("bottom").weights, strict=True)
    )
    wall_s = time.perf_counter() - start

    print()
    print(f"task B validation accuracy: before {before:.3f} -> after {after:.3f}")
    print(
        f"trainable params: {table.trainable_params:,} / {table.total_params:,} "
        f"({100 * table.trainable_fraction:.1f}%)"
    )
    print(f"bottom block unchanged by fine-tuning: {bottom_frozen}")
    print(f"wall time: {wall_s:.1f}s (fine-tuning {finetune_s:.1f}s)")
    return {
        "pretrain_accuracy": acc_a,
        "accuracy_before": before,
        "accuracy_after": after,
        "trainable_params": table.trainable_params,
        "total_params": table.total_params,
        "bottom_frozen": bottom_frozen,
        "skipped_steps": model.peft_skipped_steps,
        "wall_time_s": wall_s,
        "finetune_time_s": finetune_s,
    }


if __name__ == "__main__":
    main()
