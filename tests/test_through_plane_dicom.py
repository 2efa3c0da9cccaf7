"""Through-plane DICOM output: thick slices made thin, written as a new series of the study.

The writer is fed each real scan made thin by linear interpolation between its slices (values
between the stored integers, so rounding is exercised), the same array medsr's NIfTI writer
receives; the output is checked with medsr's reader, dcm2niix, SimpleITK (GDCM) and dciodvfy.
One test runs a small random ThroughPlaneNet end to end.
"""

from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import UID

from medsr.dicom_writing import DicomSeriesWriter, ThinSliceSeriesWriter
from medsr.errors import OutputError
from medsr.geometry import LPS_TO_RAS, in_plane_factors, rescaled_affine
from medsr.reading import open_scan, read_scan
from medsr.transforms import IntensityCounts
from medsr.writing import NiftiSliceWriter

from conftest import (
    CT_SERIES,
    MR_MULTIFRAME,
    MR_SERIES,
    NEEDS_DCIODVFY,
    derivation_description,
    new_dciodvfy_errors,
    pydicom_test_file,
)

FACTOR = 4
SLAB = 7  # slices per write: slabs cross the boundaries between source slices


def thin_by_interpolation(volume: np.ndarray, factor: int) -> np.ndarray:
    """``(I, J, K)`` -> ``(I, J, K * factor)``: each thin slice linearly interpolated between the
    two source slices around its slice index ``k + (j - (factor - 1) / 2) / factor`` (the
    first and last slices held beyond the ends)."""
    index = np.clip((np.arange(volume.shape[2] * factor) + 0.5) / factor - 0.5, 0, volume.shape[2] - 1)
    below = np.minimum(np.floor(index).astype(int), volume.shape[2] - 2)
    weight = (index - below).astype(np.float32)
    return volume[:, :, below] * (1 - weight) + volume[:, :, below + 1] * weight


def write_thin(source, folder, factor: int = FACTOR, enhanced: np.ndarray | None = None, **writer_options):
    """Write ``source`` made thin (by interpolation, or ``enhanced``) as a DICOM series; returns
    the opened scan and the volume written."""
    scan = open_scan(source)
    volume = scan.load().array
    if enhanced is None:
        enhanced = thin_by_interpolation(volume, factor)
    counts = IntensityCounts()
    counts.add(volume)
    affine = rescaled_affine(scan.affine, (1, 1, factor))
    with ThinSliceSeriesWriter(folder, scan, affine, factor, f"medsr through-plane x{factor} (test)", counts.window(),
                               **writer_options) as writer:
        for start in range(0, enhanced.shape[2], SLAB):
            writer.write(np.moveaxis(enhanced[:, :, start:start + SLAB], 2, 0))
    return scan, enhanced


def files(folder):
    return sorted(folder.glob("*.dcm"))


def positions_along_normal(datasets) -> np.ndarray:
    orientation = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return np.array([np.array(d.ImagePositionPatient, dtype=float) @ normal for d in datasets])


def expected_thin_positions(positions: np.ndarray, factor: int) -> np.ndarray:
    """Thin slice j of slice k: its own position moved by ``(j - (factor - 1) / 2) / factor``
    of the step to the neighbour on its side (the only neighbour, at the ends)."""
    expected = []
    for k, position in enumerate(positions):
        for j in range(factor):
            offset = (j - (factor - 1) / 2) / factor
            upward = (offset > 0 or k == 0) and k < len(positions) - 1
            step = positions[k + 1] - position if upward else position - positions[k - 1]
            expected.append(position + offset * step)
    return np.array(expected)


def evenly_spaced_mr(folder):
    """The real MR series (gaps 6.96-7.07 mm) with every ImagePositionPatient moved onto its
    mean-step grid: a series that an affine describes exactly."""
    folder.mkdir()
    scan = open_scan(MR_SERIES)
    lps = LPS_TO_RAS @ scan.affine
    slice_index = {header.SOPInstanceUID: k for k, header in enumerate(scan.dicom_headers)}
    for path in sorted(MR_SERIES.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        del dataset[0x00000000:0x00010000]  # command-set elements these files carry
        k = slice_index[dataset.SOPInstanceUID]
        dataset.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, 3] + k * lps[:3, 2]]
        dataset.save_as(folder / path.name)
    return folder


