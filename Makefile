# The two commands users need are `make demo` and `make test` (see README.md).
PYTHON ?= python3

.PHONY: install demo test lint bench fuzz

install:
	$(PYTHON) -m pip install -q -e .

demo: install
	pynbd serve -f memory 1G

test:
	scripts/install-deps
	$(PYTHON) -m ruff check src tests bench
	$(PYTHON) -m mypy --strict src
	$(PYTHON) scripts/unasync.py --check
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check src tests bench
	$(PYTHON) -m mypy --strict src
	$(PYTHON) scripts/unasync.py --check

bench:
	scripts/install-deps
	$(PYTHON) -m pip install -q -r bench/requirements.lock
	$(PYTHON) bench/run.py

fuzz:
	$(PYTHON) tests/fuzz/fuzz_main.py
