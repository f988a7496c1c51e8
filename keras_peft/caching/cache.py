"""Computing and storing the prefix outputs (`cache_prefix`), and training on them.

When every variable below some depth is frozen (`head_only`, `top_layers`)
and that bottom part, the *prefix*, computes the same output for an example
every epoch, there is no need to run it every epoch. `cache_prefix` splits the
model (`split_prefix`), runs the prefix once over the data, stores its outputs
(in memory, or on disk with `tf.data.Dataset.save`), and `CachedPrefix.fit`
trains the suffix on them.

Caching is only correct when the prefix is deterministic. `cache_prefix`
refuses, with an error that says what to change, when

- the prefix has trainable variables (`PrefixError`);
- the prefix would apply dropout or noise, or run `BatchNormalization` on
  batch statistics (`NondeterministicPrefixError`): a frozen Keras layer
  still applies dropout in `fit`. `inference_prefix=True` runs the prefix in
  inference mode instead (dropout off, moving statistics), what Keras'
  transfer-learning guide means by `base_model(x, training=False)`, but it
  changes training, so it must be asked for;
- the prefix contains a random augmentation layer, or the data pipeline draws
  random numbers (random augmentation in a `map`) (`NondeterministicDataError`,
  see `keras_peft.caching.data`): a cached activation would freeze one random
  draw per example.
"""

from __future__ import annotations

import time

import keras
import tensorflow as tf

from keras_peft.backends import keras3
from keras_peft.caching.data import as_dataset, check_data
from keras_peft.caching.errors import NondeterministicPrefixError, PrefixError
from keras_peft.caching.split import PrefixSplit, copy_policy, split_prefix
from keras_peft.caching.storage import to_disk, to_memory

__all__ = ["CachedPrefix", "cache_prefix"]


