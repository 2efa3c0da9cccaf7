"""Evaluation protocol v1 (in-plane) and v1-z (through-plane): degrade a real volume, restore
it with models and classical baselines, and score every answer against the original in original
units.

v1 baselines (same low-res input as the models):
- ``bicubic``: scipy ``zoom(order=3, grid_mode=True, mode="reflect")`` in-plane;
- ``zero_fill``: zero-filled k-space (sinc) interpolation, the strongest classical answer for
  the ``kspace`` degradation (computed for both degradations, counted only for ``kspace``).
A model only counts as better when it beats the best baseline in both PSNR and SSIM. The stress
degradations (:data:`medsr.transforms.STRESS_DEGRADATIONS`) count both baselines.

Each model runs told the degradation's grid, and with ``auto`` also as the default path does:
finding the grid from the low-res pixels (:mod:`medsr.degradation`), scored as ``<model> auto``.
With ``consistency`` as ``medsr enhance --consistency`` has it, each model's output is projected
onto the images its grid turns into the low-res input where that option projects
(:mod:`medsr.consistency`); the same forward pass without the projection is then scored as
``<model> plain``. Unless ``off``, the relative consistency error of both is kept.
With ``ensemble``, each model also runs as ``medsr enhance --ensemble --detail-map`` does
(:mod:`medsr.ensemble`), scored as ``<model> ensemble``; its detail map is kept and scored
against the real error of that output (:func:`medsr.detail_map.map_quality`).

v1-z: thick slices simulated along the slice axis (``gaussian`` or ``box`` profile), cubic
B-spline along that axis as the baseline, PSNR over the volume with ``factor`` slices trimmed at
each end, SSIM on the planes that contain the slice axis.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import zoom

from medsr.consistency import resolved, volume_consistency_error
from medsr.degradation import (
    ClassifierEnsemble,
    DegradationClassifier,
    DegradationEstimate,
    first_look,
    second_look,
)
from medsr.detail_map import map_quality
from medsr.engine import enhance_volume
from medsr.errors import MedsrError
from medsr.geometry import largest_spacing_axis
from medsr.metrics import SliceScores, score_through_plane, slice_scores, trim_border
from medsr.model import SRResNet, ThroughPlaneNet
from medsr.reading import Scan, plane_of
from medsr.synthesis import ModelAnswer
from medsr.through_plane import enhance_through_plane
from medsr.transforms import (
    GRID_OF,
    STRESS_DEGRADATIONS,
    bspline_upsample,
    central_block_origin,
    degrade_volume,
    robust_window,
    thick_slices,
)

BASELINES_FOR = {"bicubic": ("bicubic",), "kspace": ("bicubic", "zero_fill"),
                 **{name: ("bicubic", "zero_fill") for name in STRESS_DEGRADATIONS}}
AUTO_SUFFIX = " auto"
PLAIN_SUFFIX = " plain"  # a model's output without the consistency projection
ENSEMBLE_SUFFIX = " ensemble"  # the mean of the eight flips/transposes


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
    (``scores[method] = {"psnr", "ssim"}``, per scan or averaged); through-plane
    degradations (``"gaussian x4"``) have the B-spline alone."""
    counted = [scores[b] for b in BASELINES_FOR.get(degradation, ("bspline",))]
    return {metric: max(s[metric] for s in counted) for metric in ("psnr", "ssim")}


@dataclass
class ScanResult:
    """Scores for one scan and one degradation: ``scores[method] = {"psnr": dB, "ssim": x}``;
    ``decisions[method]`` holds what the auto runs found from the pixels;
    ``consistency[model] = (plain, projected)`` the relative consistency errors
    ``||D(x) - y|| / ||y||`` of the model told the grid, without and with the projection;
    with the ensemble, ``maps[model]`` its detail map (kept with the images) and
    ``map_quality[model] = {"spearman", "auroc", "auroc_anatomy"}`` against the ensemble
    output's error (:func:`medsr.detail_map.map_quality`)."""

    scan: str
    degradation: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    decisions: dict[str, DegradationEstimate] = field(default_factory=dict)
    details: dict[str, SliceScores] = field(default_factory=dict, repr=False)
    consistency: dict[str, tuple[float, float]] = field(default_factory=dict)
    maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    map_quality: dict[str, dict[str, float]] = field(default_factory=dict)

    def best_baseline(self) -> dict[str, float]:
        """Best PSNR and best SSIM among the baselines that count for this degradation."""
        return best_baseline(self.scores, self.degradation)

    def beats_baselines(self, method: str) -> bool:
        best = self.best_baseline()
        return all(self.scores[method][m] > best[m] for m in ("psnr", "ssim"))


