# Framewise: `make serve` runs the service on the embedded CPU default, `make test` passes the tests.
# Both set everything up on a fresh machine (virtual environment, buf, CPU model repository).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUF := .tools/node_modules/.bin/buf
BUF_VERSION := 1.75.0
REPO_CPU := .cache/model_repository_cpu
PYTEST_ARGS ?=

.PHONY: install tools system-deps repository serve test lint proto proto-check bench clean

install: $(VENV)/.installed

# The Triton python-backend stub (shipped by nvidia-pytriton) links the system libpython3.11.
system-deps:
	@if [ ! -e /usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0 ]; then \
	  echo "installing libpython3.11 (needed by Triton's python backend stub)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libpython3.11; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq libpython3.11; fi; \
	fi

$(VENV)/.installed: pyproject.toml | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

tools: $(BUF)

$(BUF):
	npm install --prefix .tools --no-audit --no-fund --silent @bufbuild/buf@$(BUF_VERSION)

# Idempotent: a no-op when the repository already matches its sources.
repository: install
	$(PY) build_engines.py --target cpu --output $(REPO_CPU)

# Without FRAMEWISE_DID_API_KEY, talking videos go to the project's local D-ID emulator (said
# loudly here and in the server log); with it, to api.d-id.com (or FRAMEWISE_DID_URL).
DID_EMULATOR_PORT ?= 8081
SERVE := $(PY) -m server --model-repository $(REPO_CPU) --log-format text
serve: repository
	@if [ -n "$$FRAMEWISE_DID_API_KEY" ]; then exec $(SERVE); fi; \
	echo "!!! FRAMEWISE_DID_API_KEY is not set: starting the LOCAL D-ID EMULATOR on 127.0.0.1:$(DID_EMULATOR_PORT)." >&2; \
	echo "!!! Talking videos will NOT come from D-ID (the emulator holds the photo still over the audio)." >&2; \
	$(PY) -m did_emulator --port $(DID_EMULATOR_PORT) --api-key local-emulator & emulator=$$!; \
	trap 'kill $$emulator 2>/dev/null' EXIT; \
	FRAMEWISE_DID_URL=http://127.0.0.1:$(DID_EMULATOR_PORT) FRAMEWISE_DID_API_KEY=local-emulator FRAMEWISE_DID_IS_EMULATOR=1 $(SERVE)

proto: install
	$(PY) proto/generate.py

lint: install tools
	$(PY) proto/generate.py --deps-only >/dev/null
	$(BUF) lint

test: install tools lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Detection (orchestrator vs direct Triton) and tracking benchmarks; ~6 minutes on 2 cores.
bench: repository
	$(PY) bench/detect_bench.py --output bench/results
	$(PY) bench/track_bench.py --output bench/results

clean:
	rm -rf .cache build
