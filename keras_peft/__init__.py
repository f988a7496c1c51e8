"""keras-peft: parameter-efficient fine-tuning for Keras 3 / TensorFlow.

```python
import keras
import keras_peft

model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="body"),
                          keras.layers.Dense(1, name="head")], name="net")
keras_peft.wrap(model, rules={r".*body/.*": keras_peft.Rule(lr_scale=0.5)})
print(keras_peft.report(model))
```
"""

import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from keras_peft import layers
from keras_peft._version import __version__ as __version__
from keras_peft.checkpoints.delta import (
    DeltaError,
    DeltaFileError,
    DeltaMismatchError,
    load_delta,
    save_delta,
)
from keras_peft.model import (
    PeftModel,
    all_layers,
    get_rules,
    is_wrapped,
    unwrap,
    variable_paths,
    wrap,
)
from keras_peft.reporting import Report, ReportRow, report
from keras_peft.rules import (
    Decision,
    DuplicatePathError,
    FrozenLayerError,
    Plan,
    PolicyError,
    Rule,
    UnmatchedRuleError,
)
from keras_peft.strategies.auto import AutoResult, auto
from keras_peft.strategies.depth import BlockInferenceError, Blocks, model_blocks
from keras_peft.strategies.lora import LoraTargetError, lora, lora_layer_paths, merge, unmerge
from keras_peft.strategies.simple import (
    bitfit,
    combine,
    full,
    head_only,
    keep_frozen,
    layerwise_lr_decay,
    norm_tuning,
    surgical,
    top_layers,
)
from keras_peft.strategies.unfreezing import GradualUnfreezing, gradual_unfreezing

__all__ = [
    # core
    "PeftModel",
    "Rule",
    "all_layers",
    "get_rules",
    "is_wrapped",
    "layers",
    "report",
    "unwrap",
    "variable_paths",
    "wrap",
    "Decision",
    "Plan",
    "Report",
    "ReportRow",
    # strategies
    "Blocks",
    "model_blocks",
    "auto",
    "AutoResult",
    "bitfit",
    "combine",
    "full",
    "gradual_unfreezing",
    "GradualUnfreezing",
    "head_only",
    "keep_frozen",
    "layerwise_lr_decay",
    "lora",
    "lora_layer_paths",
    "merge",
    "norm_tuning",
    "surgical",
    "top_layers",
    "unmerge",
    # checkpoints
    "load_delta",
    "save_delta",
    # errors
    "BlockInferenceError",
    "DeltaError",
    "DeltaFileError",
    "DeltaMismatchError",
    "DuplicatePathError",
    "FrozenLayerError",
    "LoraTargetError",
    "PolicyError",
    "UnmatchedRuleError",
]

# Frozen-prefix activation caching (keras_peft.caching).
from keras_peft.caching import (
    CachedPrefix,
    CacheStep,
    NondeterministicDataError,
    NondeterministicPrefixError,
    NothingFrozenError,
    PrefixError,
    PrefixSplit,
    cache_prefix,
    fit_cached,
    split_prefix,
)

__all__ += [
    "cache_prefix",
    "fit_cached",
    "split_prefix",
    "CachedPrefix",
    "CacheStep",
    "NothingFrozenError",
    "PrefixSplit",
    "NondeterministicDataError",
    "NondeterministicPrefixError",
    "PrefixError",
]

# Named adapters: several on one base (docs/adapters.md, "Several adapters on one base").
from keras_peft.adapters.lifecycle import (  # noqa: E402
    AdapterInfo,
    adapters,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    set_adapter,
)

__all__ += ["AdapterInfo", "add_weighted_adapter", "adapters", "delete_adapter",
            "disable_adapters", "set_adapter"]

# Reliability: exact resume, atomic writes, non-finite steps (docs/reliability.md).
from keras_peft import io  # noqa: E402 (each block of this file imports after the last)
from keras_peft.checkpoints.backup import BackupAndRestore  # noqa: E402

__all__ += ["BackupAndRestore", "io"]

# Adaptive strategies: callbacks that change the policy during fit (docs/adaptive.md).
from keras_peft import adaptive  # noqa: E402
from keras_peft.adaptive.base import decisions  # noqa: E402
from keras_peft.adaptive.callbacks import (  # noqa: E402
    AdaptiveRGN,
    AutoFreeze,
    LayerwiseSampling,
    TrainingStatistics,
    UnfreezeOnPlateau,
)

__all__ += ["adaptive", "AdaptiveRGN", "AutoFreeze", "LayerwiseSampling", "TrainingStatistics",
            "UnfreezeOnPlateau", "decisions"]

# tf.keras (Keras 2) and TensorFlow Recommenders models (docs/tf-keras.md). The module,
# `keras_peft.tf_keras`, stays out of __all__: a star import would shadow the `tf_keras`
# package itself.
from keras_peft.tf_keras import MixedKerasError, require_legacy_keras  # noqa: E402

# The wrapped-model class of each Keras registers itself with keras_peft.model on import.
from keras_peft.wrapped import keras3 as _wrapped_keras3  # noqa: E402, F401
from keras_peft.wrapped import tf_keras as _wrapped_tf_keras  # noqa: E402, F401

__all__ += ["MixedKerasError", "require_legacy_keras"]
