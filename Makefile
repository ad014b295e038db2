# Two commands do everything on a fresh machine: `make book` and `make test`.
# Both create .venv and install requirements.txt when it is missing or older than the file.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: book test test-fast typecheck exercises lint clean-book help

help:
	@echo "make book       build the book, strict, every notebook executed (_build/html)"
	@echo "make test       run the whole test suite (unit tests, book build, nbgrader round trip)"
	@echo "make test-fast  bncore's unit tests only: no book build, no nbgrader, no browser"
	@echo "make typecheck  mypy on bncore (settings in pyproject.toml)"
	@echo "make exercises  regenerate exercises/ from solutions/ with nbgrader"
	@echo "make lint       ruff"

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build -W -n --keep-going .
	$(BIN)/python book/_ext/check_offline.py _build/html

test: $(STAMP)
	bash scripts/system-deps.sh
	$(BIN)/python -m pytest -q --durations=20

# The tests marked neither slow nor grading (each grading test file sets pytestmark).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not grading"

typecheck: $(STAMP)
	$(BIN)/mypy

exercises: $(STAMP)
	$(BIN)/python -m bngrade release

lint: $(STAMP)
	$(BIN)/ruff check .

clean-book:
	rm -rf _build
