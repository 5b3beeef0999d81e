# Quick start: `make demo` runs the main job, `make test` the test suite. Each creates .venv first
# (with a Python >= 3.12 found by scripts/find_python.sh) and installs the package with its dev extras.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || "$$(scripts/find_python.sh)" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m vim_jax.train --config=configs/demo.py --workdir=runs/demo/$$(date +%Y%m%d-%H%M%S)

test: setup
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
