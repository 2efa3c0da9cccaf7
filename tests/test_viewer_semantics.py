"""Issue #11: nothing a viewer or pipeline relies on changes silently.

Every case is a real scan or a variant derived from one (inverted to MONOCHROME1, re-encoded
big-endian, stripped of its patient geometry, given a Modality LUT or padding, doubled into two
echoes). The DICOM writer is fed the source upsampled by pixel repetition, so every value it
must keep is known exactly; the CLI runs where the user's path matters.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, generate_uid
from typer.testing import CliRunner

from medsr.cli import app
from medsr.dicom_writing import DicomSeriesWriter
from medsr.errors import ScanReadError
from medsr.geometry import LPS_TO_RAS, in_plane_factors, rescaled_affine
from medsr.reading import open_scan, read_scan
from medsr.transforms import IntensityCounts
from medsr.writing import MONOCHROME1_NOTE, NiftiSliceWriter, nifti_description, nifti_header

from conftest import (
    CT_SERIES,
    MR_MULTIFRAME,
    MR_NIFTI,
    MR_SERIES,
    NEEDS_DCIODVFY,
    new_dciodvfy_errors,
    pydicom_test_file,
)

runner = CliRunner()


def write_upsampled(source, folder, **open_options) -> np.ndarray:
    """Write ``source`` x2 in-plane by pixel repetition as a DICOM series; the volume written."""
    scan = open_scan(source, **open_options)
    volume = scan.load().array
    enhanced = np.repeat(np.repeat(volume, 2, axis=0), 2, axis=1)
    counts = IntensityCounts()
    counts.add(volume)
    affine = rescaled_affine(scan.affine, in_plane_factors(2, 2))
    with DicomSeriesWriter(folder, scan, affine, 2, "test", counts.window()) as writer:
        writer.write(np.moveaxis(enhanced, 2, 0))
    return enhanced


def files(folder):
    return sorted(folder.glob("*.dcm"))


def save(dataset: pydicom.Dataset, path):
    dataset.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------ 1. MONOCHROME1


def monochrome1_ct(path):
    """The real CT_small stored inverted (4095 - value, no rescale) and labelled MONOCHROME1:
    it displays like the original, bone white."""
    dataset = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    inverted = (4095 - dataset.pixel_array.astype(np.int32)).astype(np.int16)
    dataset.PixelData = inverted.tobytes()
    dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, 0
    dataset.WindowCenter, dataset.WindowWidth = 4095 - (40 + 1024), 400
    return save(dataset, path), inverted


def test_monochrome1_keeps_its_photometric_interpretation_and_value_sense(tmp_path):
    source, stored = monochrome1_ct(tmp_path / "m1.dcm")
    scan = open_scan(source)
    assert scan.photometric == "MONOCHROME1"
    np.testing.assert_array_equal(scan.load().array[:, :, 0], stored.T)  # never inverted
    enhanced = write_upsampled(source, tmp_path / "out")
    (written,) = [pydicom.dcmread(p) for p in files(tmp_path / "out")]
    assert written.PhotometricInterpretation == "MONOCHROME1"
    assert (written.WindowCenter, written.WindowWidth) == (4095 - 1064, 400)  # same display
    np.testing.assert_array_equal(read_scan(tmp_path / "out").array, enhanced)
    assert open_scan(MR_SERIES).photometric == "MONOCHROME2" and open_scan(MR_NIFTI).photometric is None


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix is not installed")
def test_dcm2niix_converts_monochrome1_without_inverting(tmp_path):
    """The evidence for NIfTI output of MONOCHROME1 input: dcm2niix keeps the values as stored
    (rescaled, not inverted) and says nothing, so medsr keeps them too and says so in descrip."""
    folder = tmp_path / "m1"
    folder.mkdir()
    source, stored = monochrome1_ct(folder / "m1.dcm")
    subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-o", str(tmp_path), "-f", "converted", str(folder)],
                   check=True, capture_output=True)
    converted = nib.load(tmp_path / "converted.nii").get_fdata()
    assert sorted(np.unique(converted)) == sorted(np.unique(stored))
    assert nifti_description("medsr x2", "MONOCHROME1").startswith(MONOCHROME1_NOTE)
    assert nifti_description("medsr x2", "MONOCHROME2") == "medsr x2"


# ------------------------------------------------------------------ 2. invented geometry


def geometry_less_ct(path, imager_spacing=True):
    """The real CT_small as a projection-style image: no position, orientation or PixelSpacing,
    only ImagerPixelSpacing (or nothing)."""
    dataset = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    spacing = list(dataset.PixelSpacing)
    for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        del dataset[keyword]
    if imager_spacing:
        dataset.ImagerPixelSpacing = spacing
    return save(dataset, path)


def test_assumed_geometry_stays_in_the_affine_and_out_of_every_header(tmp_path, caplog):
    source = geometry_less_ct(tmp_path / "dx.dcm")
    with caplog.at_level(logging.WARNING):
        scan = open_scan(source)
    assert "assumes an axial image, at the origin, ImagerPixelSpacing" in caplog.text
    assert scan.geometry_assumed and scan.xform_codes == (0, 0)
    np.testing.assert_allclose(scan.spacing[:2], [0.661468, 0.661468])
    header = scan.dicom_headers[0]  # the reader changed nothing
    assert "ImageOrientationPatient" not in header and "PixelSpacing" not in header
    write_upsampled(source, tmp_path / "out")
    (written,) = [pydicom.dcmread(p) for p in files(tmp_path / "out")]
    for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        assert keyword not in written, keyword
    assert [float(v) for v in written.ImagerPixelSpacing] == pytest.approx([0.661468 / 2] * 2)
    assert open_scan(CT_SERIES).xform_codes == (1, 1) and not open_scan(CT_SERIES).geometry_assumed


def test_every_spacing_the_source_had_is_scaled_and_no_other_is_added(tmp_path):
    dataset = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    dataset.ImagerPixelSpacing = [0.8, 0.7]  # beside PixelSpacing, as projection images have
    source = save(dataset, tmp_path / "ct.dcm")
    write_upsampled(source, tmp_path / "out")
    (written,) = [pydicom.dcmread(p) for p in files(tmp_path / "out")]
    assert [float(v) for v in written.PixelSpacing] == pytest.approx([0.661468 / 2] * 2)
    assert [float(v) for v in written.ImagerPixelSpacing] == pytest.approx([0.4, 0.35])
    write_upsampled(geometry_less_ct(tmp_path / "bare.dcm", imager_spacing=False), tmp_path / "bare")
    (bare,) = [pydicom.dcmread(p) for p in files(tmp_path / "bare")]
    assert "PixelSpacing" not in bare and "ImagerPixelSpacing" not in bare


# ------------------------------------------------------------------ 3. big-endian input


def big_endian_copy(source_folder, folder):
    """Every file of a real series re-encoded as Explicit VR Big Endian (pixels byte-swapped)."""
    folder.mkdir()
    for path in sorted(source_folder.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
        dataset.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        dataset.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
        dataset["PixelData"].VR = "OW"
        dcmwrite(folder / path.name, dataset, implicit_vr=False, little_endian=False, force_encoding=True)
        assert np.array_equal(pydicom.dcmread(folder / path.name).pixel_array, pixels)
    return folder


def test_big_endian_series_exports_as_little_endian_with_the_same_content(tmp_path, session_tiny_checkpoint):
    source = big_endian_copy(CT_SERIES, tmp_path / "big")
    weights = ["--weights", str(session_tiny_checkpoint)]
    for name, series in (("from_big", source), ("from_little", CT_SERIES)):
        result = runner.invoke(app, ["enhance", str(series), "-o", str(tmp_path / name)] + weights)
        assert result.exit_code == 0, result.output
    skipped = {"SOPInstanceUID", "SeriesInstanceUID", "MediaStorageSOPInstanceUID", "ContentTime",
               "InstanceCreationTime", "ContentDate", "InstanceCreationDate"}
    for big, little in zip(files(tmp_path / "from_big"), files(tmp_path / "from_little"), strict=True):
        big, little = pydicom.dcmread(big), pydicom.dcmread(little)
        assert big.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert {e.keyword: e.value for e in big if e.keyword not in skipped} == \
               {e.keyword: e.value for e in little if e.keyword not in skipped}
    np.testing.assert_array_equal(read_scan(tmp_path / "from_big").array, read_scan(tmp_path / "from_little").array)


def test_pydicoms_big_endian_mr_writes_the_same_values(tmp_path):
    big, little = pydicom_test_file("MR_small_bigendian.dcm"), pydicom_test_file("MR_small.dcm")
    np.testing.assert_array_equal(read_scan(big).array, read_scan(little).array)
    enhanced = write_upsampled(big, tmp_path / "out")
    np.testing.assert_array_equal(read_scan(tmp_path / "out").array, enhanced)


# ------------------------------------------------------------------ 4. NIfTI xform codes


def cropped_nifti(source, path):
    """A 16x16x3 block of a real NIfTI with its own qform and sform (and their codes), moved to
    the block's corner."""
    image = nib.load(source)
    corner = np.eye(4)
    corner[:3, 3] = [40, 50, 60]
    header = image.header.copy()
    header.set_qform(image.header.get_qform() @ corner, code=int(image.header["qform_code"]))
    header.set_sform(image.header.get_sform() @ corner, code=int(image.header["sform_code"]))
    block = np.asarray(image.dataobj[40:56, 50:66, 60:63], dtype=np.float32)
    header.set_data_dtype(np.float32)
    nib.save(nib.Nifti1Image(block, None, header=header), path)
    return path


