"""The code examples in docstrings and in docs/*.md run as written.

Each ```python block of a public object's docstring, of README.md and of every
page under docs/, is executed in a fresh namespace. A block whose first line is
`# not-run` (e.g. one that needs a download) is skipped.
"""

import doctest
import glob
import inspect
import os
import re

import pytest

import keras_peft

ROOT = os.path.join(os.path.dirname(__file__), "..")
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _docstring_blocks():
    for name in sorted(keras_peft.__all__):
        obj = getattr(keras_peft, name)
        doc = inspect.getdoc(obj) or ""
        for i, code in enumerate(BLOCK.findall(doc)):
            yield pytest.param(code, id=f"{name}-{i}")


def _page_blocks():
    pages = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    for page in [os.path.join(ROOT, "README.md"), *pages]:
        with open(page, encoding="utf-8") as f:
            text = f.read()
        for i, code in enumerate(BLOCK.findall(text)):
            yield pytest.param(code, id=f"{os.path.relpath(page, ROOT)}-{i}")


def _run(code):
    if code.lstrip().startswith("# not-run"):
        pytest.skip("block marked # not-run")
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})


@pytest.mark.parametrize("code", list(_docstring_blocks()))
def test_docstring_example_runs(code):
    _run(code)


@pytest.mark.parametrize("code", list(_page_blocks()) or [pytest.param("", marks=pytest.mark.skip)])
def test_docs_page_example_runs(code):
    _run(code)


def test_rule_doctest():
    result = doctest.testmod(keras_peft.rules, verbose=False)
    assert result.attempted > 0 and result.failed == 0
