"""Read a scan (DICOM series folder, single- or multi-frame DICOM file, NIfTI) into one type.

Contract: :func:`read_scan` returns a :class:`Scan` whose ``array`` is a float32 ``(I, J, K)``
volume in original units (DICOM RescaleSlope/Intercept applied, so CT is in HU) and whose
``affine`` maps voxel indices to RAS+ millimetres (the nibabel convention). For DICOM the axes
are ``(column, row, slice)``: ``I`` runs along the image rows (ImageOrientationPatient[:3]),
``J`` down the columns, ``K`` through the slices sorted along the slice normal. ``slice_axis`` is
the axis of acquired slices (2 for DICOM). ``dicom_headers`` keeps one header per slice, in
array order and without pixel data, so a writer can derive a new series from them.

MONAI's ``PydicomReader`` orders slices by InstanceNumber and does not cope with duplicate
positions, so the DICOM path here sorts by ImagePositionPatient projected on the slice normal.

:func:`open_scan` reads only headers and returns an :class:`OpenScan` whose slices are decoded
one at a time on demand, so a long series can be enhanced with memory bounded by the batch;
:func:`read_scan` is ``open_scan(...).load()``.
"""

from __future__ import annotations

import importlib.util
import logging
import struct
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import pixel_array as decode_pixels

from medsr.errors import ScanReadError
from medsr.geometry import LPS_TO_RAS, largest_spacing_axis, voxel_sizes

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Relative tolerance on slice gaps before the series counts as unevenly spaced.
GAP_TOLERANCE = 0.01


class _ScanFacts:
    """What :class:`Scan` and :class:`OpenScan` both tell from their headers and affine."""

    affine: np.ndarray
    dicom_headers: tuple

    @property
    def modality(self) -> str | None:
        """DICOM Modality (``"CT"``, ``"MR"``...), or None for NIfTI and DICOM without one."""
        value = str(self.dicom_headers[0].get("Modality", "") or "") if self.dicom_headers else ""
        return value.upper() or None

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis, shape ``(3,)``."""
        return voxel_sizes(self.affine)


@dataclass(frozen=True)
class Scan(_ScanFacts):
    """A volume in original units with its geometry.

    Attributes:
        array: ``(I, J, K)`` float32 voxels in original units (HU for CT, scanner units for MR).
        affine: ``(4, 4)`` voxel index -> RAS+ mm.
        slice_axis: the axis along which slices were acquired (0, 1 or 2).
        path: where the scan was read from.
        source_format: ``"dicom"`` or ``"nifti"``.
        dicom_headers: pixel-less headers, one per slice along ``slice_axis`` for a series, the
            single header for a multi-frame object, none for NIfTI.
        multiframe: True when the DICOM input was one multi-frame object.
        frame_order: multi-frame only: the source frame index (0-based) of each array slice.
    """

    array: np.ndarray
    affine: np.ndarray
    slice_axis: int
    path: Path
    source_format: str
    dicom_headers: tuple = field(default=(), repr=False)
    multiframe: bool = False
    frame_order: tuple[int, ...] = ()

    def to_metatensor(self):
        """The volume as a MONAI ``MetaTensor`` with ``affine`` and ``slice_axis`` in its meta."""
        from monai.data import MetaTensor

        return MetaTensor(
            self.array,
            affine=self.affine,
            meta={"slice_axis": self.slice_axis, "filename_or_obj": str(self.path)},
        )


@dataclass(frozen=True)
class OpenScan(_ScanFacts):
    """A scan whose headers and geometry are read and whose voxels are read slice by slice.

    Attributes:
        shape: ``(I, J, K)`` of the whole volume.
        affine, slice_axis, path, source_format, dicom_headers, multiframe, frame_order: as
            in :class:`Scan`.
        read_plane: index along ``slice_axis`` -> that slice, float32 in original units, the
            two remaining axes in array order. Raises :class:`ScanReadError` on damaged data.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    slice_axis: int
    path: Path
    source_format: str
    read_plane: Callable[[int], np.ndarray] = field(repr=False)
    dicom_headers: tuple = field(default=(), repr=False)
    multiframe: bool = False
    frame_order: tuple[int, ...] = ()

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
        return Scan(array=np.ascontiguousarray(array, dtype=np.float32), affine=self.affine,
                    slice_axis=self.slice_axis, path=self.path, source_format=self.source_format,
                    dicom_headers=self.dicom_headers, multiframe=self.multiframe,
                    frame_order=self.frame_order)


