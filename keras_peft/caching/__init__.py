"""Frozen-prefix activation caching: run the frozen bottom of a model once per example.

When every variable below some depth is frozen (`head_only`, `top_layers`)
and that bottom part, the *prefix*, computes the same output for an example
every epoch, there is no need to run it every epoch. `cache_prefix` splits a
functional model (keras-hub backbones and tasks included) into a frozen
prefix and a suffix that shares the model's layers, runs the prefix once over
the data, stores its outputs, and trains the suffix on them. Training the
suffix trains the original model: the variables are the same objects.

The modules, in import order:

- `errors`: `PrefixError` and its subclasses;
- `graph`: the functional graph in execution order, nested models opened up;
- `split`: choosing and building the split (`split_prefix`, `PrefixSplit`);
- `data`: the data as a dataset, and the check that it draws no random numbers;
- `storage`: the prefix outputs in memory or on disk;
- `cache`: `cache_prefix`, the checks that caching is correct, and `CachedPrefix`;
- `fit`: `fit_cached`, training that caches the frozen prefix as it grows.
"""

from __future__ import annotations

from keras_peft.caching.cache import CachedPrefix, cache_prefix
from keras_peft.caching.errors import (
    NondeterministicDataError,
    NondeterministicPrefixError,
    NothingFrozenError,
    PrefixError,
)
from keras_peft.caching.fit import CacheStep, fit_cached
from keras_peft.caching.split import PrefixSplit, split_prefix

__all__ = [
    "CacheStep",
    "CachedPrefix",
    "NondeterministicDataError",
    "NondeterministicPrefixError",
    "NothingFrozenError",
    "PrefixError",
    "PrefixSplit",
    "cache_prefix",
    "fit_cached",
    "split_prefix",
]
