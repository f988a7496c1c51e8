"""The adaptive strategies' time-to-accuracy study: SST-2 with the BERT recipe, 3 epochs, 3 seeds.

Each run is `recipes/bert_text_classification.py` on all-MiniLM-L6-v2 with
8,000 SST-2 training phrases (`--max-examples 8000`), 3 epochs, and the
recipe's held-out split (20 % of train.tsv, split seed 0, independent of the
run's seed), of which the first 4,000 phrases are evaluated after every
epoch (`--max-validation-examples 4000`). Settings are the recipe's
defaults, fixed before any result was seen. Each run is its own process and
writes `OUT/seed-S/<configuration>/results.json`; a finished run is not run
again, so an interrupted study continues where it stopped.

Time to accuracy. The target is the mean over the seeds of full
fine-tuning's final held-out accuracy, minus 0.5 points. A run reaches it at
the first epoch whose held-out accuracy is at least the target; its time to
the target is the training time up to that epoch's end: the wall time of
its training steps (tracing and XLA compiling included) plus, for
`+cache`, the time spent caching, without evaluation. CPU time likewise
(process CPU time). The resolution is one epoch. Per configuration: the
final accuracy (mean, std), how many seeds reached the target, and the mean
time to it over those seeds, also as a ratio to full fine-tuning's.

    python bench/adaptive_sst2.py                  # 3 seeds x 8 configurations, then the table
    python bench/adaptive_sst2.py --seeds 0 --configs full,autofreeze+cache
    python bench/adaptive_sst2.py --run --seed 0 --config lisa    # one run
    python bench/adaptive_sst2.py --summarize      # the table from the runs that finished
    python bench/adaptive_sst2.py --chart docs/assets/adaptive_decisions.png --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "recipes"))
import _common  # noqa: E402  (recipes/_common.py: light)

RECIPE = os.path.join(ROOT, "recipes", "bert_text_classification.py")
SST2 = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "sst2", "train.tsv"))
OUT = os.path.join(HERE, "results", "adaptive_sst2")
CONFIGS = ("full", "top_layers:2", "gradual", "plateau", "autofreeze", "autofreeze+cache",
           "lisa", "rgn")
RECIPE_ARGS = ("--max-examples", "8000", "--max-validation-examples", "4000", "--epochs", "3",
               "--no-save-delta")
MARGIN = 0.005  # the target: full fine-tuning's final accuracy minus 0.5 points
GOAL = ("autofreeze+cache", 0.5)  # reaches the target in at most half full's time


def slug(config: str) -> str:
    """The recipe's folder name for a strategy (`top_layers:2` -> `top_layers-2`)."""
    return config.replace(":", "-").replace("/", "_").replace("=", "")


def command(seed: int, config: str, out: str, data: str, extra=()) -> list[str]:
    return [sys.executable, RECIPE, "--data", data, "--strategy", config, "--seed", str(seed),
            "--output-dir", os.path.join(out, f"seed-{seed}"), *RECIPE_ARGS, *extra]


def result_path(out: str, seed: int, config: str) -> str:
    return os.path.join(out, f"seed-{seed}", slug(config), "results.json")


def run(seed: int, config: str, out: str, data: str, extra=()) -> None:
    """One run, in its own process (skipped when its results.json exists)."""
    if os.path.exists(result_path(out, seed, config)):
        print(f"seed {seed}, {config}: finished earlier ({result_path(out, seed, config)})")
        return
    argv = command(seed, config, out, data, extra)
    print(f"\n##### seed {seed}, {config}: {' '.join(argv)}", flush=True)
    subprocess.run(argv, check=True)


def finished(out: str, seeds, configs) -> dict[str, list[dict]]:
    """{config: [results of the seeds that finished]}, in `configs` order."""
    runs = {}
    for config in configs:
        for seed in seeds:
            path = result_path(out, seed, config)
            if os.path.exists(path):
                with open(path) as f:
                    runs.setdefault(config, []).append(json.load(f))
    return runs


def time_to(result: dict, target: float) -> dict | None:
    """The first epoch whose held-out accuracy reaches `target`, and the time to its end."""
    for epoch in result["epochs"]:
        if epoch.get("val_accuracy", -1.0) >= target:
            return {"epoch": epoch["epoch"], "wall_s": epoch["train_time_s"],
                    "cpu_s": epoch["train_cpu_s"]}
    return None


def _mean(values):
    return statistics.fmean(values) if values else None


