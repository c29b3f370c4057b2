# One place for the commands the README, CI and developers use.
#   make run   - set up and start the relay against a local RabbitMQ (demo app id and token)
#   make test  - set up and run linters, type checks and the whole test suite
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Demo configuration for `make run` only; override any of them in the environment.
run: export RELAY_SDKAPPIDS ?= 1400000001
run: export RELAY_CALLBACK_TOKENS ?= 1400000001=change-me-demo-token
run: export RELAY_QUEUES ?= moderation.revocations,audit.revocations
run: export RELAY_LOG_FORMAT ?= console

.PHONY: run test lint typecheck pytest broker clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: $(STAMP) broker
	$(BIN)/relay check-config
	$(BIN)/relay serve

broker:
	@./scripts/ensure-rabbitmq.sh

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check relay tests
	$(BIN)/ruff format --check relay tests

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
