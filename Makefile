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
	$(VENV)/bin/diffshield demo --out demo_out --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --maxschedchunk 1   # two workers, one test at a time each (long ones first: conftest)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts examples

# Retrain the shipped t2i model and detectors from scratch (about 100 minutes on 2 CPU cores): world version 1
# gives the VAE (shared by both worlds) and toy:detector-v1 (the DDPM's world); world version 2 gives toy:t2i and
# toy:detector on that VAE. The DDPM and the inpainter have their own recipes (docs/toyworld.md).
toyworld: $(STAMP)
	$(VENV)/bin/diffshield toyworld train --world-version 1 --work runs/toyworld1 --out runs/toyworld1/weights \
		--overwrite
	cp runs/toyworld1/weights/detector/config.json runs/toyworld1/weights/detector/model.safetensors \
		src/diffshield/toyworld/weights/detector_v1/
	$(VENV)/bin/diffshield toyworld train --world-version 2 --vae runs/toyworld1/weights/t2i/vae --work runs/toyworld2 \
		--out src/diffshield/toyworld/weights --overwrite

bench: $(STAMP)
	$(PY) benchmarks/toyworld.py

# One benchmark per pillar; each writes benchmarks/results/<name>.json (slow: docs/benchmarks.md gives the times).
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
	rm -rf demo_out .pytest_cache build dist
