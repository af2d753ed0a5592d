# Quick start (README): `make train-debug` trains the debug model on 2 CPU ranks,
# `make test` runs the whole test suite. Both install what is missing first.
PYTHON ?= python
NPROC ?= 2
CONFIG ?= train_configs/rat_debug.toml
# More trainer options, e.g. ARGS=--checkpoint.enable (the debug configs save no checkpoints).
ARGS ?=
# torch first, pinned: on a CPU-only host this resolves to the CPU wheel, so the package
# install below finds torch satisfied and pulls no CUDA packages. Extra pip arguments (e.g. a
# CPU wheel index) go in TORCH_PIP_ARGS.
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: install data train-debug test gpu-wheels

install:
	@if $(PYTHON) -c "import importlib.metadata as m; [m.version(d) for d in ('rat-titan', \
'torch', 'torchtitan', 'torchdata', 'tokenizers', 'triton', 'pytest', 'pytest-timeout', \
'torchao', 'lm_eval', 'accelerate', 'matplotlib', 'transformers')]" \
		2>/dev/null; then \
		echo "install: everything already installed"; \
	else \
		command -v nvidia-smi >/dev/null || $(PYTHON) -m pip install $(TORCH_PIP_ARGS) "$(TORCH)"; \
		$(PYTHON) -m pip install -e ".[test]"; \
	fi

data: install
	$(PYTHON) -m rat_plugin.data.prepare

train-debug: data
	$(PYTHON) -m torch.distributed.run --nproc_per_node=$(NPROC) --standalone \
		--local-ranks-filter 0 --role rank --tee 3 \
		-m torchtitan.train --job.config_file $(CONFIG) $(ARGS)

test: data
	$(PYTHON) -m pytest -q

# The wheels a bare GPU node lacks for `make gpu-check` (pins: tools/gpu_wheels.txt), downloaded
# for its CPython 3.12 without resolving torch; fails above 40 MiB. Needs the package index.
GPU_WHEELS ?= .whl
.PHONY: gpu-wheels
gpu-wheels:
	$(PYTHON) tools/gpu_wheels.py download --dest $(GPU_WHEELS)

# The GPU check (docs/gpu_fast_path.md): one offline command on a bare GPU node, 9 minutes, a
# report in OUT. DRY=1 runs every stage on CPU at toy size (CI). Where make is missing:
# python3 tools/gpu_check.py [--out DIR] [--dry].
GPU_CHECK_PYTHON ?= python3
OUT ?= gpu_check_report
DRY ?=
.PHONY: gpu-check
gpu-check:
	$(GPU_CHECK_PYTHON) tools/gpu_check.py --out $(OUT) --wheels $(GPU_WHEELS) $(if $(DRY),--dry)
