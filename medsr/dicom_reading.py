"""Open DICOM input (a series folder, or a single- or multi-frame file) as an
:class:`~medsr.scan_types.OpenScan`.

Kept apart from the NIfTI reader (:mod:`medsr.nifti_reading`): the two share nothing but the
types they return, and DICOM is most of the reading code (series, geometry, pixel decoding).
:func:`medsr.reading.open_scan` dispatches here for everything that is not named ``.nii`` /
``.nii.gz``; :func:`dicom_series_in_folder`, :func:`functional_group` and
:func:`stored_padding` are also used by the writers and the batch tools.

Stored values become original units through pydicom's ``apply_modality_lut`` (Rescale
Slope/Intercept or a Modality LUT Sequence; per frame for multi-frame objects). Padding
(PixelPaddingValue, PixelPaddingRangeLimit) is reported in original units in ``padding``.

Several images at one slice position are one volume only when they are exact repeats; echoes,
phases or b-values of one series are refused with a message that names the attribute telling
them apart, and ``select=(keyword, value)`` picks one of them.

MONAI's ``PydicomReader`` orders slices by InstanceNumber and does not cope with duplicate
positions, so the DICOM path here sorts by ImagePositionPatient projected on the slice normal.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import math
import os
import struct
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array as decode_pixels
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medsr.errors import ScanReadError
from medsr.geometry import LPS_TO_RAS, XFORM_TOLERANCE
from medsr.scan_types import NIFTI_SUFFIXES, SCANNER_XFORM_CODES, UNKNOWN_XFORM_CODES, OpenScan

# the readers log under one name, the one they had before they were split by format
logger = logging.getLogger("medsr.reading")

# Relative tolerance on slice gaps before the series counts as unevenly spaced.
GAP_TOLERANCE = 0.01
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # the Media Storage Directory (DICOMDIR) SOP class
# Attributes that tell apart images taken at one slice position (echoes, phases, b-values,
# repeated acquisitions, derived images); the per-frame ones are looked up in the functional
# groups of multi-frame objects.
SAME_POSITION_ATTRIBUTES = ("EchoTime", "EffectiveEchoTime", "EchoNumbers", "TemporalPositionIdentifier",
                            "TemporalPositionIndex", "TriggerTime", "NominalCardiacTriggerDelayTime",
                            "InversionTime", "DiffusionBValue", "AcquisitionNumber", "ImageType", "FrameType")
# uncompressed transfer syntaxes, whose pixels are plain bytes after the Pixel Data element's
# header: (implicit VR, NumPy byte order)
NATIVE_SYNTAXES = {ImplicitVRLittleEndian: (True, "<"), ExplicitVRLittleEndian: (False, "<"),
                   ExplicitVRBigEndian: (False, ">")}
# what pydicom's lazy parsing raises on damaged bytes (see _damaged)
_READ_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError,
                AttributeError, IndexError, OverflowError, MemoryError, NotImplementedError,
                struct.error, BytesLengthException)


def open_dicom(path: Path, series_uid: str | None, select: tuple[str, str] | None) -> OpenScan:
    """The DICOM series in folder ``path`` (the one with ``series_uid`` when it holds several),
    or the DICOM file ``path``; ``select`` (checked) keeps the images or frames with that value.

    Raises:
        ScanReadError: not DICOM, no usable image, several series without ``series_uid``,
            images at one position that differ, ``select`` matching nothing, or damaged data.
    """
    try:
        with _collector_paused():
            if path.is_dir():
                return _open_dicom_folder(path, series_uid, select)
            return _open_dicom_file(path, select)
    except _READ_ERRORS as exc:
        raise _damaged(path, exc) from None


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector paused (as the caller had it, after): the headers of
    a series are a few hundred thousand small objects that all stay, and each full collection
    their growth sets off walks every object of the process, which holds PyTorch and MONAI
    (open_scan of a 384-file series: 0.54 s with it, 0.30 s without). Headers hold no cycles, so
    nothing is left to collect later; reference counting frees everything else as before."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _damaged(path: Path, exc: BaseException) -> ScanReadError:
    # pydicom parses elements lazily, so damaged bytes surface as these anywhere in the
    # reader; they are a property of the file, not a bug, and become one clear error
    return ScanReadError(f"{path}: damaged DICOM data ({type(exc).__name__}: {exc})")


def try_dcmread(source: Path | BinaryIO, stop_before_pixels: bool = False) -> pydicom.Dataset | None:
    """Read a DICOM file (a path, or a file open for reading at its start), or None when it is
    not DICOM (license texts, junk).

    Files without the 128-byte preamble (older writers) are read with ``force=True`` and
    accepted only if they carry a SOPClassUID, so arbitrary bytes are not taken for DICOM.
    """
    try:
        return pydicom.dcmread(source, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass
    except _READ_ERRORS:
        return None
    try:
        if not isinstance(source, (str, Path)):
            source.seek(0)
        dataset = pydicom.dcmread(source, stop_before_pixels=stop_before_pixels, force=True)
        return dataset if "SOPClassUID" in dataset else None
    except _READ_ERRORS:
        return None


class _DicomFile(NamedTuple):
    """A DICOM file whose header was read: its path, the header without pixel data, and the
    offset of its Pixel Data element in the file when the transfer syntax is uncompressed
    (:data:`NATIVE_SYNTAXES`), so the pixels can be read from there without parsing the header
    again; else None."""

    path: Path
    header: pydicom.Dataset
    pixels_at: int | None


def _read_header(path: Path) -> _DicomFile | None:
    """The header of a DICOM file as :func:`try_dcmread` reads it without pixel data (None when
    it is not DICOM), and where the pixel data starts."""
    try:
        with open(path, "rb") as file:
            header = try_dcmread(file, stop_before_pixels=True)
            end_of_header = file.tell()  # at the pixel data element, if any (checked when read)
    except OSError:
        return None
    if header is None:
        return None
    syntax = getattr(header, "file_meta", pydicom.Dataset()).get("TransferSyntaxUID")
    native = isinstance(syntax, str) and syntax in NATIVE_SYNTAXES  # damaged files hold lists too
    return _DicomFile(path, header, end_of_header if native else None)


def _open_dicom_file(path: Path, select: tuple[str, str] | None) -> OpenScan:
    image = _read_header(path)
    if image is None:
        raise ScanReadError(f"{path}: not a DICOM file (and not .nii/.nii.gz)")
    if int(image.header.get("NumberOfFrames", 1) or 1) > 1:
        return _open_multiframe(image, path, select)
    return _open_slices([image], path, select)


def dicom_series_in_folder(folder: Path) -> dict[str, list[Path]]:
    """The DICOM files directly in ``folder``, grouped by SeriesInstanceUID ("unknown" when a
    file has none); other files (NIfTI, licence texts, junk) are left out."""
    return {uid: [member.path for member in members] for uid, members in _headers_by_series(folder).items()}


def _headers_by_series(folder: Path) -> dict[str, list[_DicomFile]]:
    """Every DICOM file directly in ``folder`` with its pixel-less header, by series."""
    by_series: dict[str, list[_DicomFile]] = defaultdict(list)
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        if file.name.lower().endswith(NIFTI_SUFFIXES):
            continue
        member = _read_header(file)
        if member is not None:
            by_series[str(member.header.get("SeriesInstanceUID", "unknown"))].append(member)
    return dict(by_series)


def _open_dicom_folder(folder: Path, series_uid: str | None, select: tuple[str, str] | None) -> OpenScan:
    by_series = _headers_by_series(folder)
    if not by_series:
        raise ScanReadError(f"{folder}: no DICOM files in this folder")
    if series_uid is not None:
        if series_uid not in by_series:
            raise ScanReadError(
                f"{folder}: no series with SeriesInstanceUID {series_uid}; "
                f"found {', '.join(sorted(by_series))}"
            )
        members = by_series[series_uid]
    elif len(by_series) > 1:
        listing = "; ".join(f"{uid} ({len(f)} files)" for uid, f in sorted(by_series.items()))
        raise ScanReadError(
            f"{folder}: holds {len(by_series)} DICOM series ({listing}); pick one with --series UID"
        )
    else:
        (members,) = by_series.values()
    images = [member for member in members if _is_image(member.header)]
    if len(images) < len(members):
        logger.warning("%s: skipped %d DICOM objects without pixel data", folder, len(members) - len(images))
    if not images:
        raise ScanReadError(f"{folder}: the DICOM series has no images (no pixel data)")
    if len(images) == 1 and int(images[0].header.get("NumberOfFrames", 1) or 1) > 1:
        return _open_multiframe(images[0], folder, select)
    return _open_slices(images, folder, select)


def _is_image(header: pydicom.Dataset) -> bool:
    """Headers are read without their pixel data, so an image is known by its matrix size
    (structure sets, reports and presentation states have none)."""
    return "Rows" in header and "Columns" in header


def _check_has_image(dataset: pydicom.Dataset, path: Path) -> None:
    if not _is_image(dataset):
        media_class = getattr(getattr(dataset, "file_meta", None), "MediaStorageSOPClassUID", None)
        if media_class == MEDIA_DIRECTORY or "DirectoryRecordSequence" in dataset:
            raise ScanReadError(f"{path}: a DICOMDIR (the index of the files on a disc), not an image; "
                                "pass the folder that holds the series")
        if "SOPClassUID" not in dataset and "Modality" not in dataset and media_class is None:
            # what a damaged file parses to: a DICM marker followed by nothing DICOM can name
            raise ScanReadError(f"{path}: not a readable DICOM object (no SOP class, no modality, no image "
                                "size); the file is damaged or is not DICOM")
        modality = dataset.get("Modality", "unknown modality")
        raise ScanReadError(f"{path}: DICOM object ({modality}) has no pixel data to enhance")
    if int(dataset.get("SamplesPerPixel", 1)) != 1:
        raise ScanReadError(
            f"{path}: colour DICOM ({dataset.get('PhotometricInterpretation')}) is not supported; "
            "medsr enhances greyscale scans"
        )


def _pixels(dataset: pydicom.Dataset, path: Path) -> np.ndarray:
    """Stored pixel values, decoding compressed transfer syntaxes through pydicom's plugins."""
    try:
        return dataset.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        reason = " ".join(str(exc).split())[:300]  # one line, bounded
        if syntax is not None and syntax.is_compressed:
            if importlib.util.find_spec("pylibjpeg") is None:
                hint = ("install the decoders with pip install 'medsr[codecs]' "
                        "(pylibjpeg with its openjpeg and libjpeg plugins)")
            else:
                hint = "the installed decoders failed; the file may be damaged or use a rare variant"
            raise ScanReadError(f"{path}: cannot decode {name} pixel data: {hint} ({reason})") from None
        raise ScanReadError(f"{path}: pixel data cannot be read ({reason})") from None


