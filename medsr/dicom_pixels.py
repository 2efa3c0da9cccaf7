"""How enhanced values become the stored pixels of a derived DICOM image.

The output keeps the source's representation: its bits (8 or 16; wider sources get 16) and
signedness, its photometric interpretation (MONOCHROME1 stays, values are not inverted), its
rescale wherever the values fit it (slope 1 keeps whole HU), else a wider rescale per image
(per frame for multi-frame) chosen so nothing clips; padding pixels are stored as the source's
PixelPaddingValue and no other pixel lands in the padding range. :class:`PixelEncoder` holds
these choices for one series; :mod:`medsr.dicom_writing` places and names the images.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword

from medsr.dicom_reading import functional_group, stored_padding
from medsr.reading import OpenScan

PIXEL_DATA = 0x7FE00010  # (7FE0,0010), the last element of an image


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


def stored_pixels(plane: np.ndarray, dtype: np.dtype, slope: float, intercept: float,
                   reserved: tuple[int, int] | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
    """Stored values of ``plane`` under a rescale: ``(plane - intercept) / slope`` rounded to
    the nearest integer (ties to even) and clipped to ``dtype``; a value that would land in the
    ``reserved`` range (the padding's) moves to the nearer stored value beside it, so data
    never reads as padding (at most one stored step more error, next to the padding value).

    The arithmetic runs in float64 (exact for float32 pixels less a whole intercept), in place
    in one buffer: faster than float32 with a float64 check of the values near a half step,
    which it replaced (0.7 against 1.0 ms per 512x512 plane, benchmarks/README.md).
    ``scratch``, a float64 array of ``plane``'s shape, is that buffer when given: a writer
    reuses one, as a fresh 2 MB buffer per image costs its page faults again (in the series
    writer, 2.0 ms per 512x512 image against 0.9 with one buffer).
    """
    info = np.iinfo(dtype)
    values = scratch if scratch is not None else np.empty(plane.shape, dtype=np.float64)  # C order
    np.subtract(plane, intercept, out=values, dtype=np.float64)  # float64 arithmetic, not float32's
    if slope != 1:
        values /= slope
    np.rint(values, out=values)
    np.clip(values, info.min, info.max, out=values)
    if reserved is not None:
        low, high = reserved
        inside = (values >= low) & (values <= high)
        if inside.any():
            if low - 1 < info.min:
                upward = True
            elif high + 1 > info.max:
                upward = False
            else:
                exact = (plane[inside].astype(np.float64) - intercept) / slope
                upward = exact - (low - 1) > (high + 1) - exact
            values[inside] = np.where(upward, high + 1, low - 1)
    return values.astype(dtype)


def output_padding(header: pydicom.Dataset, dtype: np.dtype) -> tuple[int, int | None] | None:
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


def _padding_attributes(dataset: pydicom.Dataset, padding: tuple[int, int | None] | None, dtype: np.dtype) -> None:
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


def photometric_of(scan: OpenScan) -> str:
    """The source's photometric interpretation: MONOCHROME1 stays (values are not inverted)."""
    return "MONOCHROME1" if scan.photometric == "MONOCHROME1" else "MONOCHROME2"


def _pixel_module(dataset: pydicom.Dataset, rows: int, columns: int, dtype: np.dtype,
                  photometric: str) -> None:
    """The Image Pixel module of a multi-frame object whose pixel data is appended later (so
    pydicom's ``set_pixel_data``, which takes the whole array, cannot set it)."""
    dataset.Rows, dataset.Columns = rows, columns
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    bits = dtype.itemsize * 8
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits, bits, bits - 1
    dataset.PixelRepresentation = 1 if dtype.kind == "i" else 0


def source_rescale(scan: OpenScan) -> tuple[float, float]:
    """The source's (RescaleSlope, RescaleIntercept), 1 and 0 where it has none: of its first
    image, or the shared Pixel Value Transformation of a multi-frame object. The output keeps
    it for every image whose values fit it."""
    first = scan.dicom_headers[0]
    slope = float(first.get("RescaleSlope", 1) or 1)
    intercept = float(first.get("RescaleIntercept", 0) or 0)
    if scan.multiframe:
        transform = functional_group(first, None, "PixelValueTransformationSequence")
        if transform is not None:
            slope = float(transform.get("RescaleSlope", slope) or slope)
            intercept = float(transform.get("RescaleIntercept", intercept) or intercept)
    return slope, intercept


def drop_shared_rescale(dataset: pydicom.Dataset) -> None:
    """Remove the rescale a multi-frame header says for all its frames (in its shared groups
    or its top level): each frame says its own instead, as a macro is shared or per-frame."""
    shared = dataset.get("SharedFunctionalGroupsSequence")
    for groups in shared or []:
        if "PixelValueTransformationSequence" in groups:
            del groups.PixelValueTransformationSequence
    for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
        if keyword in dataset:
            delattr(dataset, keyword)


def append_pixel_data(target: Path, raw: Path, dtype: np.dtype) -> None:
    """Append the stored frames in ``raw`` to the DICOM file ``target`` as its Pixel Data, the
    last element, in chunks (a whole series of frames need not fit in memory)."""
    length = raw.stat().st_size
    with open(target, "ab") as out, open(raw, "rb") as frames:
        out.write(struct.pack("<HH2sHI", PIXEL_DATA >> 16, PIXEL_DATA & 0xFFFF,
                              b"OB" if dtype.itemsize == 1 else b"OW", 0, length + length % 2))
        shutil.copyfileobj(frames, out, 16 * 2**20)
        if length % 2:
            out.write(b"\0")  # values have even length


class PixelEncoder:
    """How enhanced values become stored pixels: the source's bits and signedness
    (:func:`stored_dtype`) and photometric interpretation, a rescale per image that fits its
    values (:func:`stored_value_mapping`), and the source's padding value kept for padding."""

    def __init__(self, scan: OpenScan) -> None:
        first = scan.dicom_headers[0]
        self.dtype = stored_dtype(first)
        self.source_mapping = source_rescale(scan)
        self.photometric = photometric_of(scan)
        # padding: pixels equal to the scan's padding value (float32, as the slices hold it) are
        # stored as the source's PixelPaddingValue; no other pixel is stored in its range
        self.padding = output_padding(first, self.dtype) if scan.padding is not None else None
        self.padding_value = np.float32(scan.padding[0]) if self.padding is not None else None
        self.reserved = None
        if self.padding is not None:
            ends = [v for v in self.padding if v is not None]
            self.reserved = (min(ends), max(ends))
        self._scratch = None  # stored_pixels' float64 buffer, one for the whole series

    def encode(self, plane: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
        """The stored pixels (rows, columns) of one enhanced ``(I, J)`` plane, and the rescale
        (slope, intercept) they are stored with."""
        padded = plane == self.padding_value if self.padding is not None else None
        values = plane if padded is None else plane[~padded]
        mapping = stored_value_mapping(values, self.dtype, *self.source_mapping, self.reserved)
        if self._scratch is None or self._scratch.shape != plane.T.shape:
            self._scratch = np.empty(plane.T.shape, dtype=np.float64)
        stored = stored_pixels(plane.T, self.dtype, *mapping, self.reserved, self._scratch)
        if padded is not None:
            stored[padded.T] = self.padding[0]
        return stored, mapping

    def set_pixel_data(self, dataset: pydicom.Dataset, stored: np.ndarray) -> None:
        """A single-frame image's pixel data and Image Pixel module, and its padding."""
        dataset.set_pixel_data(stored, self.photometric, 8 * self.dtype.itemsize, generate_instance_uid=False)
        self.set_padding(dataset)

    def set_pixel_module(self, dataset: pydicom.Dataset, rows: int, columns: int) -> None:
        """The Image Pixel module of a multi-frame object whose pixel data is appended later."""
        _pixel_module(dataset, rows, columns, self.dtype, self.photometric)

    def set_padding(self, dataset: pydicom.Dataset) -> None:
        _padding_attributes(dataset, self.padding, self.dtype)
