# The README's commands. Each installs what it needs first, into a virtual environment of
# its own (.venv, made with `python3 -m venv`), so they work where the system Python is
# externally managed. `make test PYTHON=/path/to/python` uses that interpreter's
# environment instead and creates nothing.
VENV := .venv
PYTHON ?= $(VENV)/bin/python
# Installed only when the environment has no torch, so a torch already there (a CUDA
# build, say) is never replaced. Add pip options (an index of CPU wheels) with TORCH_PIP_ARGS.
TORCH := torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := .eigenfast-installed-$(shell printf '%s' '$(PYTHON)' | cksum | cut -d' ' -f1)

ifeq ($(PYTHON),$(VENV)/bin/python)
$(STAMP): $(PYTHON)
$(PYTHON):
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip setuptools wheel
endif

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -c "import setuptools, wheel" 2>/dev/null || $(PYTHON) -m pip install --quiet --upgrade setuptools wheel
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PYTHON) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

.PHONY: install demo test bench bench-gpu
install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m eigenfast.cli demo

# pytest exits 5 when it collected nothing: that must fail, never pass silently.
test: $(STAMP)
	$(PYTHON) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(PYTHON) benches/bench_attribution.py
	$(PYTHON) benches/bench_token_bias.py

# On a machine with an NVIDIA GPU: build the CUDA extension, run the GPU tests and every
# GPU benchmark. Exits 2 without CUDA.
bench-gpu: $(STAMP)
	PYTHON=$(PYTHON) bash benches/gpu.sh
