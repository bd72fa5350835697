# Two commands on a fresh clone: `make demo` and `make test`. Both create/refresh .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint toyworld bench bench-erasure bench-redteam bench-backdoor bench-protect clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # the CPU wheel on this disk; install it first
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffshield demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# Retrain every shipped toy weight from scratch (about 50 minutes on 2 CPU cores).
toyworld: $(STAMP)
	$(VENV)/bin/diffshield toyworld train --work runs/toyworld

bench: $(STAMP)
	$(PY) benchmarks/toyworld.py

# One benchmark per issue; each writes benchmarks/results/<name>.json (slow: see the README for times).
bench-erasure: $(STAMP)
	$(PY) benchmarks/erase_speed.py
	$(PY) benchmarks/erasure.py

bench-redteam: $(STAMP)
	$(PY) benchmarks/redteam.py

bench-backdoor: $(STAMP)
	$(PY) benchmarks/backdoor.py all

bench-protect: $(STAMP)
	$(PY) benchmarks/protect.py

clean:
	rm -rf demo_out .pytest_cache
