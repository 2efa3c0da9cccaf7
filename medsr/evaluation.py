"""Evaluation protocol v1: degrade a real volume, restore it with models and classical
baselines, and score every answer against the original in original units.

Baselines (same low-res input as the models):
- ``bicubic``: scipy ``zoom(order=3, grid_mode=True, mode="reflect")`` in-plane;
- ``zero_fill``: zero-filled k-space (sinc) interpolation, the strongest classical answer for
  the ``kspace`` degradation (computed for both degradations, counted only for ``kspace``).
A model only counts as better when it beats the best baseline in both PSNR and SSIM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import zoom

from medsr.enhance import enhance_volume
from medsr.metrics import score
from medsr.model import SRResNet
from medsr.reading import Scan
from medsr.transforms import central_block_origin, degrade_volume

BASELINES_FOR = {"bicubic": ("bicubic",), "kspace": ("bicubic", "zero_fill")}


def upscale_bicubic(low_res: np.ndarray, slice_axis: int, scale: int) -> np.ndarray:
    """Cubic-spline interpolation of every slice, on the grid that tiles the low-res voxels."""
    factors = [scale] * 3
    factors[slice_axis] = 1
    return zoom(low_res.astype(np.float64), factors, order=3, grid_mode=True,
                mode="reflect").astype(np.float32)


def upscale_zero_fill(low_res: np.ndarray, slice_axis: int, scale: int) -> np.ndarray:
    """Zero-filled k-space interpolation of every slice: the exact inverse grid of the
    ``kspace`` degradation (the low-res spectrum is placed around DC of a larger one)."""
    slices = np.moveaxis(low_res, slice_axis, 0).astype(np.float64)
    count, low_h, low_w = slices.shape
    high_h, high_w = low_h * scale, low_w * scale
    top, left = central_block_origin(high_h, low_h), central_block_origin(high_w, low_w)
    spectra = np.fft.fftshift(np.fft.fft2(slices), axes=(-2, -1))
    padded = np.zeros((count, high_h, high_w), dtype=np.complex128)
    padded[:, top:top + low_h, left:left + low_w] = spectra
    high_res = np.fft.ifft2(np.fft.ifftshift(padded, axes=(-2, -1))).real * (scale * scale)
    return np.moveaxis(high_res.astype(np.float32), 0, slice_axis)


BASELINES: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {
    "bicubic": upscale_bicubic,
    "zero_fill": upscale_zero_fill,
}


def best_baseline(scores: dict[str, dict[str, float]], degradation: str) -> dict[str, float]:
    """Best PSNR and best SSIM among the baselines that count for ``degradation``
    (``scores[method] = {"psnr", "ssim"}``, per scan or averaged)."""
    counted = [scores[b] for b in BASELINES_FOR[degradation]]
    return {metric: max(s[metric] for s in counted) for metric in ("psnr", "ssim")}


@dataclass
class ScanResult:
    """Scores for one scan and one degradation: ``scores[method] = {"psnr": dB, "ssim": x}``."""

    scan: str
    degradation: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def best_baseline(self) -> dict[str, float]:
        """Best PSNR and best SSIM among the baselines that count for this degradation."""
        return best_baseline(self.scores, self.degradation)

    def beats_baselines(self, method: str) -> bool:
        best = self.best_baseline()
        return all(self.scores[method][m] > best[m] for m in ("psnr", "ssim"))


def evaluate_scan(scan: Scan, models: dict[str, SRResNet], degradation: str, scale: int,
                  slice_axis: int | None = None, device="cpu", batch_size: int | None = None,
                  keep_images: bool = False, precision: str = "auto") -> ScanResult:
    """Run protocol v1 on one scan for one degradation with every model and baseline."""
    axis = scan.slice_axis if slice_axis is None else slice_axis
    low_res, high_res, low_res_affine = degrade_volume(scan.array, scan.affine, axis, scale, degradation)
    result = ScanResult(scan=str(scan.path), degradation=degradation)
    estimates = {name: baseline(low_res, axis, scale) for name, baseline in BASELINES.items()}
    for name, model in models.items():
        if model.scale != scale:
            raise ValueError(f"model {name!r} upscales by {model.scale}, the evaluation by {scale}")
        estimates[name] = enhance_volume(low_res, low_res_affine, axis, model, degradation,
                                         device=device, batch_size=batch_size, precision=precision).array
    for name, estimate in estimates.items():
        result.scores[name] = score(high_res, estimate, axis, scale)
    if keep_images:
        result.images = {"low_res": low_res, "high_res": high_res, **estimates}
    return result


def summarise(results: list[ScanResult]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean PSNR/SSIM per degradation and method over all scans."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for degradation in sorted({r.degradation for r in results}):
        rows = [r for r in results if r.degradation == degradation]
        methods = rows[0].scores.keys()
        summary[degradation] = {
            method: {metric: float(np.nanmean([r.scores[method][metric] for r in rows]))
                     for metric in ("psnr", "ssim")}
            for method in methods
        }
    return summary
