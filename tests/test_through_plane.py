"""Through-plane super-resolution (issue #13): protocol v1-z, the B-spline start, the CLI."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import zoom
from typer.testing import CliRunner

from medsr.checkpoint import build_model, save_checkpoint
from medsr.cli import app
from medsr.config import load_config
from medsr.errors import MedsrError
from medsr.evaluation import thick_slices_affine
from medsr.geometry import rescaled_affine
from medsr.model import ThroughPlaneNet
from medsr.reading import read_scan
from medsr.through_plane import default_factor, enhance_through_plane
from medsr.transforms import bspline_upsample, robust_window, slice_profile_weights, thick_slices

from conftest import MR_NIFTI, MR_SERIES

runner = CliRunner()


@pytest.fixture(scope="module")
def through_plane_checkpoint(tmp_path_factory):
    """A small random ThroughPlaneNet, its output near the B-spline start."""
    torch.manual_seed(0)
    config = load_config(None, ["task=through_plane", "scale=4", "model.features=8", "model.num_res_blocks=1"])
    model = build_model(config)
    torch.nn.init.normal_(model.tail.conv.weight, std=1e-4)
    path = tmp_path_factory.mktemp("weights") / "thin.pt"
    save_checkpoint(path, model, config, epoch=1, iteration=1)
    return path


@pytest.fixture(scope="module")
def mr_block():
    """A ~1 mm block of the real T1 (slices along its last axis)."""
    scan = read_scan(MR_NIFTI)
    return scan.array[40:100, 60:140, 30:90], scan.affine


def test_thick_slices_follow_protocol_v1z(mr_block):
    volume, _ = mr_block
    box = thick_slices(volume, 2, 4, "box")
    np.testing.assert_allclose(box[..., 3], volume[..., 12:16].mean(axis=-1), rtol=1e-5, atol=1e-4)
    weights = slice_profile_weights(60, 4, "gaussian")
    sigma = 4 / 2.3548
    centre = 4 * 5 + 1.5
    reach = np.arange(int(np.ceil(centre - 4 * sigma)), int(np.floor(centre + 4 * sigma)) + 1)
    expected = np.exp(-((reach - centre) ** 2) / (2 * sigma**2))
    np.testing.assert_allclose(weights[5, reach], expected / expected.sum(), rtol=1e-12)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    # the ends clamp: the first thick slice's weight that falls before slice 0 lands on slice 0
    assert weights[0, 0] > weights[0, 1]
    np.testing.assert_allclose(bspline_upsample(box, 2, 4),
                               zoom(box.astype(np.float64), (1, 1, 4), order=3, grid_mode=True, mode="nearest"),
                               rtol=1e-5, atol=1e-3)


def test_an_untrained_network_is_exactly_the_bspline_baseline(mr_block):
    volume, affine = mr_block
    thick = thick_slices(volume, 2, 4, "gaussian")
    window = robust_window(thick)
    model = ThroughPlaneNet(features=4, num_res_blocks=1)  # output convolution starts at zero
    enhanced = enhance_through_plane(thick, thick_slices_affine(affine, 2, 4), 2, model, 4, window)
    np.testing.assert_allclose(enhanced.array, bspline_upsample(thick, 2, 4), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(enhanced.affine, affine, atol=1e-6)  # back on the thin grid


def test_default_factor_rounds_to_whole_thin_slices():
    assert default_factor(np.diag([0.9, 0.9, 3.0, 1.0]), 2) == 3  # 3.0 / 0.9 = 3.33: 1.0 mm slices
    assert default_factor(np.diag([0.72, 0.72, 4.0, 1.0]), 2) == 6
    with pytest.raises(MedsrError, match="nothing to make thinner"):
        default_factor(np.diag([1.0, 1.0, 1.2, 1.0]), 2)
    with pytest.raises(MedsrError, match="beyond the 8"):
        default_factor(np.diag([0.5, 0.5, 6.0, 1.0]), 2)


def test_cli_makes_a_real_thick_series_thin(tmp_path, through_plane_checkpoint):
    """The real MR series: 0.86 mm pixels, 7 mm slices -> 8 thin slices per thick one."""
    output = tmp_path / "thin.nii.gz"
    result = runner.invoke(app, ["enhance", str(MR_SERIES), "-o", str(output), "--through-plane",
                                 "--weights", str(through_plane_checkpoint)])
    assert result.exit_code == 0, result.output
    source = read_scan(MR_SERIES)
    image = nib.load(output)
    assert image.shape == (256, 256, 160)
    np.testing.assert_allclose(image.affine, rescaled_affine(source.affine, (1, 1, 8)), atol=1e-4)
    assert b"through-plane x8" in image.header["descrip"].tobytes()
    # every thin slice stays within the range of the thick slices around it
    data = image.get_fdata(dtype=np.float32)
    assert data.min() > source.array.min() - 0.2 * np.ptp(source.array)


def test_cli_through_plane_with_a_chosen_factor_and_wrong_weights(tmp_path, through_plane_checkpoint,
                                                                    session_tiny_checkpoint):
    output = tmp_path / "thin.nii.gz"
    result = runner.invoke(app, ["enhance", str(MR_SERIES), "-o", str(output), "--through-plane", "--scale", "2",
                                 "--weights", str(through_plane_checkpoint)])
    assert result.exit_code == 0, result.output
    assert nib.load(output).shape == (256, 256, 40)
    wrong = runner.invoke(app, ["enhance", str(MR_SERIES), "-o", str(tmp_path / "w.nii.gz"), "--through-plane",
                                "--weights", str(session_tiny_checkpoint)])
    assert wrong.exit_code == 1 and "in-plane weights; drop --through-plane" in wrong.output
    too_much = runner.invoke(app, ["enhance", str(MR_SERIES), "-o", str(tmp_path / "z.nii.gz"), "--through-plane",
                                   "--scale", "12", "--weights", str(through_plane_checkpoint)])
    assert too_much.exit_code == 1 and "must be 2 to 8, not 12" in too_much.output


def test_evaluate_through_plane_scores_protocol_v1z(tmp_path, mr_block, through_plane_checkpoint):
    volume, affine = mr_block
    source = tmp_path / "iso.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), source)
    result = runner.invoke(app, ["evaluate", str(source), "--through-plane",
                                 "--weights", str(through_plane_checkpoint)])
    assert result.exit_code == 0, result.output
    assert "bspline PSNR/SSIM" in result.output and "thin PSNR/SSIM" in result.output
    assert "gaussian x4: thin" in result.output and "box x4: thin" in result.output


def test_through_plane_refuses_what_it_cannot_do(tmp_path, through_plane_checkpoint, mr_block):
    volume, affine = mr_block
    model = ThroughPlaneNet(features=4, num_res_blocks=1)
    window = robust_window(volume)
    with pytest.raises(MedsrError, match="--batch-size must be >= 1, not -1"):
        enhance_through_plane(volume, affine, 2, model, 4, window, batch_size=-1)
    with pytest.raises(MedsrError, match="at least two"):
        enhance_through_plane(volume[:, :, :1], affine, 2, model, 4, window)
    result = runner.invoke(app, ["evaluate", str(MR_NIFTI), "--through-plane", "--bootstrap", "100"])
    assert result.exit_code == 2 and "--through-plane takes --profile" in result.output
    result = runner.invoke(app, ["enhance", str(MR_SERIES), "-o", str(tmp_path / "t.nii.gz"), "--through-plane",
                                 "--degradation", "kspace", "--weights", str(through_plane_checkpoint)])
    assert result.exit_code == 1 and "--degradation is an in-plane choice" in result.output


def test_flat_background_stays_flat_in_thin_slices(through_plane_checkpoint, monkeypatch):
    """Thick voxels whose 7x7 in-plane x 3-slice neighbourhood holds one exact value (the real
    T1's empty background) keep it in all their thin voxels; every other thin voxel is the
    network's own output."""
    from scipy.ndimage import maximum_filter, minimum_filter

    from medsr import through_plane
    from medsr.checkpoint import load_model

    scan = read_scan(MR_NIFTI)
    volume, affine = scan.array[:60, :80, 30:90], scan.affine  # a corner: 37% empty background
    thick = thick_slices(volume, 2, 4, "box")
    model, _ = load_model(through_plane_checkpoint)
    window = robust_window(thick)
    kept = enhance_through_plane(thick, thick_slices_affine(affine, 2, 4), 2, model, 4, window).array
    monkeypatch.setattr(through_plane, "flat_neighbourhoods", lambda values: torch.zeros_like(values, dtype=bool))
    raw = enhance_through_plane(thick, thick_slices_affine(affine, 2, 4), 2, model, 4, window).array
    flat = maximum_filter(thick, (7, 7, 3), mode="nearest") == minimum_filter(thick, (7, 7, 3), mode="nearest")
    flat, value = np.repeat(flat, 4, axis=2), np.repeat(thick, 4, axis=2)
    assert 0.05 < flat.mean() < 0.95
    assert not np.array_equal(raw[flat], value[flat])  # the network alone paints it
    np.testing.assert_array_equal(kept[flat], value[flat])
    np.testing.assert_array_equal(kept[~flat], raw[~flat])


@pytest.mark.parametrize("scale", [2, 4])
def test_block_fill_on_the_kspace_grid_gives_each_output_pixel_its_nearest_low_res_pixel(scale):
    """In-plane on the k-space grid (low-res pixel ``n`` is output pixel ``s n``) each flat or
    padded low-res pixel fills the output pixels nearest to it, ties to the lower one, and the
    output pixels past the last low-res pixel go to it: at x4 ``4n-1 .. 4n+2``, not the
    tiling block ``4n .. 4n+3``."""
    from medsr.engine import fill_blocks, in_plane_block_starts

    rng = np.random.default_rng(scale)
    coarse = rng.normal(size=(2, 5, 6)).astype(np.float32)
    where = rng.random(coarse.shape) < 0.4
    fine = rng.normal(size=(2, 5 * scale, 6 * scale)).astype(np.float32)
    expected = fine.copy()
    for index in np.ndindex(fine.shape):
        # the nearest low-res pixel of output pixel m is m / s rounded, ties down, within the image
        owner = [index[0]] + [min(int(np.ceil(m / scale - 0.5)), n - 1)
                              for m, n in zip(index[1:], coarse.shape[1:], strict=True)]
        if where[tuple(owner)]:
            expected[index] = coarse[tuple(owner)]
    fill_blocks(fine, coarse, where, (1, scale, scale), in_plane_block_starts(scale, "kspace"))
    np.testing.assert_array_equal(fine, expected)


@pytest.mark.parametrize("factors", [(3, 1, 1), (1, 3, 1), (1, 1, 3), (1, 2, 2)],
                         ids=["thin-axis0", "thin-axis1", "thin-axis2", "in-plane-tiles"])
def test_block_fill_matches_a_repeated_mask(factors):
    """``fill_blocks`` (a broadcast view, used by the flat rule and the padding restore, in-plane
    and through-plane) sets exactly the fine voxels a coarse mask repeated ``factors`` times
    along each axis marks, with the coarse voxel's value or one number, and leaves every other
    voxel."""
    from medsr.engine import fill_blocks

    rng = np.random.default_rng(sum(a * f for a, f in enumerate(factors)))
    coarse = rng.normal(size=(5, 6, 7)).astype(np.float32)
    where = rng.random(coarse.shape) < 0.3
    mask, repeated = where, coarse
    for axis, factor in enumerate(factors):
        mask, repeated = np.repeat(mask, factor, axis=axis), np.repeat(repeated, factor, axis=axis)
    for values in (coarse, np.float32(-2048.0)):
        fine = rng.normal(size=mask.shape).astype(np.float32)
        expected = fine.copy()
        expected[mask] = repeated[mask] if np.ndim(values) else values
        fill_blocks(fine, values, where, factors)
        np.testing.assert_array_equal(fine, expected)
