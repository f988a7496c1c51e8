"""Adaptive fine-tuning: callbacks that change the policy during `fit` from what it measures.

See `keras_peft.adaptive.callbacks` for the callbacks, `.monitor` for what
they measure and `.base` for how their decisions are kept and resumed.
"""

from keras_peft.adaptive.base import AdaptiveCallback, decisions
from keras_peft.adaptive.callbacks import (
    AdaptiveRGN,
    AutoFreeze,
    LayerwiseSampling,
    TrainingStatistics,
    UnfreezeOnPlateau,
)

__all__ = ["AdaptiveCallback", "AdaptiveRGN", "AutoFreeze", "LayerwiseSampling",
           "TrainingStatistics", "UnfreezeOnPlateau", "decisions"]
