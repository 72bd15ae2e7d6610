# Quickstart: `make demo` and `make test` on a fresh clone with Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "jaxres needs Python >= 3.11; run make PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per extra: the demo needs only jaxres[analysis]; the tests need everything.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[$*]'
	touch $@

# The default gradient-propagation study (plain vs residual CIFAR twins at depths 20/56/110 and
# the pre-activation ResNet-110; BN in batch mode and no norm, ReLU and tanh, at init,
# offline); outputs go to runs/analyze/
# (git-ignored). README "Gradient-propagation analysis" says how long it takes.
demo: $(VENV)/.installed-analysis
	$(BIN)/jaxres analyze --out runs/analyze

# Every test, slow ones included; -n 2 uses both cores of the CI machine.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 -q

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