def itk_world_lps(path, index):
    sitk = pytest.importorskip("SimpleITK")
    return np.array(sitk.ReadImage(str(path)).TransformIndexToPhysicalPoint([int(i) for i in index]))


def write_nifti(scan, path) -> nib.Nifti1Image:
    """``scan`` x2 in-plane by repetition through the streaming NIfTI writer, with its codes."""
    volume = scan.load().array
    axes = [a for a in range(3) if a != scan.slice_axis]
    for axis in axes:
        volume = np.repeat(volume, 2, axis=axis)
    affine = rescaled_affine(scan.affine, in_plane_factors(scan.slice_axis, 2))
    with NiftiSliceWriter(path, volume.shape, affine, "test", xform_codes=scan.xform_codes) as writer:
        writer.write(volume)
    return nib.load(path)


@pytest.mark.parametrize("name, codes", [("open_ms_mni/patient07/T1.nii.gz", (1, 0)),
                                         ("niivue_mr_gd/MR_Gd.nii.gz", (2, 2)),
                                         ("mricron_ch2_colin27/ch2.nii.gz", (0, 4))])
def test_nifti_keeps_its_xform_codes_and_lands_where_nibabel_and_itk_say(shared_scans, tmp_path, name, codes):
    source = cropped_nifti(shared_scans / "nifti" / name, tmp_path / "in.nii.gz")
    scan = open_scan(source)
    assert scan.xform_codes == codes
    written = write_nifti(scan, tmp_path / "out.nii.gz")
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == codes
    expected = rescaled_affine(scan.affine, in_plane_factors(scan.slice_axis, 2))
    np.testing.assert_allclose(written.affine, expected, atol=1e-4)
    for index in [(0, 0, 0), (31, 0, 2), (5, 17, 1)]:
        lps = (LPS_TO_RAS @ written.affine @ [*index, 1.0])[:3]
        np.testing.assert_allclose(itk_world_lps(tmp_path / "out.nii.gz", index), lps, atol=1e-3)