class _FrameDecoder:
    """Stored pixel values of one file, or of one frame of a multi-frame file, read on demand.

    Uncompressed pixels are read straight from the file, at the offset noted when its header was
    read (:class:`_DicomFile`), as pydicom would return them: its dtype and byte order, the bits
    above BitsStored cleared or sign-extended. That is 10x faster than pydicom's
    :func:`~pydicom.pixels.pixel_array` on the path, which parses the header again. Anything
    else (compressed, 8-bit big-endian, colour, unusual or inconsistent Image Pixel attributes,
    too little data) goes to ``pixel_array``, which reads only the elements before the pixel data
    and the requested frame (some scanners put thousands of elements after the pixels, which a
    full read would parse for every slice). Files it cannot take (no preamble, odd encodings)
    go through a full read, which also gives the clear decoder messages.
    """

    def __init__(self, image: _DicomFile, n_frames: int = 1) -> None:
        self.file, self.n_frames = image.path, n_frames
        self.shape = (int(image.header.Rows), int(image.header.Columns))
        self.layout = _native_layout(image, n_frames)
        self._all_frames: np.ndarray | None = None  # the full-read fallback, decoded once

    def __call__(self, frame: int | None = None) -> np.ndarray:
        try:
            if self._all_frames is None:
                stored = self._read_native(frame or 0) if self.layout is not None else None
                if stored is None:
                    try:
                        stored = decode_pixels(self.file, index=frame)
                    except Exception:  # anything pydicom's direct path rejects gets the full read
                        stored = self._full_read(frame)
            else:
                stored = self._all_frames[frame or 0]
        except _READ_ERRORS as exc:
            raise _damaged(self.file, exc) from None
        if stored.shape != self.shape:
            raise ScanReadError(f"{self.file}: pixel data of shape {stored.shape} does not match "
                                f"Rows x Columns {self.shape[0]}x{self.shape[1]}")
        return stored

    def _read_native(self, frame: int) -> np.ndarray | None:
        """Frame ``frame`` read straight from the file, or None where pydicom must decide: the
        element there is not Pixel Data (OB/OW) holding every frame, or the file ends early."""
        layout = self.layout
        with open(self.file, "rb") as file:
            file.seek(layout.element_at)
            start = file.read(8 if layout.implicit else 12)
            if len(start) != (8 if layout.implicit else 12):
                return None
            tag = struct.unpack(f"{layout.order}HH", start[:4])
            length = struct.unpack(f"{layout.order}L", start[-4:])[0]
            if (tag != (0x7FE0, 0x0010) or (not layout.implicit and start[4:6] not in (b"OB", b"OW"))
                    or length == 0xFFFFFFFF or length < self.n_frames * layout.frame_bytes):
                return None
            file.seek(frame * layout.frame_bytes, os.SEEK_CUR)
            count = layout.frame_bytes // layout.dtype.itemsize
            stored = np.fromfile(file, dtype=layout.dtype, count=count)
        if stored.size != count:
            return None
        if layout.unused_bits:  # as pydicom: shifted out and back, which sign-extends signed data
            np.left_shift(stored, layout.unused_bits, out=stored)
            np.right_shift(stored, layout.unused_bits, out=stored)
        return stored.reshape(self.shape)

    def _full_read(self, frame: int | None) -> np.ndarray:
        dataset = try_dcmread(self.file)
        if dataset is None or "PixelData" not in dataset:
            raise ScanReadError(f"{self.file}: pixel data cannot be read")
        frames = _pixels(dataset, self.file)
        if self.n_frames == 1:
            return frames
        frames = frames.reshape(-1, *self.shape)
        if len(frames) != self.n_frames:
            raise ScanReadError(f"{self.file}: {len(frames)} frames of pixel data, NumberOfFrames says {self.n_frames}")
        self._all_frames = frames
        return frames[frame]


