"""`auto`: choose what to train, and how fast, from measured gradients (Auto-RGN).

Surgical fine-tuning (Lee et al., ICLR 2023, "Surgical Fine-Tuning Improves
Adaptation to Distribution Shifts") proposes Auto-RGN: for every parameter
tensor, the relative gradient norm

    rgn = ||g|| / ||w||

on the target data tells how much the data "wants" that tensor to move,
relative to its size. Auto-RGN trains each tensor with a learning rate
proportional to its rgn, normalised by the largest one. `auto` measures rgn on
a few batches, without changing the model, and returns ordinary rules (one per
variable path, each with a note `rgn=...` that `keras_peft.report` shows), so
the decision can be printed, edited or combined before `keras_peft.wrap`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import numbers
import re

import keras
import numpy as np
import tensorflow as tf

from keras_peft.backends import keras3
from keras_peft.rules import Rule
from keras_peft.strategies.depth import head_and_neck

__all__ = ["AutoResult", "auto"]

EPSILON = 1e-12
"""Floor of a variable's norm in `rgn = ||g|| / max(||w||, EPSILON)`."""

_COLUMNS = ("path", "params", "grad_norm", "weight_norm", "rgn", "lr_scale", "trainable")


@dataclasses.dataclass(frozen=True)
class AutoResult(collections.abc.Mapping):
    """What `keras_peft.auto` measured and decided.

    It is also a read-only mapping of its `rules`, so that it goes wherever
    rules go, like every other strategy's result:
    `keras_peft.wrap(model, keras_peft.auto(model, data))`, `combine(...)`.

    Attributes:
        rules: ordered `{re.escape(path): Rule}`, one per measured variable, in
            the model's variable order; pass it to `keras_peft.wrap`. Each
            rule's `note` is `"rgn=<value>"` (plus `(head)` or
            `(not selected)`), which `keras_peft.report` shows.
        stats: one dict per measured variable, in the model's order, with keys
            `path`, `params`, `grad_norm` (mean over batches of the gradient's
            L2 norm), `weight_norm`, `rgn`, `lr_scale` (None when frozen) and
            `trainable`.
        num_batches: how many batches were measured.
        budget: the parameter budget in parameters (None when not given).
        total_params: all parameters of the model (as `keras_peft.report`
            counts them, non-trainable state included).

    `str(result)` is an aligned table of `stats` with a summary line.
    """

    rules: dict
    stats: list
    num_batches: int
    budget: int | None
    total_params: int

    # The Mapping protocol, over `rules`.
    def __getitem__(self, pattern: str) -> Rule:
        return self.rules[pattern]

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def trainable_params(self) -> int:
        return sum(s["params"] for s in self.stats if s["trainable"])

    def __str__(self) -> str:
        def fmt(key, value):
            if value is None:
                return "-"
            if isinstance(value, bool):
                return "yes" if value else "no"
            if isinstance(value, int):
                return f"{value:,}"
            if isinstance(value, float):
                return f"{value:.3g}"
            return str(value)

        body = [[fmt(k, s[k]) for k in _COLUMNS] for s in self.stats]
        widths = [max([len(h)] + [len(row[i]) for row in body]) for i, h in enumerate(_COLUMNS)]

        def line(cells):
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        rule = ["-" * w for w in widths]
        out = [line(_COLUMNS), line(rule), *(line(row) for row in body), line(rule)]
        summary = (
            f"measured on {self.num_batches} batch(es); trainable params: "
            f"{self.trainable_params:,} of {self.total_params:,}"
        )
        if self.budget is not None:
            summary += f" (budget {self.budget:,})"
        out.append(summary)
        return "\n".join(out)

    def __repr__(self) -> str:
        return str(self)