def table(runs: dict[str, list[dict]]) -> tuple[list[dict], float | None]:
    """Per configuration: final accuracy, seeds that reached the target, time to it."""
    full = runs.get("full", [])
    target = statistics.fmean(r["val_accuracy"] for r in full) - MARGIN if full else None
    rows = []
    for config, results in runs.items():
        accuracies = [r["val_accuracy"] for r in results]
        reached = [t for t in (time_to(r, target) for r in results) if t] if full else []
        rows.append({
            "config": config, "seeds": len(results),
            "accuracy_mean": statistics.fmean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "reached": len(reached),
            "epoch_mean": _mean([t["epoch"] for t in reached]),
            "wall_s_mean": _mean([t["wall_s"] for t in reached]),
            "cpu_s_mean": _mean([t["cpu_s"] for t in reached]),
            "total_wall_s_mean": statistics.fmean(r["epochs"][-1]["train_time_s"]
                                                  for r in results),
            "trainable_end_mean": statistics.fmean(r["trainable_params_end"] for r in results),
        })
    base = next((r for r in rows if r["config"] == "full"), None)
    for r in rows:
        both = base and base["wall_s_mean"] and r["wall_s_mean"]
        r["wall_vs_full"] = r["wall_s_mean"] / base["wall_s_mean"] if both else None
        r["cpu_vs_full"] = r["cpu_s_mean"] / base["cpu_s_mean"] if both else None
    return rows, target


def machine(runs: dict[str, list[dict]]) -> str:
    """Where the runs ran, and how busy the machine was (1-minute load before/after fit)."""
    results = [r for rs in runs.values() for r in rs]
    devices = sorted({"{kind} ({name}, {count})".format(**r["settings"]["device"])
                      for r in results if r.get("settings", {}).get("device")})
    loads = [x for r in results for x in (r.get("load_average_1min") or []) if x is not None]
    text = f"Ran on: {', '.join(devices) or 'unknown'}"
    if loads:
        text += (f"; 1-minute load average before and after each run's training "
                 f"{min(loads):.1f} to {max(loads):.1f}")
    return text + "."


def markdown(rows: list[dict], target: float | None, where: str = "") -> str:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    head = ["configuration", "seeds", "final accuracy", "reached target", "epoch",
            "time to target, wall (s)", "CPU (s)", "wall vs full", "CPU vs full",
            "3 epochs, wall (s)", "trainable at the end"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["config"], str(r["seeds"]),
            f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}",
            f"{r['reached']} of {r['seeds']}", num(r["epoch_mean"], ".2g"),
            num(r["wall_s_mean"], ".0f"), num(r["cpu_s_mean"], ".0f"),
            num(r["wall_vs_full"], ".2f"), num(r["cpu_vs_full"], ".2f"),
            f"{r['total_wall_s_mean']:.0f}", f"{r['trainable_end_mean']:,.0f}"]) + " |")
    text = "\n".join(lines) + "\n" + (f"\n{where}\n" if where else "")
    if target is None:
        return text + "\nNo run of full fine-tuning has finished: no target yet.\n"
    text += (f"\nTarget: full fine-tuning's mean final accuracy minus {100 * MARGIN:.1f} points "
             f"= {target:.4f}. Times are means over the seeds that reached it.\n")
    name, ratio = GOAL
    row = next((r for r in rows if r["config"] == name), None)
    full = next(r for r in rows if r["config"] == "full")
    if row is None or row["seeds"] < 3 or full["seeds"] < 3:
        verdict = "not judged yet (it needs 3 seeds of both)"
    elif row["reached"] < row["seeds"]:
        verdict = f"not met ({row['reached']} of {row['seeds']} seeds reached the target)"
    else:
        met = row["wall_vs_full"] is not None and row["wall_vs_full"] <= ratio
        verdict = f"{'met' if met else 'not met'} (wall time {row['wall_vs_full']:.2f}x full's)"
    return text + (f"Goal ({name} reaches the target in at most {ratio:g}x the time of full "
                   f"fine-tuning): {verdict}.\n")


CHARTED = ("autofreeze", "autofreeze+cache", "lisa", "plateau")  # decisions change what trains


def block_timelines(result: dict, blocks: list[str]) -> dict[str, list[tuple[int, int, bool]]]:
    """Per block, `(first step, last step, trains)` spans from a run's decisions.

    AutoFreeze's `freeze` freezes its groups from the step after the decision;
    LISA's `sample` makes its groups the middle blocks that train (the others
    are frozen, the stem trains); `unfreeze` (UnfreezeOnPlateau, which starts
    with every block frozen) unfreezes its groups.
    """
    steps = len(result.get("step_times_s") or []) or 1
    decisions = result.get("decisions") or []
    plateau = any(d["action"] == "unfreeze" for d in decisions)
    state = {b: not plateau for b in blocks}
    changes = [(0, dict(state))]
    for d in decisions:
        if d["action"] == "freeze":
            state.update({g: False for g in d["groups"]})
        elif d["action"] == "unfreeze":
            state.update({g: True for g in d["groups"]})
        elif d["action"] == "sample":
            state.update({b: b == "stem" or b in d["groups"] for b in blocks})
        else:
            continue
        changes.append((d["step"] + 1, dict(state)))
    spans = {b: [] for b in blocks}
    for i, (start, states) in enumerate(changes):
        end = changes[i + 1][0] - 1 if i + 1 < len(changes) else steps - 1
        if end < start:
            continue
        for b in blocks:
            last = spans[b][-1] if spans[b] else None
            if last and last[2] == states[b] and last[1] == start - 1:
                spans[b][-1] = (last[0], end, states[b])
            else:
                spans[b].append((start, end, states[b]))
    return spans


