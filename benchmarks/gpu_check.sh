#!/usr/bin/env bash
# The GPU half of issue #5 as one run (about 8 minutes on an H100/H200), for a machine with a
# CUDA GPU and medsr installed with a CUDA build of PyTorch (README, "Development"):
#   1. the GPU tests: bf16 autocast against fp32 (protocol PSNR within 0.05 dB on the samples);
#   2. enhance throughput on a 2,000-slice series built from the real MR sample (256 -> 512),
#      plain and torch.compile'd, end to end against forward only;
#   3. the same series written as DICOM, 500 slices;
#   4. peak host memory against series length;
#   5. training samples/s and time waiting for data.
# Paste the tables into benchmarks/README.md with the card's name.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
python -m pytest -q -m gpu tests/
python benchmarks/enhance_throughput.py --devices cuda --slices 2000 --repeats 3 --no-seed --compile both
python benchmarks/enhance_throughput.py --devices cuda --slices 500 --repeats 1 --no-seed --to dicom
python benchmarks/long_series_memory.py --slices 100 1000 --device cuda --batch-size 64
python benchmarks/train_throughput.py --iterations 50
