#!/usr/bin/env bash
# Loss, metrics and training-step benchmarks in one go, one JSON line per case on stdout (progress on stderr).
#
#   benchmarks/run_gpu.sh [WHEEL_DIR]
#
# WHEEL_DIR (or $MEDJDT_WHEELS): a folder of wheels carried to a machine without network access; they are
# installed first (pip --no-index). The package itself is imported from this checkout. On a GPU the cases use
# the issue's shape (2, 3, 128, 128, 128) and finish well within 5 minutes on an H200; without a GPU the same
# script is a short dry run on small CPU shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

wheels="${1:-${MEDJDT_WHEELS:-}}"
if [[ -n "$wheels" ]]; then
    echo "installing wheels from $wheels" >&2
    python -m pip install --quiet --no-index --find-links "$wheels" "$wheels"/*.whl >&2
fi

device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [[ "$device" == cuda ]]; then
    python -c "import torch; print('device:', torch.cuda.get_device_name())" >&2
    loss_args=(--shape 2 3 128 128 128 --repeats 50)
    metric_args=(--shape 2 3 128 128 128 --repeats 20)
    train_args=(--size 128 --steps 10 --warmup 3)
else
    echo "no GPU: dry run on CPU shapes" >&2
    loss_args=(--shape 2 3 32 32 32 --repeats 5 --threads 1)
    metric_args=(--shape 2 3 32 32 32 --repeats 3 --threads 1)
    train_args=(--size 32 --steps 2 --warmup 1 --channels 8 16)
fi

run() {  # a benchmark that hangs or fails must not keep the others from running
    local limit=$1
    shift
    echo "running: $*" >&2
    # stdout carries only the JSON lines; anything else a library prints goes to stderr
    { timeout "$limit" python "$@" || echo "{\"bench\": \"$(basename "$1" .py)\", \"error\": \"exit $?\"}"; } |
        while IFS= read -r line; do
            if [[ "$line" == "{"* ]]; then echo "$line"; else echo "$line" >&2; fi
        done
}

run 90 benchmarks/bench_loss.py --device "$device" --json "${loss_args[@]}"
run 90 benchmarks/bench_metrics.py --device "$device" --json "${metric_args[@]}"
run 90 benchmarks/bench_train.py "${train_args[@]}"
