"""Write enhanced volumes. Every file goes to a temporary name in the destination folder and is
renamed only when complete, so an interruption never leaves half a file under the real name.
"""

from __future__ import annotations

import gzip
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


def nifti_header(shape: tuple[int, int, int], affine: np.ndarray, description: str = "") -> nib.Nifti1Header:
    """Header of a float32 NIfTI-1 whose qform and sform both equal ``affine`` (RAS, mm)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_qform(affine, code=SCANNER_XFORM)
    header.set_sform(affine, code=SCANNER_XFORM)
    header.set_xyzt_units(xyz="mm")
    header["descrip"] = description.encode("ascii", "replace")[:79]
    return header


class NiftiSliceWriter:
    """Write a float32 NIfTI slab by slab along the last axis, as the enhancer produces it.

    NIfTI stores voxels with the first index fastest, so consecutive slices along axis 2 are
    consecutive bytes: the file (gzip-compressed for ``.nii.gz``) is streamed to a temporary
    name beside ``path`` and renamed only when every slice arrived. Memory stays at one slab.

    Example:
        >>> with NiftiSliceWriter(out, (512, 512, 120), affine) as writer:
        ...     for slab in slabs:  # (512, 512, n) float32, in order
        ...         writer.write(slab)
    """

    VOX_OFFSET = 352  # 348-byte header + 4-byte extension flag (no extensions)

    def __init__(self, path: str | Path, shape: tuple[int, int, int], affine: np.ndarray,
                 description: str = "", overwrite: bool = False) -> None:
        self.path, self.shape = Path(path), tuple(int(n) for n in shape)
        if not self.path.name.lower().endswith(NIFTI_SUFFIXES):
            raise OutputError(f"{self.path}: NIfTI output must end in .nii or .nii.gz")
        if self.path.exists() and not overwrite:
            raise OutputError(f"{self.path}: already exists; pass --overwrite to replace it")
        self.header = nifti_header(self.shape, affine, description)
        self.header["vox_offset"] = self.VOX_OFFSET
        self.written = 0

    def __enter__(self) -> NiftiSliceWriter:
        compressed = self.path.name.lower().endswith(".nii.gz")
        self._atomic = atomic_output(self.path, suffix=".tmp.nii.gz" if compressed else ".tmp.nii")
        temporary = self._atomic.__enter__()
        self._file = gzip.open(temporary, "wb", compresslevel=1) if compressed else open(temporary, "wb")
        self.header.write_to(self._file)  # nibabel writes the extension flag too
        self._file.write(b"\0" * (self.VOX_OFFSET - self._file.tell()))
        return self

    def write(self, slab: np.ndarray) -> None:
        """Append ``(I, J, n)`` voxels: the next ``n`` slices along the last axis."""
        if slab.shape[:2] != self.shape[:2] or self.written + slab.shape[2] > self.shape[2]:
            raise ValueError(f"slab {slab.shape} does not continue a volume of {self.shape}")
        self._file.write(np.asarray(slab, dtype=np.float32).tobytes(order="F"))
        self.written += slab.shape[2]

    def __exit__(self, kind, error, traceback) -> bool:
        self._file.close()
        if kind is None and self.written != self.shape[2]:
            error = ValueError(f"{self.path}: only {self.written} of {self.shape[2]} slices were written")
            self._atomic.__exit__(ValueError, error, None)  # removes the temporary file
            raise error
        self._atomic.__exit__(kind, error, traceback)  # renames on success, removes on failure
        return False


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
