# The README's commands. Each installs what it needs first, into a virtual environment of
# its own (.venv, made with `python3 -m venv`), so they work where the system Python is
# externally managed. `make test PYTHON=/path/to/python` uses that interpreter's
# environment instead and creates no venv.
VENV := .venv
PYTHON ?= $(VENV)/bin/python
# The exact releases the whole suite passed with, torch included: every install takes
# them as pip constraints, so it gets a known-good set on any day. `make install
# CONSTRAINTS=` installs without pins (what pyproject.toml allows: the newest releases in
# a new venv, what is there already where it fits); CONSTRAINTS=other.txt takes that file.
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# Add pip options for the torch install (an index of CPU wheels, say) with TORCH_PIP_ARGS.
TORCH_PIP_ARGS ?=
STAMP := .eigenfast-installed-$(shell printf '%s' '$(PYTHON) $(CONSTRAINTS)' | cksum | cut -d' ' -f1)

# The oldest transformers pyproject.toml declares (its lower bound, the one place it is
# written), for `make test-oldest`.
OLDEST_TRANSFORMERS = $(shell python3 -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(next(re.search(r">=\s*([0-9.]+)", d)[1] for d in deps if re.match(r"transformers\b", d)))')
# Released with transformers and pinned by it: for the oldest transformers, pip picks
# their releases; everything else keeps the pinned set.
RELEASED_WITH_TRANSFORMERS := transformers tokenizers huggingface-hub hf-xet kernels safetensors

# One line: what the environment runs with.
VERSIONS := import sys, importlib.metadata as m; \
    print("versions: python " + sys.version.split()[0], *(f"{n} {next((d.version for d in m.distributions(name=n)), None)}" for n in ("torch", "transformers", "triton")), sep=", ")

# The [gguf] extra (GGUF export, llama.cpp through llama-cpp-python): llama-cpp-python has no
# wheel on PyPI, so pip builds llama.cpp from source, CPU backend only and none of its programs,
# once, into a wheel in $(WHEELS) that every environment here (.venv, .venv-oldest) installs
# from. The build is the slow step of a first `make` (minutes; docs/SERVING.md has the
# measured time). GGUF=0 leaves the extra out: the tests that need it then skip.
GGUF ?= 1
WHEELS := $(CURDIR)/.wheels
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_BLAS=OFF -DGGML_CCACHE=OFF -DLLAVA_BUILD=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
LLAMA_WHEEL := $(WHEELS)/.built-$(shell grep -i '^llama.cpp.python==' $(CONSTRAINTS) 2>/dev/null | cut -d= -f3)
comma := ,
EXTRAS := $(if $(filter 1,$(GGUF)),test$(comma)gguf,test)
WHEEL_DEPS := $(if $(filter 1,$(GGUF)),$(LLAMA_WHEEL))

# $(call install,PYTHON,PIP CONSTRAINT OPTIONS,SOURCE TREE,EXTRA REQUIREMENTS): setuptools
# and wheel (the build runs without isolation), torch when the environment has none (the
# extension compiles against it), then the tree, editable, with its extras (llama-cpp-python
# from the wheel built here).
define install
	$(1) -c "import setuptools, wheel" 2>/dev/null || $(1) -m pip install --quiet $(2) --upgrade setuptools wheel
	$(1) -c "import torch" 2>/dev/null || $(1) -m pip install --quiet $(2) $(TORCH_PIP_ARGS) torch
	$(1) -m pip install --quiet $(2) --find-links $(WHEELS) --no-build-isolation -e "$(3)[$(EXTRAS)]" $(4)
	$(1) -c '$(VERSIONS)'
endef

# $(call pytest,PYTHON,DIRECTORY,OPTIONS): the tests, run from DIRECTORY. pytest exits 5
# when it collected nothing: that must fail, never pass silently.
define pytest
	cd $(2) && $(1) -m pytest -q $(3) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc
endef

# $(call fresh_venv,DIRECTORY): a new venv there, and in DIRECTORY/src a copy of this tree
# as a clone of it would hold it (tracked and untracked files, none that git ignores).
# The drift checks install that copy, not this tree: an editable install builds
# eigenfast._C into the tree it installs, against its own venv's torch, and .venv's
# library must stay the one built for .venv's torch.
define fresh_venv
	rm -rf $(1)
	python3 -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	mkdir $(1)/src
	git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C $(1)/src
endef

ifeq ($(PYTHON),$(VENV)/bin/python)
$(STAMP): $(PYTHON)
$(PYTHON):
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet $(PIN) --upgrade pip setuptools wheel
endif

$(STAMP): pyproject.toml setup.py $(CONSTRAINTS) $(wildcard csrc/*) $(WHEEL_DEPS)
	$(call install,$(PYTHON),$(PIN),.,)
	touch $@

# The llama-cpp-python wheel, built once per pinned release (its build prints its seconds).
$(LLAMA_WHEEL): $(PYTHON)
	mkdir -p $(WHEELS)
	start=$$(date +%s); CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(PYTHON) -m pip wheel --quiet --no-deps $(PIN) -w $(WHEELS) llama-cpp-python \
	    && echo "llama-cpp-python wheel built in $$(( $$(date +%s) - start )) s"
	touch $@

.PHONY: install demo test test-oldest test-latest bench bench-gpu
install: $(STAMP)

# The demo needs no llama.cpp: a first `make demo` installs without the [gguf] extra (the same
# stamp, so a later `make test` sees the wheel missing, builds it and installs the extra).
demo:
	@$(MAKE) --no-print-directory GGUF=0 install
	$(PYTHON) -m eigenfast.cli demo

test: $(STAMP)
	@$(PYTHON) -c '$(VERSIONS)'
	$(call pytest,$(PYTHON),.,)

# The fast tests on the oldest transformers pyproject.toml allows, in a fresh .venv-oldest:
# the pinned set, except what is released with transformers.
test-oldest: $(WHEEL_DEPS)
	$(call fresh_venv,.venv-oldest)
	grep -viE '^($(subst $() ,|,$(RELEASED_WITH_TRANSFORMERS)))==' $(CONSTRAINTS) > .venv-oldest/constraints.txt
	$(call install,$(CURDIR)/.venv-oldest/bin/python,-c $(CURDIR)/.venv-oldest/constraints.txt,$(CURDIR)/.venv-oldest/src,"transformers==$(OLDEST_TRANSFORMERS)")
	$(call pytest,$(CURDIR)/.venv-oldest/bin/python,.venv-oldest/src,-m "not slow")

# The fast tests on the newest release of every dependency, in a fresh .venv-latest: no
# constraints, and transformers past pyproject.toml's upper bound too (pip then notes the
# conflict), to see the next release break something before a user does.
test-latest:
	$(call fresh_venv,.venv-latest)
	$(call install,$(CURDIR)/.venv-latest/bin/python,,$(CURDIR)/.venv-latest/src,)
	.venv-latest/bin/python -m pip install --quiet --upgrade transformers
	@.venv-latest/bin/python -c '$(VERSIONS)'
	$(call pytest,$(CURDIR)/.venv-latest/bin/python,.venv-latest/src,-m "not slow")

bench: $(STAMP)
	$(PYTHON) benches/bench_attribution.py
	$(PYTHON) benches/bench_token_bias.py

# On a machine with an NVIDIA GPU: build the CUDA extension, run the GPU tests and every
# GPU benchmark. Exits 2 without CUDA.
bench-gpu: $(STAMP)
	PYTHON=$(PYTHON) bash benches/gpu.sh
