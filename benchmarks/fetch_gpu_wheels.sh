#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels benchmarks/gpu_check.sh installs on a GPU
# machine that has Python 3.12, a CUDA build of PyTorch and numpy, scipy, scikit-image, typer,
# rich, pyyaml, matplotlib, tensorboard, hypothesis and pytest, but not the rest of medsr's
# dependencies (pyproject.toml): monai, pytorch-ignite, nibabel, pydicom, isal. What those
# require for Python 3.12 (printed below, from each wheel's METADATA) is already there:
# monai numpy and torch, pytorch-ignite torch and packaging (scikit-image's), nibabel numpy,
# packaging and typing-extensions (torch's), pydicom and isal nothing.
# The versions are those the CPU tests pass with. Run from anywhere:
#   benchmarks/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 pydicom==3.0.2 isal==1.9.1)
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
for wheel in .whl/*.whl; do
    echo "$wheel: $(unzip -p "$wheel" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
        | sed 's/Requires-Dist: //' | paste -sd ',' - || true)"
done
du -sh .whl