# ----------------------------------------------------------------- arguments
def _check_budget(budget, total: int) -> int | None:
    if budget is None:
        return None
    error = ValueError(
        "`budget` must be a number of parameters (an int >= 1) or a fraction of all "
        f"parameters (a float in (0, 1]). Received: budget={budget!r}."
    )
    if isinstance(budget, bool):
        raise error
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise error
        return int(budget)
    if isinstance(budget, numbers.Real):
        if not 0 < budget <= 1 or math.isnan(budget):
            raise error
        return math.floor(float(budget) * total)
    raise error


def _check_args(num_batches, min_lr_scale, verbose, batch_size, data):
    if isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral) or (
        num_batches < 1
    ):
        raise ValueError(
            f"`num_batches` must be an int >= 1. Received: num_batches={num_batches!r}."
        )
    if (
        isinstance(min_lr_scale, bool)
        or not isinstance(min_lr_scale, numbers.Real)
        or not 0 < min_lr_scale <= 1
    ):
        raise ValueError(
            "`min_lr_scale` must be a number in (0, 1] (a Rule's lr_scale must be > 0; "
            "freeze with `budget=` instead). Received: "
            f"min_lr_scale={min_lr_scale!r}."
        )
    if verbose not in ("auto", 0, 1, 2):
        raise ValueError(f"`verbose` must be 'auto', 0, 1 or 2. Received: verbose={verbose!r}.")
    if batch_size is not None and not isinstance(data, tuple):
        raise ValueError(
            "`batch_size` applies to data given as a tuple (x, y); a dataset, "
            f"PyDataset or generator is already batched. Received: batch_size={batch_size!r}."
        )


class _FunctionLoss(keras.losses.Loss):
    """A loss function as a `Loss`, which reduces it and applies sample weights."""

    def __init__(self, fn):
        super().__init__(name=getattr(fn, "__name__", "loss"))
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def _loss_function(model, loss):
    """Returns `f(x, y, y_pred, sample_weight) -> scalar loss`."""
    if loss is not None:
        if isinstance(loss, keras.losses.Loss):
            loss_obj = loss
        else:
            fn = keras.losses.get(loss) if isinstance(loss, str) else loss
            if not callable(fn):
                raise ValueError(
                    "`loss` must be a loss name, a keras.losses.Loss or a function "
                    f"(y_true, y_pred). Received: loss={loss!r}."
                )
            loss_obj = _FunctionLoss(fn)

        def compute(x, y, y_pred, sample_weight):
            value = loss_obj(y, y_pred, sample_weight=sample_weight)
            if model.losses:  # regularisation, as Model.compute_loss adds it
                value = value + tf.add_n([tf.cast(v, value.dtype) for v in model.losses])
            return value

        return compute
    compiled = getattr(model, "compiled", False)
    overrides = type(model).compute_loss is not keras.Model.compute_loss
    if compiled and (getattr(model, "loss", None) is not None or overrides):
        return lambda x, y, y_pred, sw: keras3.compute_loss(model, x, y, y_pred, sw)
    state = "compiled without a loss" if compiled else "not compiled"
    raise ValueError(
        f"keras_peft.auto needs a loss to measure gradients, but model {model.name!r} is "
        f"{state} and no `loss=` was given. Compile the model with its loss first "
        "(`model.compile(optimizer=..., loss=...)`) or pass one, e.g. "
        "`auto(model, data, loss='sparse_categorical_crossentropy')`."
    )


