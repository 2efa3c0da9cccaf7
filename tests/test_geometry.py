from __future__ import annotations

import numpy as np
import pytest

from medsr.geometry import (
    degraded_affine,
    enhanced_affine,
    in_plane_factors,
    largest_spacing_axis,
    nearest_block_start,
    rescaled_affine,
    slice_axis_of,
    through_plane_factors,
    voxel_sizes,
)


def oblique_affine(spacing=(0.8, 0.6, 3.0), angle=0.3, origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


def corners(affine: np.ndarray, shape) -> np.ndarray:
    """World positions of the outer corners of the grid (voxel edges, not centres)."""
    lows = np.array([-0.5, -0.5, -0.5])
    highs = np.asarray(shape) - 0.5
    points = np.array([[x, y, z, 1] for x in (lows[0], highs[0]) for y in (lows[1], highs[1])
                       for z in (lows[2], highs[2])])
    return (affine @ points.T).T[:, :3]


@pytest.mark.parametrize("factors", [(2, 2, 1), (4, 4, 1), (1, 2, 2), (0.5, 0.5, 1), (3, 1, 3)])
def test_rescaled_grid_covers_the_same_extent(factors):
    affine, shape = oblique_affine(), (10, 12, 7)
    new_shape = tuple(int(n * f) for n, f in zip(shape, factors, strict=True))
    new = rescaled_affine(affine, factors)
    np.testing.assert_allclose(corners(new, new_shape), corners(affine, shape), atol=1e-9)
    np.testing.assert_allclose(voxel_sizes(new), voxel_sizes(affine) / np.asarray(factors))


def test_x2_origin_moves_by_a_quarter_voxel_back():
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    new = rescaled_affine(affine, (2, 2, 1))
    # half of the new voxel (0.2) minus half of the old one (0.4)
    np.testing.assert_allclose(new[:3, 3], [-0.2, -0.2, 0.0])


def test_up_then_down_is_identity():
    affine = oblique_affine()
    np.testing.assert_allclose(rescaled_affine(rescaled_affine(affine, (2, 2, 1)), (0.5, 0.5, 1)), affine)


# (grid, slice axis, scale, where the first output voxel centre sits along each in-plane axis,
# in input voxels from the first input voxel centre)
ENHANCED_GRIDS = [(grid, axis, scale, first)
                  for axis in (0, 1, 2)
                  for grid, scale, first in [("bicubic", 2, -0.25), ("bicubic", 4, -0.375),
                                             ("kspace", 2, 0.0), ("kspace", 4, 0.0)]]


@pytest.mark.parametrize("grid, slice_axis, scale, first", ENHANCED_GRIDS)
def test_enhanced_affine_table(grid, slice_axis, scale, first):
    affine = oblique_affine()
    new = enhanced_affine(affine, slice_axis, scale, grid)
    in_plane = [a for a in range(3) if a != slice_axis]
    expected = affine.copy()
    for axis in in_plane:
        expected[:3, axis] = affine[:3, axis] / scale
    expected[:3, 3] = affine[:3, 3] + first * affine[:3, in_plane].sum(axis=1)
    np.testing.assert_allclose(new, expected, atol=1e-12)
    # the slice axis is untouched, the in-plane axes keep their directions
    np.testing.assert_array_equal(new[:3, slice_axis], affine[:3, slice_axis])


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
@pytest.mark.parametrize("scale", [2, 4])
def test_kspace_grid_puts_coarse_pixel_n_on_fine_pixel_scale_n(slice_axis, scale):
    """What a zero-filled reconstruction does (FOV centre on pixel N/2 for N and for s N
    pixels): coarse pixel ``n`` and fine pixel ``s n`` are one point, in world mm; on the
    bicubic grid coarse pixel ``n`` is the centre of fine pixels ``s n .. s n + s - 1``."""
    affine, shape = oblique_affine(), np.array([6, 5, 4])
    coarse = np.array([[i, j, k, 1.0] for i in range(shape[0]) for j in range(shape[1]) for k in range(shape[2])])
    factors = np.array(in_plane_factors(slice_axis, scale))
    fine = coarse.copy()
    fine[:, :3] *= factors
    kspace = enhanced_affine(affine, slice_axis, scale, "kspace")
    np.testing.assert_allclose(fine @ kspace.T, coarse @ affine.T, atol=1e-9)
    bicubic = enhanced_affine(affine, slice_axis, scale, "bicubic")
    fine[:, :3] += (factors - 1) / 2  # the middle of the block
    np.testing.assert_allclose(fine @ bicubic.T, coarse @ affine.T, atol=1e-9)


@pytest.mark.parametrize("grid", ["bicubic", "kspace"])
@pytest.mark.parametrize("slice_axis", [0, 1, 2])
@pytest.mark.parametrize("scale", [2, 4])
def test_degraded_affine_is_undone_by_enhanced_affine(grid, slice_axis, scale):
    affine = oblique_affine()
    low_res = degraded_affine(affine, slice_axis, scale, grid)
    np.testing.assert_allclose(voxel_sizes(low_res), voxel_sizes(affine) * in_plane_factors(slice_axis, scale))
    np.testing.assert_allclose(enhanced_affine(low_res, slice_axis, scale, grid), affine, atol=1e-12)
    if grid == "kspace":
        np.testing.assert_array_equal(low_res[:3, 3], affine[:3, 3])  # the first pixel stays
    else:
        np.testing.assert_allclose(low_res, rescaled_affine(affine, in_plane_factors(slice_axis, 1 / scale)))


@pytest.mark.parametrize("grid, scale, start", [("bicubic", 2, 0), ("bicubic", 4, 0), ("kspace", 2, 0),
                                                ("kspace", 4, 1)])
def test_nearest_block_start_table(grid, scale, start):
    assert nearest_block_start(scale, grid) == start
    # the block's fine pixels are the nearest to their coarse pixel (ties to the lower one)
    first = enhanced_affine(np.eye(4), 2, scale, grid)[0, 3]  # fine pixel 0 in coarse units
    fine = np.arange(-start, scale - start)  # the block of coarse pixel 0
    positions = first + fine / scale  # in coarse pixels from coarse pixel 0
    assert np.all(positions > -0.5) and np.all(positions <= 0.5)


def test_grid_functions_refuse_an_unknown_grid():
    for call in (lambda: enhanced_affine(np.eye(4), 2, 2, "nearest"), lambda: nearest_block_start(2, "nearest")):
        with pytest.raises(ValueError, match="grid must be 'bicubic' or 'kspace', not 'nearest'"):
            call()


@pytest.mark.parametrize("factors", [(0, 2, 1), (-2, 2, 1), (2, 2)])
def test_rescaled_affine_rejects_bad_factors(factors):
    with pytest.raises(ValueError, match="three positive numbers"):
        rescaled_affine(np.eye(4), factors)


@pytest.mark.parametrize("spacing, expected", [((1, 1, 3), 2), ((3, 1, 1), 0), ((1, 1, 1), 2),
                                               ((2, 2, 1), 1), ((0.5, 4.0, 4.0), 2)])
def test_largest_spacing_axis_ties_go_to_the_last(spacing, expected):
    assert largest_spacing_axis(oblique_affine(spacing=spacing)) == expected


def test_in_plane_factors():
    assert in_plane_factors(0, 2) == (1.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="slice_axis"):
        in_plane_factors(3, 2)


def test_through_plane_factors():
    assert through_plane_factors(1, 4) == (1, 4, 1)
    with pytest.raises(ValueError, match="slice_axis"):
        through_plane_factors(3, 4)


@pytest.mark.parametrize("spacing, expected", [
    ((0.7, 0.7, 3.0), 2),   # thick slices
    ((1, 1, 1), 2),         # equal voxels: the last axis, as the protocol says
    ((2, 2, 1), 2),         # a 1 mm volume whose planes were made coarser: those planes
    ((1.0, 1.8, 1.8), 0),   # the same with the slices along the first axis
    ((3, 1, 1), 0),
    ((1, 2, 3), 2),         # all different: the largest
])
def test_slice_axis_is_the_odd_one_out(spacing, expected):
    assert slice_axis_of(oblique_affine(spacing=spacing)) == expected