def refuse_non_finite(path: Path, bad: int) -> None:
    """Refuse a scan with ``bad`` NaN or infinite voxels (when there are any)."""
    if bad:
        raise ScanReadError(f"{path}: {bad} voxels are NaN or infinite; medsr needs finite values")


def read_scan(path: str | Path, series_uid: str | None = None) -> Scan:
    """Read a DICOM series folder, a DICOM file or a NIfTI file, every voxel at once.

    Args:
        path: a folder holding one DICOM series, a single DICOM file, or a ``.nii``/``.nii.gz``.
        series_uid: SeriesInstanceUID to pick when a folder holds several series.

    Returns:
        The :class:`Scan`, in original units, with a RAS+ affine.

    Raises:
        ScanReadError: the path is missing, not a readable scan, or holds no usable image.
    """
    return open_scan(path, series_uid).load()


def open_scan(path: str | Path, series_uid: str | None = None) -> OpenScan:
    """Read the headers of a scan (as :func:`read_scan` takes it) and check its geometry; the
    voxels are read later, slice by slice, through :attr:`OpenScan.read_plane`.

    Raises:
        ScanReadError: the path is missing, not a readable scan, or holds no usable image.
    """
    path = Path(path)
    if not path.exists():
        raise ScanReadError(f"{path}: no such file or folder")
    if path.name.lower().endswith(NIFTI_SUFFIXES) and path.is_file():
        return _open_nifti(path)
    try:
        return _open_dicom_folder(path, series_uid) if path.is_dir() else _open_dicom_file(path)
    except _READ_ERRORS as exc:
        raise _damaged(path, exc) from None


def _damaged(path: Path, exc: BaseException) -> ScanReadError:
    # pydicom parses elements lazily, so damaged bytes surface as these anywhere in the
    # reader; they are a property of the file, not a bug, and become one clear error
    return ScanReadError(f"{path}: damaged DICOM data ({type(exc).__name__}: {exc})")


# --------------------------------------------------------------------------------------- NIfTI


def _open_nifti(path: Path) -> OpenScan:
    import nibabel as nib

    def quietly(read):
        # damaged headers make nibabel's scaling overflow; the finite checks report it
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            return read()

    try:
        # the file stays open, so reading the slices in order decompresses a .nii.gz once
        image = quietly(lambda: nib.load(str(path), keep_file_open=True))
        shape = tuple(int(n) for n in image.shape)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise ScanReadError(f"{path}: not a readable NIfTI file ({exc})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3:
        raise ScanReadError(
            f"{path}: medsr enhances 3-D volumes, this NIfTI has shape {tuple(image.shape)}; "
            "extract one volume first (e.g. nibabel: image.slicer[..., 0])"
        )
    if min(shape) < 1:
        raise ScanReadError(f"{path}: the NIfTI volume has no voxels (shape {shape})")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ScanReadError(f"{path}: the NIfTI header's affine is not a valid voxel-to-world map")
    slice_axis = largest_spacing_axis(affine)

    def read_all() -> np.ndarray:
        try:
            return quietly(lambda: np.asarray(image.dataobj, dtype=np.float32)).reshape(shape)
        except Exception as exc:
            raise ScanReadError(f"{path}: not a readable NIfTI file ({exc})") from None

    if slice_axis == 2 and len(image.shape) == 3:
        def read_plane(index: int) -> np.ndarray:
            # slices along the last axis are contiguous bytes in the file
            try:
                return quietly(lambda: image.slicer[:, :, index:index + 1].get_fdata(dtype=np.float32))[:, :, 0]
            except Exception as exc:
                raise ScanReadError(f"{path}: not a readable NIfTI file ({exc})") from None
    else:  # other slice axes are strided through the file
        read_plane = planes_from_whole(read_all, slice_axis)

    return OpenScan(shape=shape, affine=affine, slice_axis=slice_axis, path=path,
                    source_format="nifti", read_plane=read_plane)


def planes_from_whole(load: Callable[[], np.ndarray], axis: int) -> Callable[[int], np.ndarray]:
    """A ``read_plane`` for slices that cut across the file: ``load()`` reads the whole volume
    once, when the first slice is asked for, and every slice is taken from it."""
    volume: list[np.ndarray] = []

    def read_plane(index: int) -> np.ndarray:
        if not volume:
            volume.append(load())
        return np.take(volume[0], index, axis=axis)

    return read_plane


# --------------------------------------------------------------------------------------- DICOM


_READ_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError,
                AttributeError, IndexError, OverflowError, MemoryError, NotImplementedError,
                struct.error, BytesLengthException)


