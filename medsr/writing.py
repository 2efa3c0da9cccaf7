"""Write enhanced volumes. Every file goes to a temporary name in the destination folder and is
renamed only when complete, so an interruption never leaves half a file under the real name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

from medsr.errors import OutputError
from medsr.reading import NIFTI_SUFFIXES

SCANNER_XFORM = 1  # NIfTI xform code: scanner-based anatomical coordinates


@contextmanager
def atomic_output(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    On any failure or interruption the temporary file is removed and ``path`` is untouched.
    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(output: Path, inputs: list[Path], overwrite: bool = False) -> None:
    """Refuse outputs that would replace an input, land inside an input series folder, go to a
    missing folder, or replace an existing file without ``overwrite``."""
    resolved = output.resolve()
    for source in inputs:
        source = source.resolve()
        if resolved == source:
            raise OutputError(f"{output}: output would overwrite the input; choose another path")
        if source.is_dir() and source in resolved.parents:
            raise OutputError(f"{output}: output must not go inside the input series folder {source}")
        if resolved in source.parents:
            raise OutputError(f"{output}: output would replace a folder that holds the input {source}")
    if not output.parent.is_dir():
        raise OutputError(f"{output}: folder {output.parent} does not exist; create it first")
    if not os.access(output.parent, os.W_OK):
        raise OutputError(f"{output}: folder {output.parent} is not writable")
    if output.exists() and not overwrite:
        raise OutputError(f"{output}: already exists; pass --overwrite to replace it")


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, description: str = "",
                overwrite: bool = False) -> Path:
    """Write a float32 NIfTI-1 whose qform and sform both equal ``affine`` (RAS, mm).

    Args:
        path: destination ending in ``.nii`` or ``.nii.gz``.
        array: ``(I, J, K)`` voxels in original units.
        affine: ``(4, 4)`` voxel -> RAS mm.
        description: stored in the header's ``descrip`` (at most 79 characters).
        overwrite: replace an existing file.
    """
    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise OutputError(f"{path}: NIfTI output must end in .nii or .nii.gz")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it")
    image = nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine)
    image.set_qform(affine, code=SCANNER_XFORM)
    image.set_sform(affine, code=SCANNER_XFORM)
    image.header.set_xyzt_units(xyz="mm")
    image.header["descrip"] = description.encode("ascii", "replace")[:79]
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    with atomic_output(path, suffix=f".tmp{suffix}") as temporary:  # nibabel compresses by suffix
        nib.save(image, temporary)
    return path
