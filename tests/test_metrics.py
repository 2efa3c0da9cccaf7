from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medsr.metrics import psnr, score, scored_slices, ssim, trim_border


def volumes(seed=0, shape=(40, 36, 5)):
    rng = np.random.default_rng(seed)
    reference = rng.normal(100, 30, size=shape)
    return reference, reference + rng.normal(0, 5, size=shape)


def test_psnr_matches_scikit_image():
    reference, test = volumes()
    data_range = reference.max() - reference.min()
    assert psnr(reference, test, data_range) == pytest.approx(
        peak_signal_noise_ratio(reference, test, data_range=data_range), rel=1e-9)
    assert psnr(reference, reference, data_range) == float("inf")


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_ssim_is_the_per_slice_scikit_image_mean(axis):
    reference, test = volumes(shape=(20, 24, 22))
    data_range = reference.max() - reference.min()
    expected = np.mean([
        structural_similarity(np.take(reference, i, axis), np.take(test, i, axis), data_range=data_range,
                              gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        for i in range(reference.shape[axis])])
    assert ssim(reference, test, axis, data_range, reference.min()) == pytest.approx(expected, rel=1e-9)


def test_empty_slices_do_not_count():
    reference = np.zeros((30, 30, 3))
    reference[5:25, 5:25, 1] = 100.0  # only the middle slice has foreground
    assert scored_slices(reference, 2, 0.0, 100.0) == [1]


def test_score_trims_the_border_and_uses_the_reference_range():
    reference, test = volumes()
    test[:2] = 1e6  # a wild border of 2 voxels is cut away at scale 2
    result = score(reference, test, slice_axis=2, scale=2)
    trimmed_reference, trimmed_test = trim_border(reference, 2, 2), trim_border(test, 2, 2)
    data_range = reference.max() - reference.min()
    assert result["psnr"] == pytest.approx(psnr(trimmed_reference, trimmed_test, data_range))
    with pytest.raises(ValueError, match="shapes differ"):
        score(reference, test[:-1], 2, 2)
