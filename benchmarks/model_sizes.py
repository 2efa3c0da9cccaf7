"""What width and depth cost: multiply-adds and CPU forward rate of x2 SRResNets of several
sizes, in one run (random weights: speed does not depend on them).

The cost side of issue #14's features x blocks table; the quality side needs a training run per
size (the model card lists the sizes trained so far). The bound the issue sets for the shipped
x2 model without a GPU to measure: at most 2.5x the multiply-adds of the 32-feature model.

    python benchmarks/model_sizes.py [--threads 2] [--batches 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from medsr.engine import native_bf16
from medsr.model import SRResNet

SIZES = [(32, 8), (48, 8), (64, 8), (32, 16), (48, 12), (48, 16)]
REFERENCE = (32, 8)  # the model shipped before issue #14


def gmac_per_slice(model: torch.nn.Module) -> float:
    """Multiply-adds (10^9) of one 256x256 low-res slice on the bicubic grid."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, 1, 256, 256), torch.zeros(1, dtype=torch.long), grid="bicubic")
    return counter.get_total_flops() / 2e9


def forward_rate(model, bf16: bool, batches: int) -> tuple[float, float]:
    """``(seconds of the first call, slices/s after it)`` of ``model`` (a module or a compiled
    one) on batches of 4 random low-res 256x256 slices, the bicubic grid, on the CPU, in bf16
    autocast or float32. The first call warms up (and compiles)."""
    low_res, codes = torch.rand(4, 1, 256, 256), torch.zeros(4, dtype=torch.long)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        start = time.perf_counter()
        model(low_res, codes, grid="bicubic")
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(batches):
            model(low_res, codes, grid="bicubic")
    return first, 4 * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batches", type=int, default=3)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    bf16 = native_bf16(torch.device("cpu"))
    print(f"x2 SRResNet, batch 4 x 256x256, {arguments.threads} threads, eager; "
          f"bf16 column {'native' if bf16 else 'emulated (no native bf16 here)'}")
    print(f"{'features x blocks':>18s} {'params':>9s} {'GMAC/slice':>10s} {'x 32x8':>7s} "
          f"{'fp32 sl/s':>9s} {'bf16 sl/s':>9s}")
    reference = None
    for features, blocks in SIZES:
        torch.manual_seed(0)
        model = SRResNet(scale=2, features=features, num_res_blocks=blocks).eval()
        gmac = gmac_per_slice(model)
        reference = gmac if (features, blocks) == REFERENCE else reference
        parameters = sum(p.numel() for p in model.parameters())
        _, fp32 = forward_rate(model, False, arguments.batches)
        _, low = forward_rate(model, True, arguments.batches)
        print(f"{features:>10d} x {blocks:<5d} {parameters:9,d} {gmac:10.1f} {gmac / reference:7.2f} "
              f"{fp32:9.2f} {low:9.2f}")


if __name__ == "__main__":
    main()
