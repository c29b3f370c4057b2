# One place for the commands the README, CI and developers use.
#   make run   - set up and start the relay against a local RabbitMQ (demo app id and token)
#   make test  - set up and run linters, type checks, the ops validators and the whole test suite
#   make image, make image-test - build the container image with buildah and run it (docs/deploy.md)
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

# Demo configuration for `make run` and `make sample` only; override any of them in the environment.
run sample: export RELAY_SDKAPPIDS ?= 1400000001
run sample: export RELAY_CALLBACK_TOKENS ?= 1400000001=change-me-demo-token
run sample: export RELAY_QUEUES ?= moderation.revocations
run sample: export RELAY_AUDIT_QUEUES ?= audit.revocations
run sample: export RELAY_LOG_FORMAT ?= console
KIND ?= c2c
IMAGE ?= localhost/revoke-relay:dev

.PHONY: run sample test lint typecheck ops pytest faults faults-cluster faults-redis chaos bench broker synapse image image-test clean

# What serving needs (make run); the test extras come on top (make test and the other targets).
$(RUN_STAMP): pyproject.toml constraints.txt
	@echo "make: creating $(VENV) and installing revoke-relay (first run: about 20 s)"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	@echo "make: installing the test and lint tools into $(VENV)"
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: $(RUN_STAMP) broker
	$(BIN)/relay check-config
	@echo "make: starting the relay on :8080 (Ctrl-C stops it); in another terminal: make sample"
	$(BIN)/relay serve

# Post a signed sample recall to the relay started by `make run` (KIND=c2c|group|official_account).
sample: $(RUN_STAMP)
	$(BIN)/relay send-sample --kind $(KIND)

broker:
	@./scripts/ensure-rabbitmq.sh

test: lint typecheck ops pytest

# Manifests, Dockerfile, alert rules, dashboard, live /metrics (installs promtool, checkov, ...).
ops: $(STAMP)
	./scripts/check-ops.sh

# The container image from deploy/Dockerfile, without a Docker daemon: buildah (chroot isolation),
# on a stand-in base from Debian packages where the default base cannot be pulled. Then its size
# report and SBOM in build/image/. Root on Debian (installs buildah/mmdebstrap with apt).
image:
	IMAGE=$(IMAGE) ./scripts/image.sh build

# The image's size report, then the image run as a user would (tests/image/image_smoke.py):
# non-root, /healthz and /readyz, a callback into RabbitMQ, the spool, SIGTERM, size budget, SBOM.
image-test: $(STAMP) broker
	IMAGE=$(IMAGE) ./scripts/image.sh report
	RELAY_IMAGE=$(IMAGE) $(BIN)/pytest -p no:cacheprovider -v -s tests/image/image_smoke.py

# The performance benchmark (A: bare HTTP, B: broker ceiling, R: relay, S: spool path) → bench/results/.
bench: $(STAMP)
	./bench/ensure-tools.sh
	$(BIN)/python -m bench.run --workers 2

# The fault scenarios at full length (30 s outages) with the results table.
faults: $(STAMP)
	$(BIN)/python -m tests.faults --profile full --out bench/results/faults-full.json

# The cluster fault scenarios (three private nodes, 200 callbacks/s, 30 s outages) with the results table;
# then the frozen-node scenario again with net_ticktime 15 (see bench/results/faults-cluster.md).
faults-cluster: $(STAMP)
	status=0; \
	$(BIN)/python -m tests.faults --cluster --profile full --out bench/results/faults-cluster.json || status=1; \
	$(BIN)/python -m tests.faults --cluster --profile full --net-ticktime 15 partition_frozen \
		--out bench/results/faults-cluster-ticktime15.json || status=1; \
	exit $$status

# The correlation store's fault scenarios on private Redis servers (a six-node cluster, a Sentinel set):
# primary SIGKILL and SIGSTOP, the whole cluster down, resharding, at 200 callbacks/s; the table goes to
# bench/results/faults-redis.json (docs/deploy.md). CI runs the short profile inside `make pytest`.
faults-redis: $(STAMP)
	rm -f bench/results/faults-redis.json
	RELAY_REDIS_FAULTS=full RELAY_REDIS_FAULTS_OUT=bench/results/faults-redis.json \
		$(BIN)/pytest -p no:cacheprovider -s -v tests/faults/test_redis.py

# Random overlapping faults over the whole deployment (three nodes, two relays, Redis, the Tencent
# simulator) for DURATION with a fresh seed (SEED=N repeats a run), then the checker; the report and its
# timeline go to bench/results/chaos-<date>.md/.png (the PNG needs the bench extra: matplotlib).
DURATION ?= 30m
chaos: $(STAMP)
	$(BIN)/python -m tests.faults.chaos --duration $(DURATION) $(if $(SEED),--seed $(SEED))

lint: $(STAMP)
	$(BIN)/ruff check relay tests examples bench
	$(BIN)/ruff format --check relay tests examples bench

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy --strict examples/consumer.py examples/audit_service.py

pytest: $(STAMP) synapse
	$(BIN)/pytest

# A real Matrix homeserver for tests/synapse/ (PyPI, its own venv in .tools/; ~30 s the first time).
synapse:
	./scripts/ensure-synapse.sh

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
