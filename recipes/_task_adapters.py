"""Several task adapters on one base, for the BERT recipe's `--adapter NAME` and
`--load-adapter FILE`.

A run with `--adapter NAME` trains one named adapter (any keras-peft LoRA
variant) that covers the encoder's layers and the `logits` head, everything
else frozen, and saves it alone to `<output-dir>/NAME/adapter.safetensors`
with the run's `results.json` beside it (the task's data settings and the
base it was trained on). Everything the task changed is in that file: the
base, including the head's starting kernel (`fixed_head`), is the same in
every run, so adapters trained in separate runs load onto one base, beside
each other, and each is evaluated on its own task's held-out data.
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras

from keras_peft.adapters import check_adapter_name

ADAPTER_FILE = "adapter.safetensors"
HEAD = r"(?:.*/)?logits"  # the classifier head's layer path
HEAD_SEED = 0
# The data settings of a task: enough to rebuild its held-out split in another run.
TASK_KEYS = ("data", "validation_data", "text_column", "label_column", "delimiter",
             "validation_fraction", "split_seed", "max_examples", "max_validation_examples")
# What a loaded adapter's base must share with this run's.
BASE_KEYS = ("preset", "pooling", "sequence_length", "quantize")


@dataclasses.dataclass(frozen=True)
class TaskAdapter:
    """An adapter file written by `--adapter`, with its task's settings."""

    name: str
    path: str
    task: dict  # TASK_KEYS
    base: dict  # BASE_KEYS
    num_classes: int
    val_accuracy: float  # measured when it was trained


def task_settings(args) -> dict:
    """This run's task (`TASK_KEYS`), with a local data file as an absolute path."""
    task = {k: getattr(args, k) for k in TASK_KEYS}
    for key in ("data", "validation_data"):
        if task[key] and os.path.exists(task[key]):
            task[key] = os.path.abspath(task[key])
    return task


def base_settings(args, pooling: str) -> dict:
    return {"preset": args.preset, "pooling": pooling, "sequence_length": args.sequence_length,
            "quantize": args.quantize}


def check_name(name: str) -> str:
    """`name` if it can name an adapter; SystemExit saying why not."""
    try:
        return check_adapter_name(name)
    except ValueError as e:
        raise SystemExit(f"error: --adapter: {e}") from None


def read(path: str) -> TaskAdapter:
    """The adapter file at `path` and the `results.json` beside it; SystemExit if either is
    missing or was not written by `--adapter`."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --load-adapter {path!r}: no such file. Give the "
                         f"{ADAPTER_FILE} that a run with --adapter NAME wrote under "
                         "--output-dir/NAME/.")
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "results.json")
    try:
        with open(beside, encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"error: --load-adapter {path!r}: cannot read the results.json beside it ({e}). "
            "The recipe writes it next to the adapter: it holds the task's data and the base "
            "the adapter was trained on, both needed to evaluate the adapter.") from None
    if not result.get("adapter_name"):
        raise SystemExit(
            f"error: --load-adapter {path!r}: {beside} is from a run without --adapter, so "
            "its delta holds no named adapter (and perhaps a head outside it). Train the "
            "task with --adapter NAME.")
    return TaskAdapter(name=result["adapter_name"], path=path, task=result["task"],
                       base={k: result["settings"].get(k) for k in BASE_KEYS},
                       num_classes=int(result["num_classes"]),
                       val_accuracy=float(result["val_accuracy"]))


def read_all(paths: list[str], args, pooling: str, num_classes: int | None) -> list[TaskAdapter]:
    """The `--load-adapter` files, checked against this run: the same base (preset, pooling,
    sequence length, quantization), the same number of classes (one head shape), names
    unique and not `--adapter`'s. SystemExit naming what differs."""
    loaded = [read(p) for p in paths]
    base = base_settings(args, pooling)
    names = [a.name for a in loaded] + ([args.adapter] if args.adapter else [])
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SystemExit(f"error: adapter name(s) {twice} given twice (--load-adapter files "
                         "and --adapter must name different tasks).")
    classes = num_classes if num_classes is not None else loaded[0].num_classes
    for a in loaded:
        differ = {k: (a.base[k], base[k]) for k in BASE_KEYS if a.base[k] != base[k]}
        if differ:
            shown = ", ".join(f"{k}: {was!r} there, {now!r} here" for k, (was, now) in
                              differ.items())
            raise SystemExit(f"error: --load-adapter {a.path!r} was trained on another base "
                             f"({shown}). Run with the same --preset, --pooling, "
                             "--sequence-length and --quantize.")
        if a.num_classes != classes:
            raise SystemExit(
                f"error: --load-adapter {a.path!r} has {a.num_classes} classes and this run "
                f"{classes}: the adapters share one head, so their tasks need the same number "
                "of classes.")
    return loaded


def fixed_head(model) -> None:
    """Sets the `logits` head to the kernel every `--adapter` run starts from (Glorot
    uniform, seed `HEAD_SEED`; bias 0): a part of the shared base, which each task's
    adapter adjusts."""
    head = model.get_layer("logits")
    init = keras.initializers.GlorotUniform(seed=HEAD_SEED)
    head.kernel.assign(init(tuple(head.kernel.shape), dtype=head.kernel.dtype))
    head.bias.assign(keras.ops.zeros(tuple(head.bias.shape), dtype=head.bias.dtype))


def table(rows: list[dict]) -> str:
    """The per-adapter evaluation as a markdown table."""
    lines = ["| adapter | task data | held-out | accuracy | at training | from |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        was = "" if r["accuracy_at_training"] is None else f"{r['accuracy_at_training']:.4f}"
        lines.append(f"| {r['adapter']} | {r['data']} | {r['validation_examples']:,} | "
                     f"{r['val_accuracy']:.4f} | {was} | {r['origin']} |")
    return "\n".join(lines)
