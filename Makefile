# Quickstart: `make demo` and `make test` on a fresh clone with Python >= 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test

.PHONY: demo test test-fast clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "jaxres needs Python >= 3.11; run make PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The default gradient-propagation study (plain vs residual CIFAR twins, depths 20/56/110, BN
# eval/batch and no norm, ReLU and tanh, at init, offline); outputs go to runs/analyze/
# (git-ignored). Measured 1 min 47 s on a quiet 2-core CPU (settings run in two threads).
demo: $(STAMP)
	$(BIN)/jaxres analyze --out runs/analyze

# Every test, slow ones included; -n 2 uses both cores of the CI machine.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
