# Two commands do everything: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch pinned to the CPU wheel where there is no NVIDIA GPU (plain `torch` pulls GBs of CUDA).
TORCH_CPU ?= torch==2.13.0
EXTRAS ?= pva,dev,codecs,monitor,bench

.PHONY: venv demo test test-fast bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q "torch>=2.1" && $(BIN)/python -m pip install -q -e ".[$(EXTRAS),gpu]"; \
	else \
	  $(BIN)/python -m pip install -q "$(TORCH_CPU)" && $(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"; \
	fi
	touch $@

demo: venv
	$(BIN)/peaknet-pva demo

test: venv
	$(BIN)/python -m pytest -q -ra tests

test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not pva" tests

bench: venv
	$(BIN)/python benchmarks/bench_peaks.py
	$(BIN)/python benchmarks/bench_pipeline.py

clean:
	rm -rf $(VENV) build *.egg-info
