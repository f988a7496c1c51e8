"""Core benchmark of keras-peft: wrap overhead and the speed-up of freezing.

This is a benchmark, not a test: it prints numbers (and, with ``--json``,
writes them). It measures, in one process, on the same model and data:

1. **Overhead** of ``keras_peft.wrap``: plain Keras ``fit`` versus the same
   model wrapped with ``{".*": Rule()}`` (everything trainable, so the
   wrapped step does exactly the work of Keras' own). Target: step-time
   ratio wrap/plain <= 1.05. A variant with ``Rule(lr_scale=0.5)`` on every
   variable is reported too (it reads each variable before the optimizer
   step and blends old and new after it, so it is expected to cost more; its
   row is informational).
2. **Freezing**: a stack of ``L`` equal Dense blocks (width ``W``, input of
   width ``W`` so every block costs the same), fully trained versus the bottom
   ``k = L/2`` blocks frozen with ``Rule(trainable=False)``. The measured
   speed-up full/frozen is compared with the theoretical one (see
   `theoretical_speedups`). Target: measured >= 90% of theoretical. Plain
   Keras freezing (``layer.trainable = False``) is measured as a reference.

Method: every model is built from the same seed, compiled with AdamW and the
same ``jit_compile`` (True unless ``--no-jit``), warmed up (tracing and XLA
compilation excluded), then trained with ``fit`` over a fixed in-memory
dataset while a callback times each batch (the callback is not async-safe,
so Keras converts each step's logs to Python numbers before the callback
runs: the timing includes the full step). Repetitions are interleaved
(A B C ... then ... C B A) so that drift (the other core, thermal, ...) hits
every configuration alike; each configuration's median step time over all
measured steps is reported.

Usage::

    python bench/bench_core.py            # default size, ~2-3 min on 2 CPU cores
    python bench/bench_core.py --quick    # tiny smoke run (< 60 s)
    python bench/bench_core.py --no-jit --json bench/results/core.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# Runnable as `python bench/bench_core.py` from a checkout without installing.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "recipes"))

import _common  # noqa: E402  (recipes/_common.py)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")  # "N out of the last M calls ... retracing": one model each

import keras_peft  # noqa: E402
from keras_peft import Rule  # noqa: E402

OVERHEAD_TARGET = 1.05  # wrap / plain step time, at most
FREEZE_TARGET = 0.90  # measured / theoretical speed-up, at least

DEFAULTS = {"layers": 8, "width": 1024, "batch": 512, "steps": 3, "reps": 30, "warmup": 3}
QUICK = {"layers": 4, "width": 128, "batch": 32, "steps": 3, "reps": 4, "warmup": 2}


# --------------------------------------------------------------------- setup
def machine_info(jit: bool) -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_peft": keras_peft.__version__,
        "keras_backend": keras.backend.backend(),
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "jit_compile": jit,
    }


def build_model(layers: int, width: int, seed: int) -> keras.Model:
    """`layers` equal blocks Dense(width -> width, relu): every block costs the same.

    No head: the loss (MSE) is taken on the last block's output, so that the
    blocks are the whole cost of the step and the theoretical speed-up is
    exact up to elementwise work. Glorot init with fan_in == fan_out keeps the
    activations well away from denormals (variance halves per relu).
    """
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((width,), name="x")]
        + [keras.layers.Dense(width, activation="relu", name=f"block_{i}") for i in range(layers)],
        name="blocks",
    )
    return model


def frozen_pattern(k: int) -> str:
    return r".*block_(?:" + "|".join(str(i) for i in range(k)) + r")/.*"


def compile_model(model, jit: bool):
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=1e-4, weight_decay=1e-4),
        loss="mse",
        jit_compile=jit,
    )
    return model


def trainable_params(model) -> int:
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def make_configs(layers: int, k: int):
    """(key, label, builder) for each configuration; builder(model) -> model."""

    def plain(m):
        return m

    def wrap_all(m):
        return keras_peft.wrap(m, {".*": Rule()})

    def wrap_lr(m):
        return keras_peft.wrap(m, {".*": Rule(lr_scale=0.5)})

    def wrap_frozen(m):
        return keras_peft.wrap(m, {frozen_pattern(k): Rule(trainable=False), ".*": Rule()})

    def plain_frozen(m):
        for layer in m.layers[:k]:
            layer.trainable = False
        return m

    return [
        ("plain", "plain keras, all trainable", plain),
        ("wrap", 'wrap {".*": Rule()}', wrap_all),
        ("wrap_lr", 'wrap {".*": Rule(lr_scale=0.5)}', wrap_lr),
        ("wrap_frozen", f"wrap, bottom {k}/{layers} blocks Rule(trainable=False)", wrap_frozen),
        ("plain_frozen", f"plain keras, bottom {k}/{layers} layer.trainable=False", plain_frozen),
    ]


def run_steps(model, dataset, steps: int, mode: str, batch_data) -> list[float]:
    if mode == "fit":
        # One extra leading batch, dropped: the first batch of a `fit` call also
        # starts the dataset iterator (~1-2 ms), which is not part of a step.
        timer = _common.make_timer(per="batch")  # wall time, begin to end (logs fetched)
        model.fit(
            dataset,
            epochs=1,
            steps_per_epoch=steps + 1,
            verbose=0,
            callbacks=[timer],
            shuffle=False,
        )
        return timer.times[1:]
    x, y = batch_data
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.train_on_batch(x, y)  # returns Python floats: the step has finished
        times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------- the theory
def theoretical_speedups(layers: int, k: int) -> dict:
    """Speed-up full/frozen predicted by counting matmuls.

    Per block of equal cost, training does 3 matmuls of the same size: the
    forward one, the weight gradient (dL/dW = x^T g) and the input gradient
    (dL/dx = g W^T).

    - naive: every block costs 3 when trained and 1 (forward only) when
      frozen: 3L / (3L - 2k).
    - corrected: the input gradient of the first block is never computed
      (the model input is not a variable), whether the bottom blocks are
      frozen or not; with the bottom k blocks frozen, the lowest trainable
      block (k+1) needs no input gradient either, because nothing below it
      trains: TF prunes the backward pass there. Full: L + L + (L-1);
      frozen: L + (L-k) + (L-k-1); ratio (3L-1) / (3L-2k-1).

    Both ignore elementwise work (bias, relu, the optimizer update). The
    AdamW update is proportional to the trainable parameters, like the
    weight gradients, so it pushes the attainable ratio slightly above the
    corrected value; the forward-only elementwise work pulls it slightly
    below. Pass/fail uses the corrected (larger, stricter) value.
    """
    L = layers
    return {
        "naive": 3 * L / (3 * L - 2 * k),
        "corrected": (3 * L - 1) / (3 * L - 2 * k - 1),
    }


# ----------------------------------------------------------------- the bench
def summarize(times_s: list[float]) -> dict:
    ms = sorted(t * 1000 for t in times_s)
    q = np.percentile(ms, [10, 25, 75, 90]).tolist() if ms else [float("nan")] * 4
    return {
        "n": len(ms),
        "median_ms": statistics.median(ms) if ms else float("nan"),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
        "p10_ms": q[0],
        "p25_ms": q[1],
        "p75_ms": q[2],
        "p90_ms": q[3],
        "min_ms": ms[0] if ms else float("nan"),
    }


def paired_ratio(per_rep_a: list[list[float]], per_rep_b: list[list[float]]) -> float:
    """Median over repetitions of median(b) / median(a) within the same repetition.

    Each repetition runs every configuration back to back, so a burst of
    load from elsewhere on the machine mostly hits both sides of a pair;
    the median over repetitions then drops the pairs it split.
    """
    r = [
        statistics.median(b) / statistics.median(a) for a, b in zip(per_rep_a, per_rep_b) if a and b
    ]
    return statistics.median(r) if r else float("nan")


def sanity_checks(models: dict, layers: int, width: int, k: int, seed: int) -> dict:
    """Checks that each configuration trained as it claims (all ran the same steps).

    - plain and wrap {".*": Rule()} end with the same weights;
    - the frozen blocks still hold their initial values, the others moved;
    - lr_scale=0.5 moved the weights less far than wrap (Adam at half the
      learning rate: exactly half as far after one step; the ratio drifts
      up from 0.5 over many steps on a fixed batch).
    """
    init = [v.numpy() for v in build_model(layers, width, seed).weights]
    out = {}

    def weights(key):
        return [v.numpy() for v in models[key].weights]

    def moved(key):
        return [float(np.linalg.norm(w - w0)) for w, w0 in zip(weights(key), init)]

    if "plain" in models and "wrap" in models:
        out["wrap_equals_plain"] = all(
            np.allclose(a, b, rtol=1e-4, atol=1e-6)
            for a, b in zip(weights("plain"), weights("wrap"))
        )
    if "wrap" in models and "wrap_lr" in models:
        full, half = sum(moved("wrap")), sum(moved("wrap_lr"))
        out["lr_scale_distance_ratio"] = half / full if full else float("nan")
    for key in ("wrap_frozen", "plain_frozen"):
        if key in models:
            d = moved(key)  # two variables (kernel, bias) per block
            out[f"{key}_bottom_unchanged"] = all(x == 0.0 for x in d[: 2 * k])
            out[f"{key}_top_moved"] = all(x > 0.0 for x in d[2 * k :])
    return out


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _build_all(args, configs, dataset, batch_data, jit: bool):
    """Each configuration's model, compiled, traced and warmed up; and its report row."""
    L, W = args.layers, args.width
    models, rows = {}, {}
    for key, label, builder in configs:
        model = compile_model(builder(build_model(L, W, args.seed)), jit)
        t0 = time.perf_counter()
        run_steps(model, dataset, 1, args.mode, batch_data)  # trace + compile
        compile_s = time.perf_counter() - t0
        run_steps(model, dataset, args.warmup, args.mode, batch_data)
        models[key] = model
        rows[key] = {
            "label": label,
            "trainable_params": trainable_params(model),
            "first_call_s": compile_s,
            "per_rep": [],
        }
        print(f"  built {key:<13} first call (trace+compile) {compile_s:6.2f} s", flush=True)
    return models, rows


