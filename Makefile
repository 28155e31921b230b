# The two commands at the top of the README:
#   make run   - create .venv, install unseg, segment the bundled sample images
#   make test  - create .venv, install unseg with the dev extras, lint and run the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
OUT ?= out/sample

.PHONY: run test install install-dev lint clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, pinned to 2.13.0 where that (CPU) wheel is available, so that resolving the
# project's `torch>=2.1` never pulls a CUDA build; any torch>=2.1 otherwise.
$(VENV)/.torch: $(VENV)/bin/activate
	$(PIP) install --quiet torch==2.13.0 || $(PIP) install --quiet "torch>=2.1"
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps "pysodmetrics>=1.4"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(VENV)/bin/unseg segment examples/images --out $(OUT) --overwrite

lint: install-dev
	$(VENV)/bin/ruff check src tests bench

test: install-dev lint
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) out build src/*.egg-info
