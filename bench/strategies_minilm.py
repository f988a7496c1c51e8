"""Strategies on the real all-MiniLM-L6-v2 checkpoint and SST-2: accuracy vs cost.

Fixed budget: `--train` SST-2 phrases for one epoch, evaluated on `--eval`
held-out phrases of the same training file (deterministic split, seed 0).
A mean-pooling head is used (all-MiniLM-L6-v2 was trained with mean
pooling; its [CLS] pooler was not, see ../shared/DESIGN-NOTES.md), so
`pooled_dense` is unused and frozen in every configuration.

    python bench/strategies_minilm.py                # all strategies
    python bench/strategies_minilm.py --only full,head_only --train 512

Prints a markdown table (strategy, trainable parameters, median step time,
accuracy) and writes it with a JSON next to it under bench/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf

import keras_peft
from keras_peft import Rule

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "recipes"))
import _common  # noqa: E402  (recipes/_common.py)
from _text_classifier import build_classifier  # noqa: E402  (recipes/, shared with the recipe)

SST2 = os.path.join(HERE, "..", "..", "shared", "data", "sst2", "train.tsv")
STRATEGIES = ["full", "head_only", "top_layers:2", "bitfit", "lora:8", "llrd:0.8", "auto"]
# Learning rates usual for each kind of strategy (few trained parameters -> larger rate).
LEARNING_RATES = {"full": 5e-5, "top_layers": 1e-4, "llrd": 1e-4, "auto": 1e-3,
                  "head_only": 3e-3, "bitfit": 1e-3, "lora": 1e-3}


def load_sst2(path, n_train, n_eval, seed=0):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    order = np.random.default_rng(seed).permutation(len(rows))
    pick = lambda idx: ([rows[i]["sentence"] for i in idx],  # noqa: E731
                        np.array([int(rows[i]["label"]) for i in idx]))
    return pick(order[:n_train]), pick(order[n_train:n_train + n_eval])


def build_model(preset, seed, sequence_length):
    """The recipe's mean-pooling classifier (no dropout, token ids in: the pipeline tokenizes)."""
    keras.utils.set_random_seed(seed)
    return build_classifier(preset, 2, pooling="mean", sequence_length=sequence_length,
                            dropout=0.0, preprocessor=False)


_ARGUMENTS = {"full": _common.NO_ARG, "head_only": _common.NO_ARG, "bitfit": _common.NO_ARG,
              "top_layers": _common.NEEDS_ARG, "lora": _common.NEEDS_ARG,
              "llrd": _common.NEEDS_ARG, "auto": _common.OPTIONAL_ARG}  # auto: budget 0.1
_UNKNOWN = "unknown strategy {spec!r}; choose from {choices}"


def parse_strategy(strategy):
    """`(name, argument)` of `top_layers:2` and the like; SystemExit for a bad one."""
    return _common.parse_strategy(
        strategy, _ARGUMENTS, choices=str(STRATEGIES), error=SystemExit,
        wording=_common.Wording(unknown=_UNKNOWN, needs_arg="{name} needs an argument: "
                                "{name}:{hint}", takes_no_arg="{name} takes no argument"),
        hints={"top_layers": "K", "lora": "RANK", "llrd": "DECAY"})


def rules_for(strategy, model, train_ds):
    name, arg = parse_strategy(strategy)
    unused = {r"pooled_dense/.*": Rule(trainable=False, note="unused (mean pooling)")}
    if name == "full":
        rules = keras_peft.full(model)
    elif name == "head_only":
        rules = keras_peft.head_only(model)
    elif name == "top_layers":
        rules = keras_peft.top_layers(model, int(arg))
    elif name == "bitfit":
        rules = keras_peft.bitfit(model)
    elif name == "lora":
        rules = keras_peft.lora(model, int(arg), targets=r".*(query|value)")
    elif name == "llrd":
        rules = keras_peft.layerwise_lr_decay(model, float(arg))
    elif name == "auto":
        result = keras_peft.auto(
            model, train_ds, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            num_batches=4, budget=0.1)
        print(result)
        rules = result.rules
    else:  # parse_strategy admits nothing else
        raise AssertionError(name)
    return keras_peft.combine(unused, rules)


def run(strategy, args, preset, train, held_out):
    import keras_hub

    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        preset, sequence_length=args.sequence_length)

    def dataset(texts, labels, shuffle):
        ds = tf.data.Dataset.from_tensor_slices((list(texts), labels))
        if shuffle:
            ds = ds.shuffle(len(texts), seed=args.seed)
        return ds.batch(args.batch_size).map(preprocessor, num_parallel_calls=2).prefetch(2)

    train_ds = dataset(*train, shuffle=True)
    eval_ds = dataset(*held_out, shuffle=False)
    model = build_model(preset, args.seed, args.sequence_length)
    rules = rules_for(strategy, model, train_ds)
    keras_peft.wrap(model, rules)
    rep = keras_peft.report(model)
    learning_rate = args.learning_rate or LEARNING_RATES[parse_strategy(strategy)[0]]
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], jit_compile=not args.no_jit,
    )
    timer = _common.make_timer(per="batch")
    start = time.perf_counter()
    model.fit(train_ds, epochs=1, callbacks=[timer], verbose=2)
    wall = time.perf_counter() - start
    loss, accuracy = model.evaluate(eval_ds, verbose=0)
    steps = timer.times[3:] or timer.times
    return {
        "strategy": strategy,
        "learning_rate": learning_rate,
        "trainable_params": rep.trainable_params,
        "total_params": rep.total_params,
        "median_step_s": statistics.median(steps),
        "train_wall_s": wall,
        "eval_accuracy": float(accuracy),
        "eval_loss": float(loss),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(STRATEGIES))
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="one rate for all; default: a usual rate per strategy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-jit", action="store_true")
    parser.add_argument("--data", default=SST2)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "strategies_minilm"))
    args = parser.parse_args(argv)
    if not os.path.exists(args.data):
        raise SystemExit(f"SST-2 file not found: {args.data}")
    from _pretrained import minilm_path  # recipes/

    preset = minilm_path()
    train, held_out = load_sst2(args.data, args.train, args.eval, args.seed)
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; TF {tf.__version__}, "
          f"Keras {keras.__version__}; train {len(train[0])}, eval {len(held_out[0])}, "
          f"batch {args.batch_size}, sequence length {args.sequence_length}, "
          f"lr {args.learning_rate or 'per strategy'}, XLA {not args.no_jit}, pooling mean",
          flush=True)
    results = []
    for strategy in args.only.split(","):
        print(f"\n== {strategy}", flush=True)
        results.append(run(strategy, args, preset, train, held_out))
        print(json.dumps(results[-1]), flush=True)
    # Merge with earlier results of the same settings (re-running one strategy).
    previous = {}
    settings = {k: v for k, v in vars(args).items() if k not in ("only", "out")}
    if os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            saved = json.load(f)
        if saved.get("settings") == settings:
            previous = {r["strategy"]: r for r in saved["results"]}
    previous.update({r["strategy"]: r for r in results})
    order = {s: i for i, s in enumerate(STRATEGIES)}
    results = sorted(previous.values(), key=lambda r: order.get(r["strategy"], len(order)))
    lines = ["| strategy | learning rate | trainable params | % of all | median step (s) "
             "| accuracy |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r['strategy']} | {r['learning_rate']:g} | {r['trainable_params']:,} | "
            f"{100 * r['trainable_params'] / r['total_params']:.2f} | "
            f"{r['median_step_s']:.2f} | {r['eval_accuracy']:.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"settings": settings, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
