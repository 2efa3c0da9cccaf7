"""Write an enhanced volume as a new DICOM series joined to the original study.

MONAI cannot write DICOM series, so medsr derives each output object from its source header:
same SOP Class, study, patient, frame of reference and modality; new series and instance UIDs;
``DERIVED\\SECONDARY`` image type, a derivation description and references to the source
images; geometry on the grid that tiles the original pixels (the NIfTI rule of
:func:`medsr.geometry.rescaled_affine`); pixel data in the source's bits and signedness, with a
rescale chosen so the enhanced values (HU, MR units) fit without clipping.

Nothing a viewer relies on changes silently: the photometric interpretation is the source's
(MONOCHROME1 stays MONOCHROME1, values not inverted); only geometry the source had is written
(a lone image without ImageOrientationPatient/ImagePositionPatient stays without them, and the
spacing attributes it had, PixelSpacing or ImagerPixelSpacing, are scaled to the finer matrix);
padding stays padding (pixels equal to the scan's padding value are stored as the source's
PixelPaddingValue, which the header keeps, and no other pixel is stored in the padding range).
Input in any transfer syntax, big-endian included, is written as Explicit VR Little Endian.

Single-frame input gives one file per slice; multi-frame (Enhanced / Legacy Converted) input
gives one multi-frame object. :class:`DicomSeriesWriter` takes the slices as the enhancer
produces them, so memory holds one batch: single-frame files are written at once, multi-frame
pixel data goes to a scratch file and is joined to its header at the end. The series is
written into a temporary folder beside the destination and renamed into place only when
every file is complete; files and folders are synced to disk before and after the rename.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medsr import __version__
from medsr.errors import OutputError
from medsr.geometry import LPS_TO_RAS
from medsr.reading import OpenScan, functional_group, stored_padding
from medsr.transforms import IntensityWindow
from medsr.writing import is_empty_folder, output_taken, staging_folder, sync_folder

logger = logging.getLogger(__name__)

SERIES_NUMBER_OFFSET = 1000
IS_MAX = 2**31 - 1
PIXEL_DATA = 0x7FE00010  # (7FE0,0010), the last element of an image
# pixel spacings of the image plane: whichever the source has is scaled to the finer matrix
# (DetectorElementSpacing describes the detector, not the image, and stays)
IMAGE_SPACINGS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")


def stored_dtype(header: pydicom.Dataset) -> np.dtype:
    """The source's stored representation: 8 or 16 bits (wider sources get 16), its signedness."""
    signed = int(header.get("PixelRepresentation", 0)) == 1
    if int(header.get("BitsAllocated", 16)) == 8:
        return np.dtype(np.int8 if signed else np.uint8)
    return np.dtype(np.int16 if signed else np.uint16)


def stored_value_mapping(values: np.ndarray, dtype: np.dtype, slope: float, intercept: float,
                         reserved: tuple[int, int] | None = None) -> tuple[float, float]:
    """Rescale slope and intercept so ``values`` (one slice, padding left out) fit stored
    pixels of ``dtype`` without clipping.

    The source's own slope and intercept are kept whenever the values fit them (exact for CT,
    where slope 1 keeps whole HU); otherwise the slope grows just enough and the intercept
    moves so the slice's range fits. Rescale is per image (per frame for multi-frame), so only
    the slices that need it get a wider one. A widened range avoids the ``reserved`` stored
    values (the padding range) by taking the larger side of the type beside them.
    """
    if values.size == 0:
        return slope, intercept
    info = np.iinfo(dtype)
    low_limit, high_limit = int(info.min), int(info.max)
    low, high = float(values.min()), float(values.max())
    stored_low, stored_high = (low - intercept) / slope, (high - intercept) / slope
    if low_limit <= np.floor(stored_low) and np.ceil(stored_high) <= high_limit:
        return slope, intercept
    if reserved is not None:
        below, above = (low_limit, reserved[0] - 1), (reserved[1] + 1, high_limit)
        low_limit, high_limit = above if above[1] - above[0] >= below[1] - below[0] else below
    slope = max(slope, (high - low) / (high_limit - low_limit - 2))
    intercept = low - (low_limit + 1) * slope
    return slope, intercept


