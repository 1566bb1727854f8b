# The course's commands. Each sets up .venv with the pinned packages by itself when it is missing or stale.
#   make run      execute every notebook top to bottom (default profile) into build/, two at a time, and summarize
#   make test     helper tests + strict nbval over every committed notebook (what CI runs)
#   make lab      open JupyterLab on the notebooks
#   make refresh  re-execute the committed notebooks in place (after an intended change)
#   make portability  strict nbval under other CPU instruction-set levels and thread counts (before every refresh)
#   make rebuild-tiny-llama / make rebuild-adapter   retrain the shipped model / adapter (not part of CI)
#   make rehearse  every notebook on the real Llama-3.2-3B / 3.1-8B configs, random weights, on this CPU (PROFILE=...)
#   make gpu-setup && make gpu-smoke   on a CUDA machine, no Hub, no token; make gpu-test: the Hub lane
#   make wheelhouse PYTHON_VERSION=3.12 CUDA=13.0   the wheels gpu-setup needs, for a CUDA machine without network
#   make set-repository URL=... BRANCH=...   point the Colab badges and setup cells at a fork

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
NBVAL_FLAGS := --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=900

.PHONY: run test lab refresh portability rehearse rebuild-tiny-llama rebuild-adapter clean-venv

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly: a bare or open-ended torch requirement would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet "$$(grep -E '^torch==' requirements.txt)"
	$(PY) -m pip install --quiet -r requirements.txt
	# the "#no-deps name==version" lines of requirements.txt: libraries whose declared pins conflict with ours
	$(PY) -m pip install --quiet --no-deps $$(sed -n 's/^#no-deps //p' requirements.txt)
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m helpers.runner run

# Two pytest workers, each notebook's cells kept on one worker in order (--dist loadfile), one CPU thread per worker
# and kernel: the committed outputs do not depend on the thread count (make portability proves it), and two busy
# OpenMP threads per kernel on a 2-core CPU would take twice as long. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(NBVAL_FLAGS) tests notebooks

lab: $(STAMP)
	$(PY) -m jupyter lab notebooks

refresh: $(STAMP)
	$(PY) -m helpers.runner refresh

portability: $(STAMP)
	$(PY) -m helpers.runner portability

# The rehearsal: the real-model profiles' code path (Hub ids resolved offline from a local cache it builds, the real
# configs with random weights and fewer layers, Llama 3's tokenizer, decisions for a T4 / a 40 GB GPU) on this CPU,
# every notebook under pytest --nbval-lax; executed copies and junit.xml in build/rehearsal/<profile>/.
rehearse: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m helpers.rehearsal $(if $(PROFILE),--profile $(PROFILE)) $(if $(ADAPTER),--adapter $(ADAPTER))

rebuild-tiny-llama: $(STAMP)
	$(PY) data/build/train_tiny_llama.py
	$(PY) data/build/continue_tiny_llama_on_catalogue.py

rebuild-adapter: $(STAMP)
	$(PY) data/build/make_pricer_data.py
	$(PY) data/build/train_pricer_adapter.py

clean-venv:
	rm -rf $(VENV)

# The GPU lanes, on a machine with a CUDA GPU. They use GPU_PYTHON, whose CUDA build of torch stays: by default
# .venv-gpu (GPU_VENV=... elsewhere, e.g. outside a CI checkout that cleans the tree), which `make gpu-setup` creates from $(PYTHON) with --system-site-packages (so it sees that torch) and
# fills with the pinned requirements except torch, installing only what is missing: with everything present it needs
# no network, so `make gpu-setup && make gpu-smoke` runs offline. Where wheelhouse/ exists, gpu-setup installs from it
# alone (pip --no-index): `make wheelhouse` builds it on a machine with PyPI access, for the offline one.
#   make gpu-smoke   every notebook on the tiny profile placed on the GPU: no Hub, no token; copies in build/gpu-smoke/
#   make gpu-test    every notebook on a real Llama from the Hub (HF_TOKEN; PROFILE=... to choose); copies in build/gpu/
# Both are `pytest --nbval-lax` over the notebooks (helpers.runner.gpu_lane_command): every cell runs once, nbval goes
# on past a failing cell, and every failing cell is reported; helpers/nbval_keep.py writes each executed notebook,
# failed ones with the error in the failing cell, next to nbval's junit.xml; a one-screen summary ends the run.
# TIMEOUT= is seconds per cell. Exit code 2: the lane refused to start (no CUDA device, a gated profile without
# HF_TOKEN, a `python3` kernel from another Python); 1: a notebook failed.
GPU_VENV ?= .venv-gpu
GPU_PYTHON ?= $(GPU_VENV)/bin/python
PROFILE ?=
TIMEOUT ?=
.PHONY: gpu-setup gpu-smoke gpu-test set-repository wheelhouse

gpu-setup:
	$(if $(filter $(GPU_VENV)/bin/python,$(GPU_PYTHON)),test -x $(GPU_PYTHON) || $(PYTHON) -m venv --system-site-packages $(GPU_VENV))
	$(GPU_PYTHON) -m helpers.runner gpu-setup

# wheelhouse/: every wheel a CUDA Linux x86-64 machine with its own torch needs for the pins (helpers/wheelhouse.py).
# PYTHON_VERSION: the target's Python (default: $(PYTHON)'s; exact with PYTHON=python3.12, as pip evaluates dependency
# markers for the Python that runs it); CUDA=13.0 (or 13): only that CUDA library in bitsandbytes' wheel; GLIBC=2.28.
PYTHON_VERSION ?=
CUDA ?=
GLIBC ?=
wheelhouse:
	$(PYTHON) -m helpers.wheelhouse $(if $(PYTHON_VERSION),--python-version $(PYTHON_VERSION)) \
	  $(if $(CUDA),--cuda $(CUDA)) $(if $(GLIBC),--glibc $(GLIBC))

# The smoke lane: every notebook on the tiny profile on the GPU, then the cells that need no trained weights at the
# real Llama-3.2-3B scale, on a random-weight checkpoint built locally (helpers/scale.py). Both run; either fails it.
gpu-smoke:
	HF_HUB_OFFLINE=1 $(GPU_PYTHON) -m helpers.runner gpu-smoke $(if $(TIMEOUT),--timeout $(TIMEOUT)); \
	  lane=$$?; [ $$lane -eq 2 ] && exit 2; \
	  HF_HUB_OFFLINE=1 $(GPU_PYTHON) -m helpers.scale --config data/reference/llama-3.2-3b.config.json \
	    --work build/scale-smoke --device cuda; scale=$$?; \
	  [ $$lane -eq 0 ] && [ $$scale -eq 0 ]

gpu-test:
	HF_HUB_OFFLINE=0 $(GPU_PYTHON) -m helpers.runner gpu-test $(if $(PROFILE),--profile $(PROFILE)) $(if $(TIMEOUT),--timeout $(TIMEOUT))

# A fork: `make set-repository URL=https://github.com/OWNER/NAME BRANCH=main` points helpers/colab.py, every notebook's
# Colab badge and setup cell, and the README's badges at it (without URL/BRANCH: re-applies helpers/colab.py's values).
set-repository: $(STAMP)
	$(PY) -m helpers.repository $(if $(URL),--url $(URL)) $(if $(BRANCH),--branch $(BRANCH))
