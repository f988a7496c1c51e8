"""Storing the prefix outputs: in memory (numpy), or on disk with `tf.data.Dataset.save`.

Each storage takes the batches `(prefix outputs, y, sample_weight)` as the
prefix computes them and returns `(num_examples, x, y, sample_weight,
element_spec, nbytes)`: the arrays in memory (None on disk) and the element
spec of the saved dataset (None in memory).
"""

from __future__ import annotations

import os
import shutil

import keras
import numpy as np
import tensorflow as tf

__all__ = ["to_disk", "to_memory"]

_SAVED_MARKER = "dataset_spec.pb"  # what tf.data.Dataset.save writes into its folder


def _numpy_tree(structure):
    return keras.tree.map_structure(lambda t: None if t is None else np.asarray(t), structure)


def to_memory(batches):
    """Concatenates the batches into numpy arrays."""
    xs, ys, sws = [], [], []
    for out, by, bsw in batches:
        xs.append({k: np.asarray(v) for k, v in out.items()})
        ys.append(_numpy_tree(by))
        sws.append(_numpy_tree(bsw))
    if not xs:
        raise ValueError("The data is empty: there is nothing to cache.")
    x = {k: np.concatenate([b[k] for b in xs]) for k in xs[0]}

    def join(parts):
        if parts[0] is None:
            return None
        return keras.tree.map_structure(lambda *a: np.concatenate(a), *parts)

    y, sw = join(ys), join(sws)
    num = len(next(iter(x.values())))
    nbytes = sum(a.nbytes for a in x.values())
    return num, x, y, sw, None, nbytes


def _clear(folder: str) -> None:
    """Empties `folder` if it holds an earlier save; refuses a folder of other files."""
    if os.path.isdir(folder) and os.listdir(folder):
        if not os.path.exists(os.path.join(folder, _SAVED_MARKER)):
            raise ValueError(
                f"storage={folder!r} is a folder that holds other files; give an empty or new "
                "folder (an earlier cache_prefix save there is replaced).")
        shutil.rmtree(folder)


def to_disk(batches, folder, prefix, dataset):
    """Saves the examples one by one with `tf.data.Dataset.save` into `folder`."""
    folder = os.fspath(folder)
    _clear(folder)
    _, by_spec, sw_spec = keras.utils.unpack_x_y_sample_weight(dataset.element_spec)
    x_spec = {
        name: tf.TensorSpec(tuple(t.shape), t.dtype) for name, t in prefix.output.items()
    } if isinstance(prefix.output, dict) else None
    specs = tuple(s for s in (x_spec, by_spec, sw_spec) if s is not None)
    counter = {"n": 0, "bytes": 0}

    def generate():
        for out, by, bsw in batches:
            counter["n"] += int(next(iter(out.values())).shape[0])
            counter["bytes"] += sum(int(np.prod(v.shape)) * v.dtype.size for v in out.values())
            parts = tuple(p for p in (out, by, bsw) if p is not None)
            yield parts if len(parts) > 1 else parts[0]

    batched = tf.data.Dataset.from_generator(
        generate, output_signature=specs if len(specs) > 1 else specs[0])
    per_example = batched.unbatch()
    per_example.save(folder)
    return counter["n"], None, None, None, per_example.element_spec, counter["bytes"]
