#!/usr/bin/env bash
# The wheel folder bench/gpu_check.sh installs from on a GPU machine that has Python, a CUDA
# torch and transformers and nothing else (no network): tapo's own dependencies and the
# training stack (DeepSpeed, OpenRLHF and what their imported modules need), never vLLM or Ray.
#
#   bench/gpu_wheels.sh [DIR] [PYTHON_VERSION]       # default: .whl/ and 3.12
#
# Built on a CPU machine with network: every wheel for that Python on x86_64 manylinux, DeepSpeed
# (a source distribution, pure Python) built into a wheel here. Prints the folder's size: it must
# travel with the GPU check (64 MiB at most).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYVER=${2:-3.12}
PY=${PY:-.venv/bin/python}
rm -rf "$DIR" && mkdir -p "$DIR"
# tapo's core (less torch, transformers and what they bring) and the training stack's imports
# (datasets: OpenRLHF's SFT dataset);
# pyarrow 18.1 (pyproject's oldest): about 40 MB; 26 is 52 MB, too large to travel
WHEELS=(pandas==3.1.1 pyarrow==18.1.0 python-dateutil==4.0.0 six==1.17.0 tzdata==2026.6
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        math-verify==0.9.0 latex2sympy2-extended==1.11.0 antlr4-python3-runtime==4.13.2
        openrlhf==0.11.2 peft==0.21.2 accelerate==1.16.0 torchdata==0.11.0 hjson==3.1.0
        msgpack==1.2.4 ninja==1.13.2 psutil==7.2.2 py-cpuinfo==9.0.0 einops==0.8.2
        pylatexenc==2.11 jsonlines==4.0.0 attrs==26.1.0 datasets==5.2.0 dill==0.4.1
        multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0)
platforms=(--platform linux_x86_64 --platform manylinux2014_x86_64)
for minor in $(seq 17 35); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
$PY -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
    --python-version "$PYVER" "${platforms[@]}" -d "$DIR" "${WHEELS[@]}"
$PY -m pip wheel --quiet --no-deps --no-build-isolation deepspeed==0.19.6 -w "$DIR"
echo "$DIR: $(ls "$DIR" | wc -l) wheels, $(du -sm "$DIR" | cut -f1) MB"
