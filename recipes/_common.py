"""What the recipes and benchmarks share: `--strategy` parsing, step timers, result files.

Importing this module is cheap: it imports neither TensorFlow, Keras nor
keras_peft (the benchmark suite's parent process imports it and must stay
light). Keras is imported when a timer is first built, `keras_peft.io` when
a file is first written.

- `parse_strategy(spec, known)`: `name[:arg]` strings such as `lora:8`,
  `top_layers:2`, `bitfit` or `auto:0.1` (or, with `sep="_"`, the
  benchmark's plain names such as `top_layers_2`), checked against a table
  of names that take no argument, need one, or may take one. The wording of
  the errors is a parameter (`Wording`), so each recipe keeps its messages.
- `parse_lora(name, arg)`: the adapter specs `lora:RANK[:OPTION...]`,
  `dora:RANK[...]` and `pissa:RANK[...]` (`LORA_HELP` says the options), as
  a `LoraSpec` whose `rules(model, targets)` calls `keras_peft.lora`.
- `Timer` (a Keras 3 callback) and `make_timer(...)` (the same timer on any
  Callback base: tf.keras' for the TFRS path): wall and CPU seconds of
  every training batch or epoch.
- `write_json`, `write_text`, `write_csv`, `write_with`: atomic writes
  through `keras_peft.io`, creating the folder first.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

__all__ = [
    "NO_ARG",
    "NEEDS_ARG",
    "OPTIONAL_ARG",
    "Wording",
    "BERT_WORDING",
    "SEGMENTATION_WORDING",
    "parse_strategy",
    "LORA_NAMES",
    "LORA_HELP",
    "LoraSpec",
    "parse_lora",
    "TimerMixin",
    "make_timer",
    "timer_class",
    "atomic_output",
    "write_with",
    "write_text",
    "write_json",
    "write_csv",
]

# ------------------------------------------------------------------ strategies
NO_ARG = "no argument"  # `bitfit`
NEEDS_ARG = "needs an argument"  # `lora:8`
OPTIONAL_ARG = "optional argument"  # `auto`, `auto:0.1`
_KINDS = (NO_ARG, NEEDS_ARG, OPTIONAL_ARG)


@dataclasses.dataclass(frozen=True)
class Wording:
    """The three error messages of `parse_strategy`, as `str.format` templates.

    Fields they may use: `spec` (the text given), `name`, `arg` (the text
    after the separator), `choices` (what to choose from) and `hint` (the
    name's entry in `parse_strategy`'s `hints`, e.g. an example value).
    """

    unknown: str
    needs_arg: str
    takes_no_arg: str


# bert_text_classification.py: "Bad strategy 'lora': lora needs an argument, e.g. lora:2. ..."
BERT_WORDING = Wording(
    unknown="Bad strategy {spec!r}: unknown name {name!r}. Choose from: {choices}.",
    needs_arg="Bad strategy {spec!r}: {name} needs an argument, e.g. {name}:{hint}. "
              "Choose from: {choices}.",
    takes_no_arg="Bad strategy {spec!r}: {name} takes no argument. Choose from: {choices}.",
)
# image_segmentation.py (also the default): "Strategy 'lora' needs a value: lora:RANK."
SEGMENTATION_WORDING = Wording(
    unknown="Unknown strategy {spec!r}. Expected one of {choices}.",
    needs_arg="Strategy {name!r} needs a value: {name}:{hint}.",
    takes_no_arg="Strategy {name!r} takes no value. Received: {spec!r}.",
)


def parse_strategy(
    spec: str,
    known: Mapping[str, str],
    *,
    sep: str = ":",
    wording: Wording = SEGMENTATION_WORDING,
    choices: str | None = None,
    hints: Mapping[str, str] | None = None,
    empty_is_missing: bool = False,
    strip: bool = True,
    error: type[Exception] = ValueError,
) -> tuple[str, str | None]:
    """Splits `spec` (`name` or `name<sep>arg`) and checks it against `known`.

    Args:
        spec: the text given, e.g. `"lora:8"`; surrounding blanks are ignored
            unless `strip=False`.
        known: name -> `NO_ARG`, `NEEDS_ARG` or `OPTIONAL_ARG`.
        sep: what separates the name from its argument. A spec that is a
            known name as a whole is that name (so with `sep="_"`,
            `head_only` is a name and `top_layers_2` is `top_layers`, `2`);
            otherwise the name is the text before the first `sep` that
            gives a known name (or, if none does, before the first `sep`).
        wording: the error messages.
        choices: the `{choices}` of the messages; default the known names,
            comma-separated.
        hints: name -> the `{hint}` of the "needs an argument" message.
        empty_is_missing: `name<sep>` (an empty argument) counts as no
            argument; by default it is an argument, `""`.
        error: the exception class raised.

    Returns:
        `(name, arg)`: `arg` is the text after the separator, or None when
        there is none. Converting it (int, float, a list) is the caller's.

    Raises:
        `error` (ValueError): an unknown name, a missing argument, or an
        argument given to a name that takes none.
    """
    for kind in known.values():
        if kind not in _KINDS:
            raise TypeError(f"known: each kind must be one of {_KINDS}. Received: {kind!r}.")
    spec = spec.strip() if strip else spec
    name, arg = _split(spec, known, sep)
    if arg == "" and empty_is_missing:
        arg = None
    fields = {
        "spec": spec,
        "name": name,
        "arg": arg,
        "choices": ", ".join(known) if choices is None else choices,
        "hint": (hints or {}).get(name, "VALUE"),
    }
    if name not in known:
        raise error(wording.unknown.format(**fields))
    kind = known[name]
    if kind == NO_ARG and arg is not None:
        raise error(wording.takes_no_arg.format(**fields))
    if kind == NEEDS_ARG and arg is None:
        raise error(wording.needs_arg.format(**fields))
    return name, arg


def _split(spec: str, known: Mapping[str, str], sep: str) -> tuple[str, str | None]:
    if spec in known:
        return spec, None
    start = 0
    while (at := spec.find(sep, start)) >= 0:
        if spec[:at] in known:
            return spec[:at], spec[at + len(sep):]
        start = at + 1
    name, found, arg = spec.partition(sep)
    return name, (arg if found else None)


# ------------------------------------------------------------------- adapters
LORA_NAMES = ("lora", "dora", "pissa")  # dora:R = lora:R with variant DoRA, pissa:R = PiSSA init
LORA_HELP = (
    "lora:RANK[:OPTION...] (also dora:RANK, pissa:RANK), options separated by ':': "
    "all-linear (every Dense/EinsumDense in the blocks, instead of the recipe's default "
    "layers), alpha=A (scale A/RANK; default RANK), rslora (scale A/sqrt(RANK)), "
    "dropout=P, plus=RATIO (LoRA+: B at RATIO x the learning rate), bias (also train "
    "the biases), norm (also train the normalization layers), keras (Keras' own LoRA), "
    "e.g. lora:8:all-linear:bias:norm, dora:8, pissa:8, lora:8:plus=16"
)
_LORA_FLAGS = {"all-linear", "rslora", "bias", "norm", "keras"}
_LORA_VALUES = {"alpha": float, "dropout": float, "plus": float}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """A parsed adapter spec: `keras_peft.lora`'s options and what trains beside it."""

    rank: int
    variant: str = "lora"
    init: str = "default"
    all_linear: bool = False
    alpha: float | None = None
    rslora: bool = False
    dropout: float = 0.0
    plus: float | None = None
    keras: bool = False
    bias: bool = False
    norm: bool = False

    def lora_kwargs(self, targets: str) -> dict:
        """`keras_peft.lora` keyword arguments; `targets` is the recipe's default."""
        return {"rank": self.rank, "alpha": self.alpha, "variant": self.variant,
                "init": self.init, "rslora": self.rslora, "dropout": self.dropout,
                "loraplus_ratio": self.plus,
                "implementation": "keras" if self.keras else "factored",
                "targets": "all-linear" if self.all_linear else targets}

    def rules(self, model, targets: str, *, adapter: str | None = None,
              head: str | None = None) -> dict:
        """Adds the adapters to `model`; the rules, with biases/norms trained if asked.

        With `adapter`, one adapter of that name that also covers the `head` layers
        (a pattern), which do not train outside it: all the task changes is the adapter.
        """
        import keras_peft  # here, not at the top: this module stays light

        kwargs = self.lora_kwargs(targets)
        if adapter is not None:
            kwargs.update(adapter=adapter, train_head=False, targets=[kwargs["targets"], head])
        adapters = keras_peft.lora(model, rest=None, **kwargs)
        extra = []
        if self.bias:
            extra.append(keras_peft.bitfit(model, rest=None))
        if self.norm:
            extra.append(keras_peft.norm_tuning(model, rest=None))
        return keras_peft.combine(adapters, *extra, {".*": keras_peft.Rule(trainable=False,
                                                                         note="frozen")})

    def describe(self) -> str:
        what = {"lora": "LoRA", "dora": "DoRA"}[self.variant]
        parts = [f"{what} rank {self.rank}" + (" (PiSSA init)" if self.init == "pissa" else "")]
        parts += [f"alpha {self.alpha:g}"] if self.alpha is not None else []
        parts += ["rsLoRA"] if self.rslora else []
        parts += [f"LoRA+ ratio {self.plus:g}"] if self.plus else []
        parts += [f"dropout {self.dropout:g}"] if self.dropout else []
        parts += ["+ biases"] if self.bias else []
        parts += ["+ norms"] if self.norm else []
        parts += ["(Keras' LoRA)"] if self.keras else []
        return ", ".join(parts)


