"""Write an enhanced volume as a new DICOM series joined to the original study.

MONAI cannot write DICOM series, so medsr derives each output object from its source header:
same SOP Class, study, patient, frame of reference and modality; new series and instance UIDs;
``DERIVED\\SECONDARY`` image type, a derivation description and references to the source
images; geometry on the grid that tiles the original pixels (the NIfTI rule of
:func:`medsr.geometry.rescaled_affine`); pixel data in the source's bits and signedness, with a
rescale chosen so the enhanced values (HU, MR units) fit without clipping.

Single-frame input gives one file per slice; multi-frame (Enhanced / Legacy Converted) input
gives one multi-frame object. :class:`DicomSeriesWriter` takes the slices as the enhancer
produces them, so memory holds one batch: single-frame files are written at once, multi-frame
pixel data goes to a scratch file and is joined to its header at the end. The series is
written into a temporary folder beside the destination and renamed into place only when
every file is complete.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import shutil
import struct
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
from medsr.reading import OpenScan, functional_group
from medsr.transforms import IntensityWindow
from medsr.writing import current_umask

logger = logging.getLogger(__name__)

SERIES_NUMBER_OFFSET = 1000
IS_MAX = 2**31 - 1
PIXEL_DATA = 0x7FE00010  # (7FE0,0010), the last element of an image


def stored_dtype(header: pydicom.Dataset) -> np.dtype:
    """The source's stored representation: 8 or 16 bits (wider sources get 16), its signedness."""
    signed = int(header.get("PixelRepresentation", 0)) == 1
    if int(header.get("BitsAllocated", 16)) == 8:
        return np.dtype(np.int8 if signed else np.uint8)
    return np.dtype(np.int16 if signed else np.uint16)


