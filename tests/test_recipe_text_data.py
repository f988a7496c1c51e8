"""The text recipe's data loaders (recipes/_text_data.py): files, splits, TFDS, clear errors."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))

from _text_data import TextDataError, load_table, load_text_data

DEMO = os.path.join(os.path.dirname(__file__), "..", "recipes", "data", "sentiment_demo.tsv")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_tsv_in_glue_format_keeps_quotes_as_text(tmp_path):
    path = write(tmp_path, "train.tsv",
                 'sentence\tlabel\n"great" fun , really\t1\nit \'s awful\t0\n\nok\t1\n')
    split = load_table(path)
    assert split.texts == ['"great" fun , really', "it 's awful", "ok"]
    assert split.labels.tolist() == [1, 0, 1] and split.labels.dtype == np.int32


def test_csv_with_quoted_commas_and_chosen_columns(tmp_path):
    path = write(tmp_path, "reviews.csv",
                 'id,review,stars\n1,"good, really good",1\n2,"bad, very bad",0\n')
    split = load_table(path, text_column="review", label_column="stars")
    assert split.texts == ["good, really good", "bad, very bad"]
    assert split.labels.tolist() == [1, 0]


def test_missing_column_says_which_and_what_the_header_has(tmp_path):
    path = write(tmp_path, "train.tsv", "sentence\tsentiment\nfun\t1\n")
    with pytest.raises(TextDataError, match=r"column 'label' not found; the header has "
                       r"\['sentence', 'sentiment'\]\. Choose the column with --label-column"):
        load_table(path)


def test_no_text_column_found(tmp_path):
    path = write(tmp_path, "train.csv", "body,label\nfun,1\n")
    with pytest.raises(TextDataError, match=r"no text column found.*--text-column"):
        load_table(path)


def test_non_integer_label_names_the_line(tmp_path):
    path = write(tmp_path, "train.tsv", "sentence\tlabel\nfun\t1\nawful\tnegative\n")
    with pytest.raises(TextDataError, match=r"train\.tsv, line 3: label 'negative' in column "
                       r"'label' is not an integer >= 0"):
        load_table(path)


def test_negative_label_is_rejected(tmp_path):
    path = write(tmp_path, "train.tsv", "sentence\tlabel\nfun\t-1\n")
    with pytest.raises(TextDataError, match="label '-1'"):
        load_table(path)


def test_empty_file(tmp_path):
    path = write(tmp_path, "train.tsv", "")
    with pytest.raises(TextDataError, match=r"train\.tsv is empty: expected a header line"):
        load_table(path)


def test_header_without_rows(tmp_path):
    path = write(tmp_path, "train.tsv", "sentence\tlabel\n")
    with pytest.raises(TextDataError, match="has a header .* but no data rows"):
        load_table(path)


def test_wrong_delimiter_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "train.tsv", "sentence,label\nfun,1\n")
    with pytest.raises(TextDataError, match=r"single column when split on tabs.*contains "
                       r"commas: pass --delimiter ','"):
        load_table(path)
    assert load_table(path, delimiter=",").texts == ["fun"]


def test_row_with_wrong_number_of_fields(tmp_path):
    path = write(tmp_path, "train.tsv", "sentence\tlabel\nfun\t1\ttoo many\n")
    with pytest.raises(TextDataError, match=r"line 2: 3 field\(s\) where the header has 2"):
        load_table(path)


def test_missing_file(tmp_path):
    with pytest.raises(TextDataError, match="Data file not found"):
        load_table(str(tmp_path / "nope.tsv"))


def test_held_out_split_is_deterministic_disjoint_and_capped():
    data = load_text_data(DEMO, validation_fraction=0.25)
    again = load_text_data(DEMO, validation_fraction=0.25)
    assert data.train.texts == again.train.texts
    assert data.validation.texts == again.validation.texts
    assert not set(data.train.texts) & set(data.validation.texts)
    total = len(data.train) + len(data.validation)
    assert len(data.validation) == round(0.25 * total)
    assert data.num_classes == 2 and "held out: 25%" in data.validation_source
    other = load_text_data(DEMO, validation_fraction=0.25, split_seed=1)
    assert other.validation.texts != data.validation.texts
    capped = load_text_data(DEMO, validation_fraction=0.25, max_examples=10,
                            max_validation_examples=5)
    assert capped.train.texts == data.train.texts[:10]
    assert capped.validation.texts == data.validation.texts[:5]


def test_separate_validation_file(tmp_path):
    train = write(tmp_path, "train.csv", "text,label\na,0\nb,1\nc,2\n")
    val = write(tmp_path, "val.csv", "text,label\nd,1\n")
    data = load_text_data(train, val)
    assert sorted(data.train.texts) == ["a", "b", "c"] and data.validation.texts == ["d"]
    assert data.num_classes == 3 and data.validation_source == val


def test_a_single_class_is_rejected(tmp_path):
    path = write(tmp_path, "train.tsv", "sentence\tlabel\n" + "x\t1\n" * 10)
    with pytest.raises(TextDataError, match=r"only one class \(\[1\]\)"):
        load_text_data(path)


def test_too_few_examples_to_hold_out(tmp_path):
    path = write(tmp_path, "train.tsv", "sentence\tlabel\na\t0\nb\t1\n")
    with pytest.raises(TextDataError, match="too few to hold out 20%.*--validation-data"):
        load_text_data(path)


def test_demo_sample_is_balanced_and_unique():
    split = load_table(DEMO)
    assert len(split) >= 300 and len(set(split.texts)) == len(split)
    counts = np.bincount(split.labels)
    assert counts.tolist() == [len(split) // 2] * 2


def test_tfds_uses_its_own_validation_split():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        data = load_text_data("tfds:glue/sst2", max_examples=8, max_validation_examples=5)
        assert len(data.train) == 8 and len(data.validation) == 5
        assert all(isinstance(t, str) for t in data.train.texts)
        assert data.num_classes == 2  # from the ClassLabel feature
        assert data.train.source == "tfds:glue/sst2:train"
        assert data.validation.source == "tfds:glue/sst2:validation"
        imdb = load_text_data("tfds:imdb_reviews:train", max_examples=4)
        assert imdb.train.source == "tfds:imdb_reviews:train" and len(imdb.train) == 4


def test_tfds_feature_that_does_not_exist():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4), pytest.raises(
            TextDataError, match=r"has no feature 'stars'; its features are"):
        load_text_data("tfds:glue/sst2", label_column="stars")