def parse_lora(name: str, arg: str | None, *, error: type[Exception] = ValueError) -> LoraSpec:
    """`lora`/`dora`/`pissa` and the text after `name:` (`8:all-linear:plus=16`) as a
    `LoraSpec`; raises `error` saying what was wrong and what is accepted."""
    spec = f"{name}:{arg}" if arg is not None else name

    def bad(why):
        return error(f"Bad adapter spec {spec!r}: {why}. Accepted: {LORA_HELP}.")

    if name not in LORA_NAMES:
        raise bad(f"{name!r} is not one of {', '.join(LORA_NAMES)}")
    rank_text, *options = (arg or "").split(":")
    if not rank_text.isdigit() or int(rank_text) < 1:
        raise bad(f"the rank must be a positive integer, not {rank_text!r}")
    fields: dict = {"rank": int(rank_text), "variant": "dora" if name == "dora" else "lora",
                    "init": "pissa" if name == "pissa" else "default"}
    for option in options:
        key, has_value, value = option.partition("=")
        if not has_value and key in _LORA_FLAGS:
            fields[key.replace("-", "_")] = True
        elif has_value and key in _LORA_VALUES:
            try:
                fields[key] = _LORA_VALUES[key](value)
            except ValueError:
                raise bad(f"{key}={value!r} is not a number") from None
        else:
            raise bad(f"unknown option {option!r}")
    return LoraSpec(**fields)


