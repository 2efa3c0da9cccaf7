"""Throughput of ``medsr enhance`` against the bare forward pass of the same model, in one run.

Prints, for the CPU and for CUDA when present: end-to-end slices/s of enhancing a real DICOM
series to NIfTI (read, normalise, model, write), forward-only slices/s on the same slices, their
ratio, the model's GFLOP per slice, the achieved GFLOP/s, and peak host (and GPU) memory; and
the forward-only rate of the seed study's model (64 features, 8 blocks, random weights) on the
same slices, with the end-to-end command's cost relative to it. ``--slices N`` repeats the
series' real files along the normal to N slices (a GPU needs hundreds to be timed). Batches:
``--batch-size``, else what ``medsr enhance`` picks (4 on the CPU, sized from free memory on
CUDA); forward-only uses the same batch, layout (channels-last on CUDA) and bf16 autocast.

    python benchmarks/enhance_throughput.py [--series sample_scans/mr_pd_oblique_dicom] [--repeats 3]
                                            [--to nifti|dicom] [--slices N] [--devices cpu cuda]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from medsr.checkpoint import default_weights, load_model
from medsr.engine import autocast_for, default_batch_size
from medsr.enhance import enhance_file
from medsr.model import DEGRADATION_CODES, SRResNet
from medsr.reading import read_scan

from long_series import repeat_series

ROOT = Path(__file__).resolve().parent.parent


# dense bf16 tensor-core peak (TFLOP/s) by card, for the achieved fraction
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def forward_only(model, slices: np.ndarray, device: torch.device, batch_size: int,
                 compiled: bool = False) -> float:
    """Seconds for the model alone over ``slices`` (already normalised, already on the host),
    as ``medsr enhance`` runs it: bf16 autocast where ``--precision auto`` takes it (CUDA, CPUs
    with native bf16), channels-last on CUDA; compiled, with the last batch padded, when
    ``compiled`` (compiling happens in the untimed warm-up)."""
    cuda = device.type == "cuda"
    layout = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(device, memory_format=layout)
    run = torch.compile(model, dynamic=False) if compiled else model
    autocast = autocast_for(device, "auto")
    tensors = torch.from_numpy(slices)[:, None]
    codes = torch.full((batch_size,), DEGRADATION_CODES["kspace"], device=device)
    with torch.inference_mode(), autocast:
        warm = tensors[:batch_size].to(device).contiguous(memory_format=layout)
        run(warm, codes[: len(warm)])
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for first in range(0, len(tensors), batch_size):
            batch = tensors[first:first + batch_size]
            if compiled and len(batch) < batch_size:
                batch = torch.cat([batch, batch[-1:].expand(batch_size - len(batch), -1, -1, -1)])
            run(batch.to(device).contiguous(memory_format=layout), codes[: len(batch)])
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def gflop_per_slice(model, shape: tuple[int, int]) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, 1, *shape), torch.ones(1, dtype=torch.long))
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=Path, default=ROOT / "sample_scans" / "mr_pd_oblique_dicom")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--to", choices=["nifti", "dicom"], default="nifti", help="output written")
    parser.add_argument("--slices", type=int, default=None, help="repeat the series to this many slices")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off",
                        help="torch.compile the model (both: one row each, in one run)")
    parser.add_argument("--no-seed", action="store_true", help="skip the seed model's forward pass")
    arguments = parser.parse_args()
    arguments.name = arguments.series.name
    with tempfile.TemporaryDirectory() as scratch:
        if arguments.slices:
            arguments.series = repeat_series(arguments.series, arguments.slices, Path(scratch) / "series")
        run(arguments)


def run(arguments) -> None:
    model, config = load_model(default_weights(2))
    scan = read_scan(arguments.series)
    slices = np.moveaxis(scan.array, 2, 0)
    low, high = np.percentile(scan.array, [config.lower_percentile, config.upper_percentile])
    normalised = ((slices - low) / (high - low)).astype(np.float32)
    flops = gflop_per_slice(model, slices.shape[1:])
    devices = [torch.device(d) for d in arguments.devices if d == "cpu" or torch.cuda.is_available()]
    print(f"series: {arguments.name} -> {arguments.to}, {len(slices)} slices of {slices.shape[1]}x{slices.shape[2]} "
          f"-> x2; model: {config.model.features} features, {config.model.num_res_blocks} blocks; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    seed_model = SRResNet(scale=2, features=64, num_res_blocks=8).eval()
    print(f"{'device':15s} {'end-to-end sl/s':>16s} {'forward sl/s':>13s} {'ratio':>6s} "
          f"{'seed fwd sl/s':>14s} {'e2e cost/seed fwd':>18s} "
          f"{'GFLOP/slice':>12s} {'GFLOP/s':>9s} {'of peak':>8s} {'batch':>6s} {'peak host MB':>13s} "
          f"{'peak GPU MB':>12s}")
    modes = ["off", "on"] if arguments.compile == "both" else [arguments.compile]
    for device in devices:
        layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        batch = arguments.batch_size or default_batch_size(
            model.to(device, memory_format=layout), device, slices.shape[1:], DEGRADATION_CODES["kspace"])
        peak = next((t for name, t in PEAK_TFLOPS.items() if device.type == "cuda"
                     and name in torch.cuda.get_device_name(device)), float("nan"))
        seed_model = seed_model.to(device)
        end_to_end = {mode: [] for mode in modes}
        forward = {mode: [] for mode in modes}
        seed_forward = []
        for _ in range(arguments.repeats):  # interleaved, so drift hits all alike
            for mode in modes:
                with tempfile.TemporaryDirectory() as folder:
                    start = time.perf_counter()
                    output = Path(folder) / ("e.nii.gz" if arguments.to == "nifti" else "e")
                    enhance_file(arguments.series, output, device=device.type, batch_size=batch,
                                 loaded=(model, config), compile_model=mode)
                    end_to_end[mode].append(time.perf_counter() - start)
                forward[mode].append(forward_only(model, normalised, device, batch, mode == "on"))
            if not arguments.no_seed:
                seed_forward.append(forward_only(seed_model, normalised, device, batch))
        seed_rate = len(slices) / min(seed_forward) if seed_forward else float("nan")
        peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for mode in modes:
            e2e_rate, forward_rate = len(slices) / min(end_to_end[mode]), len(slices) / min(forward[mode])
            achieved = flops * forward_rate
            print(f"{device.type + (' compiled' if mode == 'on' else ''):15s} {e2e_rate:16.2f} {forward_rate:13.2f} "
                  f"{e2e_rate / forward_rate:6.2f} {seed_rate:14.2f} {seed_rate / e2e_rate:18.2f} "
                  f"{flops:12.2f} {achieved:9.1f} {achieved / (peak * 1e3):8.1%} {batch:6d} "
                  f"{peak_host:13.0f} {peak_gpu:12.0f}")
        if device.type == "cuda":
            print(f"       card: {torch.cuda.get_device_name(device)}")


if __name__ == "__main__":
    main()
