"""The data `cache_prefix` runs the prefix over, and the check that it is deterministic.

`cache_prefix` takes arrays or a `tf.data.Dataset` of batches, and refuses
(`NondeterministicDataError`) a pipeline that draws random numbers (random
augmentation in a `map`): a cached activation would freeze one random draw
per example. Shuffling the data is fine: each cached activation is stored
with its label, and `CachedPrefix.fit` reshuffles the cached examples every
epoch.
"""

from __future__ import annotations

import collections.abc
import re
import warnings

import keras
import tensorflow as tf

from keras_peft.backends import tf_data
from keras_peft.caching.errors import NondeterministicDataError

__all__ = ["as_dataset", "check_data", "check_kind", "random_ops"]


def random_ops(dataset) -> list[str] | None:
    """Names of the random-number ops in a tf.data pipeline (shuffling excepted).

    None when the pipeline cannot be inspected.
    """
    try:
        graph = tf_data.pipeline_graph(dataset)
    except Exception:  # e.g. a pipeline that cannot be serialized
        return None
    ops = {n.op for n in graph.node}
    for function in graph.library.function:
        ops.update(n.op for n in function.node_def)
    if ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless", "GeneratorDataset"}:
        return None
    return sorted(
        op for op in ops
        if re.search(r"Random|^Rng|Multinomial|TruncatedNormal", op)
        and not ("Shuffle" in op and "Dataset" in op)
    )


def check_data(dataset) -> None:
    """Raises `NondeterministicDataError` if the pipeline draws random numbers; warns if
    it cannot be inspected. The warning points at the caller of `cache_prefix`."""
    found = random_ops(dataset)
    if found is None:
        warnings.warn(
            "cache_prefix cannot see inside this data pipeline (a Python generator or "
            "py_function): make sure it gives each example the same values every epoch "
            "(no random augmentation), or the cache holds one random draw.",
            stacklevel=3,
        )
    elif found:
        raise NondeterministicDataError(
            f"The data pipeline draws random numbers (ops {found[:5]}), e.g. random "
            "augmentation in a `map`: a cached prefix output would keep one draw per "
            "example for every epoch. Train without caching (augmentation needs the "
            "prefix to run every epoch), remove the randomness from the pipeline, or pass "
            "allow_random_data=True if each example gets the same values every epoch "
            "(e.g. stateless ops seeded by the example). Shuffling alone is fine."
        )


def as_dataset(model, x, y, sample_weight, batch_size) -> tf.data.Dataset:
    """The data as a batched dataset, preprocessed as a keras-hub task's `fit` would."""
    if isinstance(x, tf.data.Dataset):
        if y is not None or sample_weight is not None:
            raise ValueError(
                "When `x` is a tf.data.Dataset, give the labels inside it, not as `y` or "
                f"`sample_weight`. Received: y={type(y).__name__}."
            )
        dataset = x
    else:
        dataset = _arrays_dataset(x, y, sample_weight, batch_size)
    if getattr(model, "preprocessor", None) is not None and hasattr(model, "preprocess_samples"):
        # A keras-hub task preprocesses in its data pipeline (raw strings in fit).
        dataset = dataset.map(model.preprocess_samples, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset


def check_kind(x, caller: str = "cache_prefix") -> None:
    """Raises TypeError unless `x` is arrays or a `tf.data.Dataset` (what caching can check)."""
    if isinstance(x, (collections.abc.Iterator, keras.utils.PyDataset)) or callable(x):
        raise TypeError(
            f"{caller} takes arrays (x, y) or a tf.data.Dataset of batches, so that "
            f"it can check the data for randomness. Received: x={type(x).__name__}. "
            "Wrap a generator with tf.data.Dataset.from_generator(...) (it is then "
            "opaque to the check: keep it deterministic), or pass the arrays."
        )


def _arrays_dataset(x, y, sample_weight, batch_size) -> tf.data.Dataset:
    check_kind(x)
    elements = tuple(e for e in (x, y, sample_weight) if e is not None)
    if sample_weight is not None and y is None:
        raise ValueError("`sample_weight` needs `y`.")
    lengths = {name: len(e) for name, e in (("x", x), ("y", y), ("sample_weight",
               sample_weight)) if e is not None and not isinstance(e, dict)
               and hasattr(e, "__len__")}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            "x, y and sample_weight must have one entry per example. Received lengths "
            + ", ".join(f"{k}={v}" for k, v in lengths.items()) + "."
        )
    return tf.data.Dataset.from_tensor_slices(
        elements[0] if len(elements) == 1 else elements).batch(batch_size or 32)
