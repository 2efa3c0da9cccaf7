"""The shipped x2 model's forward pass on the CPU: float32 or bf16 autocast, eager or
``torch.compile``d, in one run (so the ratios hold on a noisy machine).

``--precision auto`` picks bf16 on CPUs with native bf16 (AVX-512 BF16 or AMX:
``medsr.engine.native_bf16``), and ``--compile auto`` compiles from 256 slices; this prints what
each of the four combinations costs here. Batches of 4 low-res 256x256 slices (what
``medsr enhance`` uses on the CPU), the bicubic grid; the first call (compilation included) is
timed apart from the steady rate.

    python benchmarks/cpu_precision.py [--threads 2] [--batches 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from model_sizes import forward_rate

from medsr.checkpoint import default_weights, load_model
from medsr.engine import native_bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    warnings.simplefilter("ignore", UserWarning)  # inductor's notes on the FFT it leaves eager
    model, _ = load_model(default_weights(2))
    model.eval()
    runs = {"fp32 eager": (model, False), "bf16 eager": (model, True),
            "fp32 compiled": (torch.compile(model, dynamic=False), False),
            "bf16 compiled": (torch.compile(model, dynamic=False), True)}
    print(f"shipped x2 model, batch 4 x 256x256 -> 512x512, {arguments.threads} threads, "
          f"native bf16: {native_bf16(torch.device('cpu'))}")
    best = {}
    for repeat in range(arguments.repeats):
        for name, (forward, bf16) in runs.items():
            first, rate = forward_rate(forward, bf16, arguments.batches)
            best[name] = max(best.get(name, 0.0), rate)
            if repeat == 0:
                print(f"{name:>14s}: first call {first:5.1f} s")
    reference = best["fp32 eager"]
    print(f"{'':>14s}  {'slices/s':>8s}  {'x fp32 eager':>12s}")
    for name, rate in best.items():
        print(f"{name:>14s}  {rate:8.2f}  {rate / reference:12.2f}")


if __name__ == "__main__":
    main()