def protocol_slice_axis(scan: Scan) -> int:
    """Protocol v1 step 1: DICOM slices are the acquired images; for NIfTI the default is the
    axis with the largest voxel size (ties: the last). (``medsr enhance`` reads NIfTI by the
    odd one out instead, which agrees on the protocol's reference volumes.)"""
    return largest_spacing_axis(scan.affine) if scan.source_format == "nifti" else scan.slice_axis


def evaluate_scan(scan: Scan, models: dict[str, SRResNet], degradation: str, scale: int,
                  slice_axis: int | None = None, device="cpu", batch_size: int | None = None,
                  keep_images: bool = False, precision: str = "auto",
                  classifier: DegradationClassifier | ClassifierEnsemble | None = None, consistency: str = "off",
                  ensemble: bool = False) -> ScanResult:
    """Run protocol v1 on one scan for one degradation with every model and baseline.

    Each model is told the degradation's grid; with a ``classifier`` it also runs as the
    default path does (grid found from the low-res pixels), scored as ``<name> auto``. Where
    ``consistency`` (as ``medsr enhance --consistency``) projects, the model's output told the
    grid is also scored without the projection, as ``<name> plain``. With ``ensemble`` it also
    runs as the mean of the eight flips/transposes, as ``<name> ensemble``, with its detail map.

    Raises:
        MedsrError: a model upscales by another factor than ``scale``.
    """
    axis = scan.slice_axis if slice_axis is None else slice_axis
    for name, model in models.items():
        if model.scale != scale:
            raise MedsrError(f"--weights {name} upscale by {model.scale}, but --scale is {scale}; "
                             "pass --scale to match")
    low_res, high_res, low_res_affine = degrade_volume(scan.array, scan.affine, axis, scale, degradation)
    result = ScanResult(scan=str(scan.path), degradation=degradation)
    estimates = {name: baseline(low_res, axis, scale) for name, baseline in BASELINES.items()}
    told = GRID_OF[degradation]

    # the classifier's look needs no model: taken once, each model then takes its own second look
    window = robust_window(low_res)
    first, stored = ((None, None) if classifier is None else
                     first_look(functools.partial(plane_of, low_res, axis), low_res.shape[axis], window, classifier))

    def decided(model) -> DegradationEstimate:
        """What medsr enhance decides for this scan with ``model`` (whose second look is its own)."""
        return second_look(first, stored, classifier, ModelAnswer(model, device, window=window))

    # told, as if the user named the degradation itself (so auto projects a k-space truncated
    # scan, not a Gaussian-blurred one on the same grid)
    told_consistency = resolved(consistency, told, degradation)
    plain = {}
    for name, model in models.items():
        run = functools.partial(_enhanced, low_res, low_res_affine, axis, model, device=device,
                                batch_size=batch_size, precision=precision)
        estimates[name], plain[name] = run(told, consistency=told_consistency)
        if consistency != "off":  # (plain is the same as the output where this scan is not projected)
            estimates[name + PLAIN_SUFFIX] = plain[name]
            result.consistency[name] = tuple(volume_consistency_error(image, low_res, axis, told, scale)
                                             for image in (plain[name], estimates[name]))
        if ensemble:
            maps = []
            estimates[name + ENSEMBLE_SUFFIX] = enhance_volume(
                low_res, low_res_affine, axis, model, told, device=device, batch_size=batch_size,
                precision=precision, consistency=told_consistency, ensemble=True, detail_sink=maps.append).array
            result.maps[name] = np.moveaxis(np.concatenate(maps), 0, axis)
            output, reference = (trim_border(v, axis, scale) for v in (estimates[name + ENSEMBLE_SUFFIX], high_res))
            result.map_quality[name] = map_quality(trim_border(result.maps[name], axis, scale),
                                                   np.abs(output - reference), reference)
        if classifier is not None:
            decision = decided(model)
            found_consistency = resolved(consistency, decision.grid, decision.likely)
            same_run = decision.grid == told and found_consistency == told_consistency
            estimates[name + AUTO_SUFFIX] = (estimates[name] if same_run
                                             else run(decision.grid, consistency=found_consistency)[0])
            result.decisions[name + AUTO_SUFFIX] = decision
    for name, estimate in estimates.items():
        result.details[name] = slice_scores(high_res, estimate, axis, scale)
        result.scores[name] = result.details[name].scores()
    if keep_images:
        result.images = {"low_res": low_res, "high_res": high_res, **estimates}
    else:
        result.maps = {}
    return result


