"""Readers on real scans, checked against independent arithmetic (nibabel, ImagePositionPatient)."""

from __future__ import annotations

import logging
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medsr.errors import ScanReadError
from medsr.geometry import LPS_TO_RAS
from medsr.reading import read_scan

from conftest import CT_SERIES, MR_MULTIFRAME, MR_NIFTI, MR_SERIES, pydicom_test_file


def world_lps(affine: np.ndarray, index) -> np.ndarray:
    return (LPS_TO_RAS @ affine @ np.array([*index, 1.0]))[:3]


def sorted_series(folder):
    datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    cosines = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    return sorted(datasets, key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, dtype=float))))


@pytest.mark.parametrize("folder", [MR_SERIES, CT_SERIES])
def test_dicom_series_geometry_matches_image_position_patient(folder):
    scan = read_scan(folder)
    datasets = sorted_series(folder)
    assert scan.array.shape == (datasets[0].Columns, datasets[0].Rows, len(datasets))
    assert scan.slice_axis == 2 and scan.source_format == "dicom"
    row_spacing, col_spacing = (float(v) for v in datasets[0].PixelSpacing)
    cosines = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    for k, dataset in enumerate(datasets):
        origin = np.array(dataset.ImagePositionPatient, dtype=float)
        # the slice's own origin, within the rounding of uneven real-world gaps
        np.testing.assert_allclose(world_lps(scan.affine, (0, 0, k)), origin, atol=0.1)
        # i runs along the row direction by the column spacing, j down the columns
        expected = origin + 5 * col_spacing * cosines[:3] + 7 * row_spacing * cosines[3:]
        np.testing.assert_allclose(world_lps(scan.affine, (5, 7, k)), expected, atol=0.1)


def test_ct_series_is_in_hounsfield_units():
    scan = read_scan(CT_SERIES)
    first = sorted_series(CT_SERIES)[0]
    hu = first.pixel_array.astype(np.float64) * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_array_equal(scan.array[:, :, 0], hu.T.astype(np.float32))
    assert scan.array.min() < -900  # air


def test_multiframe_enhanced_mr_equals_its_source_series():
    multiframe, series = read_scan(MR_MULTIFRAME), read_scan(MR_SERIES)
    assert multiframe.multiframe and len(multiframe.dicom_headers) == 1
    np.testing.assert_array_equal(multiframe.array, series.array)
    np.testing.assert_allclose(multiframe.affine, series.affine, atol=1e-6)


def test_single_frame_file(ct_small):
    scan = read_scan(ct_small)
    dataset = pydicom.dcmread(ct_small)
    assert scan.array.shape == (128, 128, 1)
    np.testing.assert_allclose(world_lps(scan.affine, (0, 0, 0)),
                               np.array(dataset.ImagePositionPatient, dtype=float), atol=1e-4)
    expected = dataset.pixel_array.astype(np.float64) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    np.testing.assert_array_equal(scan.array[:, :, 0], expected.T.astype(np.float32))


def test_nifti_matches_nibabel():
    scan = read_scan(MR_NIFTI)
    image = nib.load(MR_NIFTI)
    np.testing.assert_array_equal(scan.array, image.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(scan.affine, image.affine)
    assert scan.slice_axis == int(np.argmax(image.header.get_zooms()[:3]))
    assert scan.to_metatensor().shape == image.shape


def test_series_sorted_by_position_not_instance_number(tmp_path):
    """Files renamed in reverse and InstanceNumbers scrambled still stack in space order."""
    reference = read_scan(MR_SERIES)
    for index, source in enumerate(sorted(MR_SERIES.glob("*.dcm"))):
        dataset = pydicom.dcmread(source)
        dataset.InstanceNumber = (index * 7) % 20 + 1
        del dataset[0x00000000:0x00010000]  # command-set elements these files carry
        dataset.save_as(tmp_path / f"{99 - index:03d}.dcm")
    scan = read_scan(tmp_path)
    np.testing.assert_array_equal(scan.array, reference.array)
    np.testing.assert_allclose(scan.affine, reference.affine)


def test_duplicate_positions_and_uneven_gaps_warn_and_keep_going(shared_scans, caplog):
    folder = shared_scans / "dicom" / "dicom_numpy_ct_irregular"
    with caplog.at_level(logging.WARNING):
        scan = read_scan(folder)
    files = list(folder.glob("*.dcm"))
    assert scan.array.shape[2] == len(files) - 1  # one duplicate position dropped
    assert "same position" in caplog.text and "uneven" in caplog.text


def test_rounding_jitter_in_the_positions_is_no_gantry_tilt(tmp_path, caplog):
    """ImagePositionPatient written to a few decimals leans a short series by a few thousandths
    of a millimetre (a real 5-slice copy of the GE PD series: 0.07 degrees); that moves no slice by a
    visible fraction of a pixel, so it is not called a tilt."""
    datasets = sorted_series(CT_SERIES)  # three 1 mm slices
    for k, (dataset, jitter) in enumerate(zip(datasets, (0.0, 0.004, 0.003), strict=True)):
        position = np.array(dataset.ImagePositionPatient, dtype=float) + [0.0, jitter, 0.0]
        dataset.ImagePositionPatient = [f"{v:.4f}" for v in position]
        dataset.save_as(tmp_path / f"{k}.dcm")
    with caplog.at_level(logging.WARNING):
        read_scan(tmp_path)
    assert "gantry tilt" not in caplog.text


def test_a_small_lean_that_adds_up_over_a_long_series_is_a_tilt(tmp_path, caplog):
    """0.02 mm per 7 mm slice (0.16 degrees) moves the last of 20 slices by 0.38 mm, almost half
    a pixel: that is said."""
    datasets = sorted_series(MR_SERIES)
    for k, dataset in enumerate(datasets):
        position = np.array(dataset.ImagePositionPatient, dtype=float) + [0.0, 0.02 * k, 0.0]
        dataset.ImagePositionPatient = [f"{v:.4f}" for v in position]
        for tag in [tag for tag in dataset.keys() if tag.group == 0]:  # a command set: no file may hold one
            del dataset[tag]
        dataset.save_as(tmp_path / f"{k}.dcm")
    with caplog.at_level(logging.WARNING):
        read_scan(tmp_path)
    assert "gantry tilt" in caplog.text


def test_gantry_tilt_keeps_the_shear(tmp_path, caplog):
    """Slices shifted along the column direction as the table moves (tilt) keep their positions."""
    datasets = sorted_series(CT_SERIES)
    for k, dataset in enumerate(datasets):
        position = np.array(dataset.ImagePositionPatient, dtype=float) + [0.0, 2.0 * k, 0.0]
        dataset.ImagePositionPatient = [f"{v:.4f}" for v in position]
        dataset.save_as(tmp_path / f"{k}.dcm")
    with caplog.at_level(logging.WARNING):
        scan = read_scan(tmp_path)
    assert "gantry tilt" in caplog.text
    for k, dataset in enumerate(datasets):
        np.testing.assert_allclose(world_lps(scan.affine, (0, 0, k)),
                                   np.array(dataset.ImagePositionPatient, dtype=float), atol=1e-3)


def test_folder_with_two_series_lists_them_and_series_picks_one(tmp_path, ct_small):
    shutil.copy(ct_small, tmp_path / "ct.dcm")
    shutil.copy(pydicom_test_file("MR_small.dcm"), tmp_path / "mr.dcm")
    with pytest.raises(ScanReadError, match="holds 2 DICOM series .*--series"):
        read_scan(tmp_path)
    uid = str(pydicom.dcmread(ct_small).SeriesInstanceUID)
    assert read_scan(tmp_path, series_uid=uid).array.shape == (128, 128, 1)
    with pytest.raises(ScanReadError, match="no series with SeriesInstanceUID 1.2.3"):
        read_scan(tmp_path, series_uid="1.2.3")


BAD_INPUTS = [
    ("missing", lambda tmp: tmp / "nope.dcm", "no such file"),
    ("empty folder", lambda tmp: tmp, "no DICOM files"),
    ("text file", lambda tmp: _write(tmp / "notes.txt", b"not a scan"), "not a DICOM file"),
    ("empty file", lambda tmp: _write(tmp / "empty.dcm", b""), "not a DICOM file"),
    ("truncated NIfTI", lambda tmp: _write(tmp / "cut.nii.gz", MR_NIFTI.read_bytes()[:5000]), "not a readable NIfTI"),
    ("structure set", lambda tmp: pydicom_test_file("rtstruct.dcm"), "no pixel data"),
    ("colour", lambda tmp: pydicom_test_file("SC_rgb_small_odd.dcm"), "colour DICOM"),
]


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name, make, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_one_clear_error(tmp_path, name, make, message):
    with pytest.raises(ScanReadError, match=message):
        read_scan(make(tmp_path))


def test_nan_and_4d_nifti_are_refused(tmp_path):
    volume = np.ones((8, 8, 3), dtype=np.float32)
    volume[2, 2, 1] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(ScanReadError, match="1 voxels are NaN or infinite"):
        read_scan(tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 3, 2), np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(ScanReadError, match=r"shape \(8, 8, 3, 2\).*extract one volume"):
        read_scan(tmp_path / "4d.nii.gz")
    # found by the fuzz campaign: a header whose last dimension is 0
    nib.save(nib.Nifti1Image(np.ones((8, 8, 0), np.float32), np.eye(4)), tmp_path / "empty.nii.gz")
    with pytest.raises(ScanReadError, match=r"has no voxels \(shape \(8, 8, 0\)\)"):
        read_scan(tmp_path / "empty.nii.gz")
