# The README's two commands are `make run` and `make test`; everything else is for developers.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
PARAMS ?= params.yaml
export DVC_NO_ANALYTICS := 1
# dvc.yaml's stage commands call `jointdistill` from the project's venv.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup run test test-fast test-slow test-bench lint lock bench ablation open-questions pipeline image clean

## setup: create $(VENV) from requirements.lock (no-op when it is already up to date)
setup:
	@scripts/install.sh $(VENV)

## run: the main job -- the whole pipeline on the embedded synthetic dataset, through `dvc repro`
run: setup
	dvc repro
	@jointdistill summary --params $(PARAMS)

# pytest-xdist workers: one per CPU (at least 2; TEST_JOBS=0 runs in this process). Each worker takes whole files
# (--dist loadfile), so a file's module fixtures are built once; the session fixtures are built once per worker.
TEST_JOBS ?= $(shell n=$$(nproc); [ $$n -lt 2 ] && n=2; echo $$n)
XDIST := $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile)

## test: the tests in two lanes, fast then slow (within each file, the slow lane runs only when the fast one
## passed), on TEST_JOBS workers. Benchmarks are not tests: `make bench` measures, `make test-bench` checks the
## benchmark code at toy sizes.
test: setup
	$(BIN)/python -m pytest $(XDIST) -m "not bench"

## test-fast: unit tests plus one end-to-end run each of dvc repro, kfp.local and the model server
test-fast: setup
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not bench"

## test-slow: kills and resumes, DDP, pinned source steps, DVC remotes, a forced re-run's byte identity
test-slow: setup
	$(BIN)/python -m pytest $(XDIST) -m "slow and not bench"

## test-bench: every benchmark suite at toy sizes (writes nothing under bench/results)
test-bench: setup
	$(BIN)/python -m pytest -m bench

# publish FROM,TO: an `ablate` run's tables and plots (paired.png and a sweep's paired-KEY.png) into bench/results,
# then docs/benchmarks.md made again from them
define publish
	mkdir -p $(2)
	cp $(1)/ablation.md $(1)/ablation.csv $(1)/ablation.json $(1)/runs.csv $(1)/ablation.png $(1)/paired*.png $(2)/
	$(BIN)/python -m bench.docs
endef

## open-questions: the questions the paper leaves open (validation size, top_k, trajectory length, alpha, feedback
## direction) as one sensitivity sweep of JointDistill (`full`): each key varied alone, paired by seed against
## params' values (one shared reference row). OPEN_SET: the size, by default the 64x128 screen (hours on a
## 2-core CPU at the default size). Resumable like `make ablation`; tables copied to $(OPEN_RESULTS).
OPEN_SEEDS ?= 0,1,2
OPEN_SET ?= prepare.height=64 prepare.width=128
OPEN_JOBS ?= 3
OPEN_DIR ?= data/open-questions
OPEN_RESULTS ?= bench/results/ablation/open-questions
# Cheapest first, so that an interrupted sweep has whole questions: val size needs its own data and teachers.
OPEN_GRID := --vary distill.alpha=0,1,1.5,2 --vary distill.feedback=progress,deficit --vary distill.top_k=5,10,20 \
	--vary distill.trajectory_length=3,5,10,20 --vary prepare.val_fraction=0.05,0.1,0.15,0.25
open-questions: setup
	$(BIN)/jointdistill ablate --params $(PARAMS) --set distill.mode=full $(foreach s,$(OPEN_SET),--set $(s)) \
		$(OPEN_GRID) --one-at-a-time --seeds $(OPEN_SEEDS) --jobs $(OPEN_JOBS) --out $(OPEN_DIR)
	$(call publish,$(OPEN_DIR),$(OPEN_RESULTS))

## lint: formatting, lint (with complexity limits), types (mypy), dvc.yaml code deps and the generated benchmarks page;
## CI runs it before the tests
lint: setup
	$(BIN)/ruff format --check src tests components pipelines bench
	$(BIN)/ruff check src tests components pipelines bench
	$(BIN)/mypy
	$(BIN)/python scripts/dvc_deps.py --check
	$(BIN)/python -m bench.docs --check

## lock: re-resolve requirements.lock from pyproject.toml (needs the network)
lock: setup
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra gcs --extra trainer --extra serve --universal --python-version 3.11 \
		-c requirements/constraints.txt --no-header -o requirements.lock

## bench: benchmarks (never part of `make test`); results in bench/results/
bench: setup
	$(BIN)/python -m bench

## ablation: the modes over 5 seeds on the default benchmark, each seed with its own labelled frames (hours on a
## 2-core CPU: docs/method.md, Evidence; two seeds run side by side (ABLATION_JOBS); never part of `make test`).
## Runs land in $(ABLATION_DIR) (a killed run resumes); the tables are copied to $(ABLATION_RESULTS).
## ABLATION_SET: params changes, e.g. ABLATION_SET="prepare.budget.seg=1.0" (every frame labelled).
ABLATION_MODES ?= single,mtl,self_train,static_kd,adaptive,adaptive+deficit,full,mtl+noval
ABLATION_SEEDS ?= 0,1,2,3,4
ABLATION_SET ?=
ABLATION_JOBS ?= 2
ABLATION_DIR ?= data/ablation
ABLATION_RESULTS ?= bench/results/ablation
ABLATION_SETS := $(foreach s,$(ABLATION_SET),--set $(s))
ablation: setup
	$(BIN)/jointdistill ablate --params $(PARAMS) $(ABLATION_SETS) --out $(ABLATION_DIR) \
		--modes $(ABLATION_MODES) --seeds $(ABLATION_SEEDS) --jobs $(ABLATION_JOBS)
	$(call publish,$(ABLATION_DIR),$(ABLATION_RESULTS))

## pipeline: compile the Kubeflow pipeline to jointdistill.yaml, and the ablation pipeline (ABLATION_MODES over
## ABLATION_SEEDS) to jointdistill-ablation.yaml
pipeline: setup
	$(BIN)/jointdistill pipeline compile -o jointdistill.yaml
	$(BIN)/jointdistill pipeline compile --ablation --modes $(ABLATION_MODES) --seeds $(ABLATION_SEEDS) \
		-o jointdistill-ablation.yaml

## image: build the container image where a Docker engine exists: make image [VARIANT=cuda] [IMAGE=name:tag]
VARIANT ?= cpu
IMAGE ?= jointdistill:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)$(if $(filter cuda,$(VARIANT)),-cuda,)
image:
	docker build --build-arg VARIANT=$(VARIANT) --build-arg SOURCE_COMMIT=$$(git rev-parse HEAD) -t $(IMAGE) .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
