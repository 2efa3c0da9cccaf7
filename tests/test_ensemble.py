"""Self-ensemble (medsr.ensemble): each flip/transpose is undone exactly on both grids (the
one-pixel shift on the k-space grid), and the engine's ensemble output is the mean of the
eight plain passes, each run on the transformed scan and undone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsr.engine import enhance_volume
from medsr.ensemble import IDENTITY, SYMMETRIES, apply, ensemble_passes, undo
from medsr.errors import MedsrError
from medsr.model import zero_fill_upsample

GRIDS = ("bicubic", "kspace")


def _without_nyquist(images: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` images with their Nyquist row and column of the spectrum removed (even
    sides): a flip maps every other frequency onto its mirror, which zero filling places
    symmetrically; the Nyquist line has no mirror on the coarse grid."""
    spectrum = torch.fft.fft2(images.double())
    spectrum[..., images.shape[-2] // 2, :] = 0
    spectrum[..., :, images.shape[-1] // 2] = 0
    return torch.fft.ifft2(spectrum).real


CLASSICAL = {
    "bicubic": lambda images, scale: F.interpolate(images, scale_factor=scale, mode="bicubic", align_corners=False),
    "kspace": lambda images, scale: zero_fill_upsample(images, scale),
}


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("shape", [(16, 16), (12, 10)])
def test_every_symmetry_is_undone_on_the_grid(grid, scale, shape):
    """The classical upsampler of each grid commutes with the eight symmetries once each is
    undone on that grid: every pass gives the plain answer (to float32 rounding)."""
    torch.manual_seed(0)
    images = _without_nyquist(torch.rand(3, 1, *shape)).float()
    codes = torch.zeros(3, dtype=torch.long)
    plain = CLASSICAL[grid](images, scale)
    passes = ensemble_passes(lambda x, c: CLASSICAL[grid](x, scale), images, codes, scale, grid)
    assert passes.shape == (8, 3, 1, scale * shape[0], scale * shape[1])
    for one in passes:
        torch.testing.assert_close(one, plain, atol=2e-5, rtol=0)


def test_the_kspace_shift_is_needed():
    """Undone as on the tiling grid (no shift), a flipped pass of the k-space upsampler lands a
    fine pixel off: far from the plain answer."""
    torch.manual_seed(0)
    images = _without_nyquist(torch.rand(1, 1, 16, 16)).float()
    flipped = next(s for s in SYMMETRIES if s.flip_rows and not s.flip_columns and not s.transpose)
    output = zero_fill_upsample(apply(images, flipped), 2)
    plain = zero_fill_upsample(images, 2)
    assert (undo(output, flipped, 2, "bicubic") - plain).abs().max() > 0.05
    torch.testing.assert_close(undo(output, flipped, 2, "kspace"), plain, atol=2e-5, rtol=0)


def test_apply_and_undo_on_the_same_grid_are_inverse_at_scale_one():
    images = torch.arange(12.0).reshape(1, 1, 3, 4)
    for symmetry in SYMMETRIES:
        torch.testing.assert_close(undo(apply(images, symmetry), symmetry, 1, "bicubic"), images)
    assert len(set(SYMMETRIES)) == 8 and SYMMETRIES[0] == IDENTITY


def test_a_bad_grid_names_the_choices():
    with pytest.raises(MedsrError, match="grid must be one of bicubic, kspace, not 'lanczos'"):
        undo(torch.zeros(1, 1, 4, 4), SYMMETRIES[1], 2, "lanczos")


@pytest.mark.parametrize("grid", GRIDS)
def test_engine_ensemble_is_the_mean_of_the_eight_plain_passes(unsure_model, grid):
    """``enhance_volume(ensemble=True)`` equals the mean over the eight symmetries of the plain
    run on the transformed volume, undone on the output grid (slices along axis 0, 12 x 10:
    not square, so the transposed passes run apart)."""
    rng = np.random.default_rng(0)
    volume = (rng.random((3, 12, 10)) * 100 + 20).astype(np.float32)  # no flat region, no padding
    affine = np.diag([3.0, 1.0, 1.0, 1.0])
    options = dict(precision="fp32", consistency="off", batch_size=8)
    ensemble = enhance_volume(volume, affine, 0, unsure_model, grid, ensemble=True, **options).array
    plain = enhance_volume(volume, affine, 0, unsure_model, grid, **options).array
    passes = []
    for symmetry in SYMMETRIES:
        turned = apply(torch.from_numpy(volume), symmetry).numpy()
        output = enhance_volume(turned, np.diag([3.0, 1.0, 1.0, 1.0]), 0, unsure_model, grid, **options).array
        passes.append(undo(torch.from_numpy(output), symmetry, 2, grid).numpy())
    np.testing.assert_allclose(ensemble, np.mean(passes, axis=0), atol=1e-3 * np.ptp(volume), rtol=0)
    assert np.abs(ensemble - plain).max() > 1e-2 * np.ptp(volume)  # the passes really differ
    np.testing.assert_allclose(passes[0], plain, atol=1e-4 * np.ptp(volume), rtol=0)


def test_through_plane_ensemble_is_the_mean_of_the_eight_flipped_volumes():
    """Through-plane, the four flips of each plane in both orientations are the eight flips
    of the volume (in-plane axes and the slice axis): the ensemble equals the mean of the plain
    runs on the eight flipped volumes, each flipped back (exact: B-spline and thick slices are
    symmetric)."""
    import itertools

    from medsr.model import ThroughPlaneNet
    from medsr.reading import read_scan
    from medsr.through_plane import enhance_through_plane
    from medsr.transforms import robust_window, thick_slices

    from conftest import MR_NIFTI

    torch.manual_seed(0)
    model = ThroughPlaneNet(features=4, num_res_blocks=1)
    torch.nn.init.normal_(model.tail.conv.weight, std=0.05)
    model.eval()
    volume = read_scan(MR_NIFTI).array[40:64, 60:92, 30:70]
    thick = thick_slices(volume, 2, 4, "gaussian")
    window = robust_window(thick)
    options = dict(affine=np.diag([1.0, 1.0, 4.0, 1.0]), slice_axis=2, model=model, factor=4, window=window,
                   precision="fp32")
    ensemble = enhance_through_plane(thick, ensemble=True, **options).array
    runs = []
    for axes in itertools.chain.from_iterable(itertools.combinations(range(3), n) for n in range(4)):
        flipped = np.flip(thick, axes) if axes else thick
        output = enhance_through_plane(np.ascontiguousarray(flipped), **options).array
        runs.append(np.flip(output, axes) if axes else output)
    np.testing.assert_allclose(ensemble, np.mean(runs, axis=0), atol=1e-3 * np.ptp(thick), rtol=0)
    assert np.abs(ensemble - runs[0]).max() > 1e-3 * np.ptp(thick)


def test_enhance_file_runs_the_through_plane_ensemble(tmp_path):
    """``enhance_file(through_plane=True, ensemble=True)`` writes the thin grid and says so."""
    import nibabel as nib

    from medsr.enhance import enhance_file
    from medsr.model import ThroughPlaneNet

    torch.manual_seed(0)
    model = ThroughPlaneNet(features=4, num_res_blocks=1)
    rng = np.random.default_rng(0)
    source = tmp_path / "thick.nii.gz"
    nib.save(nib.Nifti1Image((rng.random((16, 12, 5)) * 100).astype(np.float32), np.diag([1.0, 1.0, 4.0, 1.0])),
             source)
    result = enhance_file(source, tmp_path / "thin.nii.gz", model=model, through_plane=True, scale=4,
                          ensemble=True, device="cpu")
    assert result.ensemble and result.factor == 4
    assert nib.load(tmp_path / "thin.nii.gz").shape == (16, 12, 20)