def _timed_reps(args, keys, models, rows, dataset, batch_data) -> None:
    """`args.reps` interleaved repetitions; each appends its step times to `rows[key]`."""
    for rep in range(args.reps):
        order = keys if rep % 2 == 0 else keys[::-1]  # ABC.. CBA.. against drift
        for key in order:
            rows[key]["per_rep"].append(
                run_steps(models[key], dataset, args.steps, args.mode, batch_data)
            )
        if args.verbose or rep + 1 == args.reps or (rep + 1) % 5 == 0:
            med = "  ".join(
                f"{key}={1000 * statistics.median(rows[key]['per_rep'][-1]):.1f}" for key in keys
            )
            print(f"  rep {rep + 1}/{args.reps}: median ms  {med}", flush=True)


def _comparison(name, a: dict, b: dict, base, other, kind, theory, quick: bool) -> dict:
    """Row `b` (`other`) against row `a` (`base`): step-time ratios and the target's verdict."""
    entry = {
        "name": name,
        "base": base,
        "other": other,
        "kind": kind,
        # other / base step time, three estimators (see print_report):
        "ratio_paired": paired_ratio(a["per_rep"], b["per_rep"]),
        "ratio_median": b["median_ms"] / a["median_ms"],
    }
    ratio = entry["ratio_paired"]
    if kind == "overhead":
        entry["target"] = f"<= {OVERHEAD_TARGET:.2f}"
        entry["passed"] = ratio <= OVERHEAD_TARGET
    elif kind == "speedup":
        for est in ("paired", "median"):
            entry[f"speedup_{est}"] = 1.0 / entry[f"ratio_{est}"]
        entry["speedup"] = 1.0 / ratio
        entry["of_naive"] = entry["speedup"] / theory["naive"]
        entry["of_corrected"] = entry["speedup"] / theory["corrected"]
        entry["target"] = f">= {FREEZE_TARGET:.0%} of {theory['corrected']:.3f}"
        entry["passed"] = entry["of_corrected"] >= FREEZE_TARGET
    else:
        entry["target"] = "info"
        entry["passed"] = None
    if quick and entry["passed"] is not None:
        # Steps of ~1 ms are mostly Python: the smoke run checks that the
        # benchmark runs, not the targets.
        entry["passed"] = None
        entry["smoke"] = True
    return entry


def bench(args) -> dict:
    jit = not args.no_jit
    L, W, B = args.layers, args.width, args.batch
    k = args.frozen if args.frozen is not None else L // 2
    if not 0 < k < L:
        raise SystemExit(f"--frozen must be in 1..{L - 1}; got {k}")

    rng = np.random.default_rng(args.seed)
    x = tf.constant(rng.standard_normal((B, W), dtype=np.float32))
    y = tf.constant(rng.standard_normal((B, W), dtype=np.float32))
    # One fixed batch, repeated: the input pipeline costs (almost) nothing.
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()

    configs = make_configs(L, k)
    if args.only:
        keep = set(args.only.split(","))
        configs = [c for c in configs if c[0] in keep]
    models, rows = _build_all(args, configs, dataset, (x, y), jit)

    keys = [c[0] for c in configs]
    load_before = _loadavg()
    _timed_reps(args, keys, models, rows, dataset, (x, y))
    load_after = _loadavg()

    for key in keys:
        rows[key].update(summarize([t for rep in rows[key]["per_rep"] for t in rep]))

    theory = theoretical_speedups(L, k)
    sanity = sanity_checks(models, L, W, k, args.seed)
    results = {
        "sanity": sanity,
        "rows": rows,
        "comparisons": [],
        "theory": theory,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    for name, base, other, kind in (
        ("wrap overhead", "plain", "wrap", "overhead"),
        ("lr_scale=0.5 overhead", "plain", "wrap_lr", "info"),
        ("freeze speed-up (wrap)", "wrap", "wrap_frozen", "speedup"),
        ("freeze speed-up (plain keras, reference)", "plain", "plain_frozen", "info_speedup"),
    ):
        if base not in rows or other not in rows:
            continue
        entry = _comparison(name, rows[base], rows[other], base, other, kind, theory,
                            args.quick)
        results["comparisons"].append(entry)
        rows[other]["comparison"] = entry
    # The reference row is informational but reported as a speed-up, too.
    for c in results["comparisons"]:
        if c["kind"] == "info_speedup":
            c["speedup"] = 1.0 / c["ratio_paired"]
            c["of_naive"] = c["speedup"] / theory["naive"]
            c["of_corrected"] = c["speedup"] / theory["corrected"]
            for est in ("paired", "median"):
                c[f"speedup_{est}"] = 1.0 / c[f"ratio_{est}"]
    return results


# ------------------------------------------------------------------- output
def _verdict(c):
    if c.get("smoke"):
        return "not judged (--quick)"
    return "info" if c["passed"] is None else ("PASS" if c["passed"] else "FAIL")


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3f}"


