"""Delta checkpoints: save only what fine-tuning changed, load it onto a base model.

`save_delta` writes the trained variables (LoRA adapters, a head, biases...)
to a safetensors file, keyed by variable path, with the rules and the LoRA
ranks in its metadata. `load_delta` re-creates the adapters on a freshly
built base model, checks that the file fits the model, assigns the values
and wraps the model with the saved rules. A LoRA run's delta is a few
percent of the model (or much less), and any number of them can share one
base checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings

import numpy as np
import safetensors
import safetensors.numpy

from keras_peft._version import __version__
from keras_peft.adapters.config import AdapterConfig
from keras_peft.adapters.layer import DEFAULT_ADAPTER, is_adapted, variable_name
from keras_peft.adapters.lifecycle import (
    _apply_trainability,
    _check_known,
    _names,
    adapters,
    select_adapters,
)
from keras_peft.backends import common, require_built
from keras_peft.io import atomic_path
from keras_peft.model import get_rules, wrap
from keras_peft.rules import PolicyError, check_unique_paths, normalize_rules, resolve
from keras_peft.state import state_of

__all__ = ["DeltaError", "DeltaFileError", "DeltaMismatchError", "load_delta", "save_delta"]

FORMAT = "keras_peft.delta"
FORMAT_VERSION = 2  # 2: the metadata has its own checksum (_METADATA_DIGEST_KEY)
_METADATA_KEY = "keras_peft"
_METADATA_DIGEST_KEY = "keras_peft_sha256"
_SHOWN = 5  # how many mismatches an error lists


class DeltaError(ValueError):
    """Base class of the errors of `load_delta` and `save_delta`."""


class DeltaFileError(DeltaError):
    """The file is missing, truncated, corrupted or not a keras_peft delta."""


class DeltaMismatchError(DeltaError):
    """The delta does not fit the model (other paths, shapes, dtypes or layers)."""


# ------------------------------------------------------------------- helpers
def _digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for path in sorted(tensors):
        a = tensors[path]
        h.update(f"{path}|{a.dtype.name}|{list(a.shape)}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write(tensors: dict, path: str, metadata: dict) -> None:
    """Writes atomically: a temp file in the same folder, then `os.replace`.

    The keras_peft metadata (rules, LoRA ranks and alphas, shapes) gets a
    SHA-256 of its own, beside the one of the tensors inside it, so that a
    damaged header cannot load as other rules or another LoRA scale.
    """
    metadata = dict(metadata)
    if _METADATA_KEY in metadata:
        metadata[_METADATA_DIGEST_KEY] = _text_digest(metadata[_METADATA_KEY])
    with atomic_path(path) as tmp:
        safetensors.numpy.save_file(tensors, tmp, metadata=metadata)


# ------------------------------------------------------------------- save
def save_delta(model, path, adapter=None) -> None:
    """Saves only what fine-tuning changed, keyed by variable path.

    Writes a safetensors file with

    - every variable of `model.trainable_weights` (LoRA adapters, a head...)
      and every variable of every named adapter, selected or not;
    - the non-trainable state of trainable layers (BatchNorm moving
      statistics, which `fit` updates even when the rules freeze gamma/beta);

    and, as JSON metadata under the key `"keras_peft"`: the format version,
    the rules the model is wrapped with, the LoRA adapters' layers, ranks and
    alphas, each variable's shape and dtype, a SHA-256 of the contents, and
    the Keras and keras_peft versions. Frozen weights are not saved: load the
    delta onto the same base model with `load_delta`.

    The write is atomic: a temporary file in the same folder is renamed over
    `path` once complete, so a crash leaves any previous file intact.

    With `adapter` (a name or a list of names) the file holds only those
    adapters: their variables and settings, no rules and nothing else the
    model trains (a head outside the adapter is not in it: to keep a task's
    head with its adapter, put the head under the adapter, e.g.
    `targets=r".*(query|value|logits)"`). `load_delta` adds them to a
    base that may have other adapters.

    Args:
        model: a built Keras 3 or tf.keras model, usually wrapped (`keras_peft.wrap`).
        path: the file to write (by convention `*.safetensors`).
        adapter: None (everything), or the name(s) of the adapters to save.

    Raises:
        ValueError: the model is merged (`keras_peft.merge`): unmerge first;
            an unknown adapter name.
        DuplicatePathError: two saved variables share a path.

    Example:

    ```python
    import os, tempfile
    import keras
    import keras_peft

    def base():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((4,)),
            keras.layers.Dense(8, name="block_0"),
            keras.layers.Dense(8, name="block_1"),
            keras.layers.Dense(1, name="head"),
        ], name="mlp")

    model = base()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r".*block_\\d"))
    # ... model.fit(...) ...
    path = os.path.join(tempfile.mkdtemp(), "run.safetensors")
    keras_peft.save_delta(model, path)
    restored = keras_peft.load_delta(base(), path)
    assert keras_peft.get_rules(restored) == keras_peft.get_rules(model)
    ```
    """
    backend = require_built(model, "save_delta", "save_delta with")
    if state_of(model, backend).merged:
        raise ValueError(
            f"Model {model.name!r} is merged (keras_peft.merge): its base weights "
            "hold the adapters, which a delta does not save. Call "
            "keras_peft.unmerge(model) first, save, then merge again if needed."
        )
    if adapter is None:
        names = None
        own = {id(v) for layer in backend.lora_layer_paths(model).values() if is_adapted(layer)
               for v in layer._peft_variables.values()}
        variables = common.in_model_order(
            model, {id(v) for v in backend.delta_variables(model)} | own)
    else:
        names = _names(adapter)
        _check_known(model, names, adapters(model))
        variables = common.in_model_order(model, {
            id(v) for layer in backend.lora_layer_paths(model).values() if is_adapted(layer)
            for a in layer._peft_adapters.values() if a.name in names
            for v in a.by_key.values()})
    path_of = dict(zip((id(v) for v in model.weights), backend.variable_paths(model)))
    check_unique_paths([path_of[id(v)] for v in variables])
    tensors = {path_of[id(v)]: backend.to_numpy(v) for v in variables}
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": backend.model_header(model),
        "rules": ({p: r.get_config() for p, r in get_rules(model).items()} or None
                  if names is None else None),
        "lora": common.lora_records(backend, model, names),
        "variables": {
            path_of[id(v)]: {"shape": list(v.shape), "dtype": backend.dtype_name(v),
                             "trainable": backend.saved_trainable(v)}
            for v in variables
        },
        "sha256": _digest(tensors),
        "keras_version": backend.keras_version(),
        "keras_peft_version": __version__,
    }
    _write(tensors, os.fspath(path), {_METADATA_KEY: json.dumps(header)})


# ------------------------------------------------------------------- load
def _read(path: str) -> tuple[dict, dict]:
    """Reads and checks a delta file: `(header, {path: array})`; never changes a model."""
    what = f"Cannot read delta file {path!r}"
    try:
        with safetensors.safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise DeltaFileError(f"{what}: it does not exist.") from None
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise DeltaFileError(
            f"{what}: {e}. The file is truncated, corrupted or not a safetensors "
            "file; save it again with keras_peft.save_delta."
        ) from None
    if _METADATA_KEY not in metadata:
        raise DeltaFileError(
            f"{what}: it is a safetensors file, but not a keras_peft delta (no "
            f"{_METADATA_KEY!r} metadata; keys: {sorted(metadata)[:_SHOWN]}). Write "
            "deltas with keras_peft.save_delta."
        )
    header = _read_header(metadata, tensors, what)
    _check_contents(header, tensors, what)
    return header, tensors


def _read_header(metadata: dict, tensors: dict, what: str) -> dict:
    """The keras_peft header of a delta file, checked against its own checksum and format."""
    text, digest = metadata[_METADATA_KEY], metadata.get(_METADATA_DIGEST_KEY)
    if digest is not None and _text_digest(text) != digest:
        raise DeltaFileError(
            f"{what}: its keras_peft metadata does not match the checksum it was saved "
            "with; the file is corrupted. Save it again with keras_peft.save_delta."
        )
    try:
        header = json.loads(text)
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}")
        version = header["version"]
        declared = header["variables"]
        if not isinstance(declared, dict):
            raise TypeError(f"variables is a {type(declared).__name__}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DeltaFileError(f"{what}: its keras_peft metadata is damaged ({e}).") from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DeltaFileError(
            f"{what}: it has format version {version!r}, and this keras_peft reads "
            f"versions up to {FORMAT_VERSION}. Upgrade keras_peft (the file was "
            f"written by keras_peft {header.get('keras_peft_version')})."
        )
    if version >= 2 and digest is None:
        raise DeltaFileError(
            f"{what}: the checksum of its keras_peft metadata is missing; the file is "
            "damaged. Save it again with keras_peft.save_delta."
        )
    if set(declared) != set(tensors):
        raise DeltaFileError(
            f"{what}: its metadata lists other variables than it holds "
            f"(e.g. {sorted(set(declared) ^ set(tensors))[:_SHOWN]}); it is damaged."
        )
    return header


def _check_contents(header: dict, tensors: dict, what: str) -> None:
    """Raises `DeltaFileError` unless the tensors match the header's shapes, dtypes and sha256."""
    declared = header["variables"]
    try:
        bad = [
            p
            for p, a in tensors.items()
            if list(a.shape) != list(declared[p]["shape"])
            or a.dtype.name != declared[p]["dtype"]
        ]
        if header.get("rules"):
            normalize_rules(header["rules"])
    except (ValueError, KeyError, TypeError) as e:
        raise DeltaFileError(f"{what}: its keras_peft metadata is damaged ({e}).") from None
    if bad or _digest(tensors) != header.get("sha256"):
        raise DeltaFileError(
            f"{what}: its contents do not match the checksum it was saved with "
            f"{'(e.g. ' + str(bad[:_SHOWN]) + ') ' if bad else ''}; the file is "
            "corrupted. Save it again with keras_peft.save_delta."
        )