class _NativeLayout(NamedTuple):
    """How a file's uncompressed pixels lie: the offset of its Pixel Data element, whether its
    header is implicit VR (8 bytes) or explicit (12), the byte order (``<`` or ``>``), the
    stored dtype (that byte order), the bytes of one frame and the bits above BitsStored."""

    element_at: int
    implicit: bool
    order: str
    dtype: np.dtype
    frame_bytes: int
    unused_bits: int


def _native_layout(image: _DicomFile, n_frames: int) -> _NativeLayout | None:
    """The layout of ``image``'s pixels when they can be read straight from its file and
    pydicom would return exactly those values: an uncompressed transfer syntax the header was
    read with, greyscale, 8/16/32 bits (8-bit big-endian excepted: pydicom swaps its byte
    pairs), Image Pixel attributes that pass pydicom's checks. None otherwise, for pydicom to
    decode (or refuse)."""
    header = image.header
    if image.pixels_at is None:
        return None
    implicit, order = NATIVE_SYNTAXES[header.file_meta.TransferSyntaxUID]
    if header.original_encoding != (implicit, order == "<"):
        return None  # the data is not encoded as its file meta says: pydicom's reading stands
    try:
        bits, stored_bits = int(header.BitsAllocated), int(header.BitsStored)
        signed, samples = int(header.PixelRepresentation), int(header.SamplesPerPixel)
        rows, columns = int(header.Rows), int(header.Columns)
        frames = header.get("NumberOfFrames", 1)
        photometric = str(header.PhotometricInterpretation).strip()
    except Exception:  # missing or damaged: pydicom's reading gives the error it always gave
        return None
    if (bits not in (8, 16, 32) or (bits == 8 and order == ">") or not 1 <= stored_bits <= bits
            or signed not in (0, 1) or samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2")
            or not (0 < rows < 2**16 and 0 < columns < 2**16) or frames != n_frames):
        return None
    dtype = np.dtype(f"{order}{'ui'[signed]}{bits // 8}")
    return _NativeLayout(image.pixels_at, implicit, order, dtype, rows * columns * dtype.itemsize, bits - stored_bits)


