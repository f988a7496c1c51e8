"""Benchmark suite: keras-peft strategies against plain Keras and keras-hub's `enable_lora`.

One command runs, on the same model, data and seed, one configuration per
process (so that peak memory is per configuration):

- models: all-MiniLM-L6-v2 as a keras-hub `BertTextClassifier` (the real
  checkpoint, batch 32, sequence 64, SST-2 sentences) and a small CNN
  segmentation model (6 equal Conv-BN-ReLU blocks on 128x128 crops of the
  ISBI 2012 membrane images); `--quick` uses tiny random-weight versions;
- configurations: plain Keras full fine-tuning (no keras-peft, the
  baseline), keras-peft with everything trainable, `head_only`,
  `top_layers(2)`, `bitfit`, `lora(4)` on query/value, and keras-hub's own
  `backbone.enable_lora(4)` (the anchor users would pick instead);
- figures: median step time after warm-up, examples per second, peak
  resident memory, trainable parameters, optimizer-state size, the step-time
  ratio against plain Keras and the theoretical one (../shared/DESIGN-NOTES.md:
  a step costs 3 units per block, forward, input gradient and weight
  gradient; a frozen block costs 1, or 2 when something below it trains).

Method: every configuration is set up in its own worker process (load,
compile, warm-up), then the parent runs the timed repetitions interleaved,
A B C ... then ... C B A, one worker at a time while the others wait on
their pipes, so that load from elsewhere on the machine hits every
configuration alike. Ratios are paired: per repetition, the median step of a
configuration over the median step of the baseline in the same repetition,
then the median over repetitions. **The ratios are the meaningful numbers**;
absolute times depend on the machine and on what else runs on it.

On a GPU, mixed precision (`mixed_float16`) and XLA are on by default; on a
CPU, XLA only. Writes `suite.md`, `suite.json` and `suite.png` into `--out`
(default `bench/results/`; `--quick`: `bench/results/quick/`) and, for a full
run into `bench/results/`, copies the chart to `docs/assets/benchmarks/`.

    python bench/run.py                  # ~10 minutes on 2 CPU cores
    python bench/run.py --quick          # CI smoke (< 60 s): runs, writes the table
    python bench/run.py --models minilm --reps 12
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "recipes"))
import _common  # noqa: E402  (recipes/_common.py: imports neither TensorFlow nor keras_peft)

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
SST2 = os.path.join(SHARED_DATA, "sst2", "train.tsv")
ISBI = os.path.join(SHARED_DATA, "isbi2012-membrane", "train")
MOVIELENS = os.path.join(SHARED_DATA, "movielens-latest-small")
MARK = "@@bench "  # worker -> parent protocol lines start with this

OVERHEAD_TARGET = 1.05  # wrap everything-trainable / plain, at most
LORA_TARGET = 0.92  # keras-peft lora(4) q/v / keras-hub enable_lora(4), at most
ALL_LINEAR_TARGET = 0.80  # keras-peft all-linear lora(8) / full fine-tuning, at most
CONV_LORA_TARGET = 0.80  # keras-peft conv lora(4) / full fine-tuning (CNN), at most
# keras-hub's BERT layers that `targets="all-linear"` adapts, by name (enable_lora's way)
HUB_ALL_LINEAR = ["query", "key", "value", "attention_output", "feedforward_intermediate_dense",
                  "feedforward_output_dense"]
FREEZE_TARGET = 0.90  # measured / theoretical speed-up of top_layers(2), at least

# Sizes: model family -> settings. `quick` replaces them for the CI smoke run.
MODELS = {
    "minilm": {"family": "bert", "batch": 32, "seq": 64, "layers": 6, "checkpoint": True,
               "reps": 8, "steps": 2, "warmup": 2},
    "cnn": {"family": "cnn", "batch": 8, "size": 128, "width": 32, "layers": 6,
            "reps": 8, "steps": 3, "warmup": 2},
    "two_tower": {"family": "two_tower", "batch": 256, "reps": 8, "steps": 5, "warmup": 2},
    # The same recipe model on keras-rs (Keras 3, no TF_USE_LEGACY_KERAS): opt-in,
    # `--models two_tower_keras_rs` (or `two_tower,two_tower_keras_rs` side by side).
    "two_tower_keras_rs": {"family": "two_tower", "framework": "keras-rs", "batch": 256,
                           "reps": 8, "steps": 5, "warmup": 2},
}
QUICK_MODELS = {
    "minilm": {"family": "bert", "batch": 8, "seq": 16, "layers": 6, "checkpoint": False,
               "hidden": 16, "reps": 2, "steps": 2, "warmup": 1},
    "cnn": {"family": "cnn", "batch": 2, "size": 32, "width": 8, "layers": 6,
            "reps": 2, "steps": 2, "warmup": 1},
    "two_tower": {"family": "two_tower", "batch": 64, "reps": 2, "steps": 2, "warmup": 1,
                  "synthetic": True},
    "two_tower_keras_rs": {"family": "two_tower", "framework": "keras-rs", "batch": 64,
                           "reps": 2, "steps": 2, "warmup": 1, "synthetic": True},
}
CONFIGS = {
    "plain": "plain Keras, full fine-tuning (baseline)",
    "wrap_all": "keras-peft, everything trainable",
    "head_only": "keras-peft head_only",
    "top_layers_2": "keras-peft top_layers(2)",
    "bitfit": "keras-peft bitfit",
    "lora4": "keras-peft lora(4)",
    "lora4_keras": "keras-peft lora(4), implementation='keras' (Keras' LoRA)",
    "hub_lora4": "keras-hub backbone.enable_lora(4)",
    "lora8_all": "keras-peft lora(8), all-linear",
    "hub_lora8_all": "keras-hub backbone.enable_lora(8) on every linear layer",
    # The two-tower recipe's own strategies (recipes/two_tower_recommender.py).
    "query_tower": "keras-peft: query tower only",
    "user_embeddings": "keras-peft: user-id embeddings only",
    "lora_embeddings": "keras-peft lora(4) on the id embeddings",
    "new_id_embeddings": "keras-peft: new ids' embedding rows only (row mask)",
}
# Configuration names read as strategies, `_` before an argument: `top_layers_2` is
# top_layers with 2; the others take none.
STRATEGY_ARGUMENTS = {name: _common.NO_ARG for name in CONFIGS if name != "top_layers_2"}
STRATEGY_ARGUMENTS["top_layers"] = _common.NEEDS_ARG
_UNKNOWN = "unknown configuration {spec!r}"
_WORDING = _common.Wording(unknown=_UNKNOWN, needs_arg=_UNKNOWN, takes_no_arg=_UNKNOWN)


def parse_config(config: str, error: type[Exception] = ValueError) -> tuple[str, str | None]:
    """`(name, argument)` of a configuration: `top_layers_2` -> `("top_layers", "2")`."""
    return _common.parse_strategy(config, STRATEGY_ARGUMENTS, sep="_", wording=_WORDING,
                                  choices=", ".join(CONFIGS), error=error)


FAMILY_CONFIGS = {
    "bert": ["plain", "wrap_all", "head_only", "top_layers_2", "bitfit", "lora4", "lora4_keras",
             "hub_lora4", "lora8_all", "hub_lora8_all"],
    "cnn": ["plain", "wrap_all", "head_only", "top_layers_2", "bitfit", "lora4", "lora4_keras"],
    "two_tower": ["plain", "wrap_all", "query_tower", "user_embeddings", "lora_embeddings",
                  "new_id_embeddings"],
}


def theory_ratio(config: str, layers: int | None) -> float | None:
    """Step time relative to full fine-tuning, counting 3 units per block.

    Full fine-tuning: forward, input gradient and weight gradient in each of
    the L blocks, 3L. Freezing the bottom k blocks removes their weight and
    input gradients: 3L - 2k (DESIGN-NOTES: speed-up 3L/(3L-2k)). head_only is
    k = L (forward only). bitfit and LoRA train something in every block
    (biases, adapters) but no block weight: forward and input gradients,
    2L, since the weight gradients of biases and rank-4 adapters are small.
    """
    L = layers
    if config in ("plain", "wrap_all"):
        return 1.0
    if L is None:  # no equal blocks (the two-tower model): no theory
        return None
    if config == "head_only":
        return (3 * L - 2 * L) / (3 * L)
    name, arg = parse_config(config)
    if name == "top_layers":
        k = L - int(arg)
        return (3 * L - 2 * k) / (3 * L)
    return 2 * L / (3 * L)


# =============================================================== the worker
def _emit(kind: str, payload) -> None:
    sys.stdout.write(f"{MARK}{kind} {json.dumps(payload)}\n")
    sys.stdout.flush()


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(spec: dict) -> None:
    """Builds its configurations, then answers `RUN config n` with step times until `STOP`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if _keras2(spec["size"]):
        # tensorflow-recommenders needs Keras 2 as tf.keras; set before TensorFlow loads.
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
    sys.path.insert(0, ROOT)
    # bench/ab_trees.py measures another checkout's library in the same harness.
    sys.path.insert(0, spec.get("library") or ROOT)
    import keras
    import numpy as np
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    import keras_hub

    import keras_peft

    import_rss = _maxrss_mb()
    gpus = tf.config.list_physical_devices("GPU")
    precision = spec["precision"]
    if precision == "auto":
        precision = "mixed_float16" if gpus else "float32"
    if spec["size"]["family"] == "two_tower":
        # TFRS: a tf.keras (Keras 2) model, which Keras 3's policy does not reach; the
        # keras-rs model stays float32 too, so that the two compare.
        precision = "float32"
    # auto: XLA on, except in the CPU smoke run (it checks that the suite runs, and XLA
    # compilation would be most of its time).
    jit = {"on": True, "off": False}.get(spec["jit"], bool(gpus) or not spec["quick"])
    keras.mixed_precision.set_global_policy(precision)
    machine = {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_hub": keras_hub.__version__,
        "keras_peft": keras_peft.__version__,
        "gpus": [tf.config.experimental.get_device_details(g).get("device_name", g.name)
                 for g in gpus],
    }
    models = {}
    for config in spec["configs"]:
        models[config] = _setup(config, spec, jit, np, tf, keras, keras_peft)
        models[config][2].update(import_rss_mb=import_rss, precision=precision,
                                 jit_compile=jit, machine=machine, config=config)
        _emit("ready", models[config][2])
    # Keep the garbage collector from pausing a timed step to walk the models' objects.
    gc.collect()
    gc.freeze()
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "RUN":
            model, dataset, info = models[command[1]]
            _emit("times", _steps(model, dataset, int(command[2]), info["keras2"]))
        elif command[0] == "STOP":
            break
    done = {"peak_rss_mb": _maxrss_mb()}
    if gpus:  # device memory, the figure that matters on a GPU
        done["peak_gpu_mb"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    _emit("done", done)


def _setup(config, spec, jit, np, tf, keras, keras_peft):
    """Builds, configures, compiles and warms up one configuration's model."""
    keras.utils.set_random_seed(spec["seed"])
    size = spec["size"]
    keras2 = _keras2(size)
    if size["family"] == "two_tower":
        model, dataset = _two_tower(config, spec, size, np, tf, keras, keras_peft)
    else:
        if size["family"] == "bert":
            model, dataset = _bert(spec, size, np, tf, keras)
        else:
            model, dataset = _cnn(spec, size, np, tf, keras)
        _configure(config, model, size["family"], keras_peft)
        model.compile(
            optimizer=keras.optimizers.AdamW(learning_rate=1e-4, weight_decay=0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit,
        )
    t0 = time.perf_counter()
    _steps(model, dataset, 1, keras2)  # trace + compile
    first_call = time.perf_counter() - t0
    _steps(model, dataset, size["warmup"], keras2)

    def count(variables):
        return int(sum(np.prod(v.shape) for v in variables))

    trainable = {id(v) for v in model.trainable_weights}
    slots = model.optimizer.variables
    slots = slots() if callable(slots) else slots
    slots = [v for v in slots if len(v.shape) > 0]  # not the step counters
    info = {
        "trainable_params": count(model.trainable_weights),
        "total_params": count(model.weights),
        "optimizer_bytes": int(sum(
            np.prod(v.shape) * np.dtype(getattr(v.dtype, "name", v.dtype)).itemsize
            for v in slots)),  # Keras 3: dtype is a string; tf.keras: a tf.DType
        "trainable_paths": [p for p, v in zip(keras_peft.variable_paths(model), model.weights)
                            if id(v) in trainable],
        "first_call_s": first_call,
        "setup_rss_mb": _maxrss_mb(),
        "keras2": keras2,
    }
    return model, dataset, info


def _steps(model, dataset, n: int, keras2: bool = False) -> dict:
    """Runs `n` training steps with `fit`; returns each step's wall and CPU time (s).

    CPU time is the process' own, all threads together: unlike wall time it
    hardly grows when other processes compete for the cores.
    """
    # On tf.keras' Callback in the Keras 2 (TFRS) worker: tf.keras is Keras 2 there.
    timer = _common.make_timer(per="batch", keras2=keras2)
    model.fit(dataset, epochs=1, steps_per_epoch=n, verbose=0, shuffle=False,
              callbacks=[timer])
    return {"wall": timer.seconds, "cpu": timer.cpu_seconds}


def _bert(spec, size, np, tf, keras):
    import keras_hub

    batch, seq = size["batch"], size["seq"]
    if size["checkpoint"]:
        preset = _pretrained().minilm_path(verbose=False)
        model = keras_hub.models.BertTextClassifier.from_preset(
            preset, num_classes=2, preprocessor=None)
        preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
            preset, sequence_length=seq)
        texts, labels = _sst2(batch * 8, spec["seed"])
        features = preprocessor(tf.constant(texts))
        features = {k: np.asarray(v) for k, v in features.items()}
    else:
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=1000, num_layers=size["layers"], num_heads=2,
            hidden_dim=size["hidden"], intermediate_dim=2 * size["hidden"],
            max_sequence_length=seq)
        model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
        rng = np.random.default_rng(spec["seed"])
        n = batch * 8
        features = {"token_ids": rng.integers(5, 1000, (n, seq)).astype("int32"),
                    "segment_ids": np.zeros((n, seq), "int32"),
                    "padding_mask": np.ones((n, seq), "bool")}
        labels = rng.integers(0, 2, n)
    dataset = tf.data.Dataset.from_tensor_slices((features, labels)).batch(batch)
    return model, dataset.cache().repeat()