def _fit_saved_paths(backend, model, header: dict, tensors: dict, record: list):
    """The delta's paths re-rooted at `model`'s own name, when the saved model's name differs.

    Paths address variables relative to the model: a model's own name is not
    part of its architecture. A `keras.Sequential` or subclassed model built
    in code names its variables `<model name>/<layer>/...`, and Keras makes
    that name unique per process (`sequential`, then `sequential_1`); the
    same Sequential loaded with `keras.models.load_model` names them
    `<layer>/...`. So when every saved path starts with the saved model's
    name, that prefix is replaced by `model`'s (or dropped, when its paths
    have none) in the variable paths, LoRA layers and rule patterns. Layer
    names stay part of the address: a delta from other layers still fails.
    """
    name = (header.get("model") or {}).get("name")
    old = f"{name}/"
    paths = set(backend.variable_paths(model))
    new = f"{model.name}/" if any(p.startswith(f"{model.name}/") for p in paths) else ""
    if (not name or not tensors or old == new
            or not all(p.startswith(old) for p in tensors)
            or not any(new + p[len(old):] in paths for p in tensors)):
        return header, tensors, record
    heads = (re.escape(old), old)

    def pattern(p):
        head = next((h for h in heads if p.startswith(h)), None)
        return p if head is None else re.escape(new) + p[len(head):]

    def moved(p):
        return new + p[len(old):] if p.startswith(old) else p

    header = dict(header)
    header["variables"] = {moved(p): d for p, d in header["variables"].items()}
    if header.get("rules"):
        header["rules"] = {pattern(p): r for p, r in dict(header["rules"]).items()}
    tensors = {moved(p): a for p, a in tensors.items()}
    record = [(moved(name), adapter, config) for name, adapter, config in record]
    return header, tensors, record


