"""What the pipeline around the model costs: ``medsr.enhance_file`` with a model that does
nothing (nearest x2) against the floor of the same I/O, measured in one run.

A 384-slice series is built from the real 256x256 MR sample (``long_series.py``). Floors,
measured in this process right before each run:

- reading: every file's pixels decoded once with pydicom (``pydicom.pixels.pixel_array``);
- ``.nii``: reading + the output's float32 bytes written raw to one file;
- DICOM series: reading + the output's 16-bit pixels written raw, one file per slice;
- ``.nii.gz``: reading + the output's float32 bytes compressed by zlib level 1 on one thread.

These are the floors the issue's targets were set against. Each copies the output into a
``bytes`` object before writing it, which is part of no real writer's cost: for the 400 MB of
``.nii`` that copy takes about 0.3 s and the write itself about 0.1 s (benchmarks/README.md).
The model's own time (its forward passes over the same batches, in this process) is printed
too: with two PyTorch threads on a CPU that other jobs share, even nearest x2 is not free.

Targets (issue #12, 2-core CPU): time / floor <= 1.0 (``.nii``), <= 2.0 (DICOM series), and for
``.nii.gz`` at most 0.6 of the single-thread zlib floor.

    python benchmarks/pipeline_overhead.py [--slices 384] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.pixels import pixel_array

from medsr import enhance_file

from long_series import repeat_series

ROOT = Path(__file__).resolve().parent.parent
MR = ROOT / "sample_scans" / "mr_pd_oblique_dicom"


class NearestX2(torch.nn.Module):
    """Upscales by repeating pixels: no arithmetic worth the name, so what is timed is the
    pipeline (read, survey, normalise, copy, un-normalise, encode, write)."""

    scale = 2

    def forward(self, low_res: torch.Tensor, degradation: torch.Tensor) -> torch.Tensor:
        return F.interpolate(low_res, scale_factor=2, mode="nearest")


def floors(series: Path, scratch: Path) -> dict[str, float]:
    files = sorted(series.glob("*.dcm"))
    start = time.perf_counter()
    planes = [pixel_array(path) for path in files]
    reading = time.perf_counter() - start
    output = np.repeat(np.repeat(np.stack(planes), 2, axis=1), 2, axis=2)
    as_float = output.astype(np.float32)
    start = time.perf_counter()
    with open(scratch / "floor.nii", "wb") as handle:
        handle.write(as_float.tobytes())
    nii = time.perf_counter() - start
    start = time.perf_counter()
    for k, plane in enumerate(output.astype(np.int16)):
        (scratch / f"floor{k:05d}.raw").write_bytes(plane.tobytes())
    dicom = time.perf_counter() - start
    start = time.perf_counter()
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip container, level 1, one thread
    for plane in as_float:
        compressor.compress(plane.tobytes())
    compressor.flush()
    gzip = time.perf_counter() - start
    for path in scratch.glob("floor*"):
        path.unlink()
    return {"nii": reading + nii, "dicom": reading + dicom, "nii.gz": reading + gzip, "reading": reading}


def model_alone(model: torch.nn.Module, n_slices: int, batch: int = 4) -> float:
    """Seconds the model's forward passes take over ``n_slices`` 256x256 slices, in the
    engine's batches, without any pipeline around them."""
    low_res = torch.rand(batch, 1, 256, 256)
    codes = torch.zeros(batch, dtype=torch.long)
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(0, n_slices, batch):
            model(low_res, codes)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    model = NearestX2()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        series = repeat_series(MR, arguments.slices, scratch / "series")
        print(f"{arguments.slices} slices 256x256 -> 512x512, nearest x2, {arguments.threads} threads, "
              f"best of {arguments.repeats}")
        print(f"{'output':>14s} {'seconds':>8s} {'floor s':>8s} {'time/floor':>10s} {'slices/s':>9s}")
        for name, target in (("nii", "out.nii"), ("dicom", "out"), ("nii.gz", "out.nii.gz")):
            best, floor = np.inf, np.inf
            for _ in range(arguments.repeats):
                floor = min(floor, floors(series, scratch)[name])
                start = time.perf_counter()
                enhance_file(series, scratch / target, model=model, degradation="bicubic",
                             compile_model="off", overwrite=True)
                best = min(best, time.perf_counter() - start)
                output = scratch / target
                shutil.rmtree(output) if output.is_dir() else output.unlink()
            print(f"{name:>14s} {best:8.2f} {floor:8.2f} {best / floor:10.2f} {arguments.slices / best:9.1f}")
        alone = min(model_alone(model, arguments.slices) for _ in range(arguments.repeats))
        print(f"the model alone (its forward passes, included above): {alone:.2f} s")


if __name__ == "__main__":
    main()
