"""Open a NIfTI file (``.nii``, ``.nii.gz``) as an :class:`~medsr.scan_types.OpenScan`.

Kept apart from the DICOM reader (:mod:`medsr.dicom_reading`): the two share nothing but the
types they return, and NIfTI needs only nibabel. The voxels are nibabel's, the affine is
nibabel's (the sform when its code is set, else the qform), and what an output of the scan
must carry over is read here too: its ``(qform_code, sform_code)`` and display range.
:func:`medsr.reading.open_scan` dispatches here by file name.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from pathlib import Path

import numpy as np

from medsr.errors import ScanReadError
from medsr.geometry import XFORM_TOLERANCE, slice_axis_of, voxel_sizes
from medsr.scan_types import OpenScan, planes_from_whole

# the readers log under one name, the one they had before they were split by format
logger = logging.getLogger("medsr.reading")


def open_nifti(path: Path) -> OpenScan:
    """The NIfTI file at ``path``, its voxels read slice by slice (or whole, once, when the
    slices cut across the file).

    Raises:
        ScanReadError: not a readable NIfTI file, not one 3-D volume with voxels, or an affine
            that is not a valid voxel-to-world map.
    """
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
    slice_axis = slice_axis_of(affine)
    xform_codes = nifti_xform_codes(image.header, shape, path)

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
                    source_format="nifti", read_plane=read_plane, xform_codes=xform_codes,
                    display_range=nifti_display_range(image.header))


def nifti_display_range(header) -> tuple[float, float] | None:
    """``(cal_min, cal_max)`` when the header (or a dict of its fields) sets a display range
    (NIfTI: cal_max > cal_min)."""
    low, high = float(np.asarray(header["cal_min"])), float(np.asarray(header["cal_max"]))
    return (low, high) if np.isfinite([low, high]).all() and high > low else None


def nifti_xform_codes(header, shape: tuple[int, int, int], path: Path) -> tuple[int, int]:
    """The (qform_code, sform_code) an output of this NIfTI should carry. The output has one
    affine, nibabel's (the sform when its code is set, else the qform), so a qform that places
    the voxels elsewhere than the sform (another space) cannot be kept and its code drops to 0."""
    qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
    if qform_code and sform_code and not affines_agree(header.get_qform(), header.get_sform(), shape):
        logger.info("%s: qform and sform place the voxels differently; the output keeps the sform "
                    "(code %d) and marks its qform unknown", path, sform_code)
        qform_code = 0
    return qform_code, sform_code

def affines_agree(first: np.ndarray, second: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether two voxel-to-world affines place every voxel of a volume of ``shape`` within
    :data:`XFORM_TOLERANCE` of its smallest voxel size of each other. Their difference is
    affine, so the corners of the volume decide."""
    corners = np.array([[*corner, 1.0] for corner in itertools.product(*[(0, n - 1) for n in shape[:3]])]).T
    apart = np.linalg.norm(((np.asarray(first) - np.asarray(second)) @ corners)[:3], axis=0).max()
    smallest = min(voxel_sizes(first).min(), voxel_sizes(second).min())
    return bool(apart <= XFORM_TOLERANCE * smallest)