def _plan_lora(backend, model, record: list, path: str) -> tuple[list, dict]:
    """Which adapters need adding, and the `{path: (shape, dtype)}` those will have."""
    layers = backend.lora_layer_paths(model)
    to_enable, expected, problems = [], {}, []
    for name, adapter, config in record:
        layer = layers.get(name)
        if layer is None:
            problems.append(f"layer {name!r} is not in the model (or cannot have LoRA)")
            continue
        have = backend.adapter_configs(layer)
        if adapter in have:
            if not backend.lora_active(layer) or have[adapter] != config:
                which = "LoRA" if adapter == DEFAULT_ADAPTER else f"adapter {adapter!r}"
                problems.append(
                    f"layer {name!r} already has {which} "
                    f"({have[adapter].describe()}, enabled={backend.lora_active(layer)}); "
                    f"the delta has {config.describe()}"
                )
            continue  # same adapter already there: just assign it
        if have and "keras" in {config.implementation,
                                *(c.implementation for c in have.values())}:
            problems.append(f"layer {name!r} has Keras' own LoRA, which takes one adapter")
            continue
        reason = backend.lora_blocker(layer, config)
        if reason:
            problems.append(f"layer {name!r} cannot have LoRA: {reason}")
            continue
        for variable, shape in backend.lora_adapter_shapes(layer, config, adapter).items():
            expected[f"{name}/{variable}" if name else variable] = (shape, "float32")
        to_enable.append((layer, name, adapter, config))
    if problems:
        raise DeltaMismatchError(
            f"Delta file {path!r} has LoRA adapters that this model cannot take "
            f"({len(problems)} problem(s)): " + "; ".join(problems[:_SHOWN]) + ". "
            "Load the delta onto a fresh copy of the base model it was trained from."
        )
    return to_enable, expected


_AUTO_NAME = re.compile(r"(?:^|/)[a-z_]+_\d+/")
_AUTO_NAME_HINT = (
    " Layer names such as 'dense_3' are made up by Keras and change each time a model "
    "is built in the same process: give the layers names (`name=`), or build both "
    "models after `keras.backend.clear_session()`."
)


def _check_fit(backend, model, header: dict, tensors: dict, planned: dict, path: str) -> None:
    expected = {p: (tuple(v.shape), backend.dtype_name(v))
                for p, v in zip(backend.variable_paths(model), model.weights)}
    expected.update(planned)
    saved_from = header.get("model", {})
    origin = f"model {saved_from.get('name')!r} ({saved_from.get('class')})"
    order = [p for p in header["variables"] if p in tensors]  # the model's order at save
    missing = [p for p in order if p not in expected]
    if missing:
        close = [p for p in expected if p.rsplit("/", 1)[-1] == missing[0].rsplit("/", 1)[-1]]
        raise DeltaMismatchError(
            f"Delta file {path!r} (saved from {origin}) has {len(missing)} of "
            f"{len(tensors)} variables that this model ({model.name!r}) does not "
            f"have, e.g. {missing[:_SHOWN]}. Variables are matched by path; this "
            f"model has e.g. {close[:3] or list(expected)[:3]}. Load the delta onto "
            "the base model it was trained from, built the same way (names included)."
            + _AUTO_NAME_HINT * any(_AUTO_NAME.search(p) for p in missing[:_SHOWN])
        )
    wrong = [
        f"{p}: file {tuple(a.shape)} {a.dtype.name}, model {expected[p][0]} {expected[p][1]}"
        for p, a in ((p, tensors[p]) for p in order)
        if tuple(a.shape) != tuple(expected[p][0]) or a.dtype.name != expected[p][1]
    ]
    if wrong:
        raise DeltaMismatchError(
            f"Delta file {path!r} (saved from {origin}) does not fit model "
            f"{model.name!r}: {len(wrong)} variable(s) have another shape or dtype: "
            + "; ".join(wrong[:_SHOWN])
            + ". Load it onto the same base model configuration it was trained from."
        )
    rules = header.get("rules")
    if rules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                resolve(list(expected), normalize_rules(rules))
        except PolicyError as e:
            raise DeltaMismatchError(
                f"The rules saved in delta file {path!r} do not fit model {model.name!r}: {e}"
            ) from None