def paired_bootstrap(results: list[ScanResult], first: str, second: str, replicates: int = 2000,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """How sure the difference ``first - second`` is, over the scans of ``results`` (one
    degradation): the mean difference in PSNR and SSIM with a 95% interval from a two-level
    paired bootstrap (scans drawn with replacement, then slices within each drawn scan; both
    methods always scored on the same draw).

    Returns:
        ``{"psnr": {"difference", "low", "high"}, "ssim": {...}}``; an interval that holds 0 means
        the data cannot tell the two apart.
    """
    rng = np.random.default_rng(seed)
    observed = np.mean([[r.scores[first][m] - r.scores[second][m] for m in ("psnr", "ssim")] for r in results],
                       axis=0)
    draws = np.empty((replicates, 2))
    for replicate in range(replicates):
        differences = []
        for scan in rng.integers(len(results), size=len(results)):
            details = results[scan].details
            slices = rng.integers(len(details[first].voxels), size=len(details[first].voxels))
            a, b = details[first].scores(slices), details[second].scores(slices)
            differences.append((a["psnr"] - b["psnr"], a["ssim"] - b["ssim"]))
        draws[replicate] = np.nanmean(differences, axis=0)
    low, high = np.nanpercentile(draws, [2.5, 97.5], axis=0)
    return {metric: {"difference": float(observed[i]), "low": float(low[i]), "high": float(high[i])}
            for i, metric in enumerate(("psnr", "ssim"))}


def _enhanced(low_res, low_res_affine, axis, model, grid, **options) -> tuple[np.ndarray, np.ndarray]:
    """The enhanced volume, and the same forward pass without the consistency projection."""
    plain = []
    enhanced = enhance_volume(low_res, low_res_affine, axis, model, grid, plain_sink=plain.append, **options)
    return enhanced.array, np.moveaxis(np.concatenate(plain), 0, axis)


def thick_slices_affine(affine: np.ndarray, slice_axis: int, factor: int) -> np.ndarray:
    """Protocol v1-z step 3: the affine of the thick slices: the slice axis column times
    ``factor``, the origin moved by ``(factor - 1) / 2`` thin slices along it."""
    thick = np.array(affine, dtype=np.float64)
    thick[:3, 3] += thick[:3, slice_axis] * (factor - 1) / 2.0
    thick[:3, slice_axis] *= factor
    return thick


def evaluate_through_plane_scan(scan: Scan, models: dict[str, ThroughPlaneNet], profile: str, factor: int,
                                slice_axis: int = 2, device="cpu", batch_size: int | None = None,
                                keep_images: bool = False, lower_percentile: float = 0.5,
                                upper_percentile: float = 99.5, precision: str = "auto",
                                ensemble: bool = False) -> ScanResult:
    """Protocol v1-z on one ~1 mm volume: thicken along ``slice_axis`` with ``profile`` at
    ``factor``, restore with the B-spline baseline and every model, score; with ``ensemble``
    each model also as the mean of the four flips of each plane, ``<name> ensemble``."""
    n_thin = scan.array.shape[slice_axis] - scan.array.shape[slice_axis] % factor
    high_res = np.take(scan.array, np.arange(n_thin), axis=slice_axis)
    low_res = thick_slices(high_res, slice_axis, factor, profile)
    thick_affine = thick_slices_affine(scan.affine, slice_axis, factor)
    window = robust_window(low_res, lower_percentile, upper_percentile)
    estimates = {"bspline": bspline_upsample(low_res, slice_axis, factor)}
    for name, model in models.items():
        estimates[name] = enhance_through_plane(low_res, thick_affine, slice_axis, model, factor, window,
                                                device, batch_size, precision).array
        if ensemble:
            estimates[name + ENSEMBLE_SUFFIX] = enhance_through_plane(
                low_res, thick_affine, slice_axis, model, factor, window, device, batch_size, precision,
                ensemble=True).array
    result = ScanResult(scan=str(scan.path), degradation=f"{profile} x{factor}")
    for name, estimate in estimates.items():
        result.scores[name] = score_through_plane(high_res, estimate, slice_axis, factor)
    if keep_images:
        result.images = {"low_res": np.repeat(low_res, factor, axis=slice_axis), "high_res": high_res, **estimates}
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
