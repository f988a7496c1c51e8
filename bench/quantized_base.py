"""An int8 base against float32 with the same all-linear LoRA, side by side in one run.

Builds the recipe's mean-pooling all-MiniLM-L6-v2 classifier twice (the backbone
float32, and quantized to int8 with Keras' `quantize`), gives both all-linear LoRA
rank 8, and measures, alternating the two models step by step so that both see the
same machine: the train step time (XLA off and on), and the bytes the weights take
(every variable's size). Then the peak memory of training each, in a process of its
own: resident once built, and the peak while training (XLA on). Accuracy is measured by
`bench/adapters_sst2.py --quantize int8`.

    python bench/quantized_base.py          # ~5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "recipes"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _pretrained import minilm_path  # noqa: E402  (recipes/)
from _text_classifier import build_classifier  # noqa: E402  (recipes/)

import keras_peft  # noqa: E402


def build(quantize: bool, sequence_length: int, jit: bool):
    keras.utils.set_random_seed(0)
    model = build_classifier(minilm_path(), 2, pooling="mean", sequence_length=sequence_length,
                             dropout=0.0, preprocessor=False)
    if quantize:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
            model.backbone.quantize("int8")
    keras_peft.wrap(model, keras_peft.lora(model, rank=8, targets="all-linear"))
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), jit_compile=jit,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def weight_bytes(model) -> int:
    return int(sum(np.prod(v.shape) * tf.as_dtype(v.dtype).size for v in model.weights))


def batch_for(model, n: int, length: int):
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1000, 5000, (n, length)).astype("int32"),
         "padding_mask": np.ones((n, length), "bool"),
         "segment_ids": np.zeros((n, length), "int32")}
    names = {t.name.split(":")[0] for t in model.inputs}
    return {k: v for k, v in x.items() if k in names}, rng.integers(0, 2, n).astype("int32")


def _status_mb(key: str) -> float | None:
    """A `/proc/self/status` memory figure (Linux), in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory_of(kind: str, args) -> dict:
    """This process builds one model (`kind`) and trains it for the steps: the resident set
    once built, the peak while training (the high-water mark is reset after the build, on
    Linux), and the peak of the whole process (which includes loading the float checkpoint
    that both models start from)."""
    model = build(kind == "int8", args.sequence_length, jit=True)
    batch, y = batch_for(model, args.batch_size, args.sequence_length)
    gc.collect()
    built = _status_mb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set
        reset = True
    except OSError:
        reset = False
    for _ in range(args.steps + 1):
        model.train_on_batch(batch, y)
    return {"resident_after_build_mb": built,
            "training_peak_mb": _status_mb("VmHWM") if reset else None,
            "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def memory_apart(args) -> dict:
    """`memory_of` each model, each in a fresh process (nothing else in it)."""
    result = {}
    for kind in ("float32", "int8"):
        command = [sys.executable, os.path.abspath(__file__), "--memory-of", kind,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--sequence-length", str(args.sequence_length)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result[kind] = json.loads(out.strip().splitlines()[-1])
        print(f"memory training {kind}: {result[kind]}", flush=True)
    for key in result["float32"]:
        if result["float32"][key] and result["int8"][key]:
            result[f"{key}_int8_over_float32"] = round(
                result["int8"][key] / result["float32"][key], 3)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "quantized_base"))
    parser.add_argument("--memory-of", choices=("float32", "int8"), default=None,
                        help=argparse.SUPPRESS)  # the child process of memory_apart
    args = parser.parse_args(argv)
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, args)))
        return {}
    n, length = args.batch_size, args.sequence_length
    result = {"model": "all-MiniLM-L6-v2, mean pooling, all-linear LoRA r=8",
              "batch_size": n, "sequence_length": length, "steps": args.steps}
    for jit in (False, True):
        models = {"float32": build(False, length, jit), "int8": build(True, length, jit)}
        batch, y = batch_for(models["float32"], n, length)
        times = {k: [] for k in models}
        for model in models.values():  # trace and warm up
            model.train_on_batch(batch, y)
        for _ in range(args.steps):
            for name, model in models.items():
                t0 = time.perf_counter()
                model.train_on_batch(batch, y)
                times[name].append(time.perf_counter() - t0)
        key = "xla" if jit else "no_xla"
        result[key] = {
            name: {"step_s_median": round(statistics.median(t), 4),
                   "weight_bytes": weight_bytes(models[name]),
                   "trainable_params": keras_peft.report(models[name]).trainable_params}
            for name, t in times.items()}
        result[key]["int8_over_float32_step"] = round(
            result[key]["int8"]["step_s_median"] / result[key]["float32"]["step_s_median"], 3)
        result[key]["int8_over_float32_weights"] = round(
            result[key]["int8"]["weight_bytes"] / result[key]["float32"]["weight_bytes"], 3)
        del models
        keras.backend.clear_session()
    result["memory_apart"] = memory_apart(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