# ---------------------------------------------------------------------- timers
class TimerMixin:
    """Wall seconds and CPU seconds of every training batch (or epoch).

    Mixed into a Keras Callback class by `timer_class`; use `Timer` (Keras
    3) or `make_timer(...)`. After `fit`:

    - `times` (alias `seconds`): wall seconds of each batch (or epoch);
    - `cpu_times` (alias `cpu_seconds`): CPU seconds of this process, all
      threads together, over the same spans. On a machine shared with other
      jobs the wall time varies with their load; the CPU time much less;
    - `steps`: the training batches counted.

    Args:
        per: `"batch"` (one entry per training batch) or `"epoch"`.
        skip: called at each batch end; when it returns True the batch is
            not counted (a resumed run's passed-over batches).
    """

    def __init__(self, *, per: str = "batch", skip: Callable[[], bool] | None = None):
        super().__init__()
        if per not in ("batch", "epoch"):
            raise ValueError(f"per must be 'batch' or 'epoch'. Received: {per!r}.")
        self.per = per
        self.skip = skip
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.steps = 0
        self._t0 = (0.0, 0.0)

    @property
    def seconds(self) -> list[float]:
        return self.times

    @property
    def cpu_seconds(self) -> list[float]:
        return self.cpu_times

    def _begin(self) -> None:
        self._t0 = (time.perf_counter(), time.process_time())

    def _end(self) -> None:
        self.times.append(time.perf_counter() - self._t0[0])
        self.cpu_times.append(time.process_time() - self._t0[1])

    def on_epoch_begin(self, epoch, logs=None):
        if self.per == "epoch":
            self._begin()

    def on_epoch_end(self, epoch, logs=None):
        if self.per == "epoch":
            self._end()

    def on_train_batch_begin(self, batch, logs=None):
        if self.per == "batch":
            self._begin()

    def on_train_batch_end(self, batch, logs=None):
        # Keras hands this (synchronous) callback numpy logs: the step has finished.
        if self.skip is not None and self.skip():
            return
        self.steps += 1
        if self.per == "batch":
            self._end()

    def mean(self, skip_first: int = 1) -> float | None:
        """The mean of `times` after the first `skip_first` (which trace), or None."""
        steady = self.times[skip_first:] or self.times
        return statistics.fmean(steady) if steady else None


