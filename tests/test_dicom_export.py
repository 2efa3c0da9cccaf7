"""DICOM in -> DICOM out, checked with pydicom, SimpleITK (GDCM), dcm2niix and dciodvfy."""

from __future__ import annotations

import re
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID
from typer.testing import CliRunner

from medsr.cli import app
from medsr.geometry import enhanced_affine
from medsr.reading import read_scan

from conftest import (
    CT_SERIES,
    MR_MULTIFRAME,
    MR_SERIES,
    NEEDS_DCIODVFY,
    derivation_description,
    new_dciodvfy_errors,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, session_tiny_checkpoint):
    """Each sample DICOM input enhanced once to a DICOM series and to NIfTI, by a small model
    (what is checked here is the writing; the shipped model has its own slow test)."""
    root = tmp_path_factory.mktemp("exported")
    outputs = {}
    for name, source in (("ct", CT_SERIES), ("mr", MR_SERIES), ("multiframe", MR_MULTIFRAME)):
        for suffix in ("", ".nii.gz"):
            result = runner.invoke(app, ["enhance", str(source), "-o", str(root / f"{name}{suffix}"),
                                         "--weights", str(session_tiny_checkpoint)])
            assert result.exit_code == 0, result.output
        outputs[name] = (source, root / name, root / f"{name}.nii.gz")
    return outputs


def _files(folder):
    return sorted(folder.glob("*.dcm"))


@pytest.mark.parametrize("name", ["ct", "mr", "multiframe"])
def test_series_attributes_follow_the_source(exported, name):
    source, folder, _ = exported[name]
    sources = [pydicom.dcmread(p) for p in ([source] if source.is_file() else _files(source))]
    outputs = [pydicom.dcmread(p) for p in _files(folder)]
    assert len(outputs) == len(sources)  # one file per slice, or one multi-frame object
    source_uids = {d.SOPInstanceUID for d in sources}
    series_uids = {d.SeriesInstanceUID for d in outputs}
    assert len(series_uids) == 1 and series_uids.isdisjoint({d.SeriesInstanceUID for d in sources})
    first = sources[0]
    for dataset in outputs:
        assert UID(dataset.SOPInstanceUID).is_valid and dataset.SOPInstanceUID not in source_uids
        assert UID(dataset.SeriesInstanceUID).is_valid
        for keyword in ("SOPClassUID", "StudyInstanceUID", "FrameOfReferenceUID", "PatientID",
                        "PatientName", "StudyDate", "Modality"):
            assert dataset.get(keyword) == first.get(keyword), keyword
        # enhanced (multi-frame) IODs only allow PRIMARY as value 2
        assert list(dataset.ImageType[:2]) == ["DERIVED", "PRIMARY" if name == "multiframe" else "SECONDARY"]
        assert "medsr" in dataset.SeriesDescription and "x2" in dataset.SeriesDescription
        if name == "multiframe":  # enhanced IODs: in each frame's Derivation Image macro, not on top
            assert "DerivationDescription" not in dataset
            for frame in dataset.PerFrameFunctionalGroupsSequence:
                assert "super-resolution" in frame.DerivationImageSequence[0].DerivationDescription
        else:
            assert "super-resolution" in dataset.DerivationDescription
        assert dataset.SeriesNumber == int(first.get("SeriesNumber", 0) or 0) + 1000
        assert (dataset.Rows, dataset.Columns) == (first.Rows * 2, first.Columns * 2)
        assert dataset.BitsAllocated == 16 and dataset.PixelRepresentation == first.PixelRepresentation
    if name == "multiframe":
        (dataset,) = outputs
        assert dataset.NumberOfFrames == first.NumberOfFrames
        assert float(dataset.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0].WindowWidth) >= 1
        references = [g.DerivationImageSequence[0].SourceImageSequence[0]
                      for g in dataset.PerFrameFunctionalGroupsSequence]
        assert {r.ReferencedSOPInstanceUID for r in references} == {first.SOPInstanceUID}
        assert sorted(r.ReferencedFrameNumber for r in references) == list(range(1, first.NumberOfFrames + 1))
    else:
        referenced = {d.SourceImageSequence[0].ReferencedSOPInstanceUID for d in outputs}
        assert referenced == source_uids
        assert all(float(d.WindowWidth) >= 1 for d in outputs)
        for dataset in outputs:
            assert [float(v) for v in dataset.PixelSpacing] == pytest.approx([float(v) / 2 for v in first.PixelSpacing])
            assert list(dataset.ImageOrientationPatient) == list(first.ImageOrientationPatient)


