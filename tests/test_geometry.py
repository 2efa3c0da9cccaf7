from __future__ import annotations

import numpy as np
import pytest

from medsr.geometry import (
    in_plane_factors,
    largest_spacing_axis,
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
