# Quickstart: `make demo` and `make test` on a fresh clone with Python >= 3.11.
#
# The venv is made with the newest Python >= 3.11 on the machine, because pip resolves the newest
# JAX there, which trains faster on CPU (docs/install.md): python3.X on PATH or pyenv's newest
# 3.X.Y, X from 20 down to 11 (a
# pyenv shim of a version that is not selected fails to run and is passed over), else python3.
# `make PYTHON=python3.11 ...` picks another; `make python` prints the choice.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell \
  root=$${PYENV_ROOT:-$$HOME/.pyenv}; \
  for x in 20 19 18 17 16 15 14 13 12 11; do \
    for p in python3.$$x $$(ls -d "$$root"/versions/3.$$x.* 2>/dev/null | grep -E '/3\.[0-9]+\.[0-9]+$$' \
                            | sort -rV | sed "s|$$|/bin/python3.$$x|"); do \
      if "$$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then echo "$$p"; exit 0; fi; \
    done; \
  done; \
  echo python3)
endif
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast docs docs-serve clean python

python:
	@echo $(PYTHON)

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
# (git-ignored). docs/analysis.md says how long it takes.
demo: $(VENV)/.installed-analysis
	$(BIN)/jaxres analyze --out runs/analyze

# Every test, slow ones included; -n 2 uses both cores of the CI machine.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 -q

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

# The documentation site in strict mode (a broken link, nav entry or API reference fails) into
# site/, from its own venv: building docs needs none of JAX (the API reference reads the source).
DOCS_VENV ?= .venv-docs
$(DOCS_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DOCS_VENV)/bin/python -m pip install --quiet $$($(PYTHON) -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["docs"]))')
	touch $@

# (the two variables silence the notices MkDocs' plugins print about MkDocs 2)
docs: $(DOCS_VENV)/.installed
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(DOCS_VENV)/bin/mkdocs build --strict

docs-serve: $(DOCS_VENV)/.installed
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(DOCS_VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) $(DOCS_VENV) .pytest_cache site
