# Set-up on a fresh machine: `make demo` (decode on an embedded default) and `make test`.
# `make test-min` runs the suite on the lowest diffusers release vaepar supports (vaepar/compat.py).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MIN_VENV := .venv-min
DIFFUSERS_MIN := $(shell grep -m1 '^DIFFUSERS = ' vaepar/compat.py | cut -d'"' -f2)
MIN_STAMP := $(MIN_VENV)/.installed-$(DIFFUSERS_MIN)

.PHONY: demo test test-min venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(MIN_STAMP): pyproject.toml vaepar/compat.py
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(MIN_VENV)/bin/python -m pip install -q torch==2.13.0
	# diffusers 0.36's remote client (used by the serve tests) calls safetensors.torch._tobytes, gone in 0.8
	$(MIN_VENV)/bin/python -m pip install -q -e '.[dev]' 'diffusers==$(DIFFUSERS_MIN)' 'safetensors<0.8'
	touch $(MIN_STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

test-min: $(MIN_STAMP)
	$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(MIN_VENV) out .pytest_cache
