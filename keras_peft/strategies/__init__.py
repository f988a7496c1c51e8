"""Ready policies: functions that look at a model and return rules for `keras_peft.wrap`.

- `simple`: `full`, `head_only`, `top_layers`, `bitfit`, `norm_tuning`,
  `surgical`, `layerwise_lr_decay`, `keep_frozen` and `combine`;
- `depth`: `model_blocks`, the block/head inference every depth-based strategy asks;
- `lora`: LoRA adapters (`lora`, `merge`, `unmerge`, `lora_layer_paths`);
- `auto`: Auto-RGN, a strategy chosen from measured gradient statistics;
- `unfreezing`: `gradual_unfreezing`, a callback that changes the rules during `fit`.

The public names are exported by `keras_peft` itself; this package exports
nothing, so that `keras_peft.strategies.lora` stays the module.
"""
