"""recipes/_pretrained.py (the all-MiniLM-L6-v2 download) and its deprecated alias."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))

import _pretrained


def test_missing_cache_without_download_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_PEFT_CACHE", str(tmp_path))
    assert _pretrained.cache_dir() == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        _pretrained.minilm_path(download=False)


def test_keras_peft_pretrained_forwards_with_a_deprecation_warning(tmp_path, monkeypatch):
    import keras_peft.pretrained as old

    monkeypatch.setenv("KERAS_PEFT_CACHE", str(tmp_path))
    with pytest.warns(DeprecationWarning, match="recipes/_pretrained.py"):
        minilm_path = old.minilm_path
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        minilm_path(download=False)
    with pytest.warns(DeprecationWarning):
        assert old.MINILM_SHA256 == _pretrained.MINILM_SHA256
    with pytest.raises(AttributeError):
        old.something_else  # noqa: B018
