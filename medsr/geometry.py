"""Voxel-grid geometry shared by degradation, enhancement and writing.

All affines map voxel indices ``(i, j, k)`` to world millimetres in the RAS+ convention that
NIfTI and nibabel use. The rule for a resampled grid keeps the physical extent: every new voxel
tiles the old ones exactly, so voxel centres of the new grid sit symmetrically inside the old
voxels (and vice versa when downsampling).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# DICOM patient coordinates are LPS; NIfTI world coordinates are RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Length in mm of each voxel axis of a 4x4 affine, shape ``(3,)``."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def rescaled_affine(affine: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """Affine of the grid that divides each voxel axis ``a`` into ``factors[a]`` voxels.

    A factor of 2 halves the voxel size along that axis (upsampling); 0.5 doubles it
    (downsampling). The new grid covers the same physical extent as the old one: the corner of
    voxel 0 stays where it was, so the first voxel centre moves by ``(new - old) / 2`` along the
    axis.

    Args:
        affine: ``(4, 4)`` voxel-to-world matrix in mm.
        factors: one positive factor per voxel axis, e.g. ``(2, 2, 1)`` for in-plane x2.

    Returns:
        The ``(4, 4)`` affine of the resampled grid.
    """
    affine = np.asarray(affine, dtype=np.float64)
    factors = np.asarray(factors, dtype=np.float64)
    if factors.shape != (3,) or np.any(factors <= 0):
        raise ValueError(f"factors must be three positive numbers, not {factors.tolist()}")
    old_axes = affine[:3, :3]
    new_axes = old_axes / factors
    new = affine.copy()
    new[:3, :3] = new_axes
    # corner of voxel 0 = origin - old_axis / 2; new origin = corner + new_axis / 2
    new[:3, 3] = affine[:3, 3] + (new_axes - old_axes).sum(axis=1) / 2.0
    return new


def enhanced_affine(affine: np.ndarray, slice_axis: int, scale: int, grid: str) -> np.ndarray:
    """Affine of the in-plane output grid for a scan whose low-res pixels sit on ``grid``.

    ``bicubic`` (a resampled image): the new pixels tile the old ones
    (:func:`rescaled_affine`). ``kspace`` (k-space truncation): a zero-filled reconstruction
    keeps the field-of-view centre on pixel N/2, so coarse pixel ``n`` is fine pixel
    ``scale * n`` and the first pixel keeps its position; only the spacing is divided.

    Args:
        affine: ``(4, 4)`` voxel-to-world matrix of the low-res scan, mm.
        slice_axis: the axis left alone.
        scale: in-plane factor.
        grid: ``"bicubic"`` or ``"kspace"``.
    """
    factors = in_plane_factors(slice_axis, scale)
    if grid == "bicubic":
        return rescaled_affine(affine, factors)
    if grid == "kspace":
        new = np.asarray(affine, dtype=np.float64).copy()
        new[:3, :3] = new[:3, :3] / np.asarray(factors)
        return new
    raise ValueError(f"grid must be 'bicubic' or 'kspace', not {grid!r}")


def in_plane_factors(slice_axis: int, scale: float) -> tuple[float, float, float]:
    """Per-axis factors that scale the two in-plane axes by ``scale`` and leave ``slice_axis``."""
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, not {slice_axis}")
    factors = [float(scale)] * 3
    factors[slice_axis] = 1.0
    return tuple(factors)  # type: ignore[return-value]


def through_plane_factors(slice_axis: int, factor: int) -> tuple[int, int, int]:
    """Per-axis factors that divide each slice along ``slice_axis`` into ``factor`` thin ones
    and leave the in-plane axes."""
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, not {slice_axis}")
    factors = [1, 1, 1]
    factors[slice_axis] = int(factor)
    return tuple(factors)  # type: ignore[return-value]


def slice_axis_of(affine: np.ndarray) -> int:
    """The slice axis of a volume known only by its voxel sizes (NIfTI).

    The odd one out: when two axes share a voxel size and the third differs, the two are the
    image plane and the third is the slice axis, whether it is larger (0.7 x 0.7 x 3 mm, thick
    slices) or smaller (2 x 2 x 1 mm, a 1 mm volume whose planes were made coarser: exactly
    what in-plane super-resolution should undo). All three equal: the last axis. All three
    different: the largest. On the protocol's reference volumes (about equal voxels, or thick
    slices) this is the protocol's rule, the axis with the largest voxels.
    """
    sizes = voxel_sizes(affine)
    same = [[b for b in range(3) if np.isclose(sizes[a], sizes[b], rtol=1e-3)] for a in range(3)]
    if all(len(group) == 3 for group in same):
        return 2
    lonely = [a for a in range(3) if len(same[a]) == 1]
    if len(lonely) == 1:
        return lonely[0]
    return largest_spacing_axis(affine)


def largest_spacing_axis(affine: np.ndarray) -> int:
    """The axis with the largest voxel size; ties go to the last such axis."""
    sizes = voxel_sizes(affine)
    largest = sizes.max()
    return int(max(a for a in range(3) if np.isclose(sizes[a], largest, rtol=1e-3)))