@pytest.fixture(scope="module")
def thin(tmp_path_factory):
    """Each real DICOM sample made thin x4 and written as DICOM and, for the same volume, as
    the NIfTI medsr writes: {name: (source, DICOM folder, NIfTI, scan, enhanced)}."""
    root = tmp_path_factory.mktemp("thin")
    sources = {"ct": CT_SERIES, "mr": MR_SERIES, "multiframe": MR_MULTIFRAME,
               "mr_even": evenly_spaced_mr(root / "mr_even_source")}
    outputs = {}
    for name, source in sources.items():
        scan, enhanced = write_thin(source, root / name)
        nifti = root / f"{name}.nii"
        with NiftiSliceWriter(nifti, enhanced.shape, rescaled_affine(scan.affine, (1, 1, FACTOR)), "test") as writer:
            writer.write(enhanced)
        outputs[name] = (source, root / name, nifti, scan, enhanced)
    return outputs


def slope_of(folder) -> float:
    dataset = pydicom.dcmread(files(folder)[0])
    if "SharedFunctionalGroupsSequence" in dataset:
        return float(dataset.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleSlope)
    return float(dataset.get("RescaleSlope", 1) or 1)


def assert_values_kept(written: np.ndarray, enhanced: np.ndarray, padding: float, slope: float) -> None:
    """Half a stored step, but for data within it of the padding value, which moves one step
    aside so that it does not read as padding; padding stays padding."""
    error = np.abs(written - enhanced)
    beside_padding = (np.abs(enhanced - padding) <= slope / 2 + 1e-3) & (enhanced != padding)
    assert error[~beside_padding].max() <= slope / 2 + 1e-3
    assert error.max() < slope + 1e-3
    np.testing.assert_array_equal(written == np.float32(padding), enhanced == np.float32(padding))


# ----------------------------------------------------------------------------- the series