def stored_value_mapping(values: np.ndarray, dtype: np.dtype, slope: float, intercept: float) -> tuple[float, float]:
    """Rescale slope and intercept so ``values`` (one slice) fit stored pixels of ``dtype``
    without clipping.

    The source's own slope and intercept are kept whenever the values fit them (exact for CT,
    where slope 1 keeps whole HU); otherwise the slope grows just enough and the intercept
    moves so the slice's range fits. Rescale is per image (per frame for multi-frame), so only
    the slices that need it get a wider one.
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


def _window(dataset: pydicom.Dataset, window: IntensityWindow) -> None:
    """Keep the source window (same units) if it is valid; else show the robust percentile
    range the enhancer normalised with."""
    width = dataset.get("WindowWidth")
    widths = list(width) if isinstance(width, pydicom.multival.MultiValue) else [width]
    if dataset.get("WindowCenter") is not None and width is not None and all(
            w is not None and float(w) >= 1 for w in widths):
        return
    low, high = window.low, window.high
    dataset.WindowCenter, dataset.WindowWidth = _ds((low + high) / 2), _ds(max(high - low, 1.0))


def _set_pixel_data(dataset: pydicom.Dataset, stored: np.ndarray) -> None:
    # the VR is given, as the header may come from any transfer syntax
    dataset.add_new(PIXEL_DATA, "OB" if stored.dtype.itemsize == 1 else "OW", stored.tobytes())


def _source_reference(header: pydicom.Dataset, frame: int | None = None) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame + 1
    return item


class DicomSeriesWriter:
    """Write an enhanced volume as a new DICOM series, slice by slice, into ``folder``.

    Args:
        folder: the series folder to create (files ``IM0001.dcm``...).
        scan: the opened source DICOM scan (headers in slice order, or one multi-frame header).
        affine: RAS affine of the enhanced grid (slice axis 2).
        scale: in-plane factor, for the descriptions.
        description: DerivationDescription text.
        window: the intensity window the enhancer used (display window when the source's is
            missing or invalid).
        overwrite: replace an existing ``folder``.

    Example:
        >>> with DicomSeriesWriter(out, scan, enhanced_affine, 2, text, window) as writer:
        ...     for slab in slabs:  # (n, I', J') in original units, in slice order
        ...         writer.write(slab)

    Raises:
        OutputError: ``folder`` exists (without ``overwrite``) or its parent is missing.
    """

    def __init__(self, folder: str | Path, scan: OpenScan, affine: np.ndarray, scale: int,
                 description: str, window: IntensityWindow, overwrite: bool = False) -> None:
        if scan.source_format != "dicom" or scan.slice_axis != 2:
            raise OutputError("DICOM output needs DICOM input enhanced along its acquired slices")
        self.folder, self.scan, self.scale = Path(folder), scan, scale
        self.description, self.window = description, window
        _check_destination(self.folder, overwrite)
        self.now = datetime.datetime.now()
        self.series_uid = generate_uid()
        first = scan.dicom_headers[0]
        self.dtype = stored_dtype(first)
        slope = float(first.get("RescaleSlope", 1) or 1)
        intercept = float(first.get("RescaleIntercept", 0) or 0)
        if scan.multiframe:
            transform = functional_group(first, None, "PixelValueTransformationSequence")
            if transform is not None:
                slope = float(transform.get("RescaleSlope", slope) or slope)
                intercept = float(transform.get("RescaleIntercept", intercept) or intercept)
        self.source_mapping = (slope, intercept)
        self.spacing = _pixel_spacing(affine)
        # only the in-plane axes changed, so every slice origin moves by the same vector
        self.shift = (LPS_TO_RAS @ (affine[:, 3] - scan.affine[:, 3]))[:3]
        self.written, self.mappings = 0, []

    def __enter__(self) -> DicomSeriesWriter:
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", suffix=".tmp",
                                             dir=self.folder.parent))
        if self.scan.multiframe:
            self._frames = open(self.staging / "frames.raw", "wb")
        return self

    def write(self, slab: np.ndarray) -> None:
        """Store the next ``n`` enhanced slices, ``(n, I', J')`` in original units."""
        for plane in slab:
            mapping = stored_value_mapping(plane, self.dtype, *self.source_mapping)
            stored = _stored_pixels(plane.T, self.dtype, *mapping)
            if self.scan.multiframe:
                self._frames.write(stored.tobytes())
            else:
                self._write_image(self.written, stored, mapping)
            self.mappings.append(mapping)
            self.written += 1

    def _write_image(self, k: int, stored: np.ndarray, mapping: tuple[float, float]) -> None:
        header = self.scan.dicom_headers[k]
        dataset = _derive_common(header, self.series_uid, self.description, self.scale, self.now)
        dataset.SOPInstanceUID = generate_uid()
        _set_pixel_module(dataset, stored.shape[0], stored.shape[1], self.dtype)
        dataset.PixelSpacing = self.spacing
        dataset.ImagePositionPatient = _shifted(header.ImagePositionPatient, self.shift)
        dataset.RescaleSlope, dataset.RescaleIntercept = _ds(mapping[0]), _ds(mapping[1])
        if "RescaleType" not in dataset and self.scan.modality != "CT":
            dataset.RescaleType = "US"  # unspecified units: MR signal
        dataset.SourceImageSequence = Sequence([_source_reference(header)])
        _window(dataset, self.window)
        _set_pixel_data(dataset, stored)
        _file_meta(dataset)
        dataset.save_as(self.staging / f"IM{k + 1:04d}.dcm", enforce_file_format=True)

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            if self.scan.multiframe:
                self._frames.close()
            if kind is None:
                if self.written != self.scan.n_slices:
                    raise OutputError(f"{self.folder}: only {self.written} of {self.scan.n_slices} slices were written")
                if self.scan.multiframe:
                    self._write_multiframe()
                os.chmod(self.staging, 0o777 & ~current_umask())
                _move_into_place(self.staging, self.folder)
        finally:
            if self.staging.exists():
                shutil.rmtree(self.staging)
        return False

    def _write_multiframe(self) -> None:
        raw = self.staging / "frames.raw"
        dataset = _derive_multiframe(self.scan, self.written, self.shift, self.series_uid,
                                     self.description, self.scale, self.now, self.dtype,
                                     self.mappings, self.spacing, self.window)
        _file_meta(dataset)
        target = self.staging / "IM0001.dcm"
        dataset.save_as(target, enforce_file_format=True)
        # pixel data, the last element, is appended from the scratch file in chunks
        length = raw.stat().st_size
        with open(target, "ab") as out, open(raw, "rb") as frames:
            out.write(struct.pack("<HH2sHI", PIXEL_DATA >> 16, PIXEL_DATA & 0xFFFF,
                                  b"OB" if self.dtype.itemsize == 1 else b"OW", 0, length + length % 2))
            shutil.copyfileobj(frames, out, 16 * 2**20)
            if length % 2:
                out.write(b"\0")  # values have even length
        raw.unlink()


def _check_destination(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not overwrite:
        raise OutputError(f"{folder}: already exists; pass --overwrite to replace it")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder")
    if not folder.parent.is_dir():
        raise OutputError(f"{folder}: folder {folder.parent} does not exist; create it first")


def _move_into_place(staging: Path, folder: Path) -> None:
    if folder.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
        os.replace(folder, retired / folder.name)
        os.replace(staging, folder)
        shutil.rmtree(retired)
    else:
        os.replace(staging, folder)


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


def _derive_multiframe(scan, n_frames, shift, series_uid, description, scale, now, dtype,
                       mappings, spacing, window) -> pydicom.Dataset:
    """The multi-frame header (everything but the pixel data) for ``n_frames`` enhanced frames
    stored with the per-frame rescale ``mappings``."""
    header = scan.dicom_headers[0]
    dataset = _derive_common(header, series_uid, description, scale, now)
    for tag in [t for t in dataset.keys() if t >= PIXEL_DATA]:
        del dataset[tag]  # the pixel data goes last, appended by the writer
    dataset.SOPInstanceUID = generate_uid()
    columns, rows = (int(round(n * scale)) for n in scan.shape[:2])
    _set_pixel_module(dataset, rows, columns, dtype)
    dataset.NumberOfFrames = n_frames
    shared = dataset.get("SharedFunctionalGroupsSequence")
    per_frame_source = header.PerFrameFunctionalGroupsSequence
    one_mapping = len(set(mappings)) == 1
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
        if not one_mapping:  # some frames needed a wider rescale: every frame says its own
            transform = pydicom.Dataset()
            transform.RescaleSlope, transform.RescaleIntercept = _ds(mappings[k][0]), _ds(mappings[k][1])
            transform.RescaleType = "HU" if scan.modality == "CT" else "US"
            group.PixelValueTransformationSequence = Sequence([transform])
        frames.append(group)
    if not one_mapping:
        for groups in shared or []:
            if "PixelValueTransformationSequence" in groups:
                del groups.PixelValueTransformationSequence  # a macro is shared or per-frame
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            if keyword in dataset:
                delattr(dataset, keyword)
    dataset.PerFrameFunctionalGroupsSequence = Sequence(frames)
    # enhanced IODs: value 2 stays PRIMARY (SECONDARY is not an enumerated value there), the
    # frame types say DERIVED, and derived objects list their sources as evidence
    dataset.ImageType = ["DERIVED", "PRIMARY", *list(header.ImageType)[2:]]
    dataset.SourceImageEvidenceSequence = Sequence([_evidence(header)])
    slope, intercept = mappings[0]
    for groups in [*(shared or []), *frames]:
        for name in [k for k in groups.dir() if k.endswith("FrameTypeSequence")]:
            frame_type = list(groups.get(name)[0].FrameType)
            groups.get(name)[0].FrameType = ["DERIVED", *frame_type[1:]]
        if groups.get("FrameVOILUTSequence"):
            _window(groups.FrameVOILUTSequence[0], window)
        if groups.get("PixelMeasuresSequence"):
            groups.PixelMeasuresSequence[0].PixelSpacing = spacing
        if one_mapping and groups.get("PixelValueTransformationSequence"):
            groups.PixelValueTransformationSequence[0].RescaleSlope = _ds(slope)
            groups.PixelValueTransformationSequence[0].RescaleIntercept = _ds(intercept)
    if one_mapping and not functional_group(dataset, None, "PixelValueTransformationSequence"):
        dataset.RescaleSlope, dataset.RescaleIntercept = _ds(slope), _ds(intercept)
    return dataset
