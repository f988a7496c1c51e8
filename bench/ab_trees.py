"""A/B of two checkouts of keras_peft on the same benchmark, side by side in one run.

    python bench/ab_trees.py --base /tmp/wt_old [--configs plain,wrap_all,lora4,hub_lora4]

Starts one `bench/run.py` worker per (checkout, configuration) on one of its models
(`--model`, default all-MiniLM-L6-v2: batch 32, sequence 64, XLA, AdamW), the base
checkout's `keras_peft` first on the workers' path, and interleaves their measured
steps. Prints, per checkout, the two
ratios a restructuring must not move, each the median over repetitions of the
ratio within a repetition: keras-peft everything trainable / plain Keras (the
wrap overhead), and keras-peft lora(4) / keras-hub enable_lora(4); and the
checkout-to-checkout ratio of each configuration's step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402  (imports neither TensorFlow nor keras_peft)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="root of the other checkout (its keras_peft/)")
    p.add_argument("--model", default="minilm", choices=sorted(run.MODELS))
    p.add_argument("--configs", default="plain,wrap_all,lora4,hub_lora4")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="the suite's tiny random models (a smoke run)")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.base, "keras_peft")):
        p.error(f"--base {args.base!r} has no keras_peft/ folder")
    configs = args.configs.split(",")
    size = dict((run.QUICK_MODELS if args.quick else run.MODELS)[args.model])
    trees = {"new": run.ROOT, "base": os.path.abspath(args.base)}
    log_dir = tempfile.mkdtemp(prefix="keras-peft-ab-")
    workers = {}
    try:
        for tree, library in trees.items():
            for config in configs:
                spec = {"configs": [config], "size": size, "seed": args.seed,
                        "quick": args.quick, "precision": "auto", "jit": "auto",
                        "library": library}
                workers[(tree, config)] = run.Worker(args.model, [config], spec, log_dir)
        for (tree, config), w in workers.items():  # started together, ready in turn
            info = w.read("ready")
            print(f"ready {tree}/{config}: trainable {info['trainable_params']:,}", flush=True)
        times = {key: [] for key in workers}
        for rep in range(args.reps):
            order = list(workers) if rep % 2 == 0 else list(workers)[::-1]
            for key in order:
                times[key].append(statistics.median(workers[key].run(key[1], args.steps)["wall"]))
            print(f"rep {rep + 1}/{args.reps}: " + "  ".join(
                f"{t}/{c}={1000 * times[(t, c)][-1]:.0f}" for t, c in workers), flush=True)
        report(times, configs, args.reps)
    finally:
        for w in workers.values():
            w.kill()
    return 0


def _ratio(times, a, b, reps) -> str:
    values = sorted(times[a][i] / times[b][i] for i in range(reps))
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"{statistics.median(values):.3f} (IQR {q[0]:.3f}-{q[2]:.3f})"


def report(times, configs, reps) -> None:
    for tree in ("base", "new"):
        if "wrap_all" in configs and "plain" in configs:
            print(f"{tree}: wrap overhead (everything trainable / plain) "
                  + _ratio(times, (tree, "wrap_all"), (tree, "plain"), reps))
        if "lora4" in configs and "hub_lora4" in configs:
            print(f"{tree}: lora(4) / keras-hub enable_lora(4) "
                  + _ratio(times, (tree, "lora4"), (tree, "hub_lora4"), reps))
    for config in configs:
        print(f"new / base, {config}: " + _ratio(times, ("new", config), ("base", config), reps))


if __name__ == "__main__":
    sys.exit(main())
