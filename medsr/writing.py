"""Write enhanced volumes. Every file goes to a temporary name in the destination folder and is
renamed only when complete, so an interruption never leaves half a file under the real name.
"""

from __future__ import annotations

import gzip
import os
import shutil
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
    """Write a float32 NIfTI slab by slab along ``slice_axis``, as the enhancer produces it.

    NIfTI stores voxels with the first index fastest, so consecutive slices along axis 2 are
    consecutive bytes: the file (gzip-compressed for ``.nii.gz``) is streamed to a temporary
    name beside ``path``. Slices along axis 0 or 1 interleave in the file, so they go into a
    memory-mapped uncompressed scratch file (compressed at the end for ``.nii.gz``). Either way
    memory holds one slab, and ``path`` appears only when every slice arrived.

    Example:
        >>> with NiftiSliceWriter(out, (512, 512, 120), affine) as writer:
        ...     for slab in slabs:  # (512, 512, n) float32, in order
        ...         writer.write(slab)
    """

    VOX_OFFSET = 352  # 348-byte header + 4-byte extension flag (no extensions)

    def __init__(self, path: str | Path, shape: tuple[int, int, int], affine: np.ndarray,
                 description: str = "", overwrite: bool = False, slice_axis: int = 2) -> None:
        self.path, self.shape = Path(path), tuple(int(n) for n in shape)
        self.slice_axis = slice_axis
        if not self.path.name.lower().endswith(NIFTI_SUFFIXES):
            raise OutputError(f"{self.path}: NIfTI output must end in .nii or .nii.gz")
        if self.path.exists() and not overwrite:
            raise OutputError(f"{self.path}: already exists; pass --overwrite to replace it")
        self.header = nifti_header(self.shape, affine, description)
        self.header["vox_offset"] = self.VOX_OFFSET
        self.written = 0
        self.compressed = self.path.name.lower().endswith(".nii.gz")

    def __enter__(self) -> NiftiSliceWriter:
        self._atomic = atomic_output(self.path, suffix=".tmp.nii.gz" if self.compressed else ".tmp.nii")
        temporary = self._temporary = self._atomic.__enter__()
        self._scratch = None
        if self.slice_axis == 2:
            self._file = gzip.open(temporary, "wb", compresslevel=1) if self.compressed else open(temporary, "wb")
            self._write_header(self._file)
            return self
        if self.compressed:  # the scratch holds the uncompressed file until the end
            handle, scratch = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".scratch.nii",
                                               dir=self.path.parent)
            os.close(handle)
            self._scratch = Path(scratch)
        target = self._scratch or temporary
        with open(target, "wb") as file:
            self._write_header(file)
            file.truncate(self.VOX_OFFSET + 4 * int(np.prod(self.shape)))
        self._voxels = np.memmap(target, dtype="<f4", mode="r+", offset=self.VOX_OFFSET,
                                 shape=self.shape, order="F")
        return self

    def _write_header(self, file) -> None:
        self.header.write_to(file)  # nibabel writes the extension flag too
        file.write(b"\0" * (self.VOX_OFFSET - file.tell()))

    def write(self, slab: np.ndarray) -> None:
        """Append the next ``n`` slices: ``slab`` spans the volume but ``n`` along the slice axis."""
        expected = list(self.shape)
        expected[self.slice_axis] = slab.shape[self.slice_axis]
        if list(slab.shape) != expected or self.written + slab.shape[self.slice_axis] > self.shape[self.slice_axis]:
            raise ValueError(f"slab {slab.shape} does not continue a volume of {self.shape}")
        if self.slice_axis == 2:
            self._file.write(np.asarray(slab, dtype=np.float32).tobytes(order="F"))
        else:
            where = [slice(None)] * 3
            where[self.slice_axis] = slice(self.written, self.written + slab.shape[self.slice_axis])
            self._voxels[tuple(where)] = slab
        self.written += slab.shape[self.slice_axis]

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            self._finish(complete=kind is None)
        except BaseException as failure:
            # an incomplete volume or a failed compression: the temporary file goes
            self._atomic.__exit__(type(failure), failure, failure.__traceback__)
            raise
        finally:
            if self._scratch is not None:
                self._scratch.unlink(missing_ok=True)
        self._atomic.__exit__(kind, error, traceback)  # renames on success, removes on failure
        return False

    def _finish(self, complete: bool) -> None:
        if self.slice_axis == 2:
            self._file.close()
        else:
            self._voxels.flush()
            del self._voxels
        if not complete:
            return
        if self.written != self.shape[self.slice_axis]:
            raise ValueError(f"{self.path}: only {self.written} of {self.shape[self.slice_axis]} "
                             "slices were written")
        if self._scratch is not None:
            with open(self._scratch, "rb") as source, \
                    gzip.open(self._temporary, "wb", compresslevel=1) as compressed:
                shutil.copyfileobj(source, compressed, 16 * 2**20)