def decision_chart(results: dict[str, dict], path: str, blocks: list[str], title: str) -> str:
    """One panel per run: which blocks trained (dark) or were frozen (light) at each step,
    epoch boundaries, and for `+cache` runs what was cached from which epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 1.0 + 1.45 * len(results)),
                             sharex=True, squeeze=False)
    for ax, (config, result) in zip(axes[:, 0], results.items()):
        spans = block_timelines(result, blocks)
        for row, block in enumerate(blocks):
            for start, end, trains in spans[block]:
                ax.broken_barh([(start, end - start + 1)], (row - 0.4, 0.8),
                               color="#2b6cb0" if trains else "#d6dde6")
        per_epoch = len(result["step_times_s"]) // max(1, len(result["epochs"]))
        for e in range(1, len(result["epochs"])):
            ax.axvline(e * per_epoch, color="black", lw=0.8, ls=":")
        for step in result.get("prefix_cache") or []:
            layers = [n for n in step["prefix_layers"] if n in blocks or
                      n.startswith("transformer_layer_")]
            ax.annotate(f"cached up to {layers[-1] if layers else step['cut'][-1]}",
                        (step["epoch"] * per_epoch, len(blocks) - 0.5), fontsize=7,
                        xytext=(3, 2), textcoords="offset points", va="bottom")
        accuracy = ", ".join(f"{e['val_accuracy']:.3f}" for e in result["epochs"])
        ax.set_title(f"{config}: held-out accuracy after each epoch {accuracy}", fontsize=9,
                     loc="left")
        ax.set_yticks(range(len(blocks)), [b.replace("transformer_layer_", "layer ")
                                            for b in blocks], fontsize=7)
        ax.set_ylim(-0.6, len(blocks) + 0.4)
    axes[-1, 0].set_xlabel("training step (dark: the block trains; light: frozen; "
                           "dotted: epoch ends)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def chart(out: str, seed: int, path: str) -> str:
    runs = {c: r[0] for c, r in finished(out, [seed], CHARTED).items()}
    if not runs:
        raise SystemExit(f"error: no finished run of {', '.join(CHARTED)} for seed {seed}")
    depth = 1 + max((int(n.rsplit("_", 1)[1]) for r in runs.values()
                     for d in r.get("decisions") or [] for n in d["groups"]
                     if n.startswith("transformer_layer_")), default=5)
    blocks = ["stem", *(f"transformer_layer_{i}" for i in range(max(depth, 6)))]
    return decision_chart(runs, path, blocks, f"Decisions of the adaptive callbacks, "
                          f"all-MiniLM-L6-v2 on 8,000 SST-2 phrases, seed {seed}")


def summarize(out: str, seeds, configs) -> str:
    runs = finished(out, seeds, configs)
    if not runs:
        raise SystemExit(f"error: no finished run under {out} for seeds {seeds}")
    rows, target = table(runs)
    text = markdown(rows, target, machine(runs))
    _common.write_text(os.path.join(out, "summary.md"), text)
    _common.write_json(os.path.join(out, "summary.json"),
                       {"seeds": list(seeds), "configs": list(configs), "target": target,
                        "margin": MARGIN, "recipe_args": list(RECIPE_ARGS), "rows": rows})
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--data", default=SST2)
    p.add_argument("--out", default=OUT)
    p.add_argument("--run", action="store_true", help="one run: --seed and --config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None)
    p.add_argument("--summarize", action="store_true",
                   help="train nothing: the table from the runs that finished under --out")
    p.add_argument("--chart", metavar="PNG", default=None,
                   help="train nothing: draw the decisions of --seed's adaptive runs to PNG")
    args, extra = p.parse_known_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = args.configs.split(",")
    if args.chart:
        print(chart(args.out, args.seed, args.chart))
        return
    if args.run:
        if not args.config:
            raise SystemExit("error: --run needs --config CONFIG (and --seed S)")
        run(args.seed, args.config, args.out, args.data, extra)
        return
    if not args.summarize:
        for seed in seeds:
            for config in configs:
                run(seed, config, args.out, args.data, extra)
    print(summarize(args.out, seeds, configs))


if __name__ == "__main__":
    main()
