# Set-up and everyday commands. Each target installs what is missing first (torch pinned to its CPU build
# before the project, since an unpinned torch pulls a multi-GB CUDA build), and a second run installs nothing.
#   make demo        the main job: the method on SmolLM2-135M, a table at the end (under 10 min on 2 idle CPU cores)
#   make test        the suite CI runs (fast, then slow)
#   make test-fast   the fast suite only;   make test-slow   the slow one only
#   make bench       decode throughput, eager and compiled, and at a fixed KV budget
#   make gpu-check   the prepared GPU check (on a CUDA machine)
PYTHON ?= python
TORCH ?= torch==2.13.0
STAMP := .make

.PHONY: install demo test test-fast test-slow bench gpu-check

# torch: the pinned CPU build, unless the torch already there is a CUDA build (a GPU machine's own)
$(STAMP)/torch:
	@mkdir -p $(STAMP)
	@$(PYTHON) -c "import sys, torch; sys.exit(0 if torch.version.cuda or torch.__version__.split('+')[0] == '$(TORCH)'.split('==')[1] else 1)" 2>/dev/null \
		|| $(PYTHON) -m pip install --quiet "$(TORCH)"
	@touch $@

# the project and its dev extras, again whenever pyproject.toml changes
$(STAMP)/project: pyproject.toml $(STAMP)/torch
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	@touch $@

install: $(STAMP)/project

demo: install
	$(PYTHON) launch/train.py

test: test-fast test-slow

test-fast: install
	$(PYTHON) -m pytest -q

test-slow: install
	$(PYTHON) -m pytest -q -m slow

bench: install
	$(PYTHON) benchmarks/decode.py

gpu-check:  # the GPU machine has no network: the script installs what it carries (see its header)
	bash benchmarks/gpu_check.sh run
