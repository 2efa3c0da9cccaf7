"""Read a scan (DICOM series folder, single- or multi-frame DICOM file, NIfTI) into one type.

Contract: :func:`read_scan` returns a :class:`Scan` whose ``array`` is a float32 ``(I, J, K)``
volume in original units (DICOM RescaleSlope/Intercept applied, so CT is in HU) and whose
``affine`` maps voxel indices to RAS+ millimetres (the nibabel convention). For DICOM the axes
are ``(column, row, slice)``: ``I`` runs along the image rows (ImageOrientationPatient[:3]),
``J`` down the columns, ``K`` through the slices sorted along the slice normal. ``slice_axis`` is
the axis of acquired slices (2 for DICOM). ``dicom_headers`` keeps one header per slice, in
array order and without pixel data, so a writer can derive a new series from them. The reader
never changes those headers: what it has to assume (the geometry of a lone image without
patient coordinates) lives in the affine and in ``geometry_assumed`` only, so no writer copies
an assumption into a clinical header.

:func:`open_scan` reads only headers and returns an :class:`OpenScan` whose slices are decoded
one at a time on demand, so a long series can be enhanced with memory bounded by the batch;
:func:`read_scan` is ``open_scan(...).load()``.

This module is the entry point: it tells the formats apart by name and hands over to the
DICOM reader (:mod:`medsr.dicom_reading`: modality LUT, padding, images at one position, slice
order) or the NIfTI reader (:mod:`medsr.nifti_reading`). The types they return are defined in
:mod:`medsr.scan_types`, so the readers build them without importing this module; callers
import them from here.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.datadict import tag_for_keyword

from medsr.dicom_reading import dicom_series_in_folder, open_dicom
from medsr.errors import ScanReadError
from medsr.nifti_reading import open_nifti
from medsr.scan_types import (
    NIFTI_SUFFIXES,
    SCANNER_XFORM_CODES,
    OpenScan,
    Scan,
    plane_of,
    planes_from_whole,
    refuse_non_finite,
)

# what callers import from here; the format-specific rest is imported from its reader
__all__ = ["NIFTI_SUFFIXES", "SCANNER_XFORM_CODES", "OpenScan", "Scan", "dicom_series_in_folder", "open_scan",
           "plane_of", "planes_from_whole", "read_scan", "refuse_non_finite"]


def read_scan(path: str | Path, series_uid: str | None = None,
              select: tuple[str, str] | None = None) -> Scan:
    """Read a DICOM series folder, a DICOM file or a NIfTI file, every voxel at once.

    Args:
        path: a folder holding one DICOM series, a single DICOM file, or a ``.nii``/``.nii.gz``.
        series_uid: SeriesInstanceUID to pick when a folder holds several series.
        select: ``(keyword, value)``: keep only the DICOM images (frames) whose attribute
            ``keyword`` has that value, e.g. ``("EchoTime", "13.8")`` for one echo of a
            multi-echo series. Numbers compare with a relative tolerance of 1e-4; several
            values are written as DICOM writes them, ``"ORIGINAL\\PRIMARY\\M"``.

    Returns:
        The :class:`Scan`, in original units, with a RAS+ affine.

    Raises:
        ScanReadError: the path is missing, not a readable scan, or holds no usable image.
    """
    return open_scan(path, series_uid, select).load()


def open_scan(path: str | Path, series_uid: str | None = None,
              select: tuple[str, str] | None = None) -> OpenScan:
    """Read the headers of a scan (as :func:`read_scan` takes it) and check its geometry; the
    voxels are read later, slice by slice, through :attr:`OpenScan.read_plane`.

    Raises:
        ScanReadError: the path is missing, not a readable scan, holds no usable image, holds
            several images per slice position that differ (echoes, phases: pick one with
            ``select``), or ``select`` matches nothing.
    """
    path = Path(path)
    if not path.exists():
        raise ScanReadError(f"{path}: no such file or folder")
    if select is not None:
        select = _checked_select(select)
    if path.name.lower().endswith(NIFTI_SUFFIXES) and path.is_file():
        if select is not None:
            raise ScanReadError(f"{path}: selecting images by {select[0]} needs DICOM input, not NIfTI")
        return open_nifti(path)
    return open_dicom(path, series_uid, select)


def _checked_select(select) -> tuple[str, str]:
    if not (isinstance(select, (tuple, list)) and len(select) == 2 and all(isinstance(v, str) for v in select)):
        raise ScanReadError(f"select must be a (keyword, value) pair of strings, not {select!r}")
    keyword, value = select
    if tag_for_keyword(keyword) is None:
        raise ScanReadError(f"select: {keyword!r} is not a DICOM attribute keyword (such as EchoTime)")
    return keyword, value
