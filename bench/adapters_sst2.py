"""The adapters' accuracy study: SST-2 with the BERT recipe, several seeds, mean and spread.

Runs `recipes/bert_text_classification.py --compare CONFIGS --seed S` for each
seed (all-MiniLM-L6-v2, `--max-examples` SST-2 phrases, one epoch, the
recipe's held-out split, which does not depend on the seed), each seed in its
own output folder and with `--resume`, so an interrupted study continues
where it stopped. Then it aggregates the seeds: per configuration the mean,
standard deviation and range of the held-out accuracy, the trainable share,
the mean step time, and the goal (within 1 point of full fine-tuning's mean,
under 2 % trained, a faster step). The settings are fixed before any result
is seen: the recipe's defaults, the configurations below.

    python bench/adapters_sst2.py                          # 3 seeds x 7 configurations
    python bench/adapters_sst2.py --seeds 0 --configs full,lora:8
    python bench/adapters_sst2.py --quick                  # CI smoke: demo sample, tiny
    python bench/adapters_sst2.py --summarize              # the table from finished runs

`--summarize` trains nothing: it reads the runs that finished under `--out`
(`seed-S/<configuration>/results.json`), for the seeds and configurations
asked, and writes the table with the number of seeds each row has.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "recipes"))
import _common  # noqa: E402  (recipes/_common.py: light)

RECIPE = os.path.join(ROOT, "recipes", "bert_text_classification.py")
SST2 = os.path.join(ROOT, "..", "shared", "data", "sst2", "train.tsv")
DEMO = os.path.join(ROOT, "recipes", "data", "sentiment_demo.tsv")
KNOWN = {"full": _common.NO_ARG, "bitfit": _common.NO_ARG, "top_layers": _common.NEEDS_ARG,
         **{name: _common.NEEDS_ARG for name in _common.LORA_NAMES}}
CONFIGS = ("full", "lora:8", "lora:8:all-linear", "dora:8", "lora:8:plus=16", "pissa:8",
           "lora:8:all-linear:bias:norm")


def run_seed(seed: int, args) -> list[dict]:
    """One seed's comparison (resumed when its folder has finished runs)."""
    out = os.path.join(args.out, f"seed-{seed}")
    command = [sys.executable, RECIPE, "--data", args.data, "--compare", args.configs,
               "--seed", str(seed), "--epochs", "1", "--output-dir", out,
               "--resume", os.path.join(out, "backup")]
    command += args.recipe_args
    print(f"\n##### seed {seed}: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)
    with open(os.path.join(out, "comparison.json")) as f:
        return json.load(f)["runs"]


def finished_runs(seed: int, args) -> list[dict]:
    """The runs of `seed` that finished under `args.out`, in `args.configs` order."""
    runs = []
    for spec in args.configs.split(","):
        slug = spec.replace(":", "-").replace("/", "_").replace("=", "")  # the recipe's
        path = os.path.join(args.out, f"seed-{seed}", slug, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                runs.append(json.load(f))
    return runs


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def aggregate(per_seed: dict[int, list[dict]]) -> list[dict]:
    """Per configuration (in the order run): accuracy and step time over the seeds."""
    rows: dict[str, list[dict]] = {}
    for results in per_seed.values():
        for r in results:
            rows.setdefault(r["strategy"], []).append(r)
    table = []
    for name, runs in rows.items():
        table.append({
            "strategy": name, "seeds": len(runs),
            "trainable_params": runs[0]["trainable_params"],
            "trainable_percent": runs[0]["trainable_percent"],
            "accuracy": _spread([r["val_accuracy"] for r in runs]),
            "mean_step_s": statistics.fmean(r["mean_step_s"] for r in runs),
            "adapter": runs[0].get("adapter"),
        })
    return table


def markdown(table: list[dict]) -> str:
    base = next((r for r in table if r["strategy"] == "full"), None)
    head = ["configuration", "seeds", "trainable params", "% trained", "accuracy mean",
            "std", "range", "mean step (s)"]
    if base:
        head += ["Δ mean vs full (points)", "step vs full"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in table:
        a = r["accuracy"]
        cells = [r["strategy"], str(r["seeds"]), f"{r['trainable_params']:,}",
                 f"{r['trainable_percent']:.2f}", f"{a['mean']:.4f}", f"{a['std']:.4f}",
                 f"{a['min']:.3f}-{a['max']:.3f}", f"{r['mean_step_s']:.3f}"]
        if base:
            cells += [f"{100 * (a['mean'] - base['accuracy']['mean']):+.2f}",
                      f"{r['mean_step_s'] / base['mean_step_s']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    if base:
        judged = [r for r in table if r is not base and r["seeds"] >= 3] \
            if base["seeds"] >= 3 else []
        met = [r["strategy"] for r in judged
               if r["accuracy"]["mean"] >= base["accuracy"]["mean"] - 0.01
               and r["trainable_percent"] < 2.0 and r["mean_step_s"] < base["mean_step_s"]]
        verdict = ("met by " + ", ".join(met)) if met else "not met" if judged else \
            "not judged (it needs 3 seeds of full fine-tuning and of a configuration)"
        lines.append("")
        lines.append("Goal (3-seed mean within 1 point of full fine-tuning, under 2 % trained, "
                     f"a faster step): {verdict}.")
        if judged and len(judged) < len(table) - 1:
            lines.append("Rows with fewer than 3 seeds are not judged.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--data", default=SST2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "adapters_sst2"))
    p.add_argument("--quick", action="store_true",
                   help="the demo sample, 2 configurations, sequence 16: a smoke run")
    p.add_argument("--summarize", action="store_true",
                   help="train nothing: the table from the runs that finished under --out")
    args, args.recipe_args = p.parse_known_args(argv)
    if args.quick:
        args.data, args.configs = DEMO, "full,lora:2:all-linear"
        args.out = os.path.join(HERE, "results", "quick", "adapters_sst2") \
            if args.out == p.get_default("out") else args.out
        args.recipe_args += ["--sequence-length", "16", "--batch-size", "8",
                             "--validation-fraction", "0.3"]
    else:
        args.recipe_args += ["--max-examples", "8000"]
    for spec in args.configs.split(","):
        name, arg = _common.parse_strategy(spec, KNOWN, wording=_common.BERT_WORDING,
                                           error=SystemExit)
        if name in _common.LORA_NAMES:
            _common.parse_lora(name, arg, error=SystemExit)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.summarize:
        per_seed = {s: finished_runs(s, args) for s in seeds}
        if not any(per_seed.values()):
            raise SystemExit(f"error: no finished run under {args.out} for seeds {seeds}")
    else:
        per_seed = {s: run_seed(s, args) for s in seeds}
    table = aggregate(per_seed)
    text = markdown(table)
    print("\n" + text)
    _common.write_text(os.path.join(args.out, "summary.md"), text)
    _common.write_json(os.path.join(args.out, "summary.json"),
                       {"seeds": seeds, "configs": args.configs.split(","),
                        "recipe_args": args.recipe_args, "rows": table})
    assert all(math.isfinite(r["accuracy"]["mean"]) for r in table)


if __name__ == "__main__":
    main()
