"""Training throughput: samples/s and the fraction of time the model waits for data.

Builds the same patch pipeline ``medsr train`` uses (cached slices, random degradation) on the
shipped sample scans, then times data loading and optimisation steps separately.

    python benchmarks/train_throughput.py [--iterations 30] [--batch-size 16] [--features 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from medsr.config import load_config
from medsr.data import PatchPairDataset, discover_scans, load_cached_scan
from medsr.model import SRResNet
from medsr.training import BorderCroppedLoss, prepare_batch
from medsr.transforms import RandomDegradePair

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--features", type=int, default=32)
    arguments = parser.parse_args()
    config = load_config(ROOT / "configs" / "srresnet_l1_x2.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as cache:
        scans = [load_cached_scan(source, Path(cache), 0.5, 99.5)
                 for root in ("ct_chest_3slice_dicom", "mr_t1_nifti", "mr_pd_oblique_dicom")
                 for source in discover_scans(ROOT / "sample_scans" / root)]
    degrade = RandomDegradePair(2, config.degradation.probabilities)
    patches = PatchPairDataset(scans, config.patch_size, 2, arguments.batch_size * arguments.iterations, degrade)
    loader = torch.utils.data.DataLoader(patches, batch_size=arguments.batch_size, num_workers=0)
    model = SRResNet(2, features=arguments.features, num_res_blocks=config.model.num_res_blocks).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_function = BorderCroppedLoss(torch.nn.L1Loss(), patches.context)
    data_seconds = step_seconds = 0.0
    iterator = iter(loader)
    for iteration in range(arguments.iterations):
        start = time.perf_counter()
        images, labels, _, kwargs = prepare_batch(next(iterator), device)
        loaded = time.perf_counter()
        loss = loss_function(model(images, **kwargs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if iteration > 0:  # the first step pays one-off allocation costs
            data_seconds += loaded - start
            step_seconds += time.perf_counter() - loaded
    samples = arguments.batch_size * (arguments.iterations - 1)
    total = data_seconds + step_seconds
    print(f"device {device.type}, batch {arguments.batch_size}, patch {config.patch_size} (+context), "
          f"{arguments.features} features, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"samples/s {samples / total:.1f}; waiting for data {100 * data_seconds / total:.1f}% of the time")


if __name__ == "__main__":
    main()
