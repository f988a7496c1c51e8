"""The errors `cache_prefix` and `split_prefix` raise when caching would be wrong."""

from __future__ import annotations

__all__ = ["NondeterministicDataError", "NondeterministicPrefixError", "NothingFrozenError",
           "PrefixError"]


class PrefixError(ValueError):
    """The model cannot be split, or its prefix cannot be cached, as asked."""


class NondeterministicPrefixError(PrefixError):
    """The prefix would compute a different output for the same example each epoch."""


class NondeterministicDataError(PrefixError):
    """The data pipeline draws random numbers (e.g. random augmentation)."""


class NothingFrozenError(PrefixError):
    """Nothing at the bottom of the model is frozen: there is no prefix to cache."""