@pytest.mark.parametrize("name", ["ct", "mr", "multiframe"])
def test_round_trip_geometry_and_units(exported, name):
    source, folder, nifti = exported[name]
    original = read_scan(source)
    written = read_scan(folder if name != "multiframe" else _files(folder)[0])
    # on the grid found, which the output records: tiling (resampled) or first pixel kept (k-space)
    found = re.search(r"degradation (bicubic|kspace)", derivation_description(pydicom.dcmread(_files(folder)[0])))
    expected_affine = enhanced_affine(original.affine, 2, 2, found.group(1))
    np.testing.assert_allclose(written.affine, expected_affine, atol=1e-4)
    enhanced = nib.load(nifti).get_fdata(dtype=np.float32)  # float32, no rounding
    slope = float(pydicom.dcmread(_files(folder)[0]).get("RescaleSlope", 1) or 1)
    if name == "multiframe":
        groups = pydicom.dcmread(_files(folder)[0]).SharedFunctionalGroupsSequence[0]
        slope = float(groups.PixelValueTransformationSequence[0].RescaleSlope)
    # the stored integers hold the enhanced values to half a stored step: no clipping. The
    # stored padding value is the padding's alone: a value within half a step of it moves one
    # step aside (under a step off), so that data never reads as padding, and padding stays
    error = np.abs(written.array - enhanced)
    padding = np.float32(original.padding[0])  # every sample carries a PixelPaddingValue
    is_padding = enhanced == padding
    beside_padding = (np.abs(enhanced - padding) <= slope / 2 + 1e-3) & ~is_padding
    assert error[~beside_padding].max() <= slope / 2 + 1e-3
    assert error.max() < slope + 1e-3
    assert written.padding == original.padding
    np.testing.assert_array_equal(written.array == padding, is_padding)
    if name == "ct":
        assert slope == 1.0 and written.array.min() < -900  # whole HU, air kept


@pytest.mark.slow
def test_shipped_model_output_is_stored_without_clipping(tmp_path):
    """The shipped weights on the real CT, written as DICOM: every enhanced value (HU) reads
    back within half a stored step, and the padding outside the field of view stays padding."""
    from medsr.checkpoint import default_weights, load_model
    from medsr.dicom_writing import DicomSeriesWriter
    from medsr.engine import enhance_scan
    from medsr.reading import open_scan

    scan = open_scan(CT_SERIES)
    model, _ = load_model(default_weights(2))
    enhanced = enhance_scan(scan, model, "bicubic")
    with DicomSeriesWriter(tmp_path / "out", scan, enhanced.affine, 2, "test", enhanced.window) as writer:
        writer.write(np.moveaxis(enhanced.array, 2, 0))
    written = read_scan(tmp_path / "out")
    padding = np.float32(scan.padding[0])
    beside_padding = (np.abs(enhanced.array - padding) <= 0.5) & (enhanced.array != padding)
    error = np.abs(written.array - enhanced.array)
    assert error[~beside_padding].max() <= 0.5 + 1e-3 and error.max() < 1.0 + 1e-3
    np.testing.assert_array_equal(written.array == padding, enhanced.array == padding)
    assert written.array.min() < -900


