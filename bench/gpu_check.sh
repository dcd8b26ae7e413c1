#!/usr/bin/env bash
# One testbed round trained by the openrlhf backend on one CUDA GPU, in bf16: prints the
# median step time and the peak GPU memory (each step's line of train_log.jsonl has both).
#
#   bench/gpu_check.sh [WHEELS_DIR]
#
# Needs a machine with one CUDA GPU where torch and transformers are installed; deepspeed,
# openrlhf and what they import (ray, peft, torchdata, ...) are installed --no-deps from
# WHEELS_DIR (default .whl/) when not already importable. No vLLM: the round samples with the
# hf engine. Everything goes under runs/gpu-check/.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
PY=${PYTHON:-python3}
if ! $PY -c "import deepspeed, openrlhf" 2>/dev/null; then
    $PY -m pip install --quiet --no-deps "$WHEELS"/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY - <<'PYEOF'
import json, statistics, sys, time
from pathlib import Path

import torch

assert torch.cuda.is_available(), "bench/gpu_check.sh needs a CUDA GPU"
from pipeline.config import load_config
from pipeline.flows.round import run_round
from trainer.backends import train_round

root = Path("runs/gpu-check")
cfg = load_config("configs/testbed-small.yaml", [
    f"testbed.base_dir={root / 'base'}", "engine.backend=hf", "engine.dtype=bfloat16",
    "rollout.problems_per_round=64", "select.p_high=1", "train.backend=openrlhf"])
summary = run_round(root / "run", 1, cfg, progress=False)
t = time.time()
metrics = train_round(summary["policy"], root / "run" / "iter_0001" / "assemble",
                      root / "run" / "models" / "iter_0001", cfg, progress=False)
log = [json.loads(line) for line in
       (root / "run" / "models" / "iter_0001" / "train_log.jsonl").read_text().splitlines()]
print(json.dumps({
    "gpu": torch.cuda.get_device_name(0), "dtype": "bf16", "rows": summary["training_rows"],
    "steps": metrics["steps"], "loss": metrics["loss"],
    "median_step_s": statistics.median(x["seconds"] for x in log[1:] or log),
    "peak_gpu_gib": max(x.get("peak_gpu_gib", 0.0) for x in log),
    "train_wall_s": round(time.time() - t, 1)}))
PYEOF
