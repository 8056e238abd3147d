PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch: the CPU build (a plain `pip install torch` pulls a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test test-unit test-integration demo lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" || echo "warning: $(TORCH_SPEC) not installable here; torch-engine tests will be skipped"
	$(PIP) install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: venv
	$(PY) -m pytest -q tests/unit

test-integration: venv
	$(PY) -m pytest -q tests/integration

lint: venv
	$(VENV)/bin/ruff check epp plugins model-server tests bench

demo: venv
	$(PY) -m bench.demo

bench: venv
	$(PY) -m bench.overhead

clean:
	rm -rf $(VENV) build *.egg-info
