#!/usr/bin/env bash
# The GPU check, as it is, on a machine with one CUDA GPU, Python 3.12, a CUDA torch and
# transformers and nothing else, without network:
#
#   bench/gpu_check.sh [WHEELS_DIR [--cpu]]   # figures: $OUT/gpu_check.json (runs/gpu_check/)
#
# Installs (--no-index, --no-deps) the wheel folder that `make gpu-wheels` builds beforehand on
# a CPU machine (default .whl/: tapo's dependencies, DeepSpeed, OpenRLHF; no vLLM, no Ray), then
# runs bench/gpu_check.py: a ZeRO-2 bf16 round against the CPU fp32 run, two ZeRO-3 rounds with a
# KL reference, the memory probe on a Qwen3-shaped 1.7B model at 16k tokens, a kill-and-resume.
# About 5-10 minutes. `--cpu` runs the same parts without a GPU (the check of the check).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
PY=${PYTHON:-python3}
if ! $PY -c "import deepspeed, openrlhf, pandas, pyarrow, math_verify" 2>/dev/null; then
    $PY -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -m bench.gpu_check --out "${OUT:-runs/gpu_check}" "${@:2}"