_CLASSES: dict = {}


def timer_class(base=None) -> type:
    """The timer class on the Callback class `base` (default: Keras 3's).

    `base=tf.keras.callbacks.Callback` gives the timer for tf.keras (Keras 2)
    models, e.g. the TFRS two-tower path. Classes are built once per base.
    """
    if base is None:
        import keras

        base = keras.callbacks.Callback
    if base not in _CLASSES:
        _CLASSES[base] = type("Timer", (TimerMixin, base), {"__module__": __name__})
    return _CLASSES[base]


def make_timer(*, base=None, keras2: bool = False, **options):
    """A timer (see `TimerMixin` for `options`) on `base`, or on tf.keras' base if `keras2`.

    `keras2=True` takes `tf.keras.callbacks.Callback`, imported now (where
    tf.keras is Keras 2: `TF_USE_LEGACY_KERAS=1` with tf-keras installed).
    """
    if keras2 and base is None:
        import tensorflow as tf

        base = tf.keras.callbacks.Callback
    return timer_class(base)(**options)


def __getattr__(name):  # PEP 562: `Timer`, the Keras 3 timer, built on first use
    if name == "Timer":
        return timer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------- outputs
@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path to write; on success it replaces `path` (`keras_peft.io`).

    Creates the folder of `path` first. The temporary file keeps the
    extensions of `path` (`model.save` wants `.keras`); on an error it is
    removed and `path` is left as it was.
    """
    from keras_peft.io import atomic_path

    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    with atomic_path(path) as tmp:
        yield tmp


def write_with(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Calls `write(tmp_path)` (e.g. `model.save`, `fig.savefig`), then renames onto `path`."""
    with atomic_output(path) as tmp:
        write(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically, creating the folder."""
    if not isinstance(text, str):
        raise TypeError(f"write_text expects a str. Received: {type(text).__name__}.")

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_with(path, write)


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 2,
               default: Callable | None = None) -> None:
    """Writes `obj` as JSON (and a newline) atomically; serializes before touching the folder."""
    import json

    write_text(path, json.dumps(obj, indent=indent, default=default) + "\n")


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping | Sequence], *,
              fieldnames: Sequence[str] | None = None) -> None:
    """Writes `rows` as CSV atomically: dicts (a header from `fieldnames` or the first row's
    keys) or sequences (with `fieldnames`, if given, as the header)."""
    rows = list(rows)

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if rows and isinstance(rows[0], Mapping):
                writer = csv.DictWriter(f, fieldnames=list(fieldnames or rows[0]))
                writer.writeheader()
            else:
                writer = csv.writer(f)
                if fieldnames:
                    writer.writerow(fieldnames)
            writer.writerows(rows)

    write_with(path, write)