@pytest.mark.parametrize("name", ["ct", "mr", "multiframe"])
def test_thin_series_attributes_follow_the_source(thin, name):
    source, folder, _, scan, _ = thin[name]
    sources = [pydicom.dcmread(p) for p in ([source] if source.is_file() else files(source))]
    outputs = [pydicom.dcmread(p) for p in files(folder)]
    first = sources[0]
    source_uids = {d.SOPInstanceUID for d in sources}
    assert len({d.SeriesInstanceUID for d in outputs}) == 1
    assert outputs[0].SeriesInstanceUID != first.SeriesInstanceUID
    for dataset in outputs:
        assert UID(dataset.SOPInstanceUID).is_valid and dataset.SOPInstanceUID not in source_uids
        for keyword in ("SOPClassUID", "StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "Modality",
                        "Rows", "Columns", "BitsAllocated", "PixelRepresentation", "PhotometricInterpretation"):
            assert dataset.get(keyword) == first.get(keyword), keyword
        assert list(dataset.ImageType[:2]) == ["DERIVED", "PRIMARY" if name == "multiframe" else "SECONDARY"]
        assert dataset.SeriesDescription.endswith("medsr thin x4")
        assert derivation_description(dataset) == "medsr through-plane x4 (test)"
        assert dataset.SeriesNumber == int(first.SeriesNumber) + 1000
    if name == "multiframe":
        (dataset,) = outputs
        assert dataset.NumberOfFrames == FACTOR * first.NumberOfFrames
        measures = dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        assert float(measures.SliceThickness) == 5.0 / FACTOR
        source_measures = first.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        assert list(measures.PixelSpacing) == list(source_measures.PixelSpacing)
        groups = dataset.PerFrameFunctionalGroupsSequence
        own = [g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber for g in groups]
        assert own == [scan.frame_order[m // FACTOR] + 1 for m in range(len(groups))]
        referenced = {s.ReferencedSOPInstanceUID for g in groups
                      for s in g.DerivationImageSequence[0].SourceImageSequence}
        assert referenced == source_uids
        # the Dimension Index (the converted instances' numbers) counts the thin frames
        assert [g.FrameContentSequence[0].DimensionIndexValues for g in groups] == list(range(1, len(groups) + 1))
        numbers = [g.UnassignedPerFrameConvertedAttributesSequence[0].InstanceNumber for g in groups]
        assert numbers == list(range(1, len(groups) + 1))
        return
    assert len(outputs) == FACTOR * len(sources)
    by_position = sorted(outputs, key=lambda d: positions_along_normal([d])[0])
    sources_by_position = sorted(sources, key=lambda d: positions_along_normal([d])[0])
    for m, dataset in enumerate(by_position):
        source_slice = sources_by_position[m // FACTOR]
        assert dataset.SourceImageSequence[0].ReferencedSOPInstanceUID == source_slice.SOPInstanceUID
        assert len(dataset.SourceImageSequence) == (1 if m < FACTOR / 2 or m >= len(outputs) - FACTOR / 2 else 2)
        assert float(dataset.SliceThickness) == pytest.approx(float(source_slice.SliceThickness) / FACTOR)
        if "SpacingBetweenSlices" in source_slice:
            thin_spacing = float(source_slice.SpacingBetweenSlices) / FACTOR
            assert float(dataset.SpacingBetweenSlices) == pytest.approx(thin_spacing)
        assert list(dataset.PixelSpacing) == list(source_slice.PixelSpacing)
        assert list(dataset.ImageOrientationPatient) == list(source_slice.ImageOrientationPatient)
    # InstanceNumber 1..N, in the source's direction (the CT counts down along its positions)
    numbers = [int(d.InstanceNumber) for d in by_position]
    source_numbers = [int(d.InstanceNumber) for d in sources_by_position]
    ascending = source_numbers[0] < source_numbers[-1]
    assert numbers == list(range(1, len(outputs) + 1))[::1 if ascending else -1]
    # SliceLocation is placed between the source slices' own as the position is
    locations = [float(d.SliceLocation) for d in by_position]
    source_locations = np.array([float(d.SliceLocation) for d in sources_by_position])
    np.testing.assert_allclose(locations, expected_thin_positions(source_locations, FACTOR), atol=1e-4)


@pytest.mark.parametrize("name", ["ct", "mr_even"])
def test_round_trip_geometry_is_the_thin_grid(thin, name):
    _, folder, _, scan, enhanced = thin[name]
    written = read_scan(folder)
    np.testing.assert_allclose(written.affine, rescaled_affine(scan.affine, (1, 1, FACTOR)), atol=1e-3)
    assert written.array.shape == enhanced.shape


@pytest.mark.parametrize("name", ["ct", "mr", "mr_even", "multiframe"])
def test_round_trip_values_within_half_a_stored_step(thin, name):
    _, folder, _, scan, enhanced = thin[name]
    written = read_scan(files(folder)[0] if name == "multiframe" else folder)
    assert written.padding == scan.padding
    assert_values_kept(written.array, enhanced, scan.padding[0], slope_of(folder))


@pytest.mark.parametrize("name", ["mr", "multiframe"])
def test_unevenly_spaced_slices_keep_their_real_positions(thin, name):
    """The real MR (gaps 6.96-7.07 mm): each thin slice sits between its source slice's own
    position and its neighbour's, so the grid read back is the thin grid within the source's
    own unevenness (0.01-0.1 mm), not exactly."""
    source, folder, _, scan, _ = thin[name]
    if name == "multiframe":
        dataset = pydicom.dcmread(files(folder)[0])
        source_dataset = pydicom.dcmread(source)
        written = [g.PlanePositionSequence[0].ImagePositionPatient for g in dataset.PerFrameFunctionalGroupsSequence]
        per_frame = source_dataset.PerFrameFunctionalGroupsSequence
        source_positions = [per_frame[f].PlanePositionSequence[0].ImagePositionPatient
                            for f in scan.frame_order]
    else:
        written = [pydicom.dcmread(p).ImagePositionPatient for p in files(folder)]
        source_positions = [header.ImagePositionPatient for header in scan.dicom_headers]
    written, source_positions = np.array(written, dtype=float), np.array(source_positions, dtype=float)
    np.testing.assert_allclose(written, expected_thin_positions(source_positions, FACTOR), atol=1e-5)
    affine_positions = (LPS_TO_RAS @ scan.affine @ np.array([[0, 0, k, 1] for k in range(scan.n_slices)]).T)[:3].T
    unevenness = np.abs(source_positions - affine_positions).max()
    assert 0.01 < unevenness < 0.1
    read_back = read_scan(files(folder)[0] if name == "multiframe" else folder)
    np.testing.assert_allclose(read_back.affine, rescaled_affine(scan.affine, (1, 1, FACTOR)), atol=unevenness)


def test_ct_with_uneven_gaps_and_a_duplicate_slice_writes_ordered_thin_slices(shared_scans, tmp_path):
    """The shared CT with gaps of 7.5 to 115 mm and two images at one position: the duplicate
    is dropped as the reader drops it, and with factor 3 every source position is kept by
    the middle thin slice; thin slices stay in order, each inside its source slice's stretch
    (halfway to each neighbour), where a step to the next slice alone would have overlapped
    them (7.5 mm then 115 mm)."""
    source = shared_scans / "dicom" / "dicom_numpy_ct_irregular"
    scan, enhanced = write_thin(source, tmp_path / "out", factor=3)
    written = [pydicom.dcmread(p) for p in files(tmp_path / "out")]
    z_in = positions_along_normal(scan.dicom_headers)
    z_out = np.sort(positions_along_normal(written))
    assert len(written) == 3 * scan.n_slices == 30
    np.testing.assert_allclose(z_out[1::3], z_in, atol=1e-5)
    assert (np.diff(z_out) > 0).all()
    boundaries = np.concatenate([[-np.inf], (z_in[1:] + z_in[:-1]) / 2, [np.inf]])
    for m, z in enumerate(z_out):
        assert boundaries[m // 3] < z < boundaries[m // 3 + 1]
    back = read_scan(tmp_path / "out")
    assert_values_kept(back.array, enhanced, scan.padding[0], slope_of(tmp_path / "out"))


# ------------------------------------------------------------------------ other readers


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix is not installed")
@pytest.mark.parametrize("name, slice_tolerance", [("ct", 0.01), ("mr_even", 0.01), ("mr", 0.05)])
def test_dcm2niix_conversion_overlays_medsr_nifti(thin, name, slice_tolerance, tmp_path):
    _, folder, nifti, scan, _ = thin[name]
    result = subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-o", str(tmp_path), "-f", "converted", str(folder)],
                            check=True, capture_output=True, text=True)
    assert sorted(p.name for p in tmp_path.glob("*.nii")) == ["converted.nii"], result.stdout
    theirs = nib.as_closest_canonical(nib.load(tmp_path / "converted.nii"))
    ours = nib.as_closest_canonical(nib.load(nifti))
    assert theirs.shape == ours.shape == (*scan.shape[:2], FACTOR * scan.n_slices)
    np.testing.assert_allclose(theirs.affine[:, :2], ours.affine[:, :2], atol=1e-4)
    # the real MR's slices are unevenly spaced: dcm2niix takes its step from the first gap
    # (7.07 mm / 4), medsr's affine from the mean (7.00 / 4), and its first slice from the real
    # first position; within that spread
    np.testing.assert_allclose(theirs.affine[:, 2:], ours.affine[:, 2:], atol=slice_tolerance)
    ours_values, theirs_values = ours.get_fdata(), theirs.get_fdata()
    padding = scan.padding[0]
    beside_padding = (np.abs(ours_values - padding) <= 0.5) & (ours_values != padding)
    np.testing.assert_allclose(theirs_values[~beside_padding], ours_values[~beside_padding], atol=0.51)
    np.testing.assert_allclose(theirs_values, ours_values, atol=1.0)


@pytest.mark.parametrize("name", ["ct", "mr_even"])
def test_simpleitk_gdcm_reads_one_thin_series(thin, name):
    sitk = pytest.importorskip("SimpleITK")
    _, folder, _, scan, enhanced = thin[name]
    reader = sitk.ImageSeriesReader()
    assert len(reader.GetGDCMSeriesIDs(str(folder))) == 1
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    assert image.GetSize() == enhanced.shape
    affine = rescaled_affine(scan.affine, (1, 1, FACTOR))
    np.testing.assert_allclose(image.GetSpacing(), np.linalg.norm(affine[:3, :3], axis=0), rtol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), (LPS_TO_RAS @ affine)[:3, 3], atol=1e-3)
    values = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    assert_values_kept(values.astype(np.float32), enhanced, scan.padding[0], slope_of(folder))


@NEEDS_DCIODVFY
@pytest.mark.parametrize("name", ["ct", "mr", "multiframe"])
def test_dciodvfy_reports_no_new_errors(thin, name):
    """The first thin image (one source) and one between two sources: no error the source
    lacks, but for the sources' own invalid UIDs, which every derived image must reference."""
    source, folder, _, scan, _ = thin[name]
    source_files = [source] if source.is_file() else files(source)
    source_uids = {header.SOPInstanceUID for header in scan.dicom_headers}
    for derived in {files(folder)[0], files(folder)[len(files(folder)) // 2]}:
        errors = new_dciodvfy_errors(source_files[0], derived)
        assert not {e for e in errors if not any(f'"{uid}"' in e for uid in source_uids)}, derived.name


# --------------------------------------------------------------- what a viewer relies on


def test_empty_folder_accepted_existing_series_refused_and_nothing_left_behind(tmp_path):
    empty = tmp_path / "made_first"
    empty.mkdir()
    write_thin(CT_SERIES, empty, factor=2)
    assert len(files(empty)) == 6
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        write_thin(CT_SERIES, empty, factor=2)
    write_thin(CT_SERIES, empty, factor=3, overwrite=True)
    assert len(files(empty)) == 9
    scan = open_scan(CT_SERIES)
    affine = rescaled_affine(scan.affine, (1, 1, 2))
    window = IntensityCounts()
    window.add(scan.load().array)
    with pytest.raises(OutputError, match="only 4 of 6 slices were written"):
        with ThinSliceSeriesWriter(tmp_path / "short", scan, affine, 2, "test", window.window()) as writer:
            writer.write(np.zeros((4, 512, 512), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made_first"]


def test_bad_arguments_are_refused_with_the_rule(tmp_path):
    scan = open_scan(CT_SERIES)
    window = IntensityCounts()
    window.add(scan.load().array)
    thin_grid = rescaled_affine(scan.affine, (1, 1, 2))
    cases = [
        (dict(scan=scan, affine=rescaled_affine(scan.affine, in_plane_factors(2, 2)), factor=2),
         ValueError, r"affine must be the source grid divided by \(1, 1, 2\)"),
        (dict(scan=scan, affine=thin_grid, factor=1), ValueError, "2 or more, not 1"),
        (dict(scan=scan, affine=thin_grid, factor=2.0), ValueError, "whole number"),
        (dict(scan=open_scan(pydicom_test_file("CT_small.dcm")),
              affine=rescaled_affine(open_scan(pydicom_test_file("CT_small.dcm")).affine, (1, 1, 2)), factor=2),
         OutputError, "thin slices are placed between neighbouring source slices; this scan has one slice"),
    ]
    for arguments, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            ThinSliceSeriesWriter(tmp_path / "out", description="test", window=window.window(), **arguments)
        assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=r"divided by \(2, 2, 1\)"):
        DicomSeriesWriter(tmp_path / "out", scan, thin_grid, 2, "test", window.window())
    assert list(tmp_path.iterdir()) == []


def test_eight_bit_monochrome1_with_a_wider_slice_keeps_bits_photometric_and_padding(tmp_path):
    """The real CT re-stored in 8 bits (16 HU a step, padding 0) and labelled MONOCHROME1: thin
    slices stay 8-bit MONOCHROME1 with their values (never inverted), a slice whose values do
    not fit gets its own wider rescale, and padding stays padding."""
    source = tmp_path / "ct8"
    source.mkdir()
    for path in sorted(CT_SERIES.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        hu = dataset.pixel_array.astype(np.float64) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        stored = np.clip(np.rint((hu + 1024) / 16), 1, 255).astype(np.uint8)
        stored[dataset.pixel_array == dataset.PixelPaddingValue] = 0
        dataset.PixelData = stored.tobytes()
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
        dataset["PixelPaddingValue"].VR, dataset.PixelPaddingValue = "US", 0
        dataset.RescaleSlope, dataset.RescaleIntercept = 16, -1024
        dataset.PhotometricInterpretation = "MONOCHROME1"
        dataset.save_as(source / path.name)
    scan = open_scan(source)
    volume = scan.load().array
    padding = scan.padding[0]
    enhanced = thin_by_interpolation(volume, 2)
    thin_padding = thin_by_interpolation((volume == padding).astype(np.float32), 2) == 1
    enhanced[thin_padding] = padding
    enhanced[:, :, 3] = np.where(thin_padding[:, :, 3], padding, enhanced[:, :, 3] * 3)  # beyond 8 bits
    write_thin(source, tmp_path / "out", factor=2, enhanced=enhanced)
    written = [pydicom.dcmread(p) for p in files(tmp_path / "out")]
    assert all(d.BitsAllocated == 8 and d.PhotometricInterpretation == "MONOCHROME1" for d in written)
    assert all(d.PixelPaddingValue == 0 for d in written)
    slopes = [float(d.RescaleSlope) for d in written]
    assert slopes[3] > 16 and slopes.count(16.0) == 5
    back = read_scan(tmp_path / "out")
    for k, slope in enumerate(slopes):
        assert_values_kept(back.array[:, :, k], enhanced[:, :, k], padding, slope)


@pytest.mark.slow  # the shipped through-plane model on a real series: a whole-model check
def test_through_plane_model_output_is_stored_without_clipping(tmp_path):
    """A small random ThroughPlaneNet on the real MR, x4, written as DICOM: every enhanced value
    reads back within half a stored step (a slice whose overshoot does not fit gets its own
    rescale), on the thin grid."""
    from medsr.checkpoint import build_model
    from medsr.config import load_config
    from medsr.through_plane import enhance_through_plane

    torch.manual_seed(0)
    config = load_config(None, ["task=through_plane", "scale=4", "model.features=8", "model.num_res_blocks=1"])
    model = build_model(config)
    torch.nn.init.normal_(model.tail.conv.weight, std=1e-2)  # some random detail on the B-spline
    scan = open_scan(MR_SERIES)
    volume = scan.load().array
    counts = IntensityCounts()
    counts.add(volume)
    enhanced = enhance_through_plane(volume, scan.affine, 2, model, FACTOR, counts.window())
    np.testing.assert_allclose(enhanced.affine, rescaled_affine(scan.affine, (1, 1, FACTOR)))
    write_thin(MR_SERIES, tmp_path / "out", enhanced=enhanced.array)
    back = read_scan(tmp_path / "out")
    assert back.array.shape == (256, 256, 80)
    slopes = [float(pydicom.dcmread(p).RescaleSlope) for p in files(tmp_path / "out")]
    for k, slope in enumerate(slopes):
        assert_values_kept(back.array[:, :, k], enhanced.array[:, :, k], scan.padding[0], slope)
