"""Named adapters on all-MiniLM-L6-v2: delta size per adapter, and the cost of switching.

Builds the recipe's mean-pooling classifier, adds two all-linear rank-8 adapters
("sentiment", "topic", random B so that both change the output), and measures,
in one run:

- the size of each one-adapter delta file (`save_delta(model, path, adapter=...)`)
  against the base model's weights file (`save_weights`, float32);
- `set_adapter` (the selection and, on a wrapped model, the policy), in ms;
- the first `predict` after a switch to a selection not traced yet (a trace), after
  a switch back (the kept trace), and a steady one;
- a rebuild instead of a switch: a fresh base built and the delta loaded.

    python bench/adapter_lifecycle.py            # ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "recipes"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _pretrained import minilm_path  # noqa: E402  (recipes/)
from _text_classifier import build_classifier  # noqa: E402  (recipes/)

import keras_peft  # noqa: E402


def build(sequence_length: int):
    keras.utils.set_random_seed(0)
    return build_classifier(minilm_path(), 2, pooling="mean", sequence_length=sequence_length,
                            dropout=0.0, preprocessor=False)


def ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "adapter_lifecycle"))
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="adapter_lifecycle_")
    model = build(args.sequence_length)
    base_file = os.path.join(work, "base.weights.h5")
    model.save_weights(base_file)
    rng = np.random.default_rng(0)
    for name in ("sentiment", "topic"):
        rules = keras_peft.lora(model, rank=8, targets="all-linear", adapter=name)
        for layer in keras_peft.all_layers(model):
            if name in getattr(layer, "_peft_adapters", {}):
                b = layer._peft_adapters[name].by_key["b"]
                b.assign(0.02 * rng.standard_normal(b.shape).astype("float32"))
    keras_peft.wrap(model, rules)
    x = {"token_ids": np.ones((8, args.sequence_length), "int32"),
         "padding_mask": np.ones((8, args.sequence_length), "bool"),
         "segment_ids": np.zeros((8, args.sequence_length), "int32")}
    names = {t.name.split(":")[0] for t in model.inputs}
    x = {k: v for k, v in x.items() if k in names}
    sizes = {}
    for name in ("sentiment", "topic"):
        path = os.path.join(work, f"{name}.safetensors")
        keras_peft.save_delta(model, path, adapter=name)
        sizes[name] = os.path.getsize(path)
    base_size = os.path.getsize(base_file)

    switch, first, steady, outputs = [], [], [], {}
    keras_peft.set_adapter(model, "sentiment")
    t0 = time.perf_counter()
    model.predict(x, verbose=0)
    first_trace = time.perf_counter() - t0
    for i in range(args.repeats):
        name = ("sentiment", "topic")[i % 2]
        t0 = time.perf_counter()
        keras_peft.set_adapter(model, name)
        t1 = time.perf_counter()
        outputs[name] = model.predict(x, verbose=0)
        t2 = time.perf_counter()
        model.predict(x, verbose=0)
        t3 = time.perf_counter()
        switch.append(t1 - t0)
        first.append(t2 - t1)
        steady.append(t3 - t2)
    t0 = time.perf_counter()
    fresh = build(args.sequence_length)
    keras_peft.load_delta(fresh, os.path.join(work, "topic.safetensors"))
    rebuilt = fresh.predict(x, verbose=0)
    rebuild = time.perf_counter() - t0
    reload_error = float(np.max(np.abs(rebuilt - outputs["topic"])))
    result = {
        "model": "all-MiniLM-L6-v2, mean pooling, 2 classes",
        "sequence_length": args.sequence_length,
        "adapters": {n: keras_peft.adapters(model)[n].describe() for n in sizes},
        "base_weights_bytes": base_size,
        "delta_bytes": sizes,
        "delta_over_base": {n: round(s / base_size, 5) for n, s in sizes.items()},
        "set_adapter_ms_median": ms(statistics.median(switch)),
        "first_predict_of_a_new_selection_ms": ms(first_trace),
        "first_predict_after_switching_back_ms_median": ms(statistics.median(first)),
        "steady_predict_ms_median": ms(statistics.median(steady)),
        "rebuild_and_load_delta_ms": ms(rebuild),
        "reloaded_max_abs_difference": reload_error,
        "outputs_differ": bool(not np.allclose(outputs["sentiment"], outputs["topic"])),
        "repeats": args.repeats,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