def _value_mapping(holder: pydicom.Dataset) -> Callable[[np.ndarray], np.ndarray]:
    """Stored values -> float32 original units, by pydicom's ``apply_modality_lut``: the
    holder's Modality LUT Sequence, else its Rescale Slope/Intercept (a missing one counts as 1
    or 0: pydicom would then apply nothing). ``holder`` is an image header or, for a frame of
    a multi-frame object, its Pixel Value Transformation item."""
    if holder.get("ModalityLUTSequence"):
        module = holder
    else:
        module = pydicom.Dataset()
        slope, intercept = holder.get("RescaleSlope"), holder.get("RescaleIntercept")
        module.RescaleSlope = slope if slope not in (None, "") else "1"
        module.RescaleIntercept = intercept if intercept not in (None, "") else "0"
        float(module.RescaleSlope), float(module.RescaleIntercept)  # damaged values fail here, not per slice

    def to_units(stored: np.ndarray) -> np.ndarray:
        return np.asarray(apply_modality_lut(stored, module), dtype=np.float32)

    return to_units


def stored_padding(header: pydicom.Dataset) -> tuple[int, int | None] | None:
    """``(PixelPaddingValue, PixelPaddingRangeLimit or None)`` of a header as stored values, or
    None without padding. Both are US or SS after PixelRepresentation; a signed value some
    writers store as US (63536 for -2000) is read back as signed. A padding value that no
    stored pixel can take (outside the range of BitsAllocated and PixelRepresentation) marks
    nothing, and counts as no padding."""
    value = header.get("PixelPaddingValue")
    if value in (None, ""):
        return None
    signed = int(header.get("PixelRepresentation", 0) or 0) == 1
    bits = int(header.get("BitsAllocated", 16) or 16)
    lowest, highest = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)

    def stored(number) -> int:
        number = int(number)
        return number - 2**16 if signed and number >= 2**15 else number

    limit = header.get("PixelPaddingRangeLimit")
    padding = stored(value), (stored(limit) if limit not in (None, "") else None)
    if not all(lowest <= end <= highest for end in padding if end is not None):
        logger.info("PixelPaddingValue %s is outside the stored values of %d-bit %s pixels; "
                    "no pixel is padding", padding, bits, "signed" if signed else "unsigned")
        return None
    return padding


