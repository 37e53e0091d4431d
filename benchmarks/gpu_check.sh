#!/usr/bin/env bash
# The GPU check on a bare GPU machine without network (one H200: torch 2.11, transformers 5.17, peft, Triton).
#
#   bash benchmarks/gpu_check.sh fetch            # here, with PyPI: the wheels the GPU machine lacks -> .whl/
#   bash benchmarks/gpu_check.sh run [OUT] [ARGS] # there: install .whl/ into /tmp/site, run the check into OUT
#
# Why a wheel: lt_train needs transformers >= 5.24 (earlier versions do not hand the attention kwargs to
# Cache.update, which the hybrid cache needs); the GPU image has 5.17. .whl/ is git-ignored: carry it
# (device tool: carry=[".whl"]). ARGS go to gpu_check.py, e.g. --quick or --only decode,train.
set -euo pipefail
cd "$(dirname "$0")/.."
TRANSFORMERS=transformers==5.24.0

case "${1:-run}" in
fetch)
    rm -rf .whl && mkdir -p .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$TRANSFORMERS"
    ls -la .whl
    ;;
run)
    OUT_DIR="${2:-${OUT:-outputs/gpu_check}}"
    shift $(( $# >= 2 ? 2 : $# ))
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    mkdir -p "$OUT_DIR"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    set -o pipefail
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/log.txt"
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh fetch | run [OUT] [gpu_check.py args]" >&2
    exit 2
    ;;
esac
