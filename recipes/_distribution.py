"""The recipes' `--distribution` option: `none`, `mirrored` (every local GPU, or the
CPU, through `tf.distribute.MirroredStrategy`), or `multi-worker`, which the Keras 3
recipes refuse with the reason (docs/scaling.md)."""

from __future__ import annotations

import contextlib

import tensorflow as tf

CHOICES = ("none", "mirrored", "multi-worker")
HELP = ("mirrored: tf.distribute.MirroredStrategy over every local GPU (or the CPU); the "
        "model is built, wrapped and compiled in its scope and --batch-size is the global "
        "batch, split over the replicas. multi-worker: refused (Keras 3's fit cannot run "
        "under MultiWorkerMirroredStrategy; docs/scaling.md)")
MULTI_WORKER = (
    "error: --distribution multi-worker: Keras 3's fit cannot run under "
    "tf.distribute.MultiWorkerMirroredStrategy on TensorFlow (it fails reducing the scalar "
    "logs across workers, TensorFlow issue 72388), with or without keras-peft, and this "
    "recipe's keras-hub models are Keras 3. Use --distribution mirrored for several GPUs on "
    "one machine; keras-peft on several workers works with tf.keras models "
    "(docs/scaling.md, 'Several workers').")


def make(kind: str, batch_size: int, say=print) -> tf.distribute.Strategy | None:
    """The strategy for `--distribution kind` (None for `none`); SystemExit for
    `multi-worker`, or a global batch the replicas cannot share evenly."""
    if kind == "none":
        return None
    if kind == "multi-worker":
        raise SystemExit(MULTI_WORKER)
    if kind != "mirrored":  # argparse's choices admit nothing else
        raise ValueError(f"--distribution must be one of {CHOICES}. Received: {kind!r}.")
    strategy = tf.distribute.MirroredStrategy()
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise SystemExit(
            f"error: --batch-size {batch_size} is the global batch, split over "
            f"{replicas} replicas: give a multiple of {replicas}.")
    say(f"distribution: MirroredStrategy over {replicas} replica(s) "
        f"({', '.join(strategy.extended.worker_devices)}); global batch {batch_size}, "
        f"{batch_size // replicas} per replica", flush=True)
    return strategy


def scope(strategy: tf.distribute.Strategy | None):
    """`strategy.scope()`, or a context that does nothing without a strategy."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def describe(strategy: tf.distribute.Strategy | None) -> dict | None:
    """What results.json records of the strategy."""
    if strategy is None:
        return None
    return {"kind": "mirrored", "replicas": strategy.num_replicas_in_sync,
            "devices": list(strategy.extended.worker_devices)}