def test_sheared_affine_keeps_only_the_sform(tmp_path):
    """A gantry-tilt CT (the real series, slices shifted along the columns): no qform can hold
    the shear, so it is marked unknown instead of claiming scanner space tens of mm off; ITK,
    which cannot represent a shear, then refuses the file rather than misplacing it."""
    for k, path in enumerate(sorted(CT_SERIES.glob("*.dcm"))):
        dataset = pydicom.dcmread(path)
        moved = np.array(dataset.ImagePositionPatient, float) + [0, 20.0 * k, 0]
        dataset.ImagePositionPatient = [f"{v:.4f}" for v in moved]
        dataset.save_as(tmp_path / f"{k}.dcm")
    scan = open_scan(tmp_path)
    assert scan.xform_codes == (1, 1)
    written = write_nifti(scan, tmp_path / "tilt.nii.gz")
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (0, 1)
    np.testing.assert_allclose(written.affine, rescaled_affine(scan.affine, in_plane_factors(2, 2)), atol=1e-4)
    sitk = pytest.importorskip("SimpleITK")
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(tmp_path / "tilt.nii.gz"))
    upright = write_nifti(open_scan(CT_SERIES), tmp_path / "upright.nii.gz")
    assert (int(upright.header["qform_code"]), int(upright.header["sform_code"])) == (1, 1)


