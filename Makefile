# The course's commands. Each sets up .venv with the pinned packages by itself when it is missing or stale.
#   make run      execute every notebook top to bottom (default profile) into build/ and summarize
#   make test     helper tests + strict nbval over every committed notebook (what CI runs)
#   make lab      open JupyterLab on the notebooks
#   make refresh  re-execute the committed notebooks in place (after an intended change)
#   make portability  strict nbval under other CPU instruction-set levels and thread counts (before every refresh)
#   make rebuild-tiny-llama / make rebuild-adapter   retrain the shipped model / adapter (not part of CI)

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
NBVAL_FLAGS := --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=900

.PHONY: run test lab refresh portability rebuild-tiny-llama rebuild-adapter clean-venv

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly: a bare or open-ended torch requirement would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet "$$(grep -E '^torch==' requirements.txt)"
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m helpers.runner run

test: $(STAMP)
	$(PY) -m pytest $(NBVAL_FLAGS) tests notebooks

lab: $(STAMP)
	$(PY) -m jupyter lab notebooks

refresh: $(STAMP)
	$(PY) -m helpers.runner refresh

portability: $(STAMP)
	$(PY) -m helpers.runner portability

rebuild-tiny-llama: $(STAMP)
	$(PY) data/build/train_tiny_llama.py

rebuild-adapter: $(STAMP)
	$(PY) data/build/make_pricer_data.py
	$(PY) data/build/train_pricer_adapter.py

clean-venv:
	rm -rf $(VENV)

# The GPU lane (issue: verified on a T4-class runner). Uses the Python whose CUDA torch the runner provides;
# `make gpu-setup` installs the pinned requirements into it without replacing torch.
GPU_SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
PROFILE ?=
.PHONY: gpu-setup gpu-test
gpu-setup:
	$(GPU_PYTHON) -c "from helpers.environment import requirements_without_torch as r; print('\n'.join(r('requirements.txt')))" \
	  | $(GPU_PYTHON) -m pip install --quiet -r /dev/stdin

gpu-test:
	HF_HUB_OFFLINE=0 $(GPU_PYTHON) -m helpers.runner gpu-test $(if $(PROFILE),--profile $(PROFILE))
