"""What keras-peft writes and reads besides Keras' own files.

- `delta`: `save_delta`/`load_delta`, only what fine-tuning changed;
- `weights`: keras-peft's state inside Keras weight files (exact resume);
- `backup`: `BackupAndRestore`, resume mid-epoch after a crash.

The public names are exported by `keras_peft` itself.
"""