def try_dcmread(path: Path, stop_before_pixels: bool = False) -> pydicom.Dataset | None:
    """Read a DICOM file, or None when it is not DICOM (license texts, junk).

    Files without the 128-byte preamble (older writers) are read with ``force=True`` and
    accepted only if they carry a SOPClassUID, so arbitrary bytes are not taken for DICOM.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass
    except _READ_ERRORS:
        return None
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
        return dataset if "SOPClassUID" in dataset else None
    except _READ_ERRORS:
        return None


def _open_dicom_file(path: Path) -> OpenScan:
    header = try_dcmread(path, stop_before_pixels=True)
    if header is None:
        raise ScanReadError(f"{path}: not a DICOM file (and not .nii/.nii.gz)")
    if int(header.get("NumberOfFrames", 1) or 1) > 1:
        return _open_multiframe(header, path, path)
    return _open_slices([(path, header)], path)


def dicom_series_in_folder(folder: Path) -> dict[str, list[Path]]:
    """The DICOM files directly in ``folder``, grouped by SeriesInstanceUID ("unknown" when a
    file has none); other files (NIfTI, licence texts, junk) are left out."""
    return {uid: [file for file, _ in members] for uid, members in _headers_by_series(folder).items()}


def _headers_by_series(folder: Path) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    """(file, pixel-less header) of every DICOM file directly in ``folder``, by series."""
    by_series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        if file.name.lower().endswith(NIFTI_SUFFIXES):
            continue
        header = try_dcmread(file, stop_before_pixels=True)
        if header is not None:
            by_series[str(header.get("SeriesInstanceUID", "unknown"))].append((file, header))
    return dict(by_series)


def _open_dicom_folder(folder: Path, series_uid: str | None) -> OpenScan:
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
    images = [(file, header) for file, header in members if _is_image(header)]
    if len(images) < len(members):
        logger.warning("%s: skipped %d DICOM objects without pixel data", folder, len(members) - len(images))
    if not images:
        raise ScanReadError(f"{folder}: the DICOM series has no images (no pixel data)")
    if len(images) == 1 and int(images[0][1].get("NumberOfFrames", 1) or 1) > 1:
        return _open_multiframe(images[0][1], images[0][0], folder)
    return _open_slices(images, folder)


def _is_image(header: pydicom.Dataset) -> bool:
    """Headers are read without their pixel data, so an image is known by its matrix size
    (structure sets, reports and presentation states have none)."""
    return "Rows" in header and "Columns" in header


def _check_has_image(dataset: pydicom.Dataset, path: Path) -> None:
    if not _is_image(dataset):
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

    pydicom's :func:`~pydicom.pixels.pixel_array` on a path reads only the elements before the
    pixel data and the requested frame: some scanners put thousands of elements after the
    pixels, which a full read would parse for every slice. Files it cannot take (no preamble,
    odd encodings) go through a full read, which also gives the clear decoder messages.
    """

    def __init__(self, file: Path, rows: int, columns: int, n_frames: int = 1) -> None:
        self.file, self.shape, self.n_frames = file, (rows, columns), n_frames
        self._all_frames: np.ndarray | None = None  # the full-read fallback, decoded once

    def __call__(self, frame: int | None = None) -> np.ndarray:
        try:
            if self._all_frames is None:
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


