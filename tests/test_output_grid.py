"""The output grid follows the grid found or told: an enhanced scan overlays its input and the
high-res reference in physical space, on the ``bicubic`` (tiling) and the ``kspace`` (first
pixel kept) grid, in NIfTI and DICOM.

Each real sample slab is degraded by protocol v1 and stored with that grid's low-res geometry
(:func:`medsr.geometry.degraded_affine`), then enhanced by the shipped x2 weights told the
grid. Two things are checked in world millimetres, never in voxel indices:

- every output voxel centre is a voxel centre of the high-res reference (to 1e-4 mm);
- the output, resampled at the low-res pixel centres, matches the low-res values better with its
  own header than with the other grid's header (half an output pixel away along each in-plane
  axis): the header describes where the pixels really are.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy.ndimage import map_coordinates
from typer.testing import CliRunner

from medsr.cli import app
from medsr.geometry import LPS_TO_RAS, enhanced_affine
from medsr.reading import read_scan
from medsr.transforms import degrade_volume

from conftest import MR_NIFTI, MR_SERIES, degraded_series

runner = CliRunner()
OTHER_GRID = {"bicubic": "kspace", "kspace": "bicubic"}
MARGIN = 4  # low-res pixels left out at each in-plane edge (interpolation meets the border there)


def voxel_centres(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World position (mm) of every voxel centre, ``(*shape, 3)``."""
    indices = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return indices @ affine[:3, :3].T + affine[:3, 3]


def misfit(output: np.ndarray, output_affine: np.ndarray, low_res: np.ndarray, low_res_affine: np.ndarray,
           slice_axis: int) -> float:
    """RMS difference between the low-res values and the output resampled (linearly) at the
    low-res voxel centres, mapped through world space, away from the in-plane edges."""
    inner = [slice(MARGIN, -MARGIN)] * 3
    inner[slice_axis] = slice(None)
    centres = voxel_centres(low_res_affine, low_res.shape)[tuple(inner)]
    world_to_output = np.linalg.inv(output_affine)
    where = centres @ world_to_output[:3, :3].T + world_to_output[:3, 3]
    sampled = map_coordinates(output.astype(np.float64), np.moveaxis(where, -1, 0), order=1, mode="nearest")
    return float(np.sqrt(np.mean((sampled - low_res[tuple(inner)]) ** 2)))


def check_overlay(output: np.ndarray, output_affine: np.ndarray, low_res: np.ndarray,
                  low_res_affine: np.ndarray, reference_affine: np.ndarray, reference_shape, slice_axis: int,
                  grid: str) -> None:
    assert output.shape == tuple(reference_shape)
    np.testing.assert_allclose(voxel_centres(output_affine, output.shape),
                               voxel_centres(reference_affine, reference_shape), atol=1e-4, rtol=0)
    own = misfit(output, output_affine, low_res, low_res_affine, slice_axis)
    other = misfit(output, enhanced_affine(low_res_affine, slice_axis, 2, OTHER_GRID[grid]),
                   low_res, low_res_affine, slice_axis)
    assert own < 0.5 * other, (grid, own, other)


@pytest.mark.parametrize("grid", ["bicubic", "kspace"])
def test_nifti_output_overlays_input_and_reference(tmp_path, grid):
    """A 16-slice sagittal slab of the real T1 (slices along axis 0)."""
    slab = nib.load(MR_NIFTI).slicer[72:88]
    high_res = slab.get_fdata(dtype=np.float32)
    low_res, _, low_res_affine = degrade_volume(high_res, slab.affine, 0, 2, grid)
    source, output = tmp_path / "coarse.nii.gz", tmp_path / "enhanced.nii.gz"
    nib.save(nib.Nifti1Image(low_res, low_res_affine), source)

    result = runner.invoke(app, ["enhance", str(source), "-o", str(output), "--degradation", grid])

    assert result.exit_code == 0, result.output
    stored = nib.load(source)
    enhanced = nib.load(output)
    check_overlay(enhanced.get_fdata(dtype=np.float32), enhanced.affine, stored.get_fdata(dtype=np.float32),
                  stored.affine, slab.affine, high_res.shape, 0, grid)