def print_report(results: dict, k: int, layers: int) -> None:
    rows = results["rows"]
    print()
    print(
        "| configuration | trainable params | median step ms | p10-p90 ms "
        "| ratio (paired) | target | pass/fail |"
    )
    print("|---|---:|---:|---:|---|---|---|")
    for row in rows.values():
        c = row.get("comparison")
        if c is None:
            ratio, target, verdict = "baseline", "", ""
        elif "speedup" in c:
            ratio = (
                f"{c['ratio_paired']:.3f} of {c['base']}: speed-up {c['speedup']:.3f} "
                f"= {c['of_corrected']:.1%} of theory"
            )
            target, verdict = c["target"], _verdict(c)
        else:
            ratio = f"{c['ratio_paired']:.3f} of {c['base']}"
            target, verdict = c["target"], _verdict(c)
        print(
            f"| {row['label']} | {row['trainable_params']:,} | {_ms(row['median_ms'])} | "
            f"{_ms(row['p10_ms'])}-{_ms(row['p90_ms'])} | {ratio} | {target} | {verdict} |"
        )
    print()
    th = results["theory"]
    print(
        f"Theoretical freeze speed-up, L={layers}, k={k}: naive 3L/(3L-2k) = {th['naive']:.3f}; "
        f"corrected (3L-1)/(3L-2k-1) = {th['corrected']:.3f} (no input gradient for the "
        "first block, nor for the lowest trainable one). Pass/fail uses the corrected value."
    )
    print(
        "Ratios (other/base step time) by estimator: paired = median over reps of the "
        "per-rep median ratio (used for pass/fail: robust to load that comes and goes); "
        "median = ratio of overall medians."
    )
    for c in results["comparisons"]:
        line = f"  {c['name']}: paired {c['ratio_paired']:.3f}, median {c['ratio_median']:.3f}"
        if "speedup" in c:
            line += (
                f"  -> speed-up paired {c['speedup_paired']:.3f} / median "
                f"{c['speedup_median']:.3f}; paired = "
                f"{c['of_naive']:.1%} of naive, {c['of_corrected']:.1%} of corrected"
            )
        print(line)
    sanity = results["sanity"]
    if sanity:
        shown = ", ".join(
            f"{name}={value:.3f}" if isinstance(value, float) else f"{name}={value}"
            for name, value in sanity.items()
        )
        print(f"Sanity (same steps for all): {shown}")
    print(
        f"Load average before/after the timed reps: {results['loadavg_before']} / "
        f"{results['loadavg_after']} (more than the CPU count means other processes "
        "competed for the cores: expect noise)."
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps (CI smoke, < 60 s)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--no-jit", action="store_true", help="compile with jit_compile=False")
    p.add_argument(
        "--mode",
        choices=["fit", "train_on_batch"],
        default="fit",
        help="how steps are run and timed (default: fit with a batch-timing callback)",
    )
    p.add_argument("--layers", type=int, help=f"blocks L (default {DEFAULTS['layers']})")
    p.add_argument("--width", type=int, help=f"block width W (default {DEFAULTS['width']})")
    p.add_argument("--batch", type=int, help=f"batch size (default {DEFAULTS['batch']})")
    p.add_argument("--frozen", type=int, help="frozen bottom blocks k (default L//2)")
    p.add_argument("--steps", type=int, help="measured steps per configuration per repetition")
    p.add_argument("--reps", type=int, help="interleaved repetitions")
    p.add_argument("--warmup", type=int, help="warm-up steps after the first call (excluded)")
    p.add_argument(
        "--only",
        help="comma-separated configuration keys: plain,wrap,wrap_lr,wrap_frozen,plain_frozen",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print every repetition")
    p.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for name, value in base.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    jit = not args.no_jit
    info = machine_info(jit)
    print("# keras-peft core benchmark")
    print()
    for key, value in info.items():
        print(f"- {key}: {value}")
    k = args.frozen if args.frozen is not None else args.layers // 2
    print(
        f"- model: {args.layers} x Dense({args.width}, relu), batch {args.batch}, AdamW, MSE; "
        f"frozen k={k}; mode={args.mode}; {args.reps} interleaved reps x {args.steps} steps "
        f"(+1 compile call, +{args.warmup} warm-up steps excluded)"
        f"{' [quick]' if args.quick else ''}"
    )
    print(flush=True)
    t0 = time.perf_counter()
    results = bench(args)
    elapsed = time.perf_counter() - t0
    print_report(results, k, args.layers)
    print(f"\nTotal benchmark time: {elapsed:.1f} s")

    if args.json:
        out = {
            "machine": info,
            "args": vars(args),
            "elapsed_s": elapsed,
            "theory": results["theory"],
            "loadavg_before": results["loadavg_before"],
            "loadavg_after": results["loadavg_after"],
            "sanity": results["sanity"],
            "comparisons": results["comparisons"],
            "rows": {
                key: {
                    name: value
                    for name, value in row.items()
                    if name not in ("per_rep", "comparison")
                }
                | {"per_rep_ms": [[t * 1000 for t in rep] for rep in row["per_rep"]]}
                for key, row in results["rows"].items()
            },
        }
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"Wrote {args.json}")

    failed = [c["name"] for c in results["comparisons"] if c.get("passed") is False]
    if failed:
        print(f"Missed targets: {', '.join(failed)}")
    return 1 if (failed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
