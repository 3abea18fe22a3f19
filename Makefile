# Every target that runs code creates .venv on first use: on a fresh machine each one alone
# does the whole set-up. torch is pinned to the CPU build that lies on this machine's disk.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint protos check-protos bench clean

$(STAMP): pyproject.toml client/pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt \
		-e ./client -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tools.demo

test: $(STAMP)
	$(PY) tools/gen_protos.py --check
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m bench.serving
	$(PY) -m bench.training

protos: $(STAMP)
	$(PY) tools/gen_protos.py

check-protos: $(STAMP)
	$(PY) tools/gen_protos.py --check

clean:
	rm -rf $(VENV) loraforge-data out .pytest_cache .ruff_cache
