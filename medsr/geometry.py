"""Voxel-grid geometry shared by degradation, enhancement and writing.

All affines map voxel indices ``(i, j, k)`` to world millimetres in the RAS+ convention that
NIfTI and nibabel use.

Two in-plane grids, one per way a scan loses resolution (:func:`enhanced_affine`, the one home of
the rule for every in-plane output, and :func:`degraded_affine`, its inverse):

- ``bicubic`` (resampling: a resliced or MNI-space volume, an export at a smaller matrix, CT
  reconstructed coarse): the grid keeps the physical extent, every new voxel tiles the old ones
  exactly, so voxel centres of the new grid sit symmetrically inside the old voxels (and vice
  versa when downsampling); the first voxel centre moves by a quarter of a coarse voxel at x2
  (:func:`rescaled_affine`). Through-plane thin slices use the same rule.
- ``kspace`` (k-space truncation: MR acquired with fewer lines, zero-filled to a larger matrix):
  public reconstruction frameworks (Gadgetron's DICOM writer,
  ``gadgets/dicom/dicom_ismrmrd_utility.cpp``; mrpro, SIRF, BART) place the
  field-of-view centre on pixel ``N/2`` and the first pixel at ``centre - (N/2) x spacing``, so
  an image zero-filled to ``s N`` pixels keeps the first pixel's position and coarse pixel ``n``
  is fine pixel ``s n``. That is also the protocol's ``kspace`` degradation (the centred FFT
  crop) and the grid the model's zero-filled upsampler restores. Only the spacing changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# DICOM patient coordinates are LPS; NIfTI world coordinates are RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Two voxel-to-world maps of one volume agree when they place every voxel within this fraction
# of its smallest size of each other (real series with uneven gaps differ by 1/8 of an in-plane
# voxel between their affine and its nearest qform; a gantry tilt by tens of mm). The DICOM
# reader calls a series sheared only past it too.
XFORM_TOLERANCE = 0.25


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


def enhanced_affine(affine: np.ndarray, slice_axis: int, scale: float, grid: str) -> np.ndarray:
    """Affine of the in-plane output grid for a scan whose low-res pixels sit on ``grid``.

    ``bicubic`` (a resampled image): the new pixels tile the old ones
    (:func:`rescaled_affine`). ``kspace`` (k-space truncation): a zero-filled reconstruction
    keeps the field-of-view centre on pixel N/2, so coarse pixel ``n`` is fine pixel
    ``scale * n`` and the first pixel keeps its position; only the spacing is divided (see the
    module docstring for the sources).

    Args:
        affine: ``(4, 4)`` voxel-to-world matrix of the low-res scan, mm.
        slice_axis: the axis left alone.
        scale: in-plane factor (a fraction gives the coarser grid: :func:`degraded_affine`).
        grid: ``"bicubic"`` or ``"kspace"``.

    Returns:
        The ``(4, 4)`` affine of the enhanced grid.

    Example:
        >>> enhanced_affine(np.diag([2.0, 2.0, 5.0, 1.0]), 2, 2, "kspace")[:3, 3]  # first pixel kept
        array([0., 0., 0.])
        >>> enhanced_affine(np.diag([2.0, 2.0, 5.0, 1.0]), 2, 2, "bicubic")[:3, 3]  # tiles the old
        array([-0.5, -0.5,  0. ])
    """
    factors = in_plane_factors(slice_axis, scale)
    if grid == "bicubic":
        return rescaled_affine(affine, factors)
    if grid == "kspace":
        new = np.asarray(affine, dtype=np.float64).copy()
        new[:3, :3] = new[:3, :3] / np.asarray(factors)
        return new
    raise ValueError(f"grid must be 'bicubic' or 'kspace', not {grid!r}")


def degraded_affine(affine: np.ndarray, slice_axis: int, scale: int, grid: str) -> np.ndarray:
    """Affine of the low-res grid that ``grid``'s degradation by ``scale`` leaves of a high-res
    scan: in-plane spacing times ``scale``; on the ``bicubic`` grid the coarse pixels tile the
    fine ones, on the ``kspace`` grid the first pixel stays. The inverse of
    :func:`enhanced_affine`: enhancing the result by ``scale`` on the same grid gives ``affine``
    back."""
    return enhanced_affine(affine, slice_axis, 1.0 / scale, grid)


def nearest_block_start(scale: int, grid: str) -> int:
    """How many fine pixels before fine pixel ``scale * n`` the fine pixels nearest to coarse
    pixel ``n`` begin, along one in-plane axis (``scale`` of them, a tie going to the lower
    coarse pixel).

    ``bicubic``: 0, the block ``scale*n .. scale*n + scale - 1`` that the coarse pixel tiles.
    ``kspace``: coarse pixel ``n`` is fine pixel ``scale*n``, so its nearest fine pixels are
    ``scale*n - (scale/2 - 1) .. scale*n + scale/2``: 0 at x2 (fine ``2n`` and the tie ``2n+1``),
    1 at x4 (``4n-1 .. 4n+2``; the block ``4n .. 4n+3`` would give ``4n+3``, nearer to coarse
    ``n+1``, to ``n``). An even block can never be centred on one fine pixel: half a fine pixel
    of asymmetry is left either way.
    """
    if grid == "bicubic":
        return 0
    if grid == "kspace":
        return max(int(scale) // 2 - 1, 0)
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