class CachedPrefix:
    """The prefix outputs of a data set, and the suffix that trains on them.

    Made by `keras_peft.cache_prefix`. `fit` trains the suffix (so the original
    model's trainable variables) on the cached outputs; `evaluate` evaluates it.

    Attributes:
        split: the `PrefixSplit` (`split.suffix` is the model that trains).
        inference_prefix: whether the prefix ran in inference mode.
        num_examples: number of cached examples.
        storage: `"memory"`, or the folder of a `tf.data.Dataset.save`.
        x: `{cut name: array}` in memory (None when stored on disk).
        y: labels in memory (None if absent or on disk).
        sample_weight: sample weights in memory (None if absent or on disk).
        nbytes: size of the cached prefix outputs, in bytes.
        seconds: time it took to run the prefix over the data.
    """

    def __init__(self, split, inference_prefix, num_examples, storage, x, y, sample_weight,
                 element_spec, nbytes, seconds):
        self.split = split
        self.inference_prefix = inference_prefix
        self.num_examples = num_examples
        self.storage = storage
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self._element_spec = element_spec
        self.nbytes = nbytes
        self.seconds = seconds

    @property
    def suffix(self) -> keras.Model:
        return self.split.suffix

    def dataset(self, batch_size: int = 32, shuffle: bool = False, seed=None) -> tf.data.Dataset:
        """The cached examples as a batched `tf.data.Dataset` of `(x, y[, sample_weight])`."""
        if self.storage == "memory":
            elements = tuple(e for e in (self.x, self.y, self.sample_weight) if e is not None)
            ds = tf.data.Dataset.from_tensor_slices(elements if len(elements) > 1 else elements[0])
        else:
            ds = tf.data.Dataset.load(self.storage, element_spec=self._element_spec)
        if shuffle:
            ds = ds.shuffle(min(self.num_examples, 1 << 15), seed=seed,
                            reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    def _prepare(self) -> keras.Model:
        trainable = self.split.trainable_in_prefix()
        if trainable:
            raise PrefixError(
                f"Variables of the cached prefix have become trainable since caching (e.g. "
                f"{trainable[:3]}); the cached outputs no longer stand for what the model "
                "computes. Freeze them again, or train the whole model without caching."
            )
        suffix = self.split.suffix
        copy_policy(self.split.model, suffix)
        if not getattr(suffix, "compiled", False):
            model = self.split.model
            arguments = keras3.compile_arguments(model)
            if arguments is None:
                raise PrefixError(
                    f"Compile model {model.name!r} (the suffix trains with its optimizer, "
                    "loss and metrics) or compile `cached.suffix` yourself before `fit`."
                )
            arguments.update(optimizer=model.optimizer, jit_compile=model.jit_compile)
            suffix.compile(**arguments)
        return suffix

    def _data(self, batch_size, shuffle, seed=None):
        if self.storage == "memory":
            return {"x": self.x, "y": self.y, "sample_weight": self.sample_weight,
                    "batch_size": batch_size, "shuffle": shuffle}
        # The dataset shuffles itself; shuffle=False keeps Keras from warning.
        return {"x": self.dataset(batch_size, shuffle=shuffle, seed=seed), "shuffle": False}

    def fit(self, epochs: int = 1, batch_size: int = 32, shuffle: bool = True,
            validation_data=None, **kwargs):
        """Trains the suffix on the cached outputs, like `model.fit` (returns its History).

        Unless `suffix` was compiled, it is compiled with the model's loss,
        metrics and `jit_compile` and shares the model's optimizer (and its
        state). `validation_data` may be another `CachedPrefix` of the same
        split (`cache_prefix(model, val_data, split=cached.split)`).
        """
        suffix = self._prepare()
        if isinstance(validation_data, CachedPrefix):
            validation_data = validation_data._validation(self, batch_size)
        data = self._data(batch_size, shuffle)
        return suffix.fit(epochs=epochs, validation_data=validation_data, **data, **kwargs)

    def evaluate(self, batch_size: int = 32, **kwargs):
        """Evaluates the model on the cached examples (`suffix.evaluate`)."""
        suffix = self._prepare()
        data = self._data(batch_size, shuffle=False)
        data.pop("shuffle", None)
        return suffix.evaluate(**data, **kwargs)

    def _validation(self, train, batch_size):
        if self.split is not train.split:
            raise ValueError(
                "validation_data is cached with another split; cache it with "
                "keras_peft.cache_prefix(model, val_data, split=train_cache.split).")
        if self.storage == "memory":
            return tuple(e for e in (self.x, self.y, self.sample_weight) if e is not None)
        return self.dataset(batch_size)

    def __repr__(self):
        where = "memory" if self.storage == "memory" else f"disk ({self.storage})"
        mode = "inference" if self.inference_prefix else "training"
        return (f"<CachedPrefix: {self.num_examples} examples, cut {self.split.cut}, "
                f"{self.nbytes / 2**20:.1f} MiB in {where}, prefix run in {mode} mode "
                f"in {self.seconds:.1f} s>")


def cache_prefix(
    model,
    x,
    y=None,
    *,
    sample_weight=None,
    batch_size: int | None = None,
    after=None,
    split: PrefixSplit | None = None,
    inference_prefix: bool = False,
    storage: str | None = None,
    jit_compile: bool | None = None,
    allow_random_data: bool = False,
    verbose: int = 1,
) -> CachedPrefix:
    """Runs the frozen prefix of `model` once over the data; train the rest with `fit`.

    Args:
        model: a built functional or Sequential Keras 3 model (a keras-hub
            task included), usually wrapped with a strategy that freezes its
            bottom (`head_only`, `top_layers`). Compile it first if you will
            call `fit`: the suffix trains with its optimizer, loss and metrics.
        x: a `tf.data.Dataset` of batches `x`, `(x, y)` or `(x, y,
            sample_weight)` (for a keras-hub task with a preprocessor: raw
            inputs, preprocessed as its `fit` does), or arrays with `y`.
        y: labels, when `x` holds arrays.
        sample_weight: sample weights, when `x` holds arrays.
        batch_size: batch size for arrays (default 32).
        after: where to split (see `split_prefix`); default: every frozen layer
            below the lowest trainable one.
        split: a `PrefixSplit` to reuse (e.g. `train_cache.split`, to cache
            validation data for the same suffix).
        inference_prefix: run the prefix in inference mode (dropout off,
            BatchNorm on moving statistics). Needed when the prefix has
            dropout, as keras-hub BERT has in every layer. This changes
            training: without caching, frozen layers still apply dropout in
            `fit`; `split.joined(inference_prefix=True)` trains the same way
            without caching.
        storage: `None` to keep the outputs in memory (numpy), or a folder to
            write them to with `tf.data.Dataset.save` (for data larger than
            memory; an earlier save in that folder is replaced).
        jit_compile: compile the prefix with XLA; default: the model's
            `jit_compile` if compiled, else False.
        allow_random_data: accept a pipeline that draws random numbers (when
            you know each example still gets the same values every epoch).
        verbose: 1 prints what was cached and how long it took.

    Returns:
        A `CachedPrefix`: call its `fit` (and `evaluate`).

    Raises:
        PrefixError: the model cannot be split, or the prefix has trainable
            variables.
        NondeterministicPrefixError: the prefix has dropout or batch
            statistics (pass `inference_prefix=True`), or a random layer.
        NondeterministicDataError: the data pipeline draws random numbers.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_peft

    model = keras.Sequential([keras.Input((8,))] + [
        keras.layers.Dense(16, activation="relu", name=f"block_{i}") for i in range(3)
    ] + [keras.layers.Dense(1, name="head")], name="net")
    keras_peft.wrap(model, keras_peft.head_only(model))
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    cached = keras_peft.cache_prefix(model, x, x[:, :1], verbose=0)
    cached.fit(epochs=3, verbose=0)     # trains `head` of `model` on cached features
    model.predict(x, verbose=0)         # the whole model, with the trained head
    ```
    """
    split = _split_for(model, split, after)
    _check_prefix(split, inference_prefix)
    dataset = as_dataset(model, x, y, sample_weight, batch_size)
    if isinstance(x, tf.data.Dataset) and not allow_random_data:
        check_data(dataset)
    run_prefix = _prefix_function(model, split.prefix, jit_compile, inference_prefix)
    start = time.perf_counter()
    if storage is None or storage == "memory":
        result = to_memory(_batches(run_prefix, dataset))
    else:
        result = to_disk(_batches(run_prefix, dataset), storage, split.prefix, dataset)
    seconds = time.perf_counter() - start
    num, x_cache, y_cache, sw_cache, spec, nbytes = result
    cached = CachedPrefix(split, inference_prefix, num, storage or "memory", x_cache, y_cache,
                          sw_cache, spec, nbytes, seconds)
    if verbose:
        print(f"cache_prefix: {cached}", flush=True)
    return cached


def _split_for(model, split: PrefixSplit | None, after) -> PrefixSplit:
    """The split to cache: `split` if it was made for `model`, else `split_prefix(model, after)`."""
    if split is None:
        return split_prefix(model, after=after)
    if split.model is not model:
        raise ValueError("`split` was made for another model; make it with split_prefix(model).")
    if after is not None:
        raise ValueError("Give `after` or `split`, not both.")
    return split


def _check_prefix(split: PrefixSplit, inference_prefix: bool) -> None:
    """Refuses a prefix that trains or that is not deterministic in the mode it will run in."""
    trainable = split.trainable_in_prefix()
    if trainable:
        raise PrefixError(
            f"The prefix has trainable variables ({trainable[:3]}); a prefix that trains "
            "changes every step and cannot be cached. Freeze it, or split lower."
        )
    _check_determinism(split, inference_prefix)


def _check_determinism(split: PrefixSplit, inference_prefix: bool) -> None:
    by_kind: dict[str, list[str]] = {}
    for kind, name in split.random_layers:
        by_kind.setdefault(kind, []).append(name)
    if "random" in by_kind:
        raise NondeterministicPrefixError(
            f"The prefix contains layers that draw random numbers ({by_kind['random'][:5]}), "
            "e.g. random augmentation: caching would keep one draw per example, and in "
            "inference mode they would not augment at all. Train without caching, or split "
            "above them is not possible since they feed the frozen layers."
        )
    if inference_prefix:
        return
    problems = []
    if "dropout" in by_kind:
        problems.append(f"dropout or noise in training mode ({by_kind['dropout'][:5]}; a frozen "
                        "Keras layer still applies dropout in `fit`)")
    if "batchnorm" in by_kind:
        problems.append(f"BatchNormalization on batch statistics ({by_kind['batchnorm'][:5]}; "
                        "its layer is trainable=True)")
    if problems:
        raise NondeterministicPrefixError(
            f"The prefix is not deterministic in training mode: {'; '.join(problems)}. "
            "Pass inference_prefix=True to run the frozen prefix in inference mode (dropout "
            "off, BatchNorm on moving statistics), what Keras' transfer-learning guide "
            "means by base_model(x, training=False); this changes training, so it is not the "
            "default. split_prefix(model).joined(inference_prefix=True) trains the same way "
            "without caching."
        )


def _prefix_function(model, prefix, jit_compile, inference_prefix):
    """The prefix as a `tf.function` (XLA-compiled as the model is, unless `jit_compile`)."""
    if jit_compile is None:
        jit_compile = bool(model.jit_compile) if getattr(model, "compiled", False) else False
    training = not inference_prefix

    @tf.function(jit_compile=jit_compile, reduce_retracing=True)
    def run_prefix(inputs):
        return prefix(inputs, training=training)

    return run_prefix


def _batches(run_prefix, dataset):
    """`(prefix outputs, y, sample_weight)` for each batch of the dataset."""
    for batch in dataset:
        bx, by, bsw = keras.utils.unpack_x_y_sample_weight(batch)
        yield run_prefix(bx), by, bsw