def stored_padding_range(header: pydicom.Dataset) -> tuple[int, int] | None:
    """The inclusive range of stored values a header marks as padding, or None."""
    padding = stored_padding(header)
    if padding is None:
        return None
    value, limit = padding
    return (value, value) if limit is None else (min(value, limit), max(value, limit))


def _padding_in_units(stored_range: tuple[int, int] | None, to_units) -> tuple[float, float] | None:
    if stored_range is None:
        return None
    values = to_units(np.asarray(stored_range, dtype=np.int64))
    return float(values.min()), float(values.max())  # float32 values, as the slices hold them


def _to_units_keeping_padding(stored: np.ndarray, to_units, own_padding: tuple[int, int] | None,
                              padding: tuple[float, float] | None) -> np.ndarray:
    """Original units of one slice; its padding pixels (by its own header) that its own
    mapping puts outside the scan's ``padding`` range read as ``padding[0]``."""
    values = to_units(stored)
    if own_padding is not None and padding is not None:
        marked = (stored >= own_padding[0]) & (stored <= own_padding[1])
        values[marked & ((values < padding[0]) | (values > padding[1]))] = padding[0]
    return values


def _orientation(value, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if value is None or len(value) != 6:
        raise ScanReadError(f"{path}: ImageOrientationPatient is missing or malformed")
    cosines = np.asarray([float(v) for v in value], dtype=np.float64)
    row_dir, col_dir = cosines[:3], cosines[3:]
    if not (np.isclose(np.linalg.norm(row_dir), 1, atol=1e-3)
            and np.isclose(np.linalg.norm(col_dir), 1, atol=1e-3)):
        raise ScanReadError(f"{path}: ImageOrientationPatient {cosines.tolist()} is not unit length")
    return row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)


def _pixel_spacing(value, path: Path) -> tuple[float, float]:
    """(spacing between rows, spacing between columns) in mm."""
    if value is None or len(value) != 2 or min(float(v) for v in value) <= 0:
        raise ScanReadError(f"{path}: PixelSpacing is missing or not positive ({value})")
    return float(value[0]), float(value[1])


