"""A MONAI image writer that writes the NIfTI header ``medsr enhance`` writes.

MONAI's ``NibabelWriter`` (what ``SaveImage`` picks for ``.nii.gz``) marks every file's qform and
sform as scanner coordinates (code 1), leaves the units and the display range unset and writes
no description. So a volume enhanced by :class:`medsr.transforms.SuperResolved` and saved by
``SaveImaged`` had medsr's voxels and affine but not what its header says of them. Given as
``SaveImaged(..., writer=EnhancedNiftiWriter)`` (or the dotted name
``"medsr.monai_writer.EnhancedNiftiWriter"`` in a bundle), the header is built by
:func:`medsr.writing.nifti_header`, the one ``medsr enhance`` uses, from the MetaTensor's meta:

- ``descrip``: what :class:`~medsr.transforms.SuperResolve` decided (scale, grid, how sure, the
  projection), as ``medsr enhance`` describes it; without SuperResolve, the input's own;
- ``qform_code`` / ``sform_code``: the loaded NIfTI's, by ``medsr enhance``'s rule (a qform in
  another space than the sform drops to 0); scanner coordinates (code 1) where the meta has none,
  as for DICOM read by MONAI's readers, and for the sform where the input's was 0 (the one
  affine written must be one readers use);
- ``cal_min`` / ``cal_max``: the loaded NIfTI's display range, when it set one;
- spatial units: mm.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import NibabelWriter
from monai.data.image_writer import ImageWriter
from monai.data.utils import to_affine_nd

from medsr.nifti_reading import nifti_display_range, nifti_xform_codes
from medsr.reading import SCANNER_XFORM_CODES
from medsr.writing import nifti_header


def _text(value) -> str:
    """A header text field as MONAI's reader keeps it (bytes, a 0-d bytes array, or str)."""
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("ascii", "replace").rstrip("\0") if isinstance(value, bytes) else str(value)


def _loaded_header(meta: Mapping) -> nib.Nifti1Header | None:
    """The loaded NIfTI's header rebuilt from the fields MONAI's reader keeps in the meta, or
    None when the meta holds no NIfTI geometry (DICOM read by MONAI's readers, a plain array)."""
    header = nib.Nifti1Header()
    fields = [key for key in header.keys() if key in meta]
    if not {"dim", "pixdim", "qform_code", "sform_code", "srow_x", "quatern_b"} <= set(fields):
        return None
    try:
        for key in fields:
            header[key] = np.asarray(meta[key])
    except (TypeError, ValueError):
        return None
    return header


def _xform_codes(meta: Mapping) -> tuple[int, int]:
    """``(qform_code, sform_code)`` for the output: the loaded NIfTI's, by ``medsr enhance``'s
    rule (a qform that places the voxels elsewhere than the sform drops to 0). This writer puts
    one affine, MONAI's, in both; so the sform's code is never 0, since readers would then ignore
    that affine (and after ``Orientationd`` show the volume flipped): it takes the qform's code,
    or scanner coordinates (1, what MONAI's own writer writes) when that is 0 too."""
    header = _loaded_header(meta)
    if header is None:
        return SCANNER_XFORM_CODES
    shape = tuple(int(n) for n in header["dim"][1:4])
    try:
        qform_code, sform_code = nifti_xform_codes(header, shape, Path(str(meta.get("filename_or_obj", "<meta>"))))
    except (ValueError, np.linalg.LinAlgError):
        return SCANNER_XFORM_CODES
    defined = nib.nifti1.xform_codes.value_set()
    if qform_code not in defined or sform_code not in defined:
        return SCANNER_XFORM_CODES
    return qform_code, sform_code or qform_code or SCANNER_XFORM_CODES[1]


def _display_range(meta: Mapping) -> tuple[float, float] | None:
    """The loaded NIfTI's display range, as ``medsr enhance`` keeps it; None without one."""
    try:
        return nifti_display_range(meta)
    except (KeyError, TypeError, ValueError):
        return None


class EnhancedNiftiWriter(NibabelWriter):
    """``NibabelWriter`` with ``medsr enhance``'s header (the module docstring says what it
    keeps). Voxels, data type and affine are written as ``NibabelWriter`` writes them.

    Example:
        >>> from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, SaveImaged
        >>> from medsr.transforms import SuperResolved
        >>> pipeline = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), SuperResolved("image"),
        ...                     SaveImaged("image", output_postfix="x2", writer=EnhancedNiftiWriter)])
    """

    # what the header says when write() comes without set_metadata(): as MONAI's own writer
    description: str = ""
    xform_codes: tuple[int, int] = SCANNER_XFORM_CODES
    display_range: tuple[float, float] | None = None

    def set_metadata(self, meta_dict: Mapping | None, resample: bool = True, **options) -> None:
        super().set_metadata(meta_dict, resample, **options)
        meta = meta_dict or {}
        self.description = _text(meta.get("descrip", ""))
        self.xform_codes = _xform_codes(meta)
        self.display_range = _display_range(meta)

    def write(self, filename, verbose: bool = False, **obj_kwargs) -> None:
        ImageWriter.write(self, filename, verbose=verbose)  # the base's log line, not NibabelWriter's codes
        image = self.create_backend_obj(self.data_obj, affine=self.affine, dtype=self.output_dtype, **obj_kwargs)
        affine = to_affine_nd(3, np.eye(4) if self.affine is None else np.asarray(self.affine, dtype=np.float64))
        spatial = (tuple(image.shape[:3]) + (1, 1))[:3]  # a 2-D image is one slice thick
        header = nifti_header(spatial, affine, self.description, self.xform_codes, self.display_range)
        header.set_data_shape(image.shape)
        header.set_data_dtype(image.get_data_dtype())
        # no affine argument: nibabel then takes the header's, codes and all, as nifti_header set them
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), None, header=header), filename)
