#!/usr/bin/env bash
# Loss, metrics and training-step benchmarks in one go, one JSON line per case on stdout (progress on stderr).
#
#   benchmarks/run_gpu.sh [WHEEL_DIR]
#
# WHEEL_DIR (or $MEDJDT_WHEELS): a folder of wheels carried to a machine without network access; they are
# installed first (pip --no-index). The package itself is imported from this checkout. A CUDA machine with
# torch, triton, pytorch-lightning, torchmetrics, pandas, matplotlib and pytest needs the wheels of monai,
# nibabel, SimpleITK and jsonargparse (with docstring-parser and typeshed-client), e.g. for Python 3.12:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       monai nibabel SimpleITK jsonargparse docstring-parser typeshed-client
# (about 58 MB, SimpleITK 53 MB of it).
#
# Steps: loss, metric and training-step benchmarks, the GPU tests (Triton kernels against the torch path, no
# host synchronisation in a loss step), and a short real training run of the demo config (bench_fit.py). On a
# GPU the benchmarks use the issue's shape (2, 3, 128, 128, 128); the whole script is meant to finish within 5
# minutes on an H200 (not measured yet; each step has a time limit, 7 minutes in all). Without a GPU the same
# script is a short dry run on small CPU shapes (about 70 s on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

wheels="${1:-${MEDJDT_WHEELS:-}}"
if [[ -n "$wheels" ]]; then
    echo "installing wheels from $wheels" >&2
    # into a folder of their own: the machine's environment stays as it is
    python -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/medjdt-site "$wheels"/*.whl >&2
    export PYTHONPATH="$PYTHONPATH:/tmp/medjdt-site"
fi

device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [[ "$device" == cuda ]]; then
    python -c "import torch; print('device:', torch.cuda.get_device_name())" >&2
    loss_args=(--shape 2 3 128 128 128 --repeats 50)
    metric_args=(--shape 2 3 128 128 128 --repeats 20)
    train_args=(--size 128 --steps 10 --warmup 3)
    fit_args=(--epochs 5 --workers 8)
else
    echo "no GPU: dry run on CPU shapes" >&2
    loss_args=(--shape 2 3 32 32 32 --repeats 5 --threads 1)
    metric_args=(--shape 2 3 32 32 32 --repeats 3 --threads 1)
    train_args=(--size 32 --steps 2 --warmup 1 --channels 8 16)
    fit_args=(--epochs 2 --tiny --workers 0)
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

run 60 benchmarks/bench_loss.py --device "$device" --json "${loss_args[@]}"
run 60 benchmarks/bench_metrics.py --device "$device" --json "${metric_args[@]}"
run 60 benchmarks/bench_train.py "${train_args[@]}"

echo "running: GPU tests" >&2
tests=(tests/test_fused_triton.py tests/test_fused_metrics_triton.py tests/test_losses_validation.py)
status=0
timeout 120 python -m pytest -q -p no:cacheprovider "${tests[@]}" >&2 || status=$?
echo "{\"bench\": \"gpu_tests\", \"device\": \"$device\", \"exit\": $status}"

run 120 benchmarks/bench_fit.py "${fit_args[@]}"