def _affine(row_dir, col_dir, row_spacing, col_spacing, origin, slice_step) -> np.ndarray:
    """RAS affine for axes (column index i, row index j, slice k) from LPS DICOM geometry."""
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # moving one column along the row direction
    lps[:3, 1] = col_dir * row_spacing  # moving one row along the column direction
    lps[:3, 2] = slice_step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def _slice_step(positions: np.ndarray, normal: np.ndarray, fallback: float, path: Path,
                pixel_size: float) -> np.ndarray:
    """Mean step between consecutive sorted slice positions (LPS mm), warning on uneven gaps
    and on a shear (gantry tilt) that moves the last slice in-plane by more than
    :data:`~medsr.geometry.XFORM_TOLERANCE` of a pixel (``pixel_size``, mm): below that,
    ImagePositionPatient's rounding alone leans a short series by a few hundredths of a degree."""
    if len(positions) < 2:
        return normal * fallback
    gaps = np.diff(positions @ normal)
    mean_step = (positions[-1] - positions[0]) / (len(positions) - 1)
    if np.ptp(gaps) > GAP_TOLERANCE * abs(np.mean(gaps)):
        logger.warning(
            "%s: slice gaps are uneven (%.3g to %.3g mm); the volume uses their mean, %.3g mm",
            path, gaps.min(), gaps.max(), np.mean(gaps),
        )
    along = np.dot(mean_step, normal)
    if np.linalg.norm(mean_step - along * normal) * (len(positions) - 1) > XFORM_TOLERANCE * pixel_size:
        logger.warning("%s: slices are sheared (gantry tilt); the affine keeps the tilt", path)
    return mean_step


def _value_text(value) -> str:
    """An attribute's value as DICOM writes it (several values joined by a backslash)."""
    if value is None or value == "":
        return "(none)"
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _sorted_values(values) -> list[str]:
    """Value texts in order, numbers by their value."""
    def key(text: str):
        try:
            return (0, float(text), text)
        except ValueError:
            return (1, 0.0, text)
    return sorted(set(values), key=key)


def _value_matches(value, text: str) -> bool:
    """Whether an attribute's value is ``text``; numbers compare with a relative tolerance."""
    if value is None or value == "":
        return False
    ours, theirs = _value_text(value).split("\\"), text.split("\\")
    if len(ours) != len(theirs):
        return False
    for mine, wanted in zip(ours, theirs, strict=True):
        try:
            if not math.isclose(float(mine), float(wanted), rel_tol=1e-4, abs_tol=1e-6):
                return False
        except ValueError:
            if mine.strip().upper() != wanted.strip().upper():
                return False
    return True


def _attribute(keyword: str, header: pydicom.Dataset, *functional_groups) -> object:
    """``keyword``'s value in an image header or, for a frame of a multi-frame object, in its
    functional groups first (per-frame, then shared: one level down, in the macro items)."""
    for groups in functional_groups:
        if groups is None:
            continue
        for element in groups:
            if element.VR == "SQ" and element.value and keyword in element.value[0]:
                return element.value[0].get(keyword)
    return header.get(keyword)


def _selected(items: list, attribute_of: Callable, select: tuple[str, str] | None, path: Path) -> list:
    """The items (images or frames) whose ``select[0]`` attribute has the value ``select[1]``."""
    if select is None:
        return items
    keyword, wanted = select
    chosen = [item for item in items if _value_matches(attribute_of(item, keyword), wanted)]
    if not chosen:
        found = _sorted_values(_value_text(attribute_of(item, keyword)) for item in items)
        raise ScanReadError(f"{path}: no image has {keyword} = {wanted}; its images have {keyword} "
                            f"{', '.join(found)}")
    return chosen


def _sort_and_deduplicate(items: list, positions: np.ndarray, normal: np.ndarray, path: Path,
                          attribute_of: Callable):
    """Sort items along the slice normal. Exact repeats of a position are dropped (first one
    wins, with a warning); images at one position that differ in an attribute of
    :data:`SAME_POSITION_ATTRIBUTES` (echoes, phases) are refused, naming the attribute."""
    order = np.argsort(positions @ normal, kind="stable")
    kept, kept_positions = [], []
    for index in order:
        position = positions[index]
        if kept_positions and np.allclose(position, kept_positions[-1], atol=1e-3):
            _refuse_distinct_images(kept[-1], items[index], items, attribute_of, path)
            logger.warning("%s: two slices at the same position %s; keeping the first",
                           path, np.round(position, 3).tolist())
            continue
        kept.append(items[index])
        kept_positions.append(position)
    return kept, np.asarray(kept_positions)