def test_nifti_whose_qform_and_sform_disagree_keeps_the_sform_code_only(tmp_path):
    image = nib.load(MR_NIFTI)
    moved = image.affine.copy()
    moved[:3, 3] += [30.0, 0, 0]  # the qform in another space, 30 mm away
    header = image.header.copy()
    header.set_qform(moved, code=1)
    header.set_sform(image.affine, code=2)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), None, header=header), tmp_path / "two.nii")
    assert open_scan(tmp_path / "two.nii").xform_codes == (0, 2)
    header = nifti_header((8, 8, 4), image.affine)
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)
    with pytest.raises(ValueError, match="0 to 5"):
        nifti_header((8, 8, 4), image.affine, xform_codes=(1, 7))


# ------------------------------------------------------------------ 7. echoes and phases


def two_echo_series(folder):
    """The real MR series twice in one series: the second copy as a later echo (EchoTime 80,
    EchoNumbers 2, half the signal), new SOPInstanceUIDs."""
    folder.mkdir()
    for path in sorted(MR_SERIES.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        del dataset[0x00000000:0x00010000]  # command-set elements these files carry
        save(dataset, folder / f"e1_{path.name}")
        dataset.EchoTime, dataset.EchoNumbers = "80.0", 2
        dataset.SOPInstanceUID = generate_uid()
        dataset.PixelData = (dataset.pixel_array // 2).astype(dataset.pixel_array.dtype).tobytes()
        save(dataset, folder / f"e2_{path.name}")
    return folder


def test_two_echoes_are_refused_with_the_attribute_and_one_is_selected(tmp_path):
    series = two_echo_series(tmp_path / "echoes")
    refusal = r"differ in EchoTime \(22.0000, 80.0\).*--select EchoTime=22.0000"
    with pytest.raises(ScanReadError, match=refusal) as caught:
        read_scan(series)
    assert "\n" not in str(caught.value)
    first, second = read_scan(series, select=("EchoTime", "22")), read_scan(series, select=("EchoTime", "80"))
    reference = read_scan(MR_SERIES)
    np.testing.assert_array_equal(first.array, reference.array)
    np.testing.assert_array_equal(second.array, np.floor(reference.array / 2))
    np.testing.assert_allclose(second.affine, reference.affine)
    assert read_scan(series, select=("EchoNumbers", "2")).array.shape == reference.array.shape
    with pytest.raises(ScanReadError, match=r"no image has EchoTime = 13.8; its images have EchoTime 22.0000, 80.0"):
        open_scan(series, select=("EchoTime", "13.8"))
    with pytest.raises(ScanReadError, match=r"'EchoTme' is not a DICOM attribute keyword"):
        open_scan(series, select=("EchoTme", "22"))
    with pytest.raises(ScanReadError, match="needs DICOM input"):
        open_scan(MR_NIFTI, select=("EchoTime", "22"))


def two_echo_multiframe(path):
    """The real multi-frame MR with every frame twice: the copies carry their own per-frame
    MR Echo macro (EffectiveEchoTime 80 against 22)."""
    dataset = pydicom.dcmread(MR_MULTIFRAME)
    pixels = dataset.pixel_array
    frames = list(dataset.PerFrameFunctionalGroupsSequence)
    doubled = []
    for echo_time in (22.0, 80.0):
        for group in frames:
            group = copy.deepcopy(group)
            echo = pydicom.Dataset()
            echo.EffectiveEchoTime = echo_time
            group.MREchoSequence = Sequence([echo])
            doubled.append(group)
    dataset.PerFrameFunctionalGroupsSequence = Sequence(doubled)
    dataset.NumberOfFrames = len(doubled)
    dataset.PixelData = np.concatenate([pixels, pixels // 2]).tobytes()
    return save(dataset, path)


def test_two_echoes_in_one_multiframe_object_are_refused_and_selected(tmp_path):
    source = two_echo_multiframe(tmp_path / "echoes.dcm")
    refusal = r"differ in EffectiveEchoTime \(22.0, 80.0\).*--select EffectiveEchoTime=22.0"
    with pytest.raises(ScanReadError, match=refusal):
        open_scan(source)
    reference = read_scan(MR_MULTIFRAME).array
    np.testing.assert_array_equal(read_scan(source, select=("EffectiveEchoTime", "80")).array, np.floor(reference / 2))
    # attributes in the shared and per-frame groups select too: one frame by its InstanceNumber
    one = read_scan(MR_MULTIFRAME, select=("InstanceNumber", "5")).array
    by_number = {int(pydicom.dcmread(p).InstanceNumber): p for p in MR_SERIES.glob("*.dcm")}
    np.testing.assert_array_equal(one, read_scan(by_number[5]).array)


# ------------------------------------------------------------------ 8. durable atomic writes


def test_atomic_output_syncs_file_then_renames_then_syncs_folder_and_never_touches_umask(
        tmp_path, monkeypatch, sync_events):
    from medsr import writing

    umask = os.umask(0o022)
    os.umask(umask)
    events = sync_events

    def no_umask(mask):
        raise AssertionError("the process umask must not be touched")

    monkeypatch.setattr(writing.os, "umask", no_umask)
    target = tmp_path / "config.yaml"
    with writing.atomic_output(target) as temporary:
        temporary.write_text("scale: 2\n")
    synced_file, renamed, synced_folder = events
    assert synced_file[0] == "fsync" and synced_file[1].startswith(str(tmp_path / ".config.yaml."))
    assert renamed == ("replace", str(target)) and synced_folder == ("fsync", str(tmp_path))
    assert target.read_text() == "scale: 2\n" and (target.stat().st_mode & 0o777) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_dicom_series_is_synced_before_and_after_its_rename_with_normal_permissions(tmp_path, monkeypatch):
    umask = os.umask(0o022)
    os.umask(umask)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("the process umask must not be touched"))
    write_upsampled(CT_SERIES, tmp_path / "out")
    staged = [p for p in synced if p.endswith(".dcm")]
    assert len(staged) == 3 and all("/.out." in p for p in staged)  # each file, before the rename
    assert synced[-1] == str(tmp_path)  # the rename itself
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in files(tmp_path / "out"))


# ------------------------------------------------------------------ 9. an empty output folder


def test_an_existing_empty_folder_receives_the_series(tmp_path, session_tiny_checkpoint):
    from medsr.errors import OutputError
    from medsr.writing import check_output_path

    empty = tmp_path / "made_first"
    empty.mkdir()
    check_output_path(empty, [CT_SERIES])
    (tmp_path / "x.nii.gz").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        check_output_path(tmp_path / "x.nii.gz", [CT_SERIES])
    result = runner.invoke(app, ["enhance", str(CT_SERIES), "-o", str(empty),
                                 "--weights", str(session_tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert len(files(empty)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made_first", "x.nii.gz"]  # no staging left
    result = runner.invoke(app, ["enhance", str(CT_SERIES), "-o", str(empty),
                                 "--weights", str(session_tiny_checkpoint)])
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.stderr


# ------------------------------------------------------------------ 10. Modality LUT, padding


def modality_lut_ct(path, first_mapped=0):
    """The real CT_small with its rescale replaced by a non-linear Modality LUT Sequence
    (16-bit entries, LUTData as OW, as scanners write it)."""
    dataset = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    lut = np.rint(64 * np.sqrt(np.arange(4096))).astype(np.uint16)
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, first_mapped, 16]
    item.ModalityLUTType = "US"
    item.add_new(0x00283006, "OW", lut.tobytes())
    dataset.ModalityLUTSequence = Sequence([item])
    del dataset.RescaleSlope, dataset.RescaleIntercept
    return save(dataset, path), lut


def test_modality_lut_sequence_is_applied_and_written_as_a_rescale(tmp_path):
    source, lut = modality_lut_ct(tmp_path / "lut.dcm")
    stored = pydicom.dcmread(source).pixel_array
    scan = read_scan(source)
    np.testing.assert_array_equal(scan.array[:, :, 0], lut[stored].T.astype(np.float32))
    enhanced = write_upsampled(source, tmp_path / "out")
    (written,) = [pydicom.dcmread(p) for p in files(tmp_path / "out")]
    assert "ModalityLUTSequence" not in written and "RescaleSlope" in written
    np.testing.assert_array_equal(read_scan(tmp_path / "out").array, enhanced)


def padded_ct(path, range_limit=None):
    """The real CT_small with every pixel outside a circle set to its PixelPaddingValue (-2000;
    with a range limit, to values spread over the padding range)."""
    dataset = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    pixels = dataset.pixel_array.copy()
    rows, columns = np.indices(pixels.shape)
    outside = np.hypot(rows - 63.5, columns - 63.5) > 60
    if range_limit is None:
        pixels[outside] = -2000
    else:
        dataset.add_new(0x00280121, "SS", range_limit)  # PixelPaddingRangeLimit
        pixels[outside] = np.linspace(-2000, range_limit, outside.sum()).astype(np.int16)
    dataset.PixelData = pixels.tobytes()
    return save(dataset, path), outside


def test_padding_is_reported_in_original_units_and_stays_padding(tmp_path):
    source, outside = padded_ct(tmp_path / "ct.dcm")
    scan = open_scan(source)
    assert scan.padding == (-3024.0, -3024.0)  # PixelPaddingValue -2000 through the rescale
    volume = scan.load().array[:, :, 0]
    np.testing.assert_array_equal(volume == -3024, outside.T)
    enhanced = np.repeat(np.repeat(volume, 2, axis=0), 2, axis=1)[:, :, None]
    near = np.zeros(enhanced.shape, bool)
    near[120:124, 0:4] = True  # data within half a HU of the padding value, above and below
    enhanced[120:122, 0:4], enhanced[122:124, 0:4] = -3023.8, -3024.3
    counts = IntensityCounts()
    counts.add(volume)
    affine = rescaled_affine(scan.affine, in_plane_factors(2, 2))
    with DicomSeriesWriter(tmp_path / "out", scan, affine, 2, "test", counts.window()) as writer:
        writer.write(np.moveaxis(enhanced, 2, 0))
    (written,) = [pydicom.dcmread(p) for p in files(tmp_path / "out")]
    assert written.PixelPaddingValue == -2000 and written["PixelPaddingValue"].VR == "SS"
    stored = written.pixel_array.T
    is_padding = enhanced[:, :, 0] == -3024
    np.testing.assert_array_equal(stored == -2000, is_padding)  # data beside it is not padding
    back = read_scan(tmp_path / "out")
    assert back.padding == scan.padding
    assert np.abs(back.array - enhanced)[near].max() < 1.0
    np.testing.assert_array_equal(back.array[~near], enhanced[~near])


def test_padding_range_and_a_signed_value_stored_as_us(tmp_path):
    source, outside = padded_ct(tmp_path / "range.dcm", range_limit=-1000)
    scan = open_scan(source)
    assert scan.padding == (-3024.0, -2024.0)
    enhanced = write_upsampled(source, tmp_path / "out")  # padding values other than the first
    (written,) = [pydicom.dcmread(p) for p in files(tmp_path / "out")]
    assert (written.PixelPaddingValue, written.PixelPaddingRangeLimit) == (-2000, -1000)
    stored = written.pixel_array.T
    np.testing.assert_array_equal(stored == -2000, enhanced[:, :, 0] == -3024)
    padding_elsewhere = (enhanced[:, :, 0] > -3024) & (enhanced[:, :, 0] <= -2024)
    assert padding_elsewhere.any() and ((stored[padding_elsewhere] < -2000) | (stored[padding_elsewhere] > -1000)).all()
    # a writer that stored the signed -2000 as US 63536 (as in the shared CT with gaps)
    dataset = pydicom.dcmread(source)
    del dataset.PixelPaddingRangeLimit
    dataset["PixelPaddingValue"].VR, dataset.PixelPaddingValue = "US", 63536
    assert open_scan(save(dataset, tmp_path / "us.dcm")).padding == (-3024.0, -3024.0)


def test_a_slice_with_a_wider_rescale_keeps_its_padding(tmp_path):
    """A slice whose values need a wider rescale keeps the stored padding value out of its data
    and reads back with its padding at the scan's padding value."""
    scan = open_scan(CT_SERIES)  # real padding: -2000 outside the field of view
    assert scan.padding == (-3024.0, -3024.0)
    volume = scan.load().array
    enhanced = np.repeat(np.repeat(volume, 2, axis=0), 2, axis=1)
    padding = enhanced == -3024
    enhanced[:, :, 1] = np.where(padding[:, :, 1], -3024, enhanced[:, :, 1] * 40)  # beyond int16
    counts = IntensityCounts()
    counts.add(volume)
    affine = rescaled_affine(scan.affine, in_plane_factors(2, 2))
    with DicomSeriesWriter(tmp_path / "out", scan, affine, 2, "test", counts.window()) as writer:
        writer.write(np.moveaxis(enhanced, 2, 0))
    written = [pydicom.dcmread(p) for p in files(tmp_path / "out")]
    assert [float(d.RescaleSlope) > 1 for d in written] == [False, True, False]
    for k, dataset in enumerate(written):
        np.testing.assert_array_equal(dataset.pixel_array.T == -2000, padding[:, :, k])
    back = read_scan(tmp_path / "out").array
    np.testing.assert_array_equal(back == -3024, padding)
    assert np.abs(back - enhanced).max() <= float(written[1].RescaleSlope) / 2 + 1e-3


@NEEDS_DCIODVFY
def test_kept_padding_and_monochrome1_add_no_conformance_errors(tmp_path):
    source, _ = padded_ct(tmp_path / "ct.dcm", range_limit=-1000)
    write_upsampled(source, tmp_path / "padded")
    assert not new_dciodvfy_errors(source, files(tmp_path / "padded")[0])
    source, _ = monochrome1_ct(tmp_path / "m1.dcm")
    write_upsampled(source, tmp_path / "m1")
    assert not new_dciodvfy_errors(source, files(tmp_path / "m1")[0])


@pytest.mark.parametrize("display_range", [(10.0, 400.0), None])
def test_nifti_display_range_comes_back_as_the_input_set_it(tmp_path, session_tiny_checkpoint, display_range):
    """cal_min/cal_max, the range NIfTI viewers open a volume with, are in the volume's units,
    which the output keeps: so it keeps them too, and leaves them unset when the input did."""
    image = nib.load(MR_NIFTI)
    block = [slice(40, 56)] * 3
    block[open_scan(MR_NIFTI).slice_axis] = slice(60, 63)  # 3 slices of 16x16
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    if display_range is not None:
        header["cal_min"], header["cal_max"] = display_range
    source = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj[tuple(block)], dtype=np.float32), image.affine, header), source)
    result = CliRunner().invoke(app, ["enhance", str(source), "-o", str(tmp_path / "out.nii.gz"),
                                      "--weights", str(session_tiny_checkpoint), "--degradation", "bicubic"])
    assert result.exit_code == 0, result.output
    header = nib.load(tmp_path / "out.nii.gz").header
    assert (float(header["cal_min"]), float(header["cal_max"])) == (display_range or (0.0, 0.0))
