"""Step time of the BERT recipe's strategies, measured interleaved on one machine.

On a shared machine, strategies timed one after the other (as `--compare`
does) see different loads. This script builds one all-MiniLM-L6-v2 classifier
per strategy (the recipe's own builder and rules), compiles each and runs one
warm-up step, then times `--steps` training steps of each strategy in turn,
for `--rounds` rounds, on the same fixed batch of SST-2 phrases. Per strategy
it reports the median step and the median of its per-round ratios to `full`
(paired within a round, so a load change between rounds cancels out).

    python bench/bert_step_times.py                    # batch 32, sequence 64
    python bench/bert_step_times.py --only full,lora:8 --rounds 2 --steps 3

Writes bench/results/bert_step_times.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "recipes"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _pretrained import minilm_path  # noqa: E402  (recipes/)
from _text_classifier import build_classifier, load_preprocessor  # noqa: E402
from _text_data import load_table  # noqa: E402
from bert_text_classification import (  # noqa: E402
    LEARNING_RATES,
    make_dataset,
    parse_strategy,
    strategy_rules,
)

import keras_peft  # noqa: E402

SST2 = os.path.join(HERE, "..", "..", "shared", "data", "sst2", "train.tsv")
STRATEGIES = "full,lora:8,bitfit,top_layers:2,auto,auto:0.02,head_only,llrd:0.8"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=STRATEGIES)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sequence-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per strategy per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default=SST2)
    p.add_argument("--no-xla", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results", "bert_step_times"))
    return p.parse_args(argv)


def build_models(args, strategies, preset, split, x, y) -> dict:
    """spec -> the recipe's mean-pooling classifier with that strategy, compiled and traced."""
    models = {}
    for s in strategies:
        keras.utils.set_random_seed(0)
        model = build_classifier(preset, 2, pooling="mean", sequence_length=args.sequence_length,
                                 preprocessor=load_preprocessor(preset, args.sequence_length))
        train_ds = make_dataset(split, args.batch_size, shuffle=False, seed=0)
        rules, _, _ = strategy_rules(s, model, train_ds, pooling="mean", total_steps=1000,
                                     verbose=0)
        keras_peft.wrap(model, rules)
        model.preprocessor = None  # the fixed batch is tokenized already
        model.compile(optimizer=keras.optimizers.AdamW(LEARNING_RATES[s.name]),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=not args.no_xla)
        start = time.perf_counter()
        model.train_on_batch(x, y)  # trace and compile
        print(f"{s.spec}: {keras_peft.report(model).trainable_params:,} trainable, first step "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        models[s.spec] = model
    return models


def time_rounds(args, models, x, y) -> dict:
    """spec -> per round, the median of that round's `--steps` steps."""
    times = {spec: [] for spec in models}
    for r in range(args.rounds):
        for spec, model in models.items():
            steps = []
            for _ in range(args.steps):
                start = time.perf_counter()
                model.train_on_batch(x, y)
                steps.append(time.perf_counter() - start)
            times[spec].append(statistics.median(steps))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items()),
              flush=True)
    return times


def result_rows(models, times) -> list[dict]:
    base = times.get("full")
    rows = []
    for spec, model in models.items():
        rep = keras_peft.report(model)
        row = {"strategy": spec, "trainable_params": rep.trainable_params,
               "trainable_percent": 100 * rep.trainable_fraction,
               "median_step_s": statistics.median(times[spec]), "round_medians_s": times[spec]}
        if base:
            row["ratio_to_full"] = statistics.median(t / b for t, b in zip(times[spec], base))
        rows.append(row)
    return rows


def table(rows) -> str:
    lines = ["| strategy | trainable params | % trained | median step (s) | step vs full |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        ratio = f"{row['ratio_to_full']:.2f}x" if "ratio_to_full" in row else "-"
        lines.append(f"| {row['strategy']} | {row['trainable_params']:,} | "
                     f"{row['trainable_percent']:.2f} | {row['median_step_s']:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    strategies = [parse_strategy(s) for s in args.only.split(",")]
    preset = minilm_path()
    split = load_table(args.data).take(np.arange(args.batch_size * 4), "sst2")
    preprocessor = load_preprocessor(preset, args.sequence_length)
    x, y = preprocessor(tf.constant(split.texts[:args.batch_size]),
                        tf.constant(split.labels[:args.batch_size]))
    models = build_models(args, strategies, preset, split, x, y)
    times = time_rounds(args, models, x, y)
    rows = result_rows(models, times)
    text = table(rows)
    print("\n" + text)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "data")}
    settings.update(machine=f"{platform.platform()}, {os.cpu_count()} CPUs",
                    tensorflow=tf.__version__, keras=keras.__version__,
                    load_average=os.getloadavg())
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump({"settings": settings, "results": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
