"""Adaptive fine-tuning: callbacks that change the policy during `fit` from what it measures.

- `keras_peft.adaptive.callbacks`: the callbacks (`TrainingStatistics`,
  `AutoFreeze`, `LayerwiseSampling`, `UnfreezeOnPlateau`, `AdaptiveRGN`);
- `keras_peft.adaptive.monitor`: what they measure (sums the train step adds to);
- `keras_peft.adaptive.base`: how their decisions are kept and resumed.

The package itself imports nothing, so that the train step and the checkpoint
code can use the monitor without importing the callbacks.
"""
