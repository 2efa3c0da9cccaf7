"""The types every scan reader returns, :class:`Scan` and :class:`OpenScan`, and the helpers
for their slices.

They live apart from :mod:`medsr.reading` (which callers import them from) so that the format
readers, :mod:`medsr.dicom_reading` and :mod:`medsr.nifti_reading`, can build them while
:mod:`medsr.reading` imports those readers to dispatch to them, without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from medsr.errors import ScanReadError
from medsr.geometry import voxel_sizes

# how a NIfTI file is named: the reader dispatches on it, and a DICOM folder leaves such files out
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# NIfTI (qform_code, sform_code) of DICOM patient coordinates: scanner-based anatomical.
SCANNER_XFORM_CODES = (1, 1)
UNKNOWN_XFORM_CODES = (0, 0)


class _ScanFacts:
    """What a scan tells from its headers and affine (the fields: :class:`ScanHeaders`)."""

    affine: np.ndarray
    dicom_headers: tuple

    @property
    def modality(self) -> str | None:
        """DICOM Modality (``"CT"``, ``"MR"``...), or None for NIfTI and DICOM without one."""
        value = str(self.dicom_headers[0].get("Modality", "") or "") if self.dicom_headers else ""
        return value.upper() or None

    @property
    def photometric(self) -> str | None:
        """DICOM PhotometricInterpretation (``"MONOCHROME1"``: low values display white), or
        None for NIfTI. The values are never inverted: they stay in original units."""
        value = str(self.dicom_headers[0].get("PhotometricInterpretation", "") or "") if self.dicom_headers else ""
        return value.strip().upper() or None

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis, shape ``(3,)``."""
        return voxel_sizes(self.affine)


@dataclass(frozen=True, kw_only=True)
class ScanHeaders(_ScanFacts):
    """What a reader tells of a scan before its voxels: geometry and headers, shared by
    :class:`Scan` and :class:`OpenScan` (keyword-only, so each can add its own required fields).

    Attributes:
        affine: ``(4, 4)`` voxel index -> RAS+ mm.
        slice_axis: the axis along which slices were acquired (0, 1 or 2).
        path: where the scan was read from.
        source_format: ``"dicom"`` or ``"nifti"``.
        dicom_headers: pixel-less headers, one per slice along ``slice_axis`` for a series, the
            single header for a multi-frame object, none for NIfTI.
        multiframe: True when the DICOM input was one multi-frame object.
        frame_order: multi-frame only: the source frame index (0-based) of each array slice.
        geometry_assumed: True when the affine rests on assumptions (a lone DICOM image
            without ImageOrientationPatient, ImagePositionPatient or PixelSpacing: axial, at the
            origin, ImagerPixelSpacing or 1 mm); the headers do not carry them.
        xform_codes: NIfTI ``(qform_code, sform_code)`` an output of this scan should carry:
            a NIfTI input's own (its qform code drops to 0 when its qform and sform disagree,
            as only the sform, nibabel's affine, is kept), ``(1, 1)`` (scanner) for DICOM,
            ``(0, 0)`` (unknown) when the geometry was assumed.
        padding: the inclusive ``(low, high)`` range of padding values in original units
            (PixelPaddingValue and PixelPaddingRangeLimit through the modality LUT of the first
            slice), or None. Every pixel its own header marks as padding reads as a value in
            this range (``low`` where its own rescale would put it elsewhere).
        display_range: a NIfTI input's ``(cal_min, cal_max)``, the range its viewers show
            (original units), when the header sets one; an output of this scan keeps it.
    """

    affine: np.ndarray
    slice_axis: int
    path: Path
    source_format: str
    dicom_headers: tuple = field(default=(), repr=False)
    multiframe: bool = False
    frame_order: tuple[int, ...] = ()
    geometry_assumed: bool = False
    xform_codes: tuple[int, int] = SCANNER_XFORM_CODES
    padding: tuple[float, float] | None = None
    display_range: tuple[float, float] | None = None

    def headers(self) -> dict:
        """This scan's :class:`ScanHeaders` fields by name, to build another kind of scan from."""
        return {f.name: getattr(self, f.name) for f in fields(ScanHeaders)}


@dataclass(frozen=True, kw_only=True)
class Scan(ScanHeaders):
    """A volume in original units with its geometry (the rest: :class:`ScanHeaders`).

    Attributes:
        array: ``(I, J, K)`` float32 voxels in original units (HU for CT, scanner units for MR).
    """

    array: np.ndarray

    def to_metatensor(self):
        """The volume as a MONAI ``MetaTensor`` with ``affine`` and ``slice_axis`` in its meta."""
        from monai.data import MetaTensor

        return MetaTensor(
            self.array,
            affine=self.affine,
            meta={"slice_axis": self.slice_axis, "filename_or_obj": str(self.path)},
        )


@dataclass(frozen=True, kw_only=True)
class OpenScan(ScanHeaders):
    """A scan whose headers and geometry are read and whose voxels are read slice by slice
    (the rest: :class:`ScanHeaders`).

    Attributes:
        shape: ``(I, J, K)`` of the whole volume.
        read_plane: index along ``slice_axis`` -> that slice, float32 in original units, the
            two remaining axes in array order. Raises :class:`ScanReadError` on damaged data.
    """

    shape: tuple[int, int, int]
    read_plane: Callable[[int], np.ndarray] = field(repr=False)

    @property
    def n_slices(self) -> int:
        return self.shape[self.slice_axis]

    def planes(self) -> Iterator[np.ndarray]:
        """Every slice in order, each read when asked for."""
        for index in range(self.n_slices):
            yield self.read_plane(index)

    def load(self) -> Scan:
        """Every slice, as a :class:`Scan`.

        Raises:
            ScanReadError: damaged pixel data, or NaN/infinite voxels.
        """
        array = np.stack(list(self.planes()), axis=self.slice_axis)
        refuse_non_finite(self.path, int(np.count_nonzero(~np.isfinite(array))))
        return Scan(array=np.ascontiguousarray(array, dtype=np.float32), **self.headers())


def refuse_non_finite(path: Path, bad: int) -> None:
    """Refuse a scan with ``bad`` NaN or infinite voxels (when there are any)."""
    if bad:
        raise ScanReadError(f"{path}: {bad} voxels are NaN or infinite; medsr needs finite values")


def plane_of(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` along ``axis``, a contiguous copy. (``np.take`` does the same 200 times
    slower on Fortran-ordered arrays, which is how nibabel hands NIfTI voxels over.)"""
    return np.ascontiguousarray(np.moveaxis(volume, axis, 0)[index])


def planes_from_whole(load: Callable[[], np.ndarray], axis: int) -> Callable[[int], np.ndarray]:
    """A ``read_plane`` for slices that cut across the file: ``load()`` reads the whole volume
    once, when the first slice is asked for, and every slice is taken from it."""
    volume: list[np.ndarray] = []

    def read_plane(index: int) -> np.ndarray:
        if not volume:
            volume.append(load())
        return plane_of(volume[0], axis, index)

    return read_plane
