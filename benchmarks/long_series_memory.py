"""Peak host memory of ``medsr enhance`` on long DICOM series: it should follow the batch, not
the series.

Builds series of N slices from the real 512x512 chest CT in ``sample_scans/`` (its 3 slices
repeated along the normal, 1 mm apart, new UIDs), then runs ``medsr enhance`` in a fresh
process per series and output format and prints its peak resident memory next to the size
the input and the enhanced volume would take as float32 arrays. A small random model (8
features, 2 blocks) keeps the run short: the memory of the pipeline, not the model's
arithmetic, is measured here.

    python benchmarks/long_series_memory.py [--slices 100 1000] [--batch-size 4] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from medsr.checkpoint import build_model, save_checkpoint
from medsr.config import load_config

from long_series import repeat_series

ROOT = Path(__file__).resolve().parent.parent
CT = ROOT / "sample_scans" / "ct_chest_3slice_dicom"

MEASURE = """
import resource, sys, time
from medsr.cli import app
start = time.perf_counter()
try:
    app(sys.argv[1:])
except SystemExit as exit:
    assert not exit.code, exit.code
print(f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} {time.perf_counter() - start}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        torch.manual_seed(0)
        config = load_config(None, ["model.features=8", "model.num_res_blocks=2"])
        weights = scratch / "small.pt"
        save_checkpoint(weights, build_model(config), config, epoch=1, iteration=1)
        print(f"{'slices':>6s} {'output':>8s} {'input MB':>9s} {'output MB':>10s} "
              f"{'peak RSS MB':>12s} {'seconds':>8s}")
        for n in arguments.slices:
            series = repeat_series(CT, n, scratch / f"ct{n}")
            for output in (f"ct{n}_x2.nii.gz", f"ct{n}_x2"):
                command = [sys.executable, "-c", MEASURE, "enhance", str(series), "-o",
                           str(scratch / output), "--weights", str(weights), "--device", arguments.device,
                           "--batch-size", str(arguments.batch_size), "--compile", "off"]
                result = subprocess.run(command, capture_output=True, text=True, check=True)
                peak_kb, seconds = result.stdout.split()[-2:]
                kind = "NIfTI" if output.endswith(".nii.gz") else "DICOM"
                print(f"{n:6d} {kind:>8s} {n * 512 * 512 * 4 / 2**20:9.0f} "
                      f"{n * 1024 * 1024 * 4 / 2**20:10.0f} {int(peak_kb) / 1024:12.0f} {float(seconds):8.1f}")
                time.sleep(0.1)


if __name__ == "__main__":
    main()
