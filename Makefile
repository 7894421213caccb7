# Every target does its own set-up on a fresh machine: a virtual environment, torch when it is
# missing (the CPU build), and this package with its extras.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCHRUN := $(VENV)/bin/torchrun
TORCH_VERSION ?= 2.13.0

.PHONY: install test test-unit test-distributed demo bench-quick gpu-check clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install test-unit test-distributed

test-unit: install
	$(PY) -m pytest -q tests --ignore=tests/distributed

test-distributed: install
	$(TORCHRUN) --standalone --nproc_per_node=2 -m pytest -q tests/distributed
	$(TORCHRUN) --standalone --nproc_per_node=3 -m pytest -q tests/distributed -m "not two_ranks_only"
	$(TORCHRUN) --standalone --nproc_per_node=4 -m pytest -q tests/distributed -m four_ranks

demo: install
	$(TORCHRUN) --standalone --nproc_per_node=2 launch/train.py

# On one CUDA GPU, in a few minutes: unit suite on cuda, distributed suite on nccl, step speed
# against a device copy, a CUDA-graph step, a digits run; writes benchmarks/results/gpu.json and
# GPU.md. Without a GPU it says so and succeeds.
gpu-check: install
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV)