def _refuse_distinct_images(first, second, items: list, attribute_of: Callable, path: Path) -> None:
    for keyword in SAME_POSITION_ATTRIBUTES:
        if _value_text(attribute_of(first, keyword)) != _value_text(attribute_of(second, keyword)):
            values = _sorted_values(_value_text(attribute_of(item, keyword)) for item in items)
            raise ScanReadError(
                f"{path}: images at one slice position differ in {keyword} ({', '.join(values)}): "
                f"the series holds several echoes or phases; pick one with "
                f"--select {keyword}={values[0]}"
            )


def _lone_image_geometry(header: pydicom.Dataset, path: Path):
    """(orientation, position, pixel spacing, assumed) of a single image.

    A lone image without patient geometry (secondary capture, projection radiograph, old
    export) still enhances: the affine assumes an axial image at the origin and takes its
    spacing from ImagerPixelSpacing, else 1 mm, with a warning. The header is left as it is,
    so a writer never copies the assumption.
    """
    orientation = header.get("ImageOrientationPatient")
    position = header.get("ImagePositionPatient")
    spacing = header.get("PixelSpacing")
    missing, assumptions = [], []
    if not orientation:
        missing.append("ImageOrientationPatient")
        assumptions.append("an axial image")
        orientation = [1, 0, 0, 0, 1, 0]
    if not position:
        missing.append("ImagePositionPatient")
        assumptions.append("at the origin")
        position = [0, 0, 0]
    if not spacing:
        missing.append("PixelSpacing")
        spacing = header.get("ImagerPixelSpacing")
        assumptions.append("ImagerPixelSpacing as pixel spacing" if spacing else "1 mm pixels")
        spacing = spacing or [1, 1]
    if missing:
        logger.warning("%s: no %s; the volume assumes %s", path, ", ".join(missing), ", ".join(assumptions))
    return orientation, position, spacing, bool(missing)


def _open_slices(images: list[_DicomFile], path: Path, select: tuple[str, str] | None = None) -> OpenScan:
    """A series of single-frame images: checked, sorted along the normal."""
    for image in images:
        _check_has_image(image.header, path)

    def attribute_of(image, keyword):
        return _attribute(keyword, image.header)

    images = _selected(images, attribute_of, select, path)
    first = images[0].header
    if len(images) == 1:
        orientation, position, spacing, assumed = _lone_image_geometry(first, path)
        positions = [[float(v) for v in position]]
    else:
        orientation, spacing, assumed = first.get("ImageOrientationPatient"), first.get("PixelSpacing"), False
        positions = []
        for image in images:
            position = image.header.get("ImagePositionPatient")
            if position is None or len(position) != 3:
                raise ScanReadError(f"{path}: a slice has no ImagePositionPatient")
            positions.append([float(v) for v in position])
    row_dir, col_dir = _orientation(orientation, path)
    normal = np.cross(row_dir, col_dir)
    row_spacing, col_spacing = _pixel_spacing(spacing, path)
    rows, columns = int(first.Rows), int(first.Columns)
    for header in (image.header for image in images[1:]):
        if (int(header.Rows), int(header.Columns)) != (rows, columns):
            raise ScanReadError(f"{path}: slices differ in size; not one volume")
        other_row, other_col = _orientation(header.get("ImageOrientationPatient"), path)
        if not (np.allclose(other_row, row_dir, atol=1e-4) and np.allclose(other_col, col_dir, atol=1e-4)):
            raise ScanReadError(f"{path}: slices differ in orientation; not one volume")
    images, positions = _sort_and_deduplicate(images, np.asarray(positions), normal, path, attribute_of)
    first = images[0].header
    thickness = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    step = _slice_step(positions, normal, thickness, path, min(row_spacing, col_spacing))
    decoders = [_FrameDecoder(image) for image in images]
    headers = tuple(image.header for image in images)
    mappings = [_value_mapping(header) for header in headers]
    own_padding = [stored_padding_range(header) for header in headers]
    padding = _padding_in_units(own_padding[0], mappings[0])

    def read_plane(index: int) -> np.ndarray:
        return _to_units_keeping_padding(decoders[index](), mappings[index], own_padding[index], padding).T

    return OpenScan(
        shape=(columns, rows, len(images)),
        affine=_affine(row_dir, col_dir, row_spacing, col_spacing, positions[0], step),
        slice_axis=2,
        path=path,
        source_format="dicom",
        read_plane=read_plane,
        dicom_headers=headers,
        geometry_assumed=assumed,
        xform_codes=UNKNOWN_XFORM_CODES if assumed else SCANNER_XFORM_CODES,
        padding=padding,
    )