def _sst2(n: int, seed: int):
    import csv

    import numpy as np

    if not os.path.exists(SST2):
        rng = np.random.default_rng(seed)
        words = ["the", "movie", "was", "good", "bad", "great", "awful", "fun", "plot", "slow"]
        texts = [" ".join(rng.choice(words, 12)) for _ in range(n)]
        return texts, rng.integers(0, 2, n)
    with open(SST2, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    order = np.random.default_rng(seed).permutation(len(rows))[:n]
    return [rows[i]["sentence"] for i in order], np.array([int(rows[i]["label"]) for i in order])


def _cnn(spec, size, np, tf, keras):
    keras.utils.set_random_seed(spec["seed"])
    model = cnn_segmenter(keras, size["size"], size["width"], size["layers"])
    images, masks = _isbi(size["batch"] * 4, size["size"], spec["seed"], np, tf)
    dataset = tf.data.Dataset.from_tensor_slices((images, masks)).batch(size["batch"])
    return model, dataset.cache().repeat()


def cnn_segmenter(keras, size: int, width: int, blocks: int):
    """A fully convolutional segmenter whose blocks all cost the same (for the theory).

    `stem_conv` (1 -> width), then `blocks` x [3x3 Conv(width) - BatchNorm - ReLU]
    (`block_0` ... at full resolution), then `seg_logits`, a 1x1 Conv to 2 classes.
    """
    inputs = keras.Input((size, size, 1), name="image")
    x = keras.layers.Conv2D(width, 3, padding="same", name="stem_conv")(inputs)
    for i in range(blocks):
        x = keras.layers.Conv2D(width, 3, padding="same", name=f"block_{i}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"block_{i}_bn")(x)
        x = keras.layers.ReLU(name=f"block_{i}_relu")(x)
    outputs = keras.layers.Conv2D(2, 1, name="seg_logits")(x)
    return keras.Model(inputs, outputs, name="cnn_segmenter")


def _isbi(n: int, size: int, seed: int, np, tf):
    """`n` random crops (deterministic) of the ISBI 2012 membrane images; synthetic if absent."""
    rng = np.random.default_rng(seed)
    image_dir, label_dir = os.path.join(ISBI, "image"), os.path.join(ISBI, "label")
    if not os.path.isdir(image_dir):
        images = rng.random((n, size, size, 1), dtype=np.float32)
        return images, (images > 0.5).astype("int32")[..., 0]
    names = sorted(os.listdir(image_dir))
    images, masks = [], []
    for i in range(n):
        name = names[i % len(names)]
        image = tf.io.decode_png(tf.io.read_file(os.path.join(image_dir, name))).numpy()
        label = tf.io.decode_png(tf.io.read_file(os.path.join(label_dir, name))).numpy()
        top, left = rng.integers(0, image.shape[0] - size + 1, 2)
        images.append(image[top:top + size, left:left + size, :1].astype("float32") / 255.0)
        masks.append((label[top:top + size, left:left + size, 0] > 127).astype("int32"))
    return np.stack(images), np.stack(masks)


def _keras2(size: dict) -> bool:
    """The TFRS two-tower model is tf.keras (Keras 2); keras-rs' and the others, Keras 3."""
    return size["family"] == "two_tower" and size.get("framework", "tfrs") == "tfrs"


def _two_tower(config, spec, size, np, tf, keras, keras_peft):
    """The two-tower recipe's model (TFRS on tf.keras, or keras-rs on Keras 3), one of its
    strategies, Adagrad."""
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    import two_tower_recommender as recipe
    from _movielens import load_ratings, split, synthetic

    framework = size.get("framework", "tfrs")
    args = recipe.parse_args(["--data", MOVIELENS, "--framework", framework])
    use_synthetic = size.get("synthetic") or not os.path.isdir(MOVIELENS)
    data = synthetic() if use_synthetic else load_ratings(MOVIELENS)
    parts = split(data, "time", args.cutoff, args.adapt_fraction, spec["seed"])
    vocab = recipe.build_vocabulary(data, parts, args.max_title_words)
    model = recipe.build_model(vocab, args, spec["seed"])
    if config == "new_id_embeddings":
        rows = recipe.new_id_rows(vocab)
        model.set_row_masks(rows["user"], rows["movie"])
    if config != "plain":
        rules = keras_peft.full(model) if config == "wrap_all" else recipe.strategy_rules(
            config, model, args)
        keras_peft.wrap(model, rules)
    optimizers = tf.keras.optimizers if framework == "tfrs" else keras.optimizers
    model.compile(optimizer=optimizers.Adagrad(args.adapt_learning_rate))
    n = size["batch"] * 8
    indices = parts.adapt[:n] if len(parts.adapt) >= n else np.resize(parts.adapt, n)
    dataset = tf.data.Dataset.from_tensor_slices(recipe.features(data, indices))
    return model, dataset.batch(size["batch"]).cache().repeat()


def _configure(config: str, model, family: str, keras_peft) -> None:
    """Applies one configuration to `model` in place."""
    from keras_peft import Rule

    name, arg = parse_config(config, error=SystemExit)
    if config == "plain":
        return
    if config == "hub_lora4":
        model.backbone.enable_lora(4)
        return
    if config == "hub_lora8_all":
        model.backbone.enable_lora(8, target_layer_names=HUB_ALL_LINEAR)
        return
    if config == "wrap_all":
        rules = keras_peft.full(model)
    elif config == "head_only":
        rules = keras_peft.head_only(model)
    elif name == "top_layers":
        rules = keras_peft.top_layers(model, int(arg))
    elif config == "bitfit":
        rules = keras_peft.bitfit(model)
    elif config in ("lora4", "lora4_keras") and family == "bert":
        # keras-hub's enable_lora sets `layer.trainable = True` on the adapted layers
        # before enabling LoRA, so their biases train too; train the same variables.
        rules = keras_peft.combine(
            {r".*(query|value)/bias": Rule(note="bias, as enable_lora trains it")},
            keras_peft.lora(model, 4, targets=r".*(query|value)",
                            implementation="keras" if config == "lora4_keras" else "factored"),
        )
    elif config == "lora8_all":
        rules = keras_peft.combine(  # the biases, as keras-hub's enable_lora trains them
            {r".*transformer_layer_\d+/.*/bias": Rule(note="bias, as enable_lora trains it")},
            keras_peft.lora(model, 8, targets="all-linear"))
    elif config in ("lora4", "lora4_keras"):
        rules = keras_peft.lora(model, 4, targets=r".*block_\d+_conv",
                                implementation="keras" if config == "lora4_keras" else "factored")
    else:
        raise SystemExit(f"unknown configuration {config!r}")
    keras_peft.wrap(model, rules)


# =============================================================== the parent
class Worker:
    """A configuration's process; the parent talks to it over its stdin/stdout."""

    def __init__(self, model_key: str, configs: list[str], spec: dict, log_dir: str):
        self.model_key, self.configs = model_key, configs
        self.log_path = os.path.join(log_dir, f"{model_key}-{'+'.join(configs)}.log")
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env=env, cwd=ROOT)
        self.info: dict | None = None

    def read(self, kind: str):
        for line in self.proc.stdout:
            if line.startswith(MARK):
                got, _, payload = line[len(MARK):].partition(" ")
                if got != kind:
                    raise RuntimeError(f"{self.name}: expected {kind!r}, got {got!r}")
                return json.loads(payload)
        self._log.flush()
        with open(self.log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{self.name} ended without {kind!r} (exit {self.proc.wait()}); "
                           f"its log ({self.log_path}) ends with:\n{tail}")

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def run(self, config: str, n: int) -> dict:
        self.send(f"RUN {config} {n}")
        return self.read("times")

    def stop(self) -> dict:
        self.send("STOP")
        done = self.read("done")
        self.proc.wait(timeout=60)
        self._log.close()
        return done

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self._log.close()

    @property
    def name(self) -> str:
        return f"{self.model_key}/{'+'.join(self.configs)}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_gb": round(_memory_gb() or 0, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def paired_ratios(base: list[list[float]], other: list[list[float]]) -> list[float]:
    """Per repetition: median step of `other` over median step of `base` (same repetition)."""
    return [statistics.median(b) / statistics.median(a) for a, b in zip(base, other) if a and b]


def _quantile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    pos = (len(values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _start_workers(model_key: str, groups: list, size: dict, args, log_dir: str,
                   workers: dict) -> dict:
    """Starts a worker per group, `--parallel` at a time (import, load, XLA compile, warm-up),
    recording each in `workers` (config -> its process); returns config -> its "ready" facts."""
    infos: dict[str, dict] = {}
    pending = list(groups)
    starting: list[Worker] = []
    while pending or starting:
        while pending and len(starting) < args.parallel:
            group = pending.pop(0)
            spec = {"configs": group, "size": size, "seed": args.seed, "quick": args.quick,
                    "precision": args.precision, "jit": args.jit}
            w = Worker(model_key, group, spec, log_dir)
            workers.update((c, w) for c in group)
            starting.append(w)
        w = starting.pop(0)
        for _ in w.configs:
            info = w.read("ready")
            infos[info["config"]] = info
            print(f"  ready {model_key + '/' + info['config']:<24} trainable "
                  f"{info['trainable_params']:>12,}  first call "
                  f"{info['first_call_s']:6.1f} s", flush=True)
    return infos


def _timed_reps(workers: dict, configs: list, reps: int, steps: int):
    """`reps` interleaved repetitions of `steps` steps (order reversed every other one);
    per config, each repetition's wall and CPU step times."""
    per_rep = {c: [] for c in configs}
    per_rep_cpu = {c: [] for c in configs}
    for rep in range(reps):
        order = configs if rep % 2 == 0 else configs[::-1]
        for config in order:
            times = workers[config].run(config, steps)
            per_rep[config].append(times["wall"])
            per_rep_cpu[config].append(times["cpu"])
        medians = "  ".join(f"{c}={1000 * statistics.median(per_rep[c][-1]):.0f}"
                            for c in configs)
        print(f"  rep {rep + 1}/{reps} (median ms): {medians}", flush=True)
    return per_rep, per_rep_cpu


def _config_row(config: str, info: dict, per_rep: dict, per_rep_cpu: dict, done: dict | None,
                batch: int, layers: int | None) -> dict:
    """One configuration's row: step times, ratios to plain (paired per repetition), memory."""
    steps_ms = [1000 * t for rep in per_rep[config] for t in rep]
    median_ms = statistics.median(steps_ms)
    ratios = paired_ratios(per_rep["plain"], per_rep[config])
    cpu_ratios = paired_ratios(per_rep_cpu["plain"], per_rep_cpu[config])
    row = {
        "label": CONFIGS[config],
        "trainable_params": info["trainable_params"],
        "total_params": info["total_params"],
        "optimizer_mb": info["optimizer_bytes"] / 2**20,
        "median_ms": median_ms,
        "p10_ms": _quantile(steps_ms, 0.1),
        "p90_ms": _quantile(steps_ms, 0.9),
        "examples_per_s": batch / (median_ms / 1000),
        "peak_rss_mb": None if done is None else done["peak_rss_mb"],
        "peak_gpu_mb": None if done is None else done.get("peak_gpu_mb"),
        "import_rss_mb": info["import_rss_mb"],
        "first_call_s": info["first_call_s"],
        "ratio": statistics.median(ratios),
        "ratio_q25": _quantile(ratios, 0.25),
        "ratio_q75": _quantile(ratios, 0.75),
        "cpu_ratio": statistics.median(cpu_ratios),
        "cpu_ms": statistics.median(1000 * t for rep in per_rep_cpu[config] for t in rep),
        "theory": theory_ratio(config, layers),
        "per_rep_ms": [[1000 * t for t in rep] for rep in per_rep[config]],
        "per_rep_cpu_ms": [[1000 * t for t in rep] for rep in per_rep_cpu[config]],
        "trainable_paths": info["trainable_paths"],
    }
    theory = row["theory"]
    row["of_theory"] = None if theory is None else theory / row["ratio"]
    row["cpu_of_theory"] = None if theory is None else theory / row["cpu_ratio"]
    return row


def bench_model(model_key: str, size: dict, args, log_dir: str) -> dict:
    configs = [c for c in FAMILY_CONFIGS[size["family"]] if c in args.configs]
    if "plain" not in configs:
        configs.insert(0, "plain")
    reps = args.reps or size["reps"]
    steps = args.steps or size["steps"]
    print(f"\n## {model_key}: {len(configs)} configurations, one process each", flush=True)
    started = time.perf_counter()
    shared = args.processes == "model"
    groups = [configs] if shared else [[c] for c in configs]
    workers: dict[str, Worker] = {}  # config -> its process
    try:
        infos = _start_workers(model_key, groups, size, args, log_dir, workers)
        for config in configs:  # one untimed step each: the first after a wait is slow
            workers[config].run(config, 1)
        load_before = _loadavg()
        t0 = time.perf_counter()
        per_rep, per_rep_cpu = _timed_reps(workers, configs, reps, steps)
        timed_s = time.perf_counter() - t0
        load_after = _loadavg()
        stopped = {id(w): w.stop() for w in dict.fromkeys(workers.values())}
        done = {c: stopped[id(workers[c])] for c in configs}
    finally:
        for w in dict.fromkeys(workers.values()):
            w.kill()

    rows = {config: _config_row(config, infos[config], per_rep, per_rep_cpu,
                                None if shared else done[config], size["batch"],
                                size.get("layers"))
            for config in configs}
    first = infos[configs[0]]
    result = {
        "processes": args.processes,
        "model": model_key,
        "size": size,
        "reps": reps,
        "steps": steps,
        "rows": rows,
        "targets": _targets(rows, judged=not args.quick and size["family"] in ("bert", "cnn")),
        "precision": first["precision"],
        "gpu": bool(first["machine"]["gpus"]),
        "jit_compile": first["jit_compile"],
        "versions": first["machine"],
        "timed_s": timed_s,
        "elapsed_s": time.perf_counter() - started,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    return result


def _targets(rows: dict, judged: bool) -> list[dict]:
    out = []

    def add(name, value, cpu_value, target, check, detail):
        out.append({"name": name, "value": value, "cpu_value": cpu_value, "target": target,
                    "passed": check(value) if judged else None,
                    "cpu_passed": check(cpu_value) if judged else None, "detail": detail})

    if "wrap_all" in rows:
        row = rows["wrap_all"]
        add("keras-peft everything trainable / plain Keras", row["ratio"], row["cpu_ratio"],
            f"<= {OVERHEAD_TARGET:.2f}", lambda r: r <= OVERHEAD_TARGET,
            f"IQR {row['ratio_q25']:.3f}-{row['ratio_q75']:.3f}")
    if "lora4" in rows and "hub_lora4" in rows:
        a, b = rows["hub_lora4"], rows["lora4"]
        ratios = paired_ratios(a["per_rep_ms"], b["per_rep_ms"])
        cpu = statistics.median(paired_ratios(a["per_rep_cpu_ms"], b["per_rep_cpu_ms"]))
        same = set(b["trainable_paths"]) == set(a["trainable_paths"])
        add("keras-peft lora(4) / keras-hub enable_lora(4)", statistics.median(ratios), cpu,
            f"<= {LORA_TARGET:.2f}", lambda r: r <= LORA_TARGET,
            f"IQR {_quantile(ratios, 0.25):.3f}-{_quantile(ratios, 0.75):.3f}; trainable "
            f"{b['trainable_params']:,} vs {a['trainable_params']:,}, same variables: {same}")
    if "lora8_all" in rows:
        row = rows["lora8_all"]
        add("keras-peft all-linear lora(8) / full fine-tuning", row["ratio"], row["cpu_ratio"],
            f"<= {ALL_LINEAR_TARGET:.2f}", lambda r: r <= ALL_LINEAR_TARGET,
            f"IQR {row['ratio_q25']:.3f}-{row['ratio_q75']:.3f}; trainable "
            f"{row['trainable_params']:,}")
    if "lora4" in rows and "hub_lora4" not in rows and "lora4_keras" in rows:  # the CNN
        row = rows["lora4"]
        add("keras-peft conv lora(4) / full fine-tuning", row["ratio"], row["cpu_ratio"],
            f"<= {CONV_LORA_TARGET:.2f}", lambda r: r <= CONV_LORA_TARGET,
            f"IQR {row['ratio_q25']:.3f}-{row['ratio_q75']:.3f}; Keras' conv LoRA: "
            f"{rows['lora4_keras']['ratio']:.3f}")
    if "top_layers_2" in rows:
        row = rows["top_layers_2"]
        add("top_layers(2) speed-up / theoretical", row["of_theory"], row["cpu_of_theory"],
            f">= {FREEZE_TARGET:.0%}", lambda r: r >= FREEZE_TARGET,
            f"speed-up {1 / row['ratio']:.3f} (CPU time {1 / row['cpu_ratio']:.3f}) vs theory "
            f"{1 / row['theory']:.3f}")
    return out


# ------------------------------------------------------------------ output
def _verdict(passed) -> str:
    return "not judged" if passed is None else "met" if passed else "MISSED"


def _value(target, key) -> str:
    value = target[key]
    return f"{value:.1%}" if "theoretical" in target["name"] else f"{value:.3f}"


def _rss(value) -> str:
    return "n/a (shared process)" if value is None else f"{value:,.0f}"


def _mb(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _model_description(size: dict) -> str:
    if size["family"] == "bert":
        return (f"all-MiniLM-L6-v2 `BertTextClassifier`, batch {size['batch']}, "
                f"sequence {size['seq']}" if size.get("checkpoint") else
                f"tiny random BERT ({size['layers']} layers, hidden {size['hidden']}), "
                f"batch {size['batch']}, sequence {size['seq']}")
    if size["family"] == "cnn":
        return (f"CNN segmenter ({size['layers']} Conv-BN-ReLU blocks of width "
                f"{size['width']}), {size['size']}x{size['size']} crops, batch {size['batch']}")
    library = ("keras-rs on Keras 3" if size.get("framework") == "keras-rs"
               else "TFRS on tf.keras")
    return (f"two-tower recommender (recipes/two_tower_recommender.py, {library}, "
            f"{'synthetic ratings' if size.get('synthetic') else 'MovieLens'}), "
            f"batch {size['batch']}, Adagrad, no XLA")


def _model_lines(res: dict) -> list[str]:
    """One model's part of the report: what it is, its table, its targets."""
    what = _model_description(res["size"])
    lines = [
        "",
        f"**{what}** ({res['reps']} interleaved repetitions x {res['steps']} steps, "
        f"load average {res['loadavg_before']} -> {res['loadavg_after']}"
        + (f"; {res['elapsed_s'] / 60:.1f} minutes with set-up" if "elapsed_s" in res
           else "") + "):",
        "",
        "| configuration | trainable params | optimizer state (MB) | median step (ms) "
        "| examples/s | peak RSS (MB) | step ratio vs plain (IQR) | CPU-time ratio "
        "| theory |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in res["rows"].values():
        base = row["label"] == CONFIGS["plain"]
        ratio = ("1 (baseline)" if base else
                 f"{row['ratio']:.3f} ({row['ratio_q25']:.2f}-{row['ratio_q75']:.2f})")
        memory = _rss(row["peak_rss_mb"])
        if row.get("peak_gpu_mb") is not None:
            memory += f" (GPU {row['peak_gpu_mb']:,.0f})"
        lines.append(
            f"| {row['label']} | {row['trainable_params']:,} | {_mb(row['optimizer_mb'])} "
            f"| {row['median_ms']:,.0f} | {row['examples_per_s']:,.1f} "
            f"| {memory} | {ratio} "
            f"| {'1' if base else format(row['cpu_ratio'], '.3f')} "
            f"| {'-' if row['theory'] is None else format(row['theory'], '.3f')} |")
    for t in res["targets"]:
        lines.append(f"\nTarget: {t['name']}, target {t['target']}: step time "
                     f"{_value(t, 'value')} **{_verdict(t['passed'])}**, CPU time "
                     f"{_value(t, 'cpu_value')} **{_verdict(t['cpu_passed'])}** "
                     f"({t['detail']}).")
    return lines


def markdown(results: dict) -> str:
    m = results["machine"]
    gpus = results["models"][0]["versions"]["gpus"] if results["models"] else []
    first = results["models"][0] if results["models"] else {}
    lines = [
        f"Machine: {m['cpu']}, {m['cpus_usable']} of {m['cpu_count']} CPU cores usable, "
        f"{m['memory_gb']} GB RAM; {', '.join(gpus) if gpus else 'no GPU'}; "
        f"{m['platform']}; Python {m['python']}, TensorFlow "
        f"{first.get('versions', {}).get('tensorflow')}, Keras "
        f"{first.get('versions', {}).get('keras')}, keras-hub "
        f"{first.get('versions', {}).get('keras_hub')}. Precision "
        f"{first.get('precision')}, XLA {'on' if first.get('jit_compile') else 'off'}, AdamW."
        + (" Quick smoke run: tiny random models, one process per model; the numbers mean "
           "nothing." if results["quick"] else ""),
        "",
        "Ratios are the meaningful numbers: each is the median over interleaved "
        "repetitions of (median step of the configuration) / (median step of plain Keras "
        "in the same repetition). Absolute times depend on the machine and its load. The "
        "CPU-time ratio does the same with the process' CPU time per step (all threads), "
        "which hardly grows when other processes compete for the cores: on a loaded "
        "machine (load average above the number of cores) it is the steadier estimate"
        + (" (on a GPU it measures the host's work only; use the step ratio)."
           if any(m.get("gpu") for m in results["models"]) else "."),
    ]
    for res in results["models"]:
        lines += _model_lines(res)
    lines += [
        "",
        "Theory (../shared/DESIGN-NOTES.md): a block costs 3 units when it trains "
        "(forward, input gradient, weight gradient) and 1 when frozen with nothing "
        "trainable below it: `top_layers(2)` of 6 blocks 10/18, `head_only` 6/18. "
        "bitfit and LoRA backpropagate through every block without its big weight "
        "gradient: 12/18. Peak RSS is the worker process' maximum resident memory, "
        "TensorFlow runtime included (about "
        f"{_mb(_first_row(results)['import_rss_mb'])} MB after the imports); on a GPU "
        "the peak device memory follows in parentheses.",
    ]
    return "\n".join(lines) + "\n"


def _first_row(results):
    for res in results["models"]:
        for row in res["rows"].values():
            return row
    return {"import_rss_mb": float("nan")}


def chart(results: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    models = results["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.2 * len(models) + 0.6),
                             squeeze=False)
    for (ax_ratio, ax_mem), res in zip(axes, models):
        rows = list(res["rows"].values())
        labels = [r["label"].replace(" (baseline)", "") for r in rows]
        y = range(len(rows))
        ax_ratio.barh([i - 0.27 for i in y], [r["theory"] or 0 for r in rows], height=0.27,
                      label="theory", color="#c4c4c4")
        ax_ratio.barh(list(y), [r["ratio"] for r in rows], height=0.27,
                      label="measured (wall time)", color="#3b75af")
        ax_ratio.barh([i + 0.27 for i in y], [r["cpu_ratio"] for r in rows], height=0.27,
                      label="measured (CPU time)", color="#8fb8de")
        ax_ratio.set_yticks(list(y), labels, fontsize=8)
        ax_ratio.invert_yaxis()
        ax_ratio.axvline(1.0, color="black", linewidth=0.8)
        ax_ratio.set_xlabel("step time / plain Keras (lower is faster)")
        ax_ratio.set_title(f"{res['model']}: step-time ratio", fontsize=10)
        ax_mem.barh(list(y), [r["peak_rss_mb"] or 0 for r in rows], color="#e08a3c")
        ax_mem.set_yticks(list(y), [""] * len(rows))
        ax_mem.invert_yaxis()
        ax_mem.set_xlabel("peak resident memory of the process (MB)")
        ax_mem.set_title(f"{res['model']}: peak RSS", fontsize=10)
    fig.suptitle("keras-peft benchmark suite" + (" (quick smoke run)" if results["quick"]
                                                  else ""), fontsize=11)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _keep_other_models(results: dict, args) -> None:
    """Keeps, from an earlier suite.json in `--out`, the models this run left out.

    So `--models two_tower` re-measures one model and the table keeps the
    others (each with its own load averages). Never mixes --quick with full runs.
    """
    path = os.path.join(args.out, "suite.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        return
    if earlier.get("quick") != results["quick"]:
        return
    measured = {m["model"] for m in results["models"]}
    kept = [m for m in earlier.get("models", []) if m["model"] not in measured]
    if kept:
        print(f"Keeping the earlier results of {[m['model'] for m in kept]} from {path}")
    order = {key: i for i, key in enumerate(MODELS)}
    results["models"] = sorted(results["models"] + kept, key=lambda m: order.get(m["model"], 99))


def _pretrained():
    """recipes/_pretrained.py, loaded by path (it imports neither keras_peft nor TensorFlow)."""
    import importlib.util

    path = os.path.join(ROOT, "recipes", "_pretrained.py")
    spec = importlib.util.spec_from_file_location("_recipes_pretrained", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny random models, 2 repetitions (CI smoke, < 60 s)")
    p.add_argument("--models", default="minilm,cnn,two_tower",
                   help="comma-separated: minilm,cnn,two_tower,two_tower_keras_rs (the "
                        "last, keras-rs, is opt-in)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)} (plain always runs)")
    p.add_argument("--reps", type=int, help="interleaved repetitions (default per model)")
    p.add_argument("--steps", type=int, help="measured steps per repetition (default per model)")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "mixed_float16"],
                   help="auto: mixed_float16 on a GPU, float32 on a CPU")
    p.add_argument("--jit", default="auto", choices=["auto", "on", "off"],
                   help="XLA (jit_compile); auto: on (--quick on a CPU: off)")
    p.add_argument("--parallel", type=int, default=2, help="processes set up at a time")
    p.add_argument("--processes", choices=["config", "model"],
                   help="one process per configuration (default; peak memory per "
                        "configuration) or per model (--quick default: faster start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default bench/results, --quick: "
                                 "bench/results/quick)")
    p.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rewrite suite.md and suite.png from suite.json in --out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.configs = set(args.configs.split(","))
    unknown = args.configs - set(CONFIGS)
    if unknown:
        p.error(f"unknown configurations {sorted(unknown)}; choose from {list(CONFIGS)}")
    models = QUICK_MODELS if args.quick else MODELS
    args.model_keys = args.models.split(",")
    for key in args.model_keys:
        if key not in models:
            p.error(f"unknown model {key!r}; choose from {list(models)}")
    args.sizes = models
    if args.processes is None:
        args.processes = "model" if args.quick else "config"
    if args.out is None:
        args.out = os.path.join(HERE, "results", "quick" if args.quick else "")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.report_only:
        with open(os.path.join(args.out, "suite.json")) as f:
            return _write(json.load(f), args)
    start = time.perf_counter()
    machine = machine_info()
    print("# keras-peft benchmark suite" + (" (--quick)" if args.quick else ""))
    for key, value in machine.items():
        print(f"- {key}: {value}")
    print(f"- load average: {_loadavg()}", flush=True)
    results = {"machine": machine, "quick": args.quick, "models": []}
    with tempfile.TemporaryDirectory(prefix="keras-peft-bench-") as log_dir:
        for key in args.model_keys:
            size = args.sizes[key]
            if size.get("checkpoint"):
                try:
                    _pretrained().minilm_path(verbose=True)  # fetch once, before the workers
                except Exception as e:  # skip the model, keep the suite going
                    print(f"Skipping {key}: the checkpoint is not available ({e}).")
                    continue
            results["models"].append(bench_model(key, size, args, log_dir))
    results["elapsed_s"] = time.perf_counter() - start
    _keep_other_models(results, args)
    for res in results["models"]:
        print(f"- GPUs: {res['versions']['gpus'] or 'none'}; precision {res['precision']}, "
              f"XLA {res['jit_compile']}")
        break
    return _write(results, args)


def _write(results: dict, args) -> int:
    os.makedirs(args.out, exist_ok=True)
    table = markdown(results)
    print("\n" + table)
    with open(os.path.join(args.out, "suite.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "suite.json"), "w") as f:
        json.dump(results, f, indent=1)
    png = os.path.join(args.out, "suite.png")
    if chart(results, png):
        print(f"Wrote {png}")
        default_out = os.path.abspath(os.path.join(HERE, "results"))
        if not args.quick and os.path.abspath(args.out) == default_out:
            docs = os.path.join(ROOT, "docs", "assets", "benchmarks")
            os.makedirs(docs, exist_ok=True)
            shutil.copy(png, os.path.join(docs, "suite.png"))
            print(f"Copied the chart to {docs}")
    per_model = ", ".join(f"{m['model']} {m['elapsed_s']:.0f} s" for m in results["models"]
                          if "elapsed_s" in m)
    print(f"Wrote {os.path.join(args.out, 'suite.md')} and suite.json; this run took "
          f"{results.get('elapsed_s', 0):.0f} s" + (f" (per model: {per_model})"
                                                    if per_model else ""))
    missed = [t["name"] for r in results["models"] for t in r["targets"] if t["passed"] is False]
    if missed:
        print("Missed targets: " + "; ".join(missed))
    return 1 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
