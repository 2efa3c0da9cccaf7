#!/usr/bin/env bash
# The GPU checks of issues #5, #12 and #21 (the second look on CUDA) as one run of at most 8
# minutes (each step has its own time limit; a step that fails or runs out is reported and the
# others still run), for a fresh CUDA machine with Python 3.12 and a CUDA build of PyTorch (plus numpy, scipy, scikit-image,
# typer, rich, pyyaml, matplotlib, tensorboard, hypothesis, pytest). The rest of medsr's
# dependencies come from the wheels benchmarks/fetch_gpu_wheels.sh put in .whl/ (copy that
# folder to the machine), installed into /tmp/site; medsr itself runs from this checkout.
#   1. the GPU tests: bf16 autocast against fp32 (protocol PSNR within 0.05 dB on the samples);
#      every batch degradation on CUDA against its NumPy counterpart, and the device route of
#      training against the CPU route, item for item;
#   2. training samples/s and time waiting for data, both routes in one run (batch 16 and 64);
#   3. enhance throughput on a 1,000-slice series built from the real MR sample (256 -> 512),
#      plain and torch.compile'd, end to end against forward only;
#   4. the same series written as DICOM, 500 slices;
#   5. peak host memory against series length.
# Paste the tables into benchmarks/README.md with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, note a failure, go on
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s)"
    if ! timeout --kill-after=5 "$limit" "$@" < /dev/null; then
        failed+=("$name")
        echo "=== $name FAILED or ran out of time"
    fi
    echo "=== $name: $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if ! "$PYTHON" -c "import monai, ignite, nibabel, pydicom, isal" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "monai & co. are missing and .whl/ holds no wheels: run benchmarks/fetch_gpu_wheels.sh first" >&2
        exit 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PYTHON" -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'monai', monai.__version__)" || exit 1

step "GPU tests" 120 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/
step "training throughput, batch 16" 60 "$PYTHON" benchmarks/train_throughput.py --iterations 100
step "training throughput, batch 64" 45 "$PYTHON" benchmarks/train_throughput.py --iterations 50 --batch-size 64
step "enhance throughput" 120 "$PYTHON" benchmarks/enhance_throughput.py --devices cuda --slices 1000 --repeats 2 --no-seed --compile both
step "enhance to DICOM" 50 "$PYTHON" benchmarks/enhance_throughput.py --devices cuda --slices 500 --repeats 1 --no-seed --to dicom
step "host memory" 50 "$PYTHON" benchmarks/long_series_memory.py --slices 100 1000 --device cuda --batch-size 64

if ((${#failed[@]})); then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed in $SECONDS s"
