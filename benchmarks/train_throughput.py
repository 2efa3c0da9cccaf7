"""Training throughput: samples/s and the fraction of time the model waits for data.

Builds the patch pipelines ``medsr train`` uses on the shipped sample scans: degraded per patch
on the CPU in the loader (route ``cpu``), or cropped on the CPU and degraded as a batch on the
training device (route ``device``, ``degrade_on: device``), with the loader ``medsr train``
builds for each. The training step is ``medsr train``'s (channels-last, bf16 autocast where
``precision: auto`` picks it). Data time is the wait for the next batch plus preparing it on
the device, synchronised, so the device route's degradation counts as data; step time is
forward, backward and optimiser step. With both routes, their iterations alternate, so the
ratios hold on a noisy machine.

    python benchmarks/train_throughput.py [--route both|cpu|device] [--iterations 30] [--batch-size 16]
                                          [--features 32] [--workers N] [--precision auto|fp32|bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from medsr.config import load_config
from medsr.data import discover_scans, load_cached_scan
from medsr.model import SRResNet
from medsr.training import (
    AutocastInferer,
    BorderCroppedLoss,
    DeviceDegradation,
    Processes,
    prepare_batch,
    training_loader,
    training_patches,
    use_bf16,
)

ROOT = Path(__file__).resolve().parent.parent


class Route:
    """One pipeline, its own model and optimiser, and its timings."""

    def __init__(self, name: str, config, scans, features: int, device: torch.device, workers: int | None) -> None:
        self.name, self.device = name, device
        self.patches = training_patches(config, scans, 1, on_device=name == "device")
        self.patches.set_epoch(1)
        loader = training_loader(self.patches, config.batch_size, Processes(), device,
                                 workers=0 if name == "cpu" else workers)
        self.workers = loader.num_workers
        self.batches = iter(loader)
        self.prepare = DeviceDegradation(self.patches) if name == "device" else prepare_batch
        torch.manual_seed(0)
        self.model = SRResNet(config.scale, features=features, num_res_blocks=config.model.num_res_blocks).to(
            device, memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.loss_function = BorderCroppedLoss(torch.nn.L1Loss(), self.patches.context)
        self.inferer = AutocastInferer(device, use_bf16(config.precision, device))
        self.batch_size = config.batch_size
        self.data_seconds = self.step_seconds = 0.0
        self.samples = 0

    def _synchronise(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def iteration(self, timed: bool) -> None:
        start = time.perf_counter()
        images, labels, _, kwargs = self.prepare(next(self.batches), self.device,
                                                 non_blocking=self.device.type == "cuda")
        self._synchronise()
        loaded = time.perf_counter()
        loss = self.loss_function(self.inferer(images, self.model, **kwargs), labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self._synchronise()
        if timed:  # the first steps pay one-off allocation and worker start-up costs
            self.data_seconds += loaded - start
            self.step_seconds += time.perf_counter() - loaded
            self.samples += self.batch_size

    @property
    def samples_per_second(self) -> float:
        return self.samples / (self.data_seconds + self.step_seconds)

    @property
    def waiting(self) -> float:
        return self.data_seconds / (self.data_seconds + self.step_seconds)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    return platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route", choices=("both", "cpu", "device"), default="both")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers for the device route (default: as medsr train picks)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    arguments = parser.parse_args()
    config = load_config(ROOT / "configs" / "srresnet_l1_x2.yaml",
                         [f"batch_size={arguments.batch_size}", f"precision={arguments.precision}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as cache:
        scans = [load_cached_scan(source, Path(cache), 0.5, 99.5)
                 for root in ("ct_chest_3slice_dicom", "mr_t1_nifti", "mr_pd_oblique_dicom")
                 for source in discover_scans(ROOT / "sample_scans" / root)]
    names = ("cpu", "device") if arguments.route == "both" else (arguments.route,)
    total = arguments.iterations + arguments.warmup
    config = dataclasses.replace(config, iterations_per_epoch=total)  # one epoch of patches
    routes = [Route(name, config, scans, arguments.features, device, arguments.workers) for name in names]
    for iteration in range(total):
        for route in routes:  # alternating, so both see the same machine
            route.iteration(timed=iteration >= arguments.warmup)

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"device {device.type} ({card}), batch {arguments.batch_size}, patch {config.patch_size} (+context), "
          f"{arguments.features} features, bf16 {routes[0].inferer.enabled}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {arguments.iterations} timed iterations per route")
    print("| route | loader workers | samples/s | waiting for data | data ms/batch | step ms/batch |")
    print("|---|---|---|---|---|---|")
    for route in routes:
        batches = route.samples / route.batch_size
        print(f"| {route.name} | {route.workers} | {route.samples_per_second:.1f} | {100 * route.waiting:.1f}% "
              f"| {1e3 * route.data_seconds / batches:.1f} | {1e3 * route.step_seconds / batches:.1f} |")
    if len(routes) == 2:
        cpu, on_device = routes
        print(f"device/cpu: samples/s x{on_device.samples_per_second / cpu.samples_per_second:.2f}, "
              f"data time x{on_device.data_seconds / cpu.data_seconds:.2f}")


if __name__ == "__main__":
    main()
