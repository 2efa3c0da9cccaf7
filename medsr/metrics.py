"""Image-quality scores as the evaluation protocol defines them (original units, whole volume).

PSNR uses ``data_range = reference.max() - reference.min()`` of the whole volume. SSIM is
scikit-image's ``structural_similarity`` per slice (Gaussian weights, sigma 1.5, population
covariance) with the same data range, averaged over slices where voxels above min + 10% of
the range cover at least 5% of the slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.metrics import structural_similarity

# The protocol's foreground rule (step 4): a slice counts when voxels above min + 10% of the
# range cover at least 5% of it. Training (which slices to cache) and the degradation finder
# (which slices to look at) use the same rule and import it from here.
FOREGROUND_LEVEL = 0.10
FOREGROUND_FRACTION = 0.05
SSIM_SIGMA = 1.5
SSIM_WINDOW = 2 * int(3.5 * SSIM_SIGMA + 0.5) + 1  # what scikit-image uses with gaussian_weights


def foreground(volume: np.ndarray) -> np.ndarray:
    """Where ``volume`` lies above its minimum plus :data:`FOREGROUND_LEVEL` of its range: the
    protocol's foreground (the anatomy, not the empty background around it)."""
    low, high = float(volume.min()), float(volume.max())
    return volume > low + FOREGROUND_LEVEL * (high - low)


def trim_border(volume: np.ndarray, slice_axis: int, border: int) -> np.ndarray:
    """Remove ``border`` voxels from both ends of each in-plane axis."""
    if border == 0:
        return volume
    index = [slice(border, -border)] * 3
    index[slice_axis] = slice(None)
    return volume[tuple(index)]


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical volumes."""
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, not {data_range}")
    return psnr_of_mse(float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2)), data_range)


def psnr_of_mse(mse: float, data_range: float) -> float:
    """PSNR in dB of a mean squared error; ``inf`` when it is 0."""
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def scored_slices(reference: np.ndarray, slice_axis: int, volume_min: float, data_range: float) -> list[int]:
    """Indices of slices with enough foreground to count in the SSIM average."""
    slices = np.moveaxis(reference, slice_axis, 0)
    threshold = volume_min + FOREGROUND_LEVEL * data_range
    return [i for i, s in enumerate(slices)
            if (s > threshold).mean() >= FOREGROUND_FRACTION and min(s.shape) >= SSIM_WINDOW]


def slice_ssims(reference: np.ndarray, test: np.ndarray, slice_axis: int, data_range: float,
                volume_min: float) -> np.ndarray:
    """SSIM of each slice along ``slice_axis``; NaN for the slices :func:`scored_slices` leaves out."""
    reference_slices = np.moveaxis(reference, slice_axis, 0).astype(np.float64)
    test_slices = np.moveaxis(test, slice_axis, 0).astype(np.float64)
    values = np.full(len(reference_slices), np.nan)
    for i in scored_slices(reference, slice_axis, volume_min, data_range):
        values[i] = structural_similarity(reference_slices[i], test_slices[i], data_range=data_range,
                                          gaussian_weights=True, sigma=SSIM_SIGMA, use_sample_covariance=False)
    return values


def ssim(reference: np.ndarray, test: np.ndarray, slice_axis: int, data_range: float,
         volume_min: float) -> float:
    """Mean per-slice SSIM over the slices :func:`scored_slices` keeps (NaN if none)."""
    values = slice_ssims(reference, test, slice_axis, data_range, volume_min)
    scored = values[~np.isnan(values)]
    return float(scored.mean()) if len(scored) else float("nan")


@dataclass(frozen=True)
class SliceScores:
    """The protocol's scores of one volume, kept per slice so they can be recombined over any
    choice of slices (the paired bootstrap resamples slices).

    Attributes:
        squared_error: ``(N,)`` sum of squared errors of each slice (border trimmed).
        voxels: ``(N,)`` voxels each sum covers.
        ssim: ``(N,)`` SSIM of each slice, NaN where the slice does not count (too little
            foreground).
        data_range: the reference volume's max - min.
    """

    squared_error: np.ndarray
    voxels: np.ndarray
    ssim: np.ndarray
    data_range: float

    def scores(self, slices: np.ndarray | None = None) -> dict[str, float]:
        """PSNR over the voxels of ``slices`` (default: all) and their mean SSIM."""
        chosen = np.arange(len(self.voxels)) if slices is None else np.asarray(slices)
        mse = float(self.squared_error[chosen].sum() / self.voxels[chosen].sum())
        scored = self.ssim[chosen][~np.isnan(self.ssim[chosen])]
        return {"psnr": psnr_of_mse(mse, self.data_range),
                "ssim": float(scored.mean()) if len(scored) else float("nan")}


def slice_scores(high_res: np.ndarray, estimate: np.ndarray, slice_axis: int, scale: int,
                 volume_range: tuple[float, float] | None = None) -> SliceScores:
    """Protocol step 4, per slice: squared errors and SSIM of ``estimate`` against ``high_res``
    (same shape, units). The data range and the foreground threshold come from the whole
    reference volume, ``(min, max)`` in ``volume_range`` when ``high_res`` holds only some of
    its slices; a border of ``scale`` voxels is removed in-plane."""
    if high_res.shape != estimate.shape:
        raise ValueError(f"shapes differ: reference {high_res.shape}, estimate {estimate.shape}")
    volume_min, volume_max = volume_range or (float(high_res.min()), float(high_res.max()))
    data_range = volume_max - volume_min
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, not {data_range}")
    reference = np.moveaxis(trim_border(high_res, slice_axis, scale), slice_axis, 0).astype(np.float64)
    test = np.moveaxis(trim_border(estimate, slice_axis, scale), slice_axis, 0).astype(np.float64)
    squared_error = ((reference - test) ** 2).reshape(len(reference), -1).sum(axis=1)
    voxels = np.full(len(reference), reference[0].size, dtype=np.float64)
    return SliceScores(squared_error, voxels, slice_ssims(reference, test, 0, data_range, volume_min), data_range)


def score(high_res: np.ndarray, estimate: np.ndarray, slice_axis: int, scale: int) -> dict[str, float]:
    """Protocol step 4: PSNR over the volume and mean per-slice SSIM of ``estimate`` against
    ``high_res`` (see :func:`slice_scores`)."""
    return slice_scores(high_res, estimate, slice_axis, scale).scores()


def score_through_plane(high_res: np.ndarray, estimate: np.ndarray, slice_axis: int, factor: int) -> dict[str, float]:
    """Protocol v1-z step 4: PSNR over the volume and SSIM on the planes that contain the slice
    axis (each index of the first other axis), ``factor`` slices trimmed at each end of it.

    The data range and the foreground threshold come from the whole reference volume.
    """
    if high_res.shape != estimate.shape:
        raise ValueError(f"shapes differ: reference {high_res.shape}, estimate {estimate.shape}")
    volume_min = float(high_res.min())
    data_range = float(high_res.max()) - volume_min
    keep = np.arange(factor, high_res.shape[slice_axis] - factor)
    reference = np.take(high_res, keep, axis=slice_axis)
    test = np.take(estimate, keep, axis=slice_axis)
    planes_axis = next(a for a in range(3) if a != slice_axis)
    return {
        "psnr": psnr(reference, test, data_range),
        "ssim": ssim(reference, test, planes_axis, data_range, volume_min),
    }
