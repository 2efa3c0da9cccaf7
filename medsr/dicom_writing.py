"""Write an enhanced volume as a new DICOM series joined to the original study.

MONAI cannot write DICOM series, so medsr derives each output object from its source header:
same SOP Class, study, patient, frame of reference and modality; new series and instance UIDs;
``DERIVED\\SECONDARY`` image type, a derivation description and references to the source
images; geometry on the grid that tiles the original pixels (the NIfTI rule of
:func:`medsr.geometry.rescaled_affine`); pixel data in the source's bits and signedness, with a
rescale chosen so the enhanced values (HU, MR units) fit without clipping.

Single-frame input gives one file per slice; multi-frame (Enhanced / Legacy Converted) input
gives one multi-frame object. The series is written into a temporary folder beside the
destination and renamed into place only when every file is complete.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medsr import __version__
from medsr.errors import OutputError
from medsr.geometry import LPS_TO_RAS
from medsr.reading import Scan, functional_group
from medsr.writing import current_umask

logger = logging.getLogger(__name__)

SERIES_NUMBER_OFFSET = 1000
IS_MAX = 2**31 - 1


def stored_dtype(header: pydicom.Dataset) -> np.dtype:
    """The source's stored representation: 8 or 16 bits (wider sources get 16), its signedness."""
    signed = int(header.get("PixelRepresentation", 0)) == 1
    if int(header.get("BitsAllocated", 16)) == 8:
        return np.dtype(np.int8 if signed else np.uint8)
    return np.dtype(np.int16 if signed else np.uint16)


def stored_value_mapping(values: np.ndarray, dtype: np.dtype, slope: float, intercept: float) -> tuple[float, float]:
    """Rescale slope and intercept so ``values`` fit stored pixels of ``dtype`` without clipping.

    The source's own slope and intercept are kept whenever the values fit them (exact for CT,
    where slope 1 keeps whole HU); otherwise the slope grows just enough and the intercept
    moves so the full range fits.
    """
    info = np.iinfo(dtype)
    low_limit, high_limit = int(info.min), int(info.max)
    low, high = float(values.min()), float(values.max())
    stored_low, stored_high = (low - intercept) / slope, (high - intercept) / slope
    if low_limit <= np.floor(stored_low) and np.ceil(stored_high) <= high_limit:
        return slope, intercept
    slope = max(slope, (high - low) / (high_limit - low_limit - 2))
    intercept = low - (low_limit + 1) * slope
    return slope, intercept


def _stored_pixels(plane: np.ndarray, dtype: np.dtype, slope: float, intercept: float) -> np.ndarray:
    stored = np.rint((plane.astype(np.float64) - intercept) / slope)
    info = np.iinfo(dtype)
    return np.clip(stored, info.min, info.max).astype(dtype)


def _pixel_spacing(affine: np.ndarray) -> list[str]:
    """PixelSpacing (between rows, between columns) of a (column, row, slice) affine."""
    col_spacing, row_spacing = np.linalg.norm(affine[:3, 0]), np.linalg.norm(affine[:3, 1])
    return [_ds(row_spacing), _ds(col_spacing)]


def _shifted(position, shift: np.ndarray) -> list[str]:
    """A source ImagePositionPatient moved in-plane onto the enhanced grid (LPS mm).

    Each slice keeps its own real position, so unevenly spaced or tilted series stay exact.
    """
    return [f"{v:.6f}" for v in np.asarray([float(x) for x in position]) + shift]


