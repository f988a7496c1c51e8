"""Labelled text for the text-classification recipe: CSV/TSV files and TFDS.

`load_text_data(spec, ...)` returns a training and a validation split of
`(texts, integer labels)`:

- `spec` is a local file (`.tsv` is read tab-separated without quoting, as
  GLUE's `sentence<TAB>label` files are; anything else comma-separated with
  CSV quoting; `delimiter=` overrides) with a header line naming a text and a
  label column, or `tfds:NAME[:SPLIT]` (e.g. `tfds:glue/sst2`,
  `tfds:imdb_reviews`) read with tensorflow-datasets.
- Validation: `validation=` (same formats) when given; else a TFDS
  dataset's own `validation` split (or `test` when it has no validation
  split); else a deterministic held-out fraction of the training file
  (`validation_fraction`, shuffled with `split_seed`, independent of the
  training seed so that runs with different seeds share one validation set).

Labels must be integers `0..C-1`. A file that cannot be read as asked (empty,
a missing column, a label that is not an integer, the wrong delimiter, a row
with the wrong number of fields) raises `TextDataError` naming the file, the
line and what to change.

This module is recipe code, not part of the keras_peft library.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys

import numpy as np

__all__ = ["TextData", "TextDataError", "TextSplit", "load_table", "load_tfds", "load_text_data"]

TFDS_PREFIX = "tfds:"
TEXT_COLUMN_GUESSES = ("sentence", "text", "review", "content")
_DELIMITER_NAMES = {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe"}


class TextDataError(ValueError):
    """A data file or dataset cannot be used as asked; the message says why and what to do."""


@dataclasses.dataclass
class TextSplit:
    """Texts and their integer labels, plus where they came from."""

    texts: list[str]
    labels: np.ndarray  # int32, shape (n,)
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices, source: str | None = None) -> TextSplit:
        indices = np.asarray(indices, dtype=np.int64)
        return TextSplit([self.texts[i] for i in indices], self.labels[indices],
                         source or self.source)


@dataclasses.dataclass
class TextData:
    """A training and a validation split, the number of classes, and how they were made."""

    train: TextSplit
    validation: TextSplit
    num_classes: int
    validation_source: str

    def describe(self) -> str:
        counts = np.bincount(self.train.labels, minlength=self.num_classes)
        return (f"data: {len(self.train):,} training examples from {self.train.source} "
                f"(per class {counts.tolist()}); {len(self.validation):,} validation "
                f"examples ({self.validation_source}); {self.num_classes} classes")


# ------------------------------------------------------------------ files
def _name(delimiter: str) -> str:
    return _DELIMITER_NAMES.get(delimiter, repr(delimiter))


def _default_delimiter(path: str) -> str:
    return "\t" if path.lower().endswith((".tsv", ".tab")) else ","


def _choose_text_column(header: list[str], text_column: str | None, where: str) -> str:
    if text_column is not None:
        return text_column
    for guess in TEXT_COLUMN_GUESSES:
        if guess in header:
            return guess
    raise TextDataError(
        f"{where}: no text column found; its header has columns {header}, none of "
        f"which is one of {list(TEXT_COLUMN_GUESSES)}. Name the text column with "
        "--text-column (text_column=...)."
    )


def _parse_label(value, where: str, label_column: str) -> int:
    text = "" if value is None else str(value).strip()
    try:
        label = int(text)
    except ValueError:
        label = None
    if label is None or label < 0:
        raise TextDataError(
            f"{where}: label {text!r} in column {label_column!r} is not an integer >= 0. "
            "Labels must be the integers 0..C-1 (GLUE's 0 = negative, 1 = positive); "
            "map text labels to integers first, or pick another column with --label-column."
        )
    return label


def load_table(path: str, *, text_column: str | None = None, label_column: str = "label",
               delimiter: str | None = None) -> TextSplit:
    """Reads a CSV/TSV file with a header line into a `TextSplit`.

    Args:
        path: the file. `.tsv`/`.tab` files are tab-separated and read without
            quote handling (GLUE's format, where quotes are part of the text);
            other files are comma-separated with standard CSV quoting.
        text_column: the text column; default the first of `sentence`, `text`,
            `review`, `content` that the header has.
        label_column: the label column (integers 0..C-1).
        delimiter: overrides the delimiter chosen from the extension.

    Raises:
        TextDataError: the file is missing or empty, has no data rows, lacks a
            column, has a non-integer label or a row with the wrong number of
            fields, or seems to use another delimiter.
    """
    if not os.path.isfile(path):
        raise TextDataError(
            f"Data file not found: {path!r}. Give a CSV/TSV file with a header line "
            "(e.g. GLUE's sentence<TAB>label) or a TFDS dataset as tfds:NAME."
        )
    delimiter = delimiter or _default_delimiter(path)
    if len(delimiter) != 1:
        raise TextDataError(f"The delimiter must be one character. Received: {delimiter!r}.")
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)  # blank lines before the header
        if header is None:
            raise TextDataError(
                f"{path} is empty: expected a header line naming a text and a label "
                f"column (e.g. 'sentence{delimiter}label') and one row per example."
            )
        header = [cell.strip() for cell in header]
        if len(header) == 1:
            others = [d for d in _DELIMITER_NAMES if d != delimiter and d in header[0]]
            hint = (f" It contains {_name(others[0])}s: pass --delimiter "
                    f"{others[0]!r} (delimiter={others[0]!r})." if others else "")
            raise TextDataError(
                f"{path}: the header {header[0]!r} is a single column when split on "
                f"{_name(delimiter)}s; a text and a label column are needed.{hint}"
            )
        text_column = _choose_text_column(header, text_column, path)
        for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if column not in header:
                raise TextDataError(
                    f"{path}: column {column!r} not found; the header has {header}. "
                    f"Choose the column with {flag}."
                )
        text_at, label_at = header.index(text_column), header.index(label_column)
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            where = f"{path}, line {reader.line_num}"
            if len(row) != len(header):
                raise TextDataError(
                    f"{where}: {len(row)} field(s) where the header has {len(header)} "
                    f"({header}), splitting on {_name(delimiter)}s. Is the delimiter right "
                    "(--delimiter), and is text containing it quoted (CSV) or free of tabs (TSV)?"
                )
            texts.append(row[text_at])
            labels.append(_parse_label(row[label_at], where, label_column))
    if not texts:
        raise TextDataError(f"{path} has a header ({header}) but no data rows.")
    return TextSplit(texts, np.asarray(labels, dtype=np.int32), path)


# ------------------------------------------------------------------- tfds
def _parse_tfds(spec: str) -> tuple[str, str | None]:
    rest = spec[len(TFDS_PREFIX):]
    name, _, split = rest.partition(":")
    if not name:
        raise TextDataError(
            f"Empty TFDS dataset name in {spec!r}; write e.g. tfds:glue/sst2 or "
            "tfds:imdb_reviews:train."
        )
    return name, split or None


def _tfds_features(name: str):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name).info
    except Exception as e:  # not registered, or metadata that cannot be had
        raise TextDataError(
            f"TFDS dataset {name!r} is not available ({type(e).__name__}: {e}). Check the "
            "name (e.g. glue/sst2, imdb_reviews), or use a local CSV/TSV file instead."
        ) from e


def _tfds_columns(info, name, text_column, label_column):
    features = info.features
    keys = list(features.keys())
    if text_column is None:
        text_keys = [k for k in keys if type(features[k]).__name__ == "Text"]
        guesses = [k for k in TEXT_COLUMN_GUESSES if k in keys]
        if guesses:
            text_column = guesses[0]
        elif len(text_keys) == 1:
            text_column = text_keys[0]
        else:
            raise TextDataError(
                f"TFDS dataset {name!r}: cannot tell the text feature among {keys}; "
                "name it with --text-column."
            )
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column not in keys:
            raise TextDataError(
                f"TFDS dataset {name!r} has no feature {column!r}; its features are {keys}. "
                f"Choose one with {flag}."
            )
    num_classes = getattr(features[label_column], "num_classes", None)
    return text_column, num_classes


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_tfds(spec: str, *, split: str | None = None, text_column: str | None = None,
              label_column: str = "label", max_examples: int | None = None):
    """Reads `tfds:NAME[:SPLIT]` into a `TextSplit`; returns `(split, num_classes or None)`.

    `split` (default `train`) is used when the spec names none. Downloads the
    dataset through tensorflow-datasets when it is not prepared yet.
    """
    import tensorflow_datasets as tfds

    name, spec_split = _parse_tfds(spec)
    split = spec_split or split or "train"
    info = _tfds_features(name)
    text_column, num_classes = _tfds_columns(info, name, text_column, label_column)
    try:
        ds = tfds.load(name, split=split)
    except Exception as e:
        raise TextDataError(
            f"Could not load TFDS dataset {name!r}, split {split!r} ({type(e).__name__}: "
            f"{str(e)[:300]}). tensorflow-datasets downloads datasets on first use; "
            "without internet access use a local file instead, e.g. --data "
            "../shared/data/sst2/train.tsv (GLUE's SST-2 train.tsv) or your own CSV/TSV."
        ) from e
    if max_examples is not None:
        ds = ds.take(max_examples)
    texts, labels = [], []
    for example in tfds.as_numpy(ds):
        texts.append(_decode(example[text_column]))
        labels.append(int(example[label_column]))
    where = f"tfds:{name}:{split}"
    if not texts:
        raise TextDataError(f"{where} has no examples.")
    labels = np.asarray(labels, dtype=np.int32)
    if labels.min() < 0:
        raise TextDataError(
            f"{where} has unlabelled examples (label {labels.min()}); GLUE's test splits "
            "are unlabelled. Use a labelled split, e.g. tfds:glue/sst2:validation."
        )
    return TextSplit(texts, labels, where), num_classes


def _tfds_validation_split(spec: str) -> str:
    name, _ = _parse_tfds(spec)
    splits = list(_tfds_features(name).splits.keys())
    # No recorded splits (e.g. under tfds.testing.mock_data): assume "validation".
    if not splits or "validation" in splits:
        return "validation"
    if "test" in splits:
        return "test"
    raise TextDataError(
        f"TFDS dataset {name!r} has no validation or test split (splits: {splits}); give "
        "one with --validation-data tfds:NAME:SPLIT."
    )


# ---------------------------------------------------------------- entry point
def _read(spec, *, split=None, text_column, label_column, delimiter, max_examples=None):
    if spec.startswith(TFDS_PREFIX):
        return load_tfds(spec, split=split, text_column=text_column,
                         label_column=label_column, max_examples=max_examples)
    return load_table(spec, text_column=text_column, label_column=label_column,
                      delimiter=delimiter), None


def _check_count(name, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise TextDataError(f"`{name}` must be a positive integer or None. Received: {value!r}.")


def load_text_data(spec: str, validation: str | None = None, *, text_column: str | None = None,
                   label_column: str = "label", delimiter: str | None = None,
                   validation_fraction: float = 0.2, split_seed: int = 0,
                   max_examples: int | None = None,
                   max_validation_examples: int | None = None) -> TextData:
    """Loads a training and a validation split (see the module docstring).

    Args:
        spec: a CSV/TSV file or `tfds:NAME[:SPLIT]`.
        validation: optional separate validation data, in the same formats.
        text_column, label_column, delimiter: see `load_table`.
        validation_fraction: share of a training *file* held out for validation
            when `validation` is not given (ignored for TFDS, which has splits).
        split_seed: seed of the deterministic shuffle of a file (held-out split
            and the `max_examples` subset).
        max_examples: keep at most this many training examples.
        max_validation_examples: keep at most this many validation examples.

    Raises:
        TextDataError: unreadable data, fewer than 2 classes, or bad arguments.
    """
    _check_count("max_examples", max_examples)
    _check_count("max_validation_examples", max_validation_examples)
    if not 0 < validation_fraction < 1:
        raise TextDataError(
            f"`validation_fraction` must be in (0, 1). Received: {validation_fraction!r}."
        )
    opts = {"text_column": text_column, "label_column": label_column, "delimiter": delimiter}
    is_tfds = spec.startswith(TFDS_PREFIX)
    train, num_classes = _read(spec, max_examples=max_examples, **opts)
    rng = np.random.default_rng(split_seed)
    if not is_tfds:
        train = train.take(rng.permutation(len(train)))  # deterministic order
    if validation is not None:
        held_out, val_classes = _read(validation, split="validation",
                                      max_examples=max_validation_examples, **opts)
        how = validation
    elif is_tfds:
        held_out, val_classes = _read(TFDS_PREFIX + _parse_tfds(spec)[0],
                                      split=_tfds_validation_split(spec),
                                      max_examples=max_validation_examples, **opts)
        how = f"the dataset's own split, {held_out.source}"
    else:
        n_val = round(validation_fraction * len(train))
        if n_val < 1 or n_val >= len(train):
            raise TextDataError(
                f"{spec} has {len(train)} examples: too few to hold out "
                f"{validation_fraction:.0%} for validation. Add examples or give "
                "--validation-data FILE."
            )
        held_out = train.take(np.arange(n_val))
        train = train.take(np.arange(n_val, len(train)))
        val_classes = None
        how = (f"held out: {validation_fraction:.0%} of {spec}, shuffled with split seed "
               f"{split_seed}")
    if max_examples is not None and len(train) > max_examples:
        train = train.take(np.arange(max_examples))
    if max_validation_examples is not None and len(held_out) > max_validation_examples:
        held_out = held_out.take(np.arange(max_validation_examples))
    if validation is None and not is_tfds:
        how += f"; {len(held_out):,} examples"
    num_classes = max(num_classes or 0, val_classes or 0,
                      int(train.labels.max()) + 1, int(held_out.labels.max()) + 1)
    present = np.unique(train.labels)
    if len(present) < 2:
        raise TextDataError(
            f"The training data ({train.source}) has only one class ({present.tolist()}); "
            "a classifier needs at least two. Check the label column."
        )
    missing = sorted(set(range(num_classes)) - set(present.tolist()))
    if missing:
        print(f"warning: classes {missing} have no training example", file=sys.stderr)
    return TextData(train, held_out, num_classes, how)
