# The two set-up commands of the README. Each creates or refreshes .venv/ first; the refresh is
# skipped while .venv/.installed is newer than the files that describe the environment.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -c constraints.txt

.PHONY: demo test

demo: $(VENV)/.installed
	$(PY) experiments/fashion_mnist_demo.py

test: $(VENV)/.installed
	$(PY) -m pytest

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch torchvision
	$(PIP) --no-build-isolation torch-scatter torch-sparse
	$(PIP) -e '.[dev]'
	touch $@
