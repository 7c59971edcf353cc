# The two set-up commands of the README. Each creates or refreshes .venv/ first; the refresh is
# skipped while .venv/.installed is newer than the files that describe the environment.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -c constraints.txt

.PHONY: train test

train: $(VENV)/.installed
	$(PY) experiments/imagenet.py --preset cpu-demo

test: $(VENV)/.installed
	$(PY) -m pytest

# torch-scatter and torch-sparse compile against the installed torch (--no-build-isolation).
# To use every core: for torch-scatter (whose setup turns ninja off) a setuptools config that
# builds its extensions in parallel; for torch-sparse ninja (and not that config: parallel ninja
# builds would share one build file). No debug info (-g0): it is slow to produce for torch's
# headers. pip caches the built wheels.
$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch torchvision ninja
	printf '[build_ext]\nparallel = %s\n' "$$(nproc)" > $(VENV)/build_ext.cfg
	CFLAGS=-g0 DIST_EXTRA_CONFIG=$(abspath $(VENV))/build_ext.cfg \
		$(PIP) --no-build-isolation torch-scatter
	CFLAGS=-g0 $(PIP) --no-build-isolation torch-sparse
	$(PIP) -e '.[dev]'
	touch $@
