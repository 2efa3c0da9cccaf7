from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import rescale

from medsr.errors import MedsrError
from medsr.evaluation import upscale_zero_fill
from medsr.geometry import enhanced_affine, voxel_sizes
from medsr.reading import read_scan
from medsr.transforms import (
    ALL_DEGRADATIONS,
    GRID_OF,
    DegradeResolution,
    NormalizeIntensityRobust,
    RandomDegradePair,
    degrade_bicubic,
    degrade_kspace,
    degrade_volume,
    robust_window,
)

from conftest import CT_SERIES


def test_normalisation_inverse_is_exact_on_real_ct():
    hu = read_scan(CT_SERIES).array
    normalise = NormalizeIntensityRobust()
    normalised = normalise(hu)
    assert np.percentile(normalised, 0.5) == pytest.approx(0.0, abs=1e-6)
    assert np.percentile(normalised, 99.5) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(normalise.inverse(normalised), hu, atol=1e-3)  # HU survive


def test_constant_volume_is_refused():
    with pytest.raises(MedsrError, match="constant .* 7"):
        robust_window(np.full((4, 4, 4), 7.0))


@pytest.mark.parametrize("lower, upper", [(50, 50), (-1, 99), (1, 101)])
def test_bad_percentiles(lower, upper):
    with pytest.raises(ValueError, match="percentiles"):
        robust_window(np.arange(10.0), lower, upper)


def test_bicubic_degradation_is_the_protocol_call():
    image = np.random.default_rng(0).normal(size=(64, 48))
    expected = rescale(image, 0.5, order=3, anti_aliasing=True, preserve_range=True, mode="reflect")
    np.testing.assert_allclose(degrade_bicubic(image, 2), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 48), (60, 42), (30, 30)])
def test_kspace_keeps_the_mean_and_zero_fill_restores_band_limited_images(shape):
    rng = np.random.default_rng(1)
    image = rng.normal(size=shape)
    low_res = degrade_kspace(image, 2)
    assert low_res.shape == (shape[0] // 2, shape[1] // 2)
    assert low_res.mean() == pytest.approx(image.mean(), abs=1e-6)
    # a band-limited image (only frequencies below the low-res Nyquist) comes back exactly
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    band_limited = (np.cos(2 * np.pi * (3 * rows / shape[0] + 0.2))
                    + 0.5 * np.sin(2 * np.pi * (2 * rows / shape[0] + 5 * cols / shape[1])))
    restored = upscale_zero_fill(degrade_kspace(band_limited, 2)[:, :, None], 2, 2)[:, :, 0]
    np.testing.assert_allclose(restored, band_limited, atol=1e-5)


def test_degrade_resolution_on_a_real_series():
    scan = read_scan(CT_SERIES)
    low_res, high_res, low_affine = DegradeResolution(2, "kspace", slice_axis=2)(scan.array, scan.affine)
    assert high_res.shape == scan.array.shape
    assert low_res.shape == (256, 256, 3)
    np.testing.assert_allclose(voxel_sizes(low_affine), voxel_sizes(scan.affine) * [2, 2, 1])


@pytest.mark.parametrize("degradation", ALL_DEGRADATIONS)
def test_low_res_affine_is_the_degradations_grid_and_enhancing_on_it_gives_the_reference_back(degradation):
    """Resampling degradations leave pixels that tile the reference's; k-space truncation and
    decimation keep the first pixel (low-res pixel ``n`` is high-res pixel ``2 n``)."""
    affine = np.array([[0.0, -0.9, 0.1, 12.0], [0.8, 0.0, 0.0, -30.0], [0.0, 0.05, 3.0, 7.0], [0, 0, 0, 1]])
    volume = np.random.default_rng(0).random((16, 12, 3)).astype(np.float32)
    _, high_res, low_affine = degrade_volume(volume, affine, 2, 2, degradation)
    grid = GRID_OF[degradation]
    first_moves = not np.allclose(low_affine[:3, 3], affine[:3, 3])
    assert first_moves == (grid == "bicubic")
    np.testing.assert_allclose(enhanced_affine(low_affine, 2, 2, grid), affine, atol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": 1}, "scale must be an integer >= 2"),
    ({"scale": 2.5}, "scale must be an integer >= 2"),
    ({"degradation": "nearest"}, "degradation must be one of"),
])
def test_degrade_resolution_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DegradeResolution(**kwargs)


def test_random_degrade_pair_shapes_and_reproducibility():
    patch = np.random.default_rng(2).random((64, 64)).astype(np.float32)
    degrade = RandomDegradePair(2, {"bicubic": 0.3, "kspace": 0.3, "blur_noise": 0.4})
    degrade.set_random_state(seed=5)
    first = [degrade(patch) for _ in range(12)]
    degrade.set_random_state(seed=5)
    again = [degrade(patch) for _ in range(12)]
    for (low_a, high_a, family_a), (low_b, _, family_b) in zip(first, again, strict=True):
        assert low_a.shape == (32, 32) and high_a is patch
        np.testing.assert_array_equal(low_a, low_b)
        assert family_a == family_b and family_a in ("bicubic", "kspace")


@pytest.mark.parametrize("probabilities, message", [
    ({"bicubic": 0.5}, "sum to 1"), ({"bilinear": 1.0}, "unknown degradations"),
    ({"bicubic": 1.5, "kspace": -0.5}, ">= 0"),
])
def test_random_degrade_pair_rejects_bad_probabilities(probabilities, message):
    with pytest.raises(ValueError, match=message):
        RandomDegradePair(2, probabilities)
