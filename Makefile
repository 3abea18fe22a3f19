# Every target that runs code creates .venv on first use: on a fresh machine each one alone
# does the whole set-up. torch is pinned to the CPU build that lies on this machine's disk.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast test-services lint protos check-protos bench clean

$(STAMP): pyproject.toml client/pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt \
		-e ./client -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tools.demo

# The suite runs on every core (pytest-xdist: a worker per core and one more, each with its
# share of torch threads; whole modules handed out longest first, by tests/durations.json: see
# tests/conftest.py). test-fast leaves out the tests marked slow: the end-to-end training runs.
PYTEST := $(PY) -m pytest -q -n auto --dist loadscope --no-loadscope-reorder

test: $(STAMP) test-services
	$(PY) tools/gen_protos.py --check
	$(PYTEST)

test-fast: $(STAMP) test-services
	$(PYTEST) -m "not slow"

# The real servers and tools the tests use, each installed only where it is missing
# (tools/test-services.sh says which and from where; tests/test_setup.py checks its choices).
test-services: $(STAMP)
	@VENV=$(VENV) tools/test-services.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP) test-services
	$(PY) -m bench.serving
	$(PY) -m bench.training
	$(PY) -m bench.fleet
	$(PY) -m bench.takeover
	$(PY) -m bench.masking
	$(PY) -m bench.masking --background bar
	$(PY) -m bench.slots

protos: $(STAMP)
	$(PY) tools/gen_protos.py

check-protos: $(STAMP)
	$(PY) tools/gen_protos.py --check

clean:
	rm -rf $(VENV) loraforge-data out .pytest_cache .ruff_cache