def functional_group(dataset: pydicom.Dataset, frame_group, sequence_name: str):
    """First item of a functional-group sequence of a multi-frame object: the frame's own
    (``frame_group``, may be None) if present, else the shared one; None if neither has it."""
    shared = dataset.get("SharedFunctionalGroupsSequence")
    for groups in (frame_group, shared[0] if shared else None):
        sequence = groups.get(sequence_name) if groups is not None else None
        if sequence:
            return sequence[0]
    return None


def _open_multiframe(image: _DicomFile, path: Path, select: tuple[str, str] | None = None) -> OpenScan:
    """Enhanced (multi-frame) MR/CT: geometry and rescale from the functional groups."""
    dataset = image.header
    _check_has_image(dataset, path)
    n_frames = int(dataset.NumberOfFrames)
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != n_frames:
        raise ScanReadError(
            f"{path}: multi-frame DICOM without per-frame functional groups; "
            "medsr needs the position of every frame"
        )
    shared = dataset.get("SharedFunctionalGroupsSequence")
    shared_groups = shared[0] if shared else None

    def attribute_of(frame: int, keyword: str):
        return _attribute(keyword, dataset, per_frame[frame], shared_groups)

    frames = _selected(list(range(n_frames)), attribute_of, select, path)
    positions, mappings = [], {}
    orientation = spacing = None
    for index in frames:
        group = per_frame[index]
        plane_position = functional_group(dataset, group, "PlanePositionSequence")
        plane_orientation = functional_group(dataset, group, "PlaneOrientationSequence")
        measures = functional_group(dataset, group, "PixelMeasuresSequence")
        if plane_position is None or plane_orientation is None or measures is None:
            raise ScanReadError(f"{path}: frame {index + 1} lacks plane position, orientation or spacing")
        frame_orientation = _orientation(plane_orientation.get("ImageOrientationPatient"), path)
        frame_spacing = _pixel_spacing(measures.get("PixelSpacing"), path)
        if orientation is None:
            orientation, spacing = frame_orientation, frame_spacing
            thickness = float(measures.get("SpacingBetweenSlices") or measures.get("SliceThickness") or 1.0)
        elif not (np.allclose(frame_orientation[0], orientation[0], atol=1e-4)
                  and np.allclose(frame_orientation[1], orientation[1], atol=1e-4)):
            raise ScanReadError(f"{path}: frames differ in orientation; not one volume")
        positions.append([float(v) for v in plane_position.ImagePositionPatient])
        transform = functional_group(dataset, group, "PixelValueTransformationSequence")
        mappings[index] = _value_mapping(transform if transform is not None else dataset)
    row_dir, col_dir = orientation
    normal = np.cross(row_dir, col_dir)
    order, positions = _sort_and_deduplicate(frames, np.asarray(positions), normal, path, attribute_of)
    step = _slice_step(positions, normal, thickness, path, min(spacing))
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    decoder = _FrameDecoder(image, n_frames)
    own_padding = stored_padding_range(dataset)
    padding = _padding_in_units(own_padding, mappings[order[0]])

    def read_plane(index: int) -> np.ndarray:
        frame = order[index]
        return _to_units_keeping_padding(decoder(frame), mappings[frame], own_padding, padding).T

    return OpenScan(
        shape=(columns, rows, len(order)),
        affine=_affine(row_dir, col_dir, spacing[0], spacing[1], positions[0], step),
        slice_axis=2,
        path=path,
        source_format="dicom",
        read_plane=read_plane,
        dicom_headers=(dataset,),
        multiframe=True,
        frame_order=tuple(order),
        padding=padding,
    )
