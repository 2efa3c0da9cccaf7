"""Data consistency (medsr.consistency): the projections reproduce the low-res input on real
slices, are the least change (against the explicit pseudo-inverse on small images), leave a
consistent image alone; the engine applies them before the padding rule (the flat-background
rule stands aside when projecting)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from typer.testing import CliRunner

from medsr.cli import app
from medsr.consistency import (
    AUTO_DEGRADATIONS,
    TOLERANCE,
    consistency_error,
    degrade,
    project,
    projects,
    resolved,
    volume_consistency_error,
)
from medsr.engine import enhance_volume
from medsr.errors import MedsrError
from medsr.evaluation import upscale_bicubic, upscale_zero_fill
from medsr.reading import read_scan
from medsr.transforms import DEGRADE_SLICE, crop_to_multiple

from conftest import CT_SERIES, MR_NIFTI, MR_SERIES

GRIDS = ("kspace", "bicubic")
runner = CliRunner()


@pytest.fixture(scope="module")
def real_slices() -> list[np.ndarray]:
    """Middle slices in original units: the MR series (256 x 256), the chest CT in HU (its
    centre 320 x 384) and the T1 NIfTI (232 x 160: not square)."""
    slices = []
    for path in (MR_SERIES, CT_SERIES, MR_NIFTI):
        scan = read_scan(path)
        volume = np.moveaxis(scan.array, scan.slice_axis, 0)
        slices.append(crop_to_multiple(volume[len(volume) // 2].astype(np.float32), 4))
    slices[1] = slices[1][96:416, 64:448]
    return slices


def _as_batch(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("scale", [2, 4])
def test_projection_reproduces_the_low_res_input_of_real_slices(real_slices, grid, scale):
    """The protocol's degradation of each real slice (float32, as stored), an estimate that
    does not reproduce it (the other grid's classical upsampler, plus texture), projected: the
    relative consistency error falls from percents to float32 rounding."""
    rng = np.random.default_rng(0)
    for image in real_slices:
        image = crop_to_multiple(image, scale)
        low_res = DEGRADE_SLICE[grid](image, scale)
        upsample = upscale_bicubic if grid == "kspace" else upscale_zero_fill
        estimate = upsample(low_res[None], 0, scale)[0]
        estimate = estimate + rng.normal(0, 0.02 * np.ptp(image), estimate.shape).astype(np.float32)
        before = consistency_error(_as_batch(estimate), _as_batch(low_res), grid, scale)
        projected = project(_as_batch(estimate), _as_batch(low_res), grid, scale).float()
        after = consistency_error(projected, _as_batch(low_res), grid, scale)
        assert before > 0.01
        assert after < TOLERANCE if grid == "bicubic" else after < 1e-5
        assert consistency_error(projected.double(), _as_batch(low_res), grid, scale) < 1e-6


@pytest.mark.parametrize("grid", GRIDS)
def test_projection_is_idempotent_and_keeps_a_consistent_image(real_slices, grid):
    image = real_slices[0]
    truth = _as_batch(image).double()
    low_res = degrade(truth, grid, 2)
    # the high-res image itself reproduces its own low-res slice: nothing to change
    assert torch.allclose(project(truth, low_res, grid, 2), truth, rtol=0, atol=1e-9 * float(truth.abs().max()))
    estimate = torch.from_numpy(upscale_bicubic(low_res.numpy(), 0, 2)).double()
    once = project(estimate, low_res, grid, 2)
    assert not torch.allclose(once, estimate, atol=1e-3)
    assert torch.allclose(project(once, low_res, grid, 2), once, rtol=0, atol=1e-9 * float(once.abs().max()))


def test_kspace_projection_keeps_the_measured_band_of_the_spectrum(real_slices):
    """Away from the Nyquist lines, the coarse band of the projected spectrum is the input's
    (times s^2) and everything outside it is the network's."""
    image = real_slices[0].astype(np.float64)
    low_res = _as_batch(DEGRADE_SLICE["kspace"](image, 2)).double()
    estimate = _as_batch(image + np.random.default_rng(1).normal(0, 50, image.shape))
    projected = project(estimate, low_res, "kspace", 2)
    spectrum = torch.fft.fftshift(torch.fft.fft2(projected), dim=(-2, -1))[0]
    measured = torch.fft.fftshift(torch.fft.fft2(low_res), dim=(-2, -1))[0] * 4
    before = torch.fft.fftshift(torch.fft.fft2(estimate), dim=(-2, -1))[0]
    band = (slice(64 + 1, 192), slice(64 + 1, 192))  # the central 128 x 128, Nyquist lines left out
    assert torch.allclose(spectrum[band], measured[1:, 1:], atol=1e-6 * float(measured.abs().max()))
    outside = torch.ones(256, 256, dtype=torch.bool)
    outside[64:192, 64:192] = False
    outside[192, 64:193] = outside[64:193, 192] = False  # the Nyquist lines' mirror images
    assert torch.allclose(spectrum[outside], before[outside], atol=1e-6 * float(before.abs().max()))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("shape, scale", [((8, 8), 2), ((12, 10), 2), ((10, 14), 2), ((12, 12), 4), ((16, 12), 4)])
def test_projection_is_the_least_change(grid, shape, scale):
    """Against x + M^T (M M^T)^-1 (y - M x) with the operator's explicit matrix M, on small
    images with even and odd low-res sides (odd sides have no Nyquist line)."""
    height, width = shape
    matrix = np.stack([degrade(torch.from_numpy(e.reshape(1, height, width)), grid, scale).numpy().ravel()
                       for e in np.eye(height * width)], axis=1)
    rng = np.random.default_rng(0)
    estimate = rng.normal(size=(3, height, width))
    low_res = rng.normal(size=(3, height // scale, width // scale))
    expected = [x.ravel() + matrix.T @ np.linalg.solve(matrix @ matrix.T, y.ravel() - matrix @ x.ravel())
                for x, y in zip(estimate, low_res, strict=True)]
    projected = project(torch.from_numpy(estimate), torch.from_numpy(low_res), grid, scale)
    np.testing.assert_allclose(projected.numpy().reshape(3, -1), np.stack(expected), atol=1e-12)


@pytest.mark.parametrize("consistency, grid, named, expected", [
    ("on", "bicubic", None, True), ("on", "kspace", "gaussian", True), ("off", "kspace", None, False),
    ("off", "bicubic", None, False),
    # auto: only what is named k-space truncation, told or found, where the operator is exact
    ("auto", "kspace", None, True), ("auto", "kspace", "kspace", True),
    ("auto", "kspace", "gaussian", False), ("auto", "kspace", "rician", False),
    ("auto", "kspace", "bicubic", False),  # an unsure scan put on the kspace grid as the cheaper mistake
    ("auto", "bicubic", None, False), ("auto", "bicubic", "lanczos", False),
])
def test_which_runs_project(consistency, grid, named, expected):
    assert projects(consistency, grid, named) is expected
    assert resolved(consistency, grid, named) == ("on" if expected else "off")
    assert {"kspace"} == AUTO_DEGRADATIONS


def test_a_bad_choice_names_the_option():
    with pytest.raises(MedsrError, match="--consistency must be one of auto, on, off, not 'yes'"):
        projects("yes", "kspace")
    with pytest.raises(ValueError, match="low_res must be"):
        project(torch.zeros(1, 8, 8), torch.zeros(1, 3, 4), "kspace", 2)


@pytest.mark.parametrize("grid", GRIDS)
def test_engine_output_reproduces_its_input(grid, tiny_checkpoint):
    """A real volume enhanced with the projection reproduces its low-res slices to float32
    rounding, exactly-zero background included (the whole slices of the T1, 18% of its voxels
    0: the flat-background rule stands aside when projecting); without it, it does not."""
    from medsr.checkpoint import load_model

    model, _ = load_model(tiny_checkpoint)
    scan = read_scan(MR_NIFTI)
    low_res = crop_to_multiple(np.moveaxis(scan.array, 0, 2)[:, :, 78:80], 2, axes=(0, 1))  # 2 sagittal slices
    assert (low_res == 0).mean() > 0.1  # real flat background
    low_res = np.ascontiguousarray(low_res)
    projected = enhance_volume(low_res, scan.affine, 2, model, grid, consistency="on", precision="fp32").array
    plain = enhance_volume(low_res, scan.affine, 2, model, grid, consistency="off", precision="fp32").array
    assert volume_consistency_error(projected, low_res, 2, grid, 2) < TOLERANCE
    assert volume_consistency_error(plain, low_res, 2, grid, 2) > 100 * TOLERANCE


def test_cli_records_the_choice(tmp_path, session_tiny_checkpoint):
    output = tmp_path / "o.nii.gz"
    result = runner.invoke(app, ["enhance", str(MR_SERIES), "-o", str(output), "--degradation", "bicubic",
                                 "--consistency", "on", "--weights", str(session_tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert nib.load(output).header["descrip"].tobytes().decode().rstrip("\0") == "medsr x2 bicubic consistent"
    # DICOM gets the long form, with the choice asked for; auto projects what is named (here told)
    # k-space truncated, and nothing on the bicubic grid
    for grid, state in (("kspace", "on"), ("bicubic", "off")):
        result = runner.invoke(app, ["enhance", str(MR_SERIES), "-o", str(tmp_path / grid), "--degradation",
                                     grid, "--weights", str(session_tiny_checkpoint)])
        assert result.exit_code == 0, result.output
        written = pydicom.dcmread(sorted((tmp_path / grid).glob("*.dcm"))[0])
        assert f"consistency projection {state} (--consistency auto)" in written.DerivationDescription
    result = runner.invoke(app, ["enhance", str(MR_SERIES), "-o", str(tmp_path / "p.nii.gz"), "--consistency", "maybe",
                                 "--weights", str(session_tiny_checkpoint)])
    assert result.exit_code == 1
    assert "--consistency must be one of auto, on, off, not 'maybe'" in result.output


def test_evaluate_prints_the_consistency_error_before_and_after(session_tiny_checkpoint):
    result = runner.invoke(app, ["evaluate", str(CT_SERIES), "--weights", str(session_tiny_checkpoint),
                                 "--degradation", "kspace", "--consistency", "on"])
    assert result.exit_code == 0, result.output
    assert "tiny PSNR/SSIM" in result.stdout and "tiny plain PSNR/SSIM" in result.stdout
    line = next(row for row in result.stdout.splitlines() if row.startswith("consistency ct_chest_3slice_dicom"))
    plain, projected = (float(word) for word in line.replace(",", "").split() if word[0].isdigit() and "e" in word)
    assert projected < 1e-5 < plain
    assert "kspace: tiny minus tiny plain, mean PSNR" in result.stdout
    off = runner.invoke(app, ["evaluate", str(CT_SERIES), "--weights", str(session_tiny_checkpoint),
                              "--degradation", "kspace", "--consistency", "off"])
    assert off.exit_code == 0 and "plain" not in off.stdout and "consistency" not in off.stdout


def test_through_plane_refuses_the_projection(tmp_path):
    from medsr.enhance import enhance_file

    with pytest.raises(MedsrError, match="--consistency on is an in-plane choice"):
        enhance_file(MR_NIFTI, tmp_path / "thin.nii.gz", through_plane=True, consistency="on")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("grid", GRIDS)
def test_projection_on_cuda_equals_the_cpu(real_slices, grid):
    low_res = _as_batch(DEGRADE_SLICE[grid](real_slices[0], 2))
    estimate = torch.from_numpy(upscale_bicubic(low_res.numpy(), 0, 2))
    on_cpu = project(estimate, low_res, grid, 2)
    on_cuda = project(estimate.cuda(), low_res.cuda(), grid, 2)
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=0, atol=1e-9 * float(on_cpu.abs().max()))


def test_evaluate_through_plane_refuses_the_projection_too():
    result = runner.invoke(app, ["evaluate", str(MR_NIFTI), "--through-plane", "--consistency", "on"])
    assert result.exit_code == 1
    assert "error: --consistency on is an in-plane choice" in result.stderr