def image_pixel_centres(dataset: pydicom.Dataset) -> np.ndarray:
    """World position (LPS mm) of every pixel centre of one DICOM image, ``(rows, columns, 3)``."""
    along_row, along_column = np.reshape(np.asarray(dataset.ImageOrientationPatient, float), (2, 3))
    row_step, column_step = (float(v) for v in dataset.PixelSpacing)
    rows, columns = np.meshgrid(np.arange(dataset.Rows), np.arange(dataset.Columns), indexing="ij")
    return (np.asarray(dataset.ImagePositionPatient, float)
            + columns[..., None] * column_step * along_row + rows[..., None] * row_step * along_column)


@pytest.mark.parametrize("grid", ["bicubic", "kspace"])
def test_dicom_output_overlays_input_and_reference(tmp_path, grid):
    """The real oblique PD series (20 slices, unevenly spaced): each output image's pixel
    centres, from its own ImagePositionPatient, are those of the high-res source image of the
    same slice."""
    source = degraded_series(MR_SERIES, tmp_path / "coarse", grid)

    result = runner.invoke(app, ["enhance", str(source), "-o", str(tmp_path / "out"), "--degradation", grid])

    assert result.exit_code == 0, result.output
    reference, low_res, enhanced = read_scan(MR_SERIES), read_scan(source), read_scan(tmp_path / "out")
    for written, original in zip(enhanced.dicom_headers, reference.dicom_headers, strict=True):
        np.testing.assert_allclose(image_pixel_centres(written), image_pixel_centres(original), atol=1e-4, rtol=0)
    # the volume the reader makes of it (the slice axis on the mean gap) overlays the input
    check_overlay(enhanced.array, enhanced.affine, low_res.array, low_res.affine, reference.affine,
                  reference.array.shape, 2, grid)


@pytest.mark.parametrize("grid", ["bicubic", "kspace"])
def test_multiframe_per_frame_positions_follow_the_grid(tmp_path, grid):
    """The multi-frame writer places every frame's ImagePositionPatient on the grid it is told:
    moved by a quarter of a source pixel towards the first pixel's corner (``bicubic``), or
    kept (``kspace``)."""
    from medsr.dicom_writing import DicomSeriesWriter
    from medsr.reading import open_scan
    from medsr.transforms import IntensityCounts

    from conftest import MR_MULTIFRAME

    scan = open_scan(MR_MULTIFRAME)
    volume = scan.load().array
    counts = IntensityCounts()
    counts.add(volume)
    affine = enhanced_affine(scan.affine, 2, 2, grid)
    with pytest.raises(ValueError, match=f"enhanced_affine, {OTHER_GRID[grid]}"):  # the grid told decides
        DicomSeriesWriter(tmp_path / "out", scan, affine, 2, "test", counts.window(), grid=OTHER_GRID[grid])
    with DicomSeriesWriter(tmp_path / "out", scan, affine, 2, "test", counts.window(), grid=grid) as writer:
        writer.write(np.repeat(np.repeat(np.moveaxis(volume, 2, 0), 2, axis=1), 2, axis=2))
    (written,) = sorted((tmp_path / "out").glob("*.dcm"))
    per_frame = scan.dicom_headers[0].PerFrameFunctionalGroupsSequence
    source = [per_frame[frame] for frame in scan.frame_order]  # in slice order, as written
    frames = pydicom.dcmread(written).PerFrameFunctionalGroupsSequence
    move = (LPS_TO_RAS @ (affine[:, 3] - scan.affine[:, 3]))[:3]
    assert np.allclose(move, 0) == (grid == "kspace")
    for frame, original in zip(frames, source, strict=True):
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        expected = np.asarray(original.PlanePositionSequence[0].ImagePositionPatient, float) + move
        np.testing.assert_allclose(position, expected, atol=1e-4)