def _ds(value: float) -> str:
    """A DS string of at most 16 characters."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6e}"


def _derive_common(header: pydicom.Dataset, series_uid: str, description: str, scale: int,
                   now: datetime.datetime) -> pydicom.Dataset:
    dataset = copy.deepcopy(header)
    dataset.remove_private_tags()  # vendor data no longer describes these pixels
    for tag in [t for t in dataset.keys() if t.group in (0x0000, 0x0002)]:
        del dataset[tag]  # command-set and stray meta elements do not belong in a stored object
    dataset.SeriesInstanceUID = series_uid
    dataset.SeriesNumber = min(int(header.get("SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET, IS_MAX)
    original = str(header.get("SeriesDescription", "") or "")
    suffix = f" medsr SR x{scale}"
    dataset.SeriesDescription = (original[:64 - len(suffix)] + suffix).strip()
    image_type = list(header.get("ImageType", []) or [])
    dataset.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]] if len(image_type) > 2 else ["DERIVED", "SECONDARY"]
    dataset.DerivationDescription = description[:1024]
    dataset.ContentDate, dataset.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    dataset.InstanceCreationDate, dataset.InstanceCreationTime = dataset.ContentDate, dataset.ContentTime
    dataset.SoftwareVersions = f"medsr {__version__}"
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue",
                    "PixelPaddingRangeLimit", "IconImageSequence", "SmallestPixelValueInSeries",
                    "LargestPixelValueInSeries"):
        if keyword in dataset:
            del dataset[keyword]
    return dataset


def _set_pixel_module(dataset: pydicom.Dataset, rows: int, columns: int, dtype: np.dtype) -> None:
    dataset.Rows, dataset.Columns = rows, columns
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    bits = dtype.itemsize * 8
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits, bits, bits - 1
    dataset.PixelRepresentation = 1 if dtype.kind == "i" else 0


def _file_meta(dataset: pydicom.Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    dataset.file_meta = meta


def _window(dataset: pydicom.Dataset, values: np.ndarray) -> None:
    """Keep the source window (same units) if it is valid; else derive one from percentiles."""
    width = dataset.get("WindowWidth")
    widths = list(width) if isinstance(width, pydicom.multival.MultiValue) else [width]
    if dataset.get("WindowCenter") is not None and width is not None and all(
            w is not None and float(w) >= 1 for w in widths):
        return
    low, high = np.percentile(values, [1, 99])
    dataset.WindowCenter, dataset.WindowWidth = _ds((low + high) / 2), _ds(max(high - low, 1.0))


def _source_reference(header: pydicom.Dataset, frame: int | None = None) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame + 1
    return item


def derive_series(scan: Scan, array: np.ndarray, affine: np.ndarray, scale: int,
                  description: str) -> list[pydicom.Dataset]:
    """The DICOM objects of the enhanced series (not yet written).

    Args:
        scan: the source DICOM scan (headers in array order, or one multi-frame header).
        array: ``(I, J, K)`` enhanced volume in original units, slice axis 2.
        affine: its RAS affine.
        scale: in-plane factor, for the descriptions.
        description: DerivationDescription text.
    """
    if scan.source_format != "dicom" or scan.slice_axis != 2:
        raise OutputError("DICOM output needs DICOM input enhanced along its acquired slices")
    now = datetime.datetime.now()
    series_uid = generate_uid()
    first = scan.dicom_headers[0]
    dtype = stored_dtype(first)
    slope = float(first.get("RescaleSlope", 1) or 1)
    intercept = float(first.get("RescaleIntercept", 0) or 0)
    if scan.multiframe:
        transform = functional_group(first, None, "PixelValueTransformationSequence")
        if transform is not None:
            slope = float(transform.get("RescaleSlope", slope) or slope)
            intercept = float(transform.get("RescaleIntercept", intercept) or intercept)
    slope, intercept = stored_value_mapping(array, dtype, slope, intercept)
    spacing = _pixel_spacing(affine)
    # only the in-plane axes changed, so every slice origin moves by the same vector
    shift = (LPS_TO_RAS @ (affine[:, 3] - scan.affine[:, 3]))[:3]
    columns, rows = array.shape[0], array.shape[1]
    if scan.multiframe:
        return [_derive_multiframe(scan, array, shift, series_uid, description, scale, now,
                                   dtype, slope, intercept, spacing)]
    datasets = []
    for k, header in enumerate(scan.dicom_headers):
        dataset = _derive_common(header, series_uid, description, scale, now)
        dataset.SOPInstanceUID = generate_uid()
        _set_pixel_module(dataset, rows, columns, dtype)
        dataset.PixelSpacing = spacing
        dataset.ImagePositionPatient = _shifted(header.ImagePositionPatient, shift)
        dataset.RescaleSlope, dataset.RescaleIntercept = _ds(slope), _ds(intercept)
        if "RescaleType" not in dataset and scan.modality != "CT":
            dataset.RescaleType = "US"  # unspecified units: MR signal
        dataset.SourceImageSequence = Sequence([_source_reference(header)])
        _window(dataset, array[:, :, k])
        dataset.PixelData = _stored_pixels(array[:, :, k].T, dtype, slope, intercept).tobytes()
        _file_meta(dataset)
        datasets.append(dataset)
    return datasets


def _evidence(header: pydicom.Dataset) -> pydicom.Dataset:
    """A Hierarchical SOP Instance Reference item pointing at the source object."""
    sop = pydicom.Dataset()
    sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
    series = pydicom.Dataset()
    series.SeriesInstanceUID = header.SeriesInstanceUID
    series.ReferencedSOPSequence = Sequence([sop])
    study = pydicom.Dataset()
    study.StudyInstanceUID = header.StudyInstanceUID
    study.ReferencedSeriesSequence = Sequence([series])
    return study


def _derive_multiframe(scan, array, shift, series_uid, description, scale, now, dtype, slope,
                       intercept, spacing) -> pydicom.Dataset:
    header = scan.dicom_headers[0]
    dataset = _derive_common(header, series_uid, description, scale, now)
    dataset.SOPInstanceUID = generate_uid()
    _set_pixel_module(dataset, array.shape[1], array.shape[0], dtype)
    dataset.NumberOfFrames = array.shape[2]
    shared = dataset.get("SharedFunctionalGroupsSequence")
    per_frame_source = header.PerFrameFunctionalGroupsSequence
    frames = []
    for k, source_index in enumerate(scan.frame_order):
        group = copy.deepcopy(per_frame_source[source_index])
        source_position = functional_group(header, per_frame_source[source_index], "PlanePositionSequence")
        position = pydicom.Dataset()
        position.ImagePositionPatient = _shifted(source_position.ImagePositionPatient, shift)
        group.PlanePositionSequence = Sequence([position])
        derivation = pydicom.Dataset()
        derivation.DerivationDescription = description[:1024]
        derivation.SourceImageSequence = Sequence([_source_reference(header, source_index)])
        group.DerivationImageSequence = Sequence([derivation])
        frames.append(group)
    dataset.PerFrameFunctionalGroupsSequence = Sequence(frames)
    # enhanced IODs: value 2 stays PRIMARY (SECONDARY is not an enumerated value there), the
    # frame types say DERIVED, and derived objects list their sources as evidence
    dataset.ImageType = ["DERIVED", "PRIMARY", *list(header.ImageType)[2:]]
    dataset.SourceImageEvidenceSequence = Sequence([_evidence(header)])
    for groups in [*(shared or []), *frames]:
        for name in [k for k in groups.dir() if k.endswith("FrameTypeSequence")]:
            frame_type = list(groups.get(name)[0].FrameType)
            groups.get(name)[0].FrameType = ["DERIVED", *frame_type[1:]]
        if groups.get("FrameVOILUTSequence"):
            _window(groups.FrameVOILUTSequence[0], array)
        if groups.get("PixelMeasuresSequence"):
            groups.PixelMeasuresSequence[0].PixelSpacing = spacing
        if groups.get("PixelValueTransformationSequence"):
            groups.PixelValueTransformationSequence[0].RescaleSlope = _ds(slope)
            groups.PixelValueTransformationSequence[0].RescaleIntercept = _ds(intercept)
    if not functional_group(dataset, None, "PixelValueTransformationSequence"):
        dataset.RescaleSlope, dataset.RescaleIntercept = _ds(slope), _ds(intercept)
    frames_stored = np.stack([_stored_pixels(array[:, :, k].T, dtype, slope, intercept)
                              for k in range(array.shape[2])])
    dataset.PixelData = frames_stored.tobytes()
    _file_meta(dataset)
    return dataset


def write_dicom_series(folder: str | Path, datasets: list[pydicom.Dataset], overwrite: bool = False) -> Path:
    """Write ``datasets`` as files ``IM0001.dcm``... into a new ``folder``, atomically.

    Raises:
        OutputError: ``folder`` exists (without ``overwrite``) or its parent is missing.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise OutputError(f"{folder}: already exists; pass --overwrite to replace it")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder")
    if not folder.parent.is_dir():
        raise OutputError(f"{folder}: folder {folder.parent} does not exist; create it first")
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for index, dataset in enumerate(datasets, start=1):
            dataset.save_as(staging / f"IM{index:04d}.dcm", enforce_file_format=True)
        os.chmod(staging, 0o777 & ~current_umask())
        if folder.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, retired / folder.name)
            os.replace(staging, folder)
            shutil.rmtree(retired)
        else:
            os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder
