"""keras-peft: parameter-efficient fine-tuning for Keras 3 / TensorFlow.

```python
import keras_peft
model = keras_peft.wrap(model, rules={r".*": keras_peft.Rule(lr_scale=0.5)})
print(keras_peft.report(model))
```
"""

import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from keras_peft import layers  # noqa: E402
from keras_peft.model import (  # noqa: E402
    PeftModel,
    get_rules,
    is_wrapped,
    unwrap,
    variable_paths,
    wrap,
)
from keras_peft.depth import BlockInferenceError, Blocks, model_blocks  # noqa: E402
from keras_peft.reporting import Report, ReportRow, report  # noqa: E402
from keras_peft.strategies import (  # noqa: E402
    bitfit,
    combine,
    full,
    head_only,
    layerwise_lr_decay,
    norm_tuning,
    surgical,
    top_layers,
)
from keras_peft.rules import (  # noqa: E402
    Decision,
    DuplicatePathError,
    Plan,
    PolicyError,
    Rule,
    UnmatchedRuleError,
)

__version__ = "0.1.0"

__all__ = [
    "BlockInferenceError",
    "Blocks",
    "bitfit",
    "combine",
    "full",
    "head_only",
    "layerwise_lr_decay",
    "model_blocks",
    "norm_tuning",
    "surgical",
    "top_layers",
    "Decision",
    "DuplicatePathError",
    "PeftModel",
    "Plan",
    "PolicyError",
    "Report",
    "ReportRow",
    "Rule",
    "UnmatchedRuleError",
    "get_rules",
    "is_wrapped",
    "layers",
    "report",
    "unwrap",
    "variable_paths",
    "wrap",
]

# Automatic selection (Auto-RGN) and gradual unfreezing
from keras_peft.auto import AutoResult, auto  # noqa: E402
from keras_peft.unfreezing import GradualUnfreezing, gradual_unfreezing  # noqa: E402

__all__ += ["AutoResult", "GradualUnfreezing", "auto", "gradual_unfreezing"]