def load_delta(model, path, adapter=None):
    """Loads a `save_delta` file onto a freshly built base model, and wraps it.

    In order: reads and checks the file (readable, complete, checksum);
    plans the LoRA adapters it records (the layers exist, support LoRA, and
    have none yet, or the same ones); checks that every saved variable path
    exists in the model, or will once the adapters exist, with the same
    shape and dtype, and that the saved rules fit. Only then does it add the
    adapters, assign the values and `wrap` the model with the saved rules
    (a delta saved from an unwrapped model only assigns values).

    If any check fails, the model is left exactly as it was: no adapter is
    added, no value or trainable flag changes.

    Named adapters are added beside the model's own (one that exists with
    the same settings is assigned); the adapters selected when the file was
    saved are selected again (with `adapter`, or from a file of one adapter:
    the loaded one alone, as `lora` would).

    Args:
        model: the base model the delta was trained from, built the same way
            (same layer names, so the same variable paths), e.g. a fresh
            `keras_hub.models.BertTextClassifier.from_preset(...)`.
        path: a file written by `keras_peft.save_delta`.
        adapter: None (everything in the file), or the name of the one
            adapter to load from it (its variables only).

    Returns:
        The same model, wrapped with the saved rules.

    Raises:
        DeltaFileError: the file is missing, truncated, corrupted or not a delta.
        DeltaMismatchError: the delta does not fit the model (unknown paths,
            other shapes or dtypes, LoRA layers it cannot take, rules that
            match nothing).

    Example:

    ```python
    import os, tempfile
    import keras
    import numpy as np
    import keras_peft

    def base():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((4,)),
            keras.layers.Dense(8, name="block_0"),
            keras.layers.Dense(8, name="block_1"),
            keras.layers.Dense(1, name="head"),
        ], name="mlp")

    model = base()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r".*block_\\d"))
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    model.fit(x, x[:, :1], epochs=2, verbose=0)
    path = os.path.join(tempfile.mkdtemp(), "run.safetensors")
    keras_peft.save_delta(model, path)

    restored = keras_peft.load_delta(base(), path)
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)
    ```
    """
    backend = require_built(model, "load_delta", "load_delta with")
    path = os.fspath(path)
    header, tensors = _read(path)
    record = _lora_record_of(backend, header, path, adapter)
    if adapter is not None:
        header, tensors = _only_adapter(backend, header, tensors, record, adapter)
    header, tensors, record = _fit_saved_paths(backend, model, header, tensors, record)
    to_enable, planned = _plan_lora(backend, model, record, path)
    _check_fit(backend, model, header, tensors, planned, path)
    _apply(backend, model, header, tensors, to_enable)
    groups: dict = {}
    for _, name, adapter, config in to_enable:
        groups.setdefault((adapter, config), []).append(name)
    for (adapter, config), layers in groups.items():
        state_of(model).add_lora({**config.to_dict(), "adapter": adapter, "targets": None,
                                  "layers": layers, "source": path})
    return model