def _rescale(stored: np.ndarray, slope, intercept) -> np.ndarray:
    slope = float(slope) if slope not in (None, "") else 1.0
    intercept = float(intercept) if intercept not in (None, "") else 0.0
    return (stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


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


def _slice_step(positions: np.ndarray, normal: np.ndarray, fallback: float, path: Path) -> np.ndarray:
    """Mean step between consecutive sorted slice positions (LPS mm), warning on uneven gaps."""
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
    if np.linalg.norm(mean_step - along * normal) > 1e-3 * abs(along):
        logger.warning("%s: slices are sheared (gantry tilt); the affine keeps the tilt", path)
    return mean_step


def _sort_and_deduplicate(items: list, positions: np.ndarray, normal: np.ndarray, path: Path):
    """Sort items along the slice normal; drop repeats of a position (first one wins)."""
    order = np.argsort(positions @ normal, kind="stable")
    kept, kept_positions = [], []
    for index in order:
        position = positions[index]
        if kept_positions and np.allclose(position, kept_positions[-1], atol=1e-3):
            logger.warning("%s: two slices at the same position %s; keeping the first",
                           path, np.round(position, 3).tolist())
            continue
        kept.append(items[index])
        kept_positions.append(position)
    return kept, np.asarray(kept_positions)


def _single_slice_geometry(dataset: pydicom.Dataset, path: Path) -> None:
    """A lone image without patient geometry (secondary capture, old exports) still enhances:
    identity orientation at the origin, spacing from PixelSpacing/ImagerPixelSpacing or 1 mm."""
    missing = [k for k in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")
               if dataset.get(k) is None]
    if not missing:
        return
    logger.warning("%s: no %s; assuming an axial image at the origin", path, ", ".join(missing))
    if dataset.get("ImageOrientationPatient") is None:
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    if dataset.get("ImagePositionPatient") is None:
        dataset.ImagePositionPatient = [0, 0, 0]
    if dataset.get("PixelSpacing") is None:
        dataset.PixelSpacing = dataset.get("ImagerPixelSpacing") or [1, 1]


def _open_slices(images: list[tuple[Path, pydicom.Dataset]], path: Path) -> OpenScan:
    """A series of single-frame images (file, header): checked, sorted along the normal."""
    first = images[0][1]
    for _, header in images:
        _check_has_image(header, path)
    if len(images) == 1:
        _single_slice_geometry(first, path)
    row_dir, col_dir = _orientation(first.get("ImageOrientationPatient"), path)
    normal = np.cross(row_dir, col_dir)
    row_spacing, col_spacing = _pixel_spacing(first.get("PixelSpacing"), path)
    rows, columns = int(first.Rows), int(first.Columns)
    for _, header in images[1:]:
        if (int(header.Rows), int(header.Columns)) != (rows, columns):
            raise ScanReadError(f"{path}: slices differ in size; not one volume")
        other_row, other_col = _orientation(header.get("ImageOrientationPatient"), path)
        if not (np.allclose(other_row, row_dir, atol=1e-4) and np.allclose(other_col, col_dir, atol=1e-4)):
            raise ScanReadError(f"{path}: slices differ in orientation; not one volume")
    positions = []
    for _, header in images:
        position = header.get("ImagePositionPatient")
        if position is None or len(position) != 3:
            raise ScanReadError(f"{path}: a slice has no ImagePositionPatient")
        positions.append([float(v) for v in position])
    images, positions = _sort_and_deduplicate(images, np.asarray(positions), normal, path)
    thickness = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    step = _slice_step(positions, normal, thickness, path)
    decoders = [_FrameDecoder(file, rows, columns) for file, _ in images]
    headers = tuple(header for _, header in images)

    def read_plane(index: int) -> np.ndarray:
        header = headers[index]
        return _rescale(decoders[index](), header.get("RescaleSlope"), header.get("RescaleIntercept")).T

    return OpenScan(
        shape=(columns, rows, len(images)),
        affine=_affine(row_dir, col_dir, row_spacing, col_spacing, positions[0], step),
        slice_axis=2,
        path=path,
        source_format="dicom",
        read_plane=read_plane,
        dicom_headers=headers,
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


def _open_multiframe(dataset: pydicom.Dataset, file: Path, path: Path) -> OpenScan:
    """Enhanced (multi-frame) MR/CT: geometry and rescale from the functional groups."""
    _check_has_image(dataset, path)
    n_frames = int(dataset.NumberOfFrames)
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != n_frames:
        raise ScanReadError(
            f"{path}: multi-frame DICOM without per-frame functional groups; "
            "medsr needs the position of every frame"
        )
    positions, rescales = [], []
    orientation = spacing = None
    for index, group in enumerate(per_frame):
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
        holder = transform if transform is not None else dataset
        rescales.append((holder.get("RescaleSlope"), holder.get("RescaleIntercept")))
    row_dir, col_dir = orientation
    normal = np.cross(row_dir, col_dir)
    order, positions = _sort_and_deduplicate(list(range(n_frames)), np.asarray(positions), normal, path)
    step = _slice_step(positions, normal, thickness, path)
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    decoder = _FrameDecoder(file, rows, columns, n_frames)

    def read_plane(index: int) -> np.ndarray:
        frame = order[index]
        return _rescale(decoder(frame), *rescales[frame]).T

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
    )