# ---------------------------------------------------------------------- data
def _batches(model, data, num_batches: int, batch_size):
    """Yields up to `num_batches` batches `(x, y, sample_weight)`, preprocessed as `fit` would.

    A keras-hub task (a `PipelineModel`) preprocesses in the data pipeline:
    its `fit` maps `model.preprocess_samples` over the batched `tf.data`
    dataset, so raw strings work. The same is done here.
    """
    preprocess = getattr(model, "preprocess_samples", None)
    if isinstance(data, (tf.data.Dataset, tuple)):
        if isinstance(data, tuple):
            if not 1 <= len(data) <= 3:
                raise ValueError(
                    "`data` as a tuple must be (x, y) or (x, y, sample_weight). Received a "
                    f"tuple of length {len(data)}."
                )
            ds = tf.data.Dataset.from_tensor_slices(
                keras.utils.pack_x_y_sample_weight(*data)
            ).batch(batch_size or 32)
        else:
            ds = data
        if preprocess is not None:
            ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
        for element in ds.take(num_batches):
            yield keras.utils.unpack_x_y_sample_weight(element)
        return

    if isinstance(data, keras.utils.PyDataset):
        source = (data[i] for i in range(min(num_batches, len(data))))
    elif isinstance(data, collections.abc.Iterator):
        source = data
    else:
        raise ValueError(
            "`data` must be a tf.data.Dataset, a tuple (x, y) or (x, y, sample_weight), a "
            "keras.utils.PyDataset, or an iterator of batches. Received: "
            f"{type(data).__module__}.{type(data).__name__}. For arrays or lists, pass "
            "`(x, y)` as a tuple."
        )
    for i, element in enumerate(source):
        if i >= num_batches:
            break
        if not isinstance(element, tuple):
            element = (element,)
        if preprocess is not None:
            element = preprocess(*element)
        yield keras.utils.unpack_x_y_sample_weight(element)


# ---------------------------------------------------------------- measuring
def _measure_fn(model, variables, loss_fn):
    handles = [v.value for v in variables]  # the backend tf.Variables

    def measure(x, y, sample_weight):
        # Watch exactly the measured variables, whatever their `trainable` flag.
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            for h in handles:
                tape.watch(h)
            # Inference mode: no dropout noise, and BatchNormalization's moving
            # statistics are left as they are.
            if keras3.call_has_training_arg(model):
                y_pred = model(x, training=False)
            else:
                y_pred = model(x)
            loss = tf.cast(loss_fn(x, y, y_pred, sample_weight), tf.float32)
        grads = tape.gradient(loss, handles)
        norms = []
        for g in grads:
            if g is None:  # not connected to the loss
                norms.append(tf.constant(0.0, tf.float32))
                continue
            if isinstance(g, tf.IndexedSlices):
                g = tf.convert_to_tensor(g)  # sums repeated rows (embeddings)
            norms.append(tf.norm(tf.cast(g, tf.float32)))
        return loss, tf.stack(norms)

    if getattr(model, "run_eagerly", False):
        return measure
    return tf.function(measure, reduce_retracing=True)


def _norm(variable) -> float:
    return float(np.linalg.norm(np.asarray(variable.numpy(), dtype=np.float64)))


def _mean_grad_norms(measure, variables, batches, num_batches, verbose):
    """`(mean gradient norm per variable, number of batches)` over `batches`."""
    sums = np.zeros(len(variables))
    count = 0
    for x, y, sample_weight in batches:
        loss_value, norms = measure(x, y, sample_weight)
        loss_value, norms = float(loss_value), norms.numpy().astype(np.float64)
        if not math.isfinite(loss_value) or not np.isfinite(norms).all():
            bad = [v.path for v, n in zip(variables, norms) if not np.isfinite(n)]
            raise ValueError(
                f"keras_peft.auto: batch {count + 1} gave a non-finite loss ({loss_value}) or "
                f"gradient (e.g. {bad[:3]}). Check the data and the loss."
            )
        sums += norms
        count += 1
        if verbose == 1:
            print(f"auto: batch {count}/{num_batches} - loss: {loss_value:.4g}")
    if count == 0:
        raise ValueError(
            "keras_peft.auto: `data` gave no batches; it needs at least one to measure "
            "gradients."
        )
    return sums / count, count


def _lr_scales(variables, rgns, head, min_lr_scale):
    """`scale_of(variable, rgn)`: the head at 1, the body at rgn / max body rgn (floored)."""
    body_max = max((r for v, r in zip(variables, rgns) if v.path not in head), default=0.0)

    def scale_of(v, r):
        if v.path in head:
            return 1.0
        if body_max <= 0:
            return float(min_lr_scale)
        return max(float(min_lr_scale), r / body_max)

    return scale_of


def _select(variables, rgns, head, budget) -> set[str]:
    """The paths that train: all, or within `budget` the head then the highest rgn first."""
    if budget is None:
        return {v.path for v in variables}
    head_params = sum(math.prod(v.shape) for v in variables if v.path in head)
    if head_params > budget:
        raise ValueError(
            f"`budget` ({budget:,} parameters) is smaller than the head, which always "
            f"trains ({head_params:,} parameters: {sorted(head)[:4]}). Give a larger budget."
        )
    left = budget - head_params
    selected = {v.path for v in variables if v.path in head}
    body = sorted(
        (i for i, v in enumerate(variables) if v.path not in head),
        key=lambda i: -rgns[i],  # stable: ties keep the model's order
    )
    for i in body:
        size = math.prod(variables[i].shape)
        if rgns[i] > 0 and size <= left:
            selected.add(variables[i].path)
            left -= size
    return selected


def auto(
    model,
    data,
    *,
    loss=None,
    num_batches: int = 4,
    budget: float | None = None,
    min_lr_scale: float = 0.01,
    block_names=None,
    batch_size: int | None = None,
    verbose="auto",
) -> AutoResult:
    """Chooses per-variable learning rates (and, with a budget, what to train) by Auto-RGN.

    On `num_batches` batches of `data`, computes the gradient of the loss with
    respect to every trainable-capable variable of `model` (every variable
    created trainable, whatever its current `trainable` flag; BatchNorm
    moving statistics and other state are left out and get no rule), and its
    relative gradient norm

        rgn = mean over batches of ||g||  /  max(||w||, 1e-12)

    (Lee et al., ICLR 2023, Auto-RGN). Then:

    - `lr_scale = rgn / max(rgn)`, floored at `min_lr_scale`; the maximum is
      taken over the variables outside the head.
    - The head (`keras_peft.model_blocks(model, block_names).head`: for a
      keras-hub task everything outside `model.backbone`) always trains, at
      `lr_scale=1.0`, whatever its rgn: a freshly initialised head has a
      large, uninformative gradient, so it neither competes with nor sets
      the scale for the pretrained variables. Its rgn is still measured and
      shown.
    - With `budget`: the head is taken first and counts toward the budget;
      then the other variables go in descending rgn, each one kept if it
      still fits in what is left (one that does not fit is skipped and
      smaller ones further down may still fit), so the trainable parameters
      never exceed the budget. Variables with a zero gradient are never
      selected. The rest get `Rule(trainable=False)`.

    Nothing about `model` changes: no weight (the forward pass runs in
    inference mode, so dropout is off and BatchNorm statistics do not
    move), no `trainable` flag, no optimizer state.

    rgn is per tensor, so tensors with a small norm (biases, normalisation
    offsets) tend to rank high. A tensor whose norm is 0 (a zero-initialised
    bias) gets `rgn = ||g|| / 1e-12`, which is huge and makes every other
    `lr_scale` tiny: measure pretrained weights, not freshly initialised ones.

    Args:
        model: a built Keras 3 model, wrapped or not.
        data: a `tf.data.Dataset` of batches, a tuple `(x, y)` or
            `(x, y, sample_weight)` of arrays (or of raw strings for a keras-hub
            task with a preprocessor), a `keras.utils.PyDataset`, or an iterator
            of batches. A keras-hub task preprocesses the batches with
            `model.preprocess_samples`, as its `fit` does.
        loss: the loss to differentiate: a name, a `keras.losses.Loss` or a
            function `(y_true, y_pred)`. When omitted, the compiled loss
            (`model.compute_loss`) is used; when given, it is used even if the
            model is compiled.
        num_batches: how many batches to measure (fewer if `data` runs out).
        budget: optional limit on trainable parameters: an int (a number of
            parameters) or a float in (0, 1] (a fraction of all parameters, as
            `keras_peft.report` counts them). Note `budget=1` means one
            parameter and `budget=1.0` means all of them.
        min_lr_scale: the smallest `lr_scale` given, in (0, 1].
        block_names: ordered block names for `model_blocks`, when the head
            cannot be inferred.
        batch_size: batch size for data given as `(x, y)` (default 32).
        verbose: `0` silent; `"auto"` or `2` one summary line; `1` also one
            line per batch measured.

    Returns:
        An `AutoResult`: `.rules` for `keras_peft.wrap`, `.stats`, and an
        aligned table as `str(result)`.

    Raises:
        ValueError: a bad argument, no loss, or `data` gave no batch or a
            non-finite loss or gradient.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_peft

    model = keras.Sequential([keras.Input((4,))] + [
        keras.layers.Dense(8, activation="tanh", name=f"block_{i}") for i in range(2)
    ] + [keras.layers.Dense(1, name="head")])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.random.rand(64, 4), np.random.rand(64, 1), verbose=0)  # "pretraining"

    x_new, y_new = np.random.rand(64, 4), np.random.rand(64, 1) + 1.0
    result = keras_peft.auto(model, (x_new, y_new), budget=0.5)  # the compiled loss
    print(result)
    keras_peft.wrap(model, result.rules)
    print(keras_peft.report(model))  # the note column shows each rgn
    ```
    """
    _check_args(num_batches, min_lr_scale, verbose, batch_size, data)
    if not isinstance(model, keras.Model) or not keras3.is_built(model):  # Keras 3 only
        raise ValueError(
            "keras_peft.auto expects a built Keras 3 model (call it on a batch or "
            f"`model.build(input_shape)` first). Received: {model!r}."
        )
    weights = model.weights
    total = sum(math.prod(v.shape) for v in weights)
    budget = _check_budget(budget, total)
    loss_fn = _loss_function(model, loss)
    head = set(head_and_neck(model, block_names)[0].paths)

    capable = keras3.trainable_capable(model)
    variables = [
        v for v in weights if id(v) in capable and tf.as_dtype(v.dtype).is_floating
    ]
    grad_norms, count = _mean_grad_norms(
        _measure_fn(model, variables, loss_fn), variables,
        _batches(model, data, num_batches, batch_size), num_batches, verbose)
    weight_norms = [_norm(v) for v in variables]
    rgns = [g / max(w, EPSILON) for g, w in zip(grad_norms, weight_norms)]
    selected = _select(variables, rgns, head, budget)
    scale_of = _lr_scales(variables, rgns, head, min_lr_scale)
    rules: dict = {}
    stats: list = []
    for v, g, w, r in zip(variables, grad_norms, weight_norms, rgns):
        trainable = v.path in selected
        note = f"rgn={r:.3g}"
        if v.path in head:
            note += " (head)"
        elif not trainable:
            note += " (not selected)"
        lr_scale = scale_of(v, r) if trainable else None
        rules[re.escape(v.path)] = (Rule(lr_scale=lr_scale, note=note) if trainable
                                    else Rule(trainable=False, note=note))
        stats.append({
            "path": v.path, "params": math.prod(v.shape), "grad_norm": float(g),
            "weight_norm": float(w), "rgn": float(r), "lr_scale": lr_scale,
            "trainable": trainable,
        })
    result = AutoResult(
        rules=rules, stats=stats, num_batches=count, budget=budget, total_params=total
    )
    if verbose:
        print(
            f"auto: measured {len(variables)} variables on {count} batch(es); training "
            f"{result.trainable_params:,} of {total:,} parameters"
            + (f" (budget {budget:,})" if budget is not None else "")
            + "."
        )
    return result