def _stored_pixels(plane: np.ndarray, dtype: np.dtype, slope: float, intercept: float,
                   reserved: tuple[int, int] | None = None) -> np.ndarray:
    """Stored values of ``plane`` under a rescale; a value that would land in the ``reserved``
    range (the padding's) moves to the nearer stored value beside it, so data never reads as
    padding (at most one stored step more error, next to the padding value)."""
    exact = (plane.astype(np.float64) - intercept) / slope
    info = np.iinfo(dtype)
    stored = np.clip(np.rint(exact), info.min, info.max)
    if reserved is not None:
        low, high = reserved
        inside = (stored >= low) & (stored <= high)
        if inside.any():
            if low - 1 < info.min:
                upward = np.ones_like(inside)
            elif high + 1 > info.max:
                upward = np.zeros_like(inside)
            else:
                upward = exact - (low - 1) > (high + 1) - exact
            stored[inside] = np.where(upward, high + 1, low - 1)[inside]
    return stored.astype(dtype)


def _output_padding(header: pydicom.Dataset, dtype: np.dtype) -> tuple[int, int | None] | None:
    """The source's (PixelPaddingValue, PixelPaddingRangeLimit or None) for stored pixels of
    ``dtype``: kept when the type holds them, else moved to its nearest end (without a range)."""
    padding = stored_padding(header)
    if padding is None:
        return None
    info = np.iinfo(dtype)
    value, limit = padding
    fits = [info.min <= v <= info.max for v in (value, limit) if v is not None]
    if all(fits):
        return value, limit
    return int(np.clip(value, info.min, info.max)), None


def _set_padding(dataset: pydicom.Dataset, padding: tuple[int, int | None] | None, dtype: np.dtype) -> None:
    """PixelPaddingValue (and PixelPaddingRangeLimit) in the VR of the output's pixels."""
    for keyword in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
        if keyword in dataset:
            del dataset[keyword]
    if padding is None:
        return
    vr = "SS" if dtype.kind == "i" else "US"
    dataset.add_new(tag_for_keyword("PixelPaddingValue"), vr, padding[0])
    if padding[1] is not None:
        dataset.add_new(tag_for_keyword("PixelPaddingRangeLimit"), vr, padding[1])


def _scaled_spacing(value, scale: int) -> list[str]:
    """A source spacing (between rows, between columns; mm) for a matrix ``scale`` times finer."""
    return [_ds(float(v) / scale) for v in value]


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
    # stale pixel statistics and icon; a Modality LUT is replaced by the output's rescale
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "IconImageSequence",
                    "SmallestPixelValueInSeries", "LargestPixelValueInSeries", "ModalityLUTSequence"):
        if keyword in dataset:
            del dataset[keyword]
    return dataset


def _photometric(scan: OpenScan) -> str:
    """The source's photometric interpretation: MONOCHROME1 stays (values are not inverted)."""
    return "MONOCHROME1" if scan.photometric == "MONOCHROME1" else "MONOCHROME2"


def _set_pixel_module(dataset: pydicom.Dataset, rows: int, columns: int, dtype: np.dtype,
                      photometric: str) -> None:
    """The Image Pixel module of a multi-frame object whose pixel data is appended later (so
    pydicom's ``set_pixel_data``, which takes the whole array, cannot set it)."""
    dataset.Rows, dataset.Columns = rows, columns
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
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