def _lora_record_of(backend, header: dict, path: str, adapter=None) -> list[tuple]:
    """`[(layer path, adapter name, AdapterConfig)]` of the file (of adapter `adapter`)."""
    try:
        found = [
            (str(e["layer"]), str(e.get("adapter", DEFAULT_ADAPTER)),
             AdapterConfig.from_dict(e, legacy=backend.LEGACY_IMPLEMENTATION))
            for e in header.get("lora") or []
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise DeltaFileError(
            f"Cannot read delta file {path!r}: its LoRA record is damaged ({e})."
        ) from None
    if adapter is not None and not any(a == adapter for _, a, _ in found):
        raise DeltaMismatchError(
            f"Delta file {path!r} has no adapter named {adapter!r}; it has "
            f"{sorted({a for _, a, _ in found}) or '(none)'}. Received: adapter={adapter!r}.")
    return [r for r in found if adapter is None or r[1] == adapter]


def _pissa_initial(name: str, adapter: str, config: AdapterConfig, prefix: str,
                   tensors: dict):
    """PiSSA's saved initial factors of layer `name`, so that its residual weight is
    re-created from the fresh base (not from a new SVD); None for other adapters."""
    if config.init != "pissa":
        return None
    at = f"{name}/" if name else ""
    return tuple(tensors[at + variable_name(prefix, k, adapter)] for k in ("a_init", "b_init"))


def _only_adapter(backend, header: dict, tensors: dict, record: list, adapter: str):
    """The file's header and tensors cut to adapter `adapter`'s variables (no rules)."""
    keep = set()
    for name, _, _ in record:
        layer_prefix = f"{name}/" if name else ""
        for kind in ("lora_kernel", "lora_embeddings"):
            keep.update(layer_prefix + variable_name(kind, k, adapter)
                        for k in ("a", "b", "magnitude", "merged_norm", "a_init", "b_init"))
    header = {**header, "rules": None,
              "variables": {p: d for p, d in header["variables"].items() if p in keep},
              "lora": [e for e in header.get("lora") or []
                       if e.get("adapter", DEFAULT_ADAPTER) == adapter]}
    return header, {p: a for p, a in tensors.items() if p in keep}


def _select_loaded(backend, model, header: dict, to_enable: list) -> None:
    """Selects the adapters the file had selected (all of its adapters when it says
    nothing, as files of keras-peft 0.x); the adapters of one-adapter loads alone."""
    entries = header.get("lora") or []
    named = {e.get("adapter", DEFAULT_ADAPTER) for e in entries}
    if not named or not any(is_adapted(layer) for layer, *_ in to_enable):
        return
    chosen = [n for n in dict.fromkeys(e.get("adapter", DEFAULT_ADAPTER) for e in entries)
              if len(named) == 1 or any(e.get("selected", True) for e in entries
                                        if e.get("adapter", DEFAULT_ADAPTER) == n)]
    select_adapters(backend, model, chosen)


def _apply(backend, model, header: dict, tensors: dict, to_enable: list) -> None:
    """Adds the adapters, assigns the values and wraps; on a failure, puts everything back.

    Every check has passed when this runs, so nothing should fail; if
    something does, values and flags are put back (added adapters are
    switched off) before the error propagates.
    """
    flags = {id(v): v.trainable for v in model.weights}
    paths = dict(zip((id(v) for v in model.weights), backend.variable_paths(model)))
    values = [(v, backend.to_numpy(v)) for v in model.weights if paths[id(v)] in tensors]
    enabled = []
    try:
        for layer, name, adapter, config in to_enable:
            prefix = next(iter(backend.lora_adapter_shapes(layer, config))).rsplit("_", 1)[0]
            backend.enable_lora(layer, config, adapter=adapter,
                                initial=_pissa_initial(name, adapter, config, prefix, tensors))
            enabled.append((layer, adapter))
        _select_loaded(backend, model, header, to_enable)
        by_path = dict(zip(backend.variable_paths(model), model.weights))
        for p, value in tensors.items():
            by_path[p].assign(value)
        if header.get("rules"):
            wrap(model, header["rules"])
        elif to_enable:
            _apply_trainability(backend, model)
    except BaseException:
        for v, value in values:
            v.assign(value)
        backend.set_trainable(model, [], model.weights, flags, {})
        for layer, adapter in enabled:
            if is_adapted(layer):
                backend.remove_adapter_variables(layer, layer._peft_detach(adapter))
            else:
                backend.set_lora_enabled(layer, False)
        backend.reset_compiled_functions(model)
        raise
    backend.reset_compiled_functions(model)
