# The two commands users need are `make demo` and `make test` (see README.md).
PYTHON ?= python3

.PHONY: install demo test lint bench fuzz crash

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

# SIGKILL during write storms, 200 rounds for each persistent format (tests/crashtest.py); CI runs a few.
crash:
	PYNBD_CRASH_ROUNDS=200 $(PYTHON) -m pytest -q --timeout=0 -k "sigkill or crash_harness" \
		tests/filters/test_cow_file.py tests/filters/test_snapshot.py tests/filters/test_cbt.py \
		tests/tools/test_gzip_stored.py
