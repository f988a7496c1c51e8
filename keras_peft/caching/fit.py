"""Training with the frozen prefix cached as it grows during `fit`: `fit_cached`.

`cache_prefix` caches a prefix that is frozen before training begins. When
the frozen part grows while the model trains (`AutoFreeze` freezes blocks
from the bottom up, or a callback of your own freezes layers), `fit_cached`
trains epoch by epoch and, at the start of each epoch, caches what has been
frozen since the last epoch:

- the first time something at the bottom is frozen, the frozen prefix runs
  once over the data (`cache_prefix`) and the epoch trains the suffix on its
  outputs;
- when more has been frozen since, only the newly frozen layers run, once,
  over the outputs already cached (the cache is extended, not rebuilt);
- an epoch with nothing frozen at the bottom trains the model itself.

So every epoch after a freeze skips the frozen layers' forward pass as well
as their backward pass, which is where AutoFreeze's larger speed-up comes
from. Freezing decisions made during an epoch take effect at once (the
backward pass stops at the frozen layers); the cache catches up at the next
epoch.

The callbacks see one training run of the original model: `on_train_begin`
and `on_train_end` once, every epoch and batch, `callback.model` the model
you passed (so `ModelCheckpoint` saves it, `EarlyStopping` stops it, the
adaptive callbacks read its gradient statistics and change its rules), and
`validation_data` is evaluated on the whole model at each epoch's end.

Caching is only correct while the cached layers stay frozen and compute the
same output for an example every epoch; `fit_cached` checks that before every
step and raises `PrefixError` rather than train on stale outputs. The same
checks as `cache_prefix` apply (dropout in the prefix needs
`inference_prefix=True`, random augmentation is refused).
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import keras
import tensorflow as tf

from keras_peft.backends import keras3
from keras_peft.caching.cache import CachedPrefix, cache_prefix
from keras_peft.caching.data import as_dataset, check_data, check_kind
from keras_peft.caching.errors import NothingFrozenError, PrefixError
from keras_peft.caching.split import copy_policy, policy_for, split_prefix
from keras_peft.model import get_rules, is_wrapped
from keras_peft.state import peek, state_of

__all__ = ["CacheStep", "fit_cached"]


@dataclasses.dataclass(frozen=True)
class CacheStep:
    """One extension of the cache, made at the start of an epoch by `fit_cached`.

    Attributes:
        epoch: the epoch (from 0) it was made for.
        prefix_layers: the layers that ran to make it (only the newly frozen ones
            when an earlier cache was extended).
        cut: the tensors cached, which the rest of the model now reads.
        num_examples: examples cached.
        nbytes: size of the cache, in bytes.
        seconds: wall time it took (running the layers over the data).
        cpu_seconds: process CPU time it took.
    """

    epoch: int
    prefix_layers: tuple
    cut: tuple
    num_examples: int
    nbytes: int
    seconds: float
    cpu_seconds: float


def fit_cached(
    model,
    x,
    y=None,
    *,
    epochs: int = 1,
    batch_size: int | None = None,
    callbacks=None,
    validation_data=None,
    inference_prefix: bool = False,
    shuffle: bool = True,
    allow_random_data: bool = False,
    verbose="auto",
) -> keras.callbacks.History:
    """Like `model.fit`, but the frozen bottom of the model is cached as it grows.

    At the start of each epoch, whatever has been frozen at the bottom of the
    model (by `AutoFreeze`, or by the policy it was wrapped with) since the
    previous epoch runs once over the data and is cached; the epoch then
    trains only the rest of the model, on the cached outputs. See the module
    docstring for what the callbacks see.

    Args:
        model: a compiled functional or Sequential Keras 3 model (a keras-hub
            task included), usually wrapped by `keras_peft.wrap`.
        x: a `tf.data.Dataset` of batches `(x, y)` (raw inputs for a keras-hub
            task with a preprocessor, as its `fit` takes them), or arrays with `y`.
        y: labels, when `x` holds arrays.
        epochs: number of epochs.
        batch_size: batch size for arrays and for the cached outputs; default:
            the dataset's batch size (32 for arrays).
        callbacks: Keras callbacks, adaptive ones included
            (`keras.callbacks.BackupAndRestore` is refused: a resumed run would
            need the cache rebuilt exactly as it was).
        validation_data: evaluated on the whole model at each epoch's end
            (`val_` entries in the logs).
        inference_prefix: run cached layers in inference mode (dropout off,
            BatchNorm on its moving statistics). Needed when the frozen layers
            have dropout, as keras-hub BERT has in every layer; this changes
            training from the epoch a layer is cached (see `cache_prefix`).
        shuffle: reshuffle the cached examples every epoch.
        allow_random_data: accept a data pipeline that draws random numbers
            (see `cache_prefix`).
        verbose: 0 silent, 1 a progress bar (as `fit`) and a line per cache
            extension; "auto" is 1.

    Returns:
        A `keras.callbacks.History` of the whole run, whose `cache_steps` lists
        each extension of the cache (`CacheStep`: when, which layers, how
        large, how long it took).

    Raises:
        PrefixError: a cached layer became trainable during training (train
            with `model.fit` when layers unfreeze), or the model cannot be
            split where it is frozen.
        NondeterministicPrefixError: frozen layers have dropout or batch
            statistics and `inference_prefix` is False, or a random layer.
        NondeterministicDataError: the data pipeline draws random numbers.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_peft

    model = keras.Sequential([keras.Input((8,))] + [
        keras.layers.Dense(16, activation="tanh", name=f"block_{i}") for i in range(4)
    ] + [keras.layers.Dense(1, name="head")], name="net")
    keras_peft.wrap(model, {".*": keras_peft.Rule()})
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    history = keras_peft.fit_cached(model, x, x[:, :1] ** 2, epochs=4, batch_size=32,
                                    callbacks=[keras_peft.AutoFreeze(every_steps=4)], verbose=0)
    for step in history.cache_steps:
        print(f"epoch {step.epoch + 1}: cached {step.prefix_layers} in {step.seconds:.2f} s")
    ```
    """
    verbose = 1 if verbose == "auto" else int(verbose)
    callbacks = list(callbacks or [])
    _check_arguments(model, epochs, callbacks)
    check_kind(x, "fit_cached")
    if isinstance(x, tf.data.Dataset) and not allow_random_data:
        check_data(as_dataset(model, x, None, None, None))  # before training, not at a cache
    batch_size = batch_size or _batch_size_of(x) or 32
    history = keras.callbacks.History()
    history.cache_steps = []
    inner = [*callbacks, history]
    if verbose:
        inner.append(keras.callbacks.ProgbarLogger())
    relay = _Relay(model, inner, validation_data, epochs, verbose)
    stage = _Stage(model)
    try:
        for epoch in range(epochs):
            step = stage.extend(x, y, batch_size, epoch, inference_prefix=inference_prefix,
                                verbose=verbose)
            if step is not None:
                history.cache_steps.append(step)
            relay.stage = stage
            one_epoch = dict(epochs=epoch + 1, initial_epoch=epoch, callbacks=[relay],
                             verbose=0)
            if stage.cached is not None:  # (a dataset shuffles itself: shuffle=False)
                stage.model.fit(stage.cached.dataset(batch_size, shuffle=shuffle),
                                shuffle=False, **one_epoch)
            elif isinstance(x, tf.data.Dataset):
                model.fit(x, shuffle=False, **one_epoch)
            else:
                model.fit(x, y, batch_size=batch_size, shuffle=shuffle, **one_epoch)
            if model.stop_training:
                break
    finally:
        stage.sync_optimizer()
        relay.end()
    return history


def _check_arguments(model, epochs, callbacks) -> None:
    if not getattr(model, "compiled", False) or getattr(model, "optimizer", None) is None:
        raise ValueError(
            f"fit_cached needs a compiled model: compile model {model.name!r} (optimizer, "
            "loss, metrics) first; the cached part of the model trains with them."
        )
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be an int >= 1. Received: epochs={epochs!r}.")
    backups = [type(c).__name__ for c in callbacks
               if isinstance(c, keras.callbacks.BackupAndRestore)]
    if backups:
        raise ValueError(
            f"fit_cached does not take {backups[0]}: a resumed run would have to rebuild "
            "the cache exactly as it was at the interruption. Use model.fit (with "
            "keras_peft.BackupAndRestore) for resumable training, or save with "
            "keras.callbacks.ModelCheckpoint."
        )


def _batch_size_of(x) -> int | None:
    if not isinstance(x, tf.data.Dataset):
        return None
    for batch in x.take(1):
        first = keras.tree.flatten(batch)[0]
        return int(first.shape[0]) if first.shape.rank else None
    return None


class _Stage:
    """What trains now: the model itself, or the suffix after the cached layers."""

    def __init__(self, model):
        self.root = model
        self.model = model
        self.cached: CachedPrefix | None = None
        self._prefix_variables = []
        self._optimizer = model.optimizer

    def extend(self, x, y, batch_size, epoch, *, inference_prefix, verbose) -> CacheStep | None:
        """Caches what has been frozen at the bottom of the stage since the last epoch."""
        self.check_frozen()
        try:
            split = split_prefix(self.model)
        except NothingFrozenError:
            return None
        start, cpu_start = time.perf_counter(), time.process_time()
        if self.cached is None:  # the data itself, as the model's fit takes it
            data = dict(x=x, y=y, batch_size=None if isinstance(x, tf.data.Dataset)
                        else batch_size)
        else:  # the outputs cached so far: only the newly frozen layers run
            data = dict(x=self.cached.dataset(batch_size))
        # (the data's randomness was checked when fit_cached began)
        cached = cache_prefix(self.model, split=split, inference_prefix=inference_prefix,
                              jit_compile=bool(self.root.jit_compile), allow_random_data=True,
                              verbose=0, **data)
        step = CacheStep(epoch, tuple(split.prefix_layers), tuple(split.cut),
                         cached.num_examples, cached.nbytes, time.perf_counter() - start,
                         time.process_time() - cpu_start)
        self._prefix_variables += split.prefix_variables()
        self.cached = cached
        self.model = self._prepare(cached.suffix)
        if verbose:
            print(f"fit_cached: epoch {epoch + 1}: cached {len(split.prefix_layers)} more "
                  f"operation(s) ({_shorten(split.prefix_layers)}) for {cached.num_examples} "
                  f"examples, {cached.nbytes / 2**20:.1f} MiB, in {step.seconds:.1f} s; the "
                  f"epoch trains from {', '.join(split.cut)} up", flush=True)
        return step

    def _prepare(self, suffix):
        """The suffix, with the model's policy, optimizer and gradient monitor."""
        root = self.root
        self.sync_optimizer()
        copy_policy(root, suffix)
        if is_wrapped(root) and is_wrapped(suffix):
            # The adaptive callbacks read the model's gradient monitor (keyed by the
            # variables, which the suffix shares) and its non-finite guard.
            state_of(suffix).monitor = state_of(root).monitor
            state_of(suffix).nonfinite = state_of(root).nonfinite
        arguments = keras3.compile_arguments(root)
        if arguments is None:
            raise PrefixError(f"Compile model {root.name!r} before fit_cached.")
        arguments.update(optimizer=root.optimizer, jit_compile=root.jit_compile)
        suffix.compile(**arguments)
        self._optimizer = root.optimizer
        self._revision = _revision(root)
        return suffix

    def check_frozen(self) -> None:
        """Raises PrefixError if a cached layer's variable trains now."""
        trained = [v.path for v in self._prefix_variables if v.trainable]
        if trained:
            raise PrefixError(
                f"Variables of layers that fit_cached cached have become trainable during "
                f"training (e.g. {trained[:3]}); their cached outputs no longer stand for "
                "what the model computes. fit_cached only follows a frozen part that grows "
                "(AutoFreeze, top_layers); train with model.fit when layers unfreeze "
                "(GradualUnfreezing, UnfreezeOnPlateau, LayerwiseSampling)."
            )

    def follow(self) -> None:
        """After the model's rules or optimizer changed (a callback): the suffix follows."""
        self.sync_optimizer()
        if self.model is self.root:
            return
        version = _revision(self.root)
        if version != self._revision and is_wrapped(self.model):
            rules = policy_for(self.root, self.model)
            if rules != get_rules(self.model):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # shadowed rules: reported for the model
                    self.model.set_rules(rules)  # its step retraces before the next batch
            self._revision = version

    def sync_optimizer(self) -> None:
        """One optimizer object for the model and the suffix, whichever rebuilt it last."""
        root, stage = self.root, self.model
        if stage is root or stage.optimizer is root.optimizer:
            self._optimizer = root.optimizer
            return
        if root.optimizer is not self._optimizer:  # the model's was rebuilt (set_rules)
            stage.optimizer = root.optimizer
            if is_wrapped(stage):
                state_of(stage).bump()  # the suffix's step retraces with it
        else:  # the suffix rebuilt its own
            root.optimizer = stage.optimizer
        self._optimizer = root.optimizer


def _revision(model):
    state = peek(model)
    return None if state is None else state.revision


def _shorten(names) -> str:
    names = list(names)
    return ", ".join(names if len(names) <= 4 else names[:2] + ["..."] + names[-1:])


class _Relay(keras.callbacks.Callback):
    """Passes one epoch's `fit` events on to the user's callbacks, as one run of the model."""

    def __init__(self, model, callbacks, validation_data, epochs, verbose):
        super().__init__()
        self.root = model
        self.callbacks = callbacks
        self.validation_data = validation_data
        self.epochs = epochs
        self.verbose = verbose
        self.stage = None
        self._began = False
        for c in callbacks:
            c.set_model(model)

    def set_model(self, model):  # the model that trains this epoch: not shown to callbacks
        self._model = model

    def set_params(self, params):
        params = dict(params or {}, epochs=self.epochs, verbose=self.verbose)
        super().set_params(params)
        for c in self.callbacks:
            c.set_params(params)

    def on_train_begin(self, logs=None):
        if not self._began:
            self._began = True
            for c in self.callbacks:
                c.on_train_begin(logs)

    def end(self):
        if self._began:
            for c in self.callbacks:
                c.on_train_end(None)

    def on_epoch_begin(self, epoch, logs=None):
        for c in self.callbacks:
            c.on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        if self.validation_data is not None:
            data = self.validation_data
            if isinstance(data, tf.data.Dataset):
                results = self.root.evaluate(data, verbose=0, return_dict=True)
            else:  # (x, y[, sample_weight]), as fit takes it
                vx, vy, vsw = keras.utils.unpack_x_y_sample_weight(tuple(data))
                results = self.root.evaluate(vx, vy, sample_weight=vsw, verbose=0,
                                             return_dict=True)
            logs.update({f"val_{k}": v for k, v in results.items()})
        for c in self.callbacks:
            c.on_epoch_end(epoch, logs)
        self.stage.follow()
        if self.root.stop_training:
            self.model.stop_training = True

    def on_train_batch_begin(self, batch, logs=None):
        for c in self.callbacks:
            c.on_train_batch_begin(batch, logs)
        self.stage.follow()
        self.stage.check_frozen()  # before the step: never train on stale outputs

    def on_train_batch_end(self, batch, logs=None):
        for c in self.callbacks:
            c.on_train_batch_end(batch, logs)
        self.stage.follow()
        if self.root.stop_training:
            self.model.stop_training = True