def _save(dataset: pydicom.Dataset, target: Path) -> None:
    """Write ``dataset`` as a DICOM file, synced to disk. ``dcmwrite`` (unlike ``save_as``)
    re-encodes a header read from a big-endian file into the little-endian file meta."""
    with open(target, "wb") as file:
        pydicom.dcmwrite(file, dataset, enforce_file_format=True)
        file.flush()
        os.fsync(file.fileno())


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
        overwrite: replace an existing ``folder`` (an empty one is replaced without it).

    Example:
        >>> with DicomSeriesWriter(out, scan, enhanced_affine, 2, text, window) as writer:
        ...     for slab in slabs:  # (n, I', J') in original units, in slice order
        ...         writer.write(slab)

    Raises:
        OutputError: ``folder`` exists and is not empty (without ``overwrite``), or its parent
            is missing.
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
        self.photometric = _photometric(scan)
        # padding: pixels equal to the scan's padding value (float32, as the slices hold it) are
        # stored as the source's PixelPaddingValue; no other pixel is stored in its range
        self.padding = _output_padding(first, self.dtype) if scan.padding is not None else None
        self.padding_value = np.float32(scan.padding[0]) if self.padding is not None else None
        self.reserved = None
        if self.padding is not None:
            ends = [v for v in self.padding if v is not None]
            self.reserved = (min(ends), max(ends))
        self.spacing = _pixel_spacing(affine)
        # only the in-plane axes changed, so every slice origin moves by the same vector
        self.shift = (LPS_TO_RAS @ (affine[:, 3] - scan.affine[:, 3]))[:3]
        self.written, self.mappings = 0, []

    def __enter__(self) -> DicomSeriesWriter:
        self.staging = staging_folder(self.folder)
        if self.scan.multiframe:
            self._frames = open(self.staging / "frames.raw", "wb")
        return self

    def write(self, slab: np.ndarray) -> None:
        """Store the next ``n`` enhanced slices, ``(n, I', J')`` in original units."""
        for plane in slab:
            padded = plane == self.padding_value if self.padding is not None else None
            values = plane if padded is None else plane[~padded]
            mapping = stored_value_mapping(values, self.dtype, *self.source_mapping, self.reserved)
            stored = _stored_pixels(plane.T, self.dtype, *mapping, self.reserved)
            if padded is not None:
                stored[padded.T] = self.padding[0]
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
        # only the geometry the source had: an absent position or orientation stays absent
        for keyword in IMAGE_SPACINGS:
            if header.get(keyword):
                dataset[keyword].value = _scaled_spacing(header.get(keyword), self.scale)
        if header.get("ImagePositionPatient"):
            dataset.ImagePositionPatient = _shifted(header.ImagePositionPatient, self.shift)
        dataset.RescaleSlope, dataset.RescaleIntercept = _ds(mapping[0]), _ds(mapping[1])
        if "RescaleType" not in dataset and self.scan.modality != "CT":
            dataset.RescaleType = "US"  # unspecified units: MR signal
        dataset.SourceImageSequence = Sequence([_source_reference(header)])
        _window(dataset, self.window)
        _file_meta(dataset)
        dataset.set_pixel_data(stored, self.photometric, 8 * self.dtype.itemsize, generate_instance_uid=False)
        _set_padding(dataset, self.padding, self.dtype)
        _save(dataset, self.staging / f"IM{k + 1:04d}.dcm")

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            if self.scan.multiframe:
                self._frames.close()
            if kind is None:
                if self.written != self.scan.n_slices:
                    raise OutputError(f"{self.folder}: only {self.written} of {self.scan.n_slices} slices were written")
                if self.scan.multiframe:
                    self._write_multiframe()
                sync_folder(self.staging)
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
        _set_padding(dataset, self.padding, self.dtype)
        _file_meta(dataset)
        target = self.staging / "IM0001.dcm"
        _save(dataset, target)
        # pixel data, the last element, is appended from the scratch file in chunks
        length = raw.stat().st_size
        with open(target, "ab") as out, open(raw, "rb") as frames:
            out.write(struct.pack("<HH2sHI", PIXEL_DATA >> 16, PIXEL_DATA & 0xFFFF,
                                  b"OB" if self.dtype.itemsize == 1 else b"OW", 0, length + length % 2))
            shutil.copyfileobj(frames, out, 16 * 2**20)
            if length % 2:
                out.write(b"\0")  # values have even length
            out.flush()
            os.fsync(out.fileno())
        raw.unlink()


def _check_destination(folder: Path, overwrite: bool) -> None:
    if output_taken(folder) and not overwrite:
        raise OutputError(f"{folder}: already exists; pass --overwrite to replace it")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder")
    if not folder.parent.is_dir():
        raise OutputError(f"{folder}: folder {folder.parent} does not exist; create it first")


def _move_into_place(staging: Path, folder: Path) -> None:
    """Rename the complete series folder to ``folder``: in one step onto nothing or an empty
    folder; a previous output is first moved aside, then removed. The rename is synced."""
    if folder.exists() and not is_empty_folder(folder):
        retired = staging_folder(folder, ".old")
        os.replace(folder, retired / folder.name)
        os.replace(staging, folder)
        sync_folder(folder.parent)
        shutil.rmtree(retired)
    else:
        os.replace(staging, folder)
        sync_folder(folder.parent)


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
    _set_pixel_module(dataset, rows, columns, dtype, _photometric(scan))
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