def test_each_slice_keeps_its_own_position_in_an_unevenly_spaced_series(shared_scans, tmp_path, tiny_checkpoint):
    source = shared_scans / "dicom" / "dicom_numpy_ct_irregular"
    result = runner.invoke(app, ["enhance", str(source), "-o", str(tmp_path / "out"),
                                 "--weights", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    z_in = sorted({float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in source.glob("*.dcm")})
    z_out = sorted(float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in _files(tmp_path / "out"))
    assert z_out == pytest.approx(z_in)


def test_simpleitk_gdcm_reads_one_series_with_the_right_grid(exported):
    sitk = pytest.importorskip("SimpleITK")
    _, folder, _ = exported["ct"]
    reader = sitk.ImageSeriesReader()
    assert len(reader.GetGDCMSeriesIDs(str(folder))) == 1
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    written = read_scan(folder)
    assert image.GetSize() == written.array.shape
    np.testing.assert_allclose(image.GetSpacing(), written.spacing, rtol=1e-5)
    lps_origin = (np.diag([-1, -1, 1, 1]) @ written.affine)[:3, 3]
    np.testing.assert_allclose(image.GetOrigin(), lps_origin, atol=1e-3)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image).transpose(2, 1, 0), written.array, atol=0.5)


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix is not installed")
@pytest.mark.parametrize("name", ["ct", "mr"])
def test_dcm2niix_conversion_overlays_medsr_nifti_voxel_for_voxel(exported, name, tmp_path):
    _, folder, nifti = exported[name]
    subprocess.run(["dcm2niix", "-z", "n", "-o", str(tmp_path), "-f", "converted", str(folder)],
                   check=True, capture_output=True)
    theirs = nib.as_closest_canonical(nib.load(tmp_path / "converted.nii"))
    ours = nib.as_closest_canonical(nib.load(nifti))
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs.affine[:, [0, 1, 3]], ours.affine[:, [0, 1, 3]], atol=0.01)
    # the real MR series is unevenly spaced (6.96-7.07 mm): both tools approximate its slice
    # step, dcm2niix from the first gap and medsr from the mean, within that spread
    np.testing.assert_allclose(theirs.affine[:, 2], ours.affine[:, 2], atol=0.1)
    # half a stored step (slope 1), but for data within it of the padding value, which moves
    # one step aside so that it does not read as padding
    ours_values, theirs_values = ours.get_fdata(), theirs.get_fdata()
    padding = read_scan(folder).padding[0]
    beside_padding = (np.abs(ours_values - padding) <= 0.5) & (ours_values != padding)
    np.testing.assert_allclose(theirs_values[~beside_padding], ours_values[~beside_padding], atol=0.51)
    np.testing.assert_allclose(theirs_values, ours_values, atol=1.0)


@NEEDS_DCIODVFY
@pytest.mark.parametrize("name", ["ct", "mr", "multiframe"])
def test_dciodvfy_reports_no_new_errors(exported, name):
    source, folder, _ = exported[name]
    source_file = source if source.is_file() else _files(source)[0]
    assert not new_dciodvfy_errors(source_file, _files(folder)[0])
    # nor an attribute the IOD does not define that the source did not already carry

    def undefined(path):
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        return {line.strip() for line in (report.stdout + report.stderr).splitlines()
                if "not present in standard DICOM IOD -" in line}

    assert undefined(_files(folder)[0]) <= undefined(source_file)


def test_dicom_output_refuses_unsafe_targets_and_leaves_nothing_behind(tmp_path, tiny_checkpoint, monkeypatch):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep")
    base = ["--weights", str(tiny_checkpoint)]
    cases = [
        (["enhance", str(CT_SERIES), "-o", str(existing)], "already exists; pass --overwrite"),
        (["enhance", str(CT_SERIES), "-o", str(CT_SERIES / "sub")], "inside the input series folder"),
        (["enhance", str(CT_SERIES), "-o", str(CT_SERIES.parent), "--overwrite"], "holds the input"),
        (["enhance", str(CT_SERIES), "-o", str(tmp_path / "x.nii.gz"), "--format", "dicom"], "into a folder"),
    ]
    for arguments, message in cases:
        result = runner.invoke(app, arguments + base)
        assert result.exit_code == 1 and message in result.stderr, result.output
    assert (existing / "keep.txt").read_text() == "keep"

    def fail_midway(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pydicom, "dcmwrite", fail_midway)
    result = runner.invoke(app, ["enhance", str(CT_SERIES), "-o", str(tmp_path / "interrupted")] + base)
    assert result.exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "tiny.pt"]


def test_batch_writes_one_output_per_series_and_reports_failures(tmp_path, tiny_checkpoint):
    from conftest import MR_NIFTI, pydicom_test_file

    inputs = tmp_path / "inputs"
    (inputs / "ct").mkdir(parents=True)
    for path in CT_SERIES.glob("*.dcm"):
        shutil.copy(path, inputs / "ct" / path.name)
    (inputs / "structures").mkdir()
    shutil.copy(pydicom_test_file("rtstruct.dcm"), inputs / "structures" / "rs.dcm")
    (tmp_path / "nifti").mkdir()
    nifti = tmp_path / "nifti" / MR_NIFTI.name  # a block of the real MR: the batch, not the model, is tested
    nib.save(nib.load(MR_NIFTI).slicer[60:66, 40:104, 40:104], nifti)
    out = tmp_path / "out"
    arguments = ["enhance", str(inputs), str(nifti), "-o", str(out), "--weights", str(tiny_checkpoint)]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 1  # one scan failed, the others were written
    assert "2 done, 0 skipped, 1 failed" in result.stdout
    assert "no pixel data" in result.stdout and "error: 1 of 3 scans failed" in result.stderr
    # several inputs: each output sits where its scan sits below their common folder
    assert sorted(str(p.relative_to(out)) for p in out.glob("*/*")) == ["inputs/ct_x2", "nifti/MR_x2.nii.gz"]
    assert len(list((out / "inputs" / "ct_x2").glob("*.dcm"))) == 3
    again = runner.invoke(app, arguments)
    assert "0 done, 2 skipped, 1 failed" in again.stdout


def test_eight_bit_input_stays_eight_bit_without_clipping(tmp_path, tiny_checkpoint):
    """An 8-bit series (here the real CT re-stored in 8 bits) comes back in 8 bits, and the
    rescale widens so the enhanced values, overshoot included, are not clipped."""
    source = tmp_path / "ct8"
    source.mkdir()
    for path in sorted(CT_SERIES.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        hu = dataset.pixel_array.astype(np.float64) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        dataset.PixelData = np.clip(np.rint((hu + 1024) / 16), 0, 255).astype(np.uint8).tobytes()
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
        dataset.RescaleSlope, dataset.RescaleIntercept = 16, -1024
        dataset.save_as(source / path.name)
    weights = ["--weights", str(tiny_checkpoint)]
    result = runner.invoke(app, ["enhance", str(source), "-o", str(tmp_path / "out"), *weights])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["enhance", str(source), "-o", str(tmp_path / "e.nii.gz"), *weights])
    assert result.exit_code == 0, result.output
    written = [pydicom.dcmread(p) for p in _files(tmp_path / "out")]
    assert all(d.BitsAllocated == 8 and d.PixelRepresentation == 0 for d in written)
    slope = float(written[0].RescaleSlope)
    enhanced = nib.load(tmp_path / "e.nii.gz").get_fdata(dtype=np.float32)
    assert np.abs(read_scan(tmp_path / "out").array - enhanced).max() <= slope / 2 + 1e-3


def test_batch_names_never_collide(tmp_path, session_tiny_checkpoint):
    """Scans of the same name in different folders (a/x/scan, b/x/scan, c/x/scan) get outputs
    that mirror those folders: none is skipped as if done, none overwrites another."""
    from conftest import MR_NIFTI

    block = nib.load(MR_NIFTI).slicer[60:63, 40:72, 40:72]
    for patient in "abc":
        (tmp_path / "in" / patient / "x").mkdir(parents=True)
        nib.save(block, tmp_path / "in" / patient / "x" / "scan.nii.gz")
    result = runner.invoke(app, ["enhance", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                                 "--weights", str(session_tiny_checkpoint), "--degradation", "kspace"])
    assert result.exit_code == 0, result.output
    assert "3 done, 0 skipped, 0 failed" in result.stdout
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.nii.gz")) == [
        "a/x/scan_x2.nii.gz", "b/x/scan_x2.nii.gz", "c/x/scan_x2.nii.gz"]


def test_batch_names_stay_unique_for_a_file_and_a_series_of_one_name(tmp_path, session_tiny_checkpoint):
    """scan.nii.gz and a DICOM series folder scan/ in one folder, both written as NIfTI, and a
    linked input named after its link: no output is taken twice or named after a store."""
    from conftest import MR_NIFTI

    inputs = tmp_path / "in"
    (inputs / "scan").mkdir(parents=True)
    for path in CT_SERIES.glob("*.dcm"):
        shutil.copy(path, inputs / "scan" / path.name)
    nib.save(nib.load(MR_NIFTI).slicer[60:63, 40:72, 40:72], tmp_path / "store.nii.gz")
    (inputs / "scan.nii.gz").symlink_to(tmp_path / "store.nii.gz")
    result = runner.invoke(app, ["enhance", str(inputs), "-o", str(tmp_path / "out"), "--format", "nifti",
                                 "--weights", str(session_tiny_checkpoint), "--degradation", "kspace"])
    assert result.exit_code == 0, result.output
    assert "2 done, 0 skipped, 0 failed" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scan_2_x2.nii.gz", "scan_x2.nii.gz"]
