"""Write enhanced volumes. Every file goes to a temporary name in the destination folder and is
renamed only when complete, so an interruption never leaves half a file under the real name,
and the file and its folder are synced to disk before and after the rename, so a power cut
leaves the old output or the new one, never an empty or partial file under the real name.

A failure to write (a full disk, a quota, a read-only or failing file system: any ``OSError``
of the writing itself) is an :class:`~medsr.errors.OutputError` naming the output, and every
temporary is removed; the temporaries of a run that could not remove them (SIGKILL) are swept
by the next run writing into the same folder (:mod:`medsr.temporaries`).

Temporary files and folders are created with the usual permissions (0666 / 0777 less the
umask, which the kernel applies): the umask is never read, because reading it means setting it
for the whole process, a race with other threads creating files.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip_threaded

from medsr.errors import OutputError
from medsr.nifti_reading import affines_agree
from medsr.reading import NIFTI_SUFFIXES, SCANNER_XFORM_CODES
from medsr.temporaries import new_name, owned

# what a MONOCHROME1 volume's NIfTI description says first: NIfTI has no photometric
# interpretation and viewers show low values dark, while the DICOM showed them white
GZIP_THREADS = max(1, min(4, os.cpu_count() or 1))
GZIP_BLOCK = 256 * 1024  # bytes compressed per task (each with the previous 32 KB as dictionary)
MONOCHROME1_NOTE = "MONOCHROME1 values (low=white)"


@contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` in the block (a full disk, a quota, a read-only or failing file
    system) into an :class:`OutputError` naming ``path``, the output the user asked for: one
    ``error: <path>: cannot write it: No space left on device`` line. Wrap only writing: an
    ``OSError`` from anything else is not about ``path``."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"{path}: cannot write it: {_reason(exc)}") from exc


def commit_or_discard(failed: bool, cleanup: ExitStack, output: Path, close: Callable[[], None],
                      commit_output: Callable[[], None]) -> None:
    """How a writer leaves: ``close()`` its open files, then, unless the block ``failed``,
    ``commit_output()`` (check it is complete, sync, rename into place) with an ``OSError`` named
    after ``output``; ``cleanup`` removes every temporary whatever happens, so a failure leaves
    ``output`` as it was. A failing disk fails the close of a failed block too: the block's
    error is the one that counts."""
    with cleanup:
        if failed:
            with suppress(OSError):
                close()
            return
        with write_errors(output):
            close()
            commit_output()


def _reason(error: OSError) -> str:
    """The system's words for ``error`` ("No space left on device"), also when a library
    re-raised it with its own message (pydicom adds the tag and a whole traceback)."""
    cause = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return " ".join(str(error).split())[:200] or type(error).__name__


@contextmanager
def temporary_beside(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A new empty file beside ``path`` under a hidden name its run owns
    (:mod:`medsr.temporaries`), with the usual permissions (0666 less the umask, not mkstemp's
    private 0600); removed when the block ends, however it ends (:func:`commit` first to keep
    it as ``path``)."""
    with owned(path.parent) as tag:
        temporary = new_name(path, suffix, tag, lambda candidate: os.close(
            os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
        try:
            yield temporary
        finally:
            temporary.unlink(missing_ok=True)


def commit(temporary: Path, path: Path) -> None:
    """Rename a complete ``temporary`` to ``path``: the file is synced to disk before the
    rename and its folder after it."""
    sync_file(temporary)
    os.replace(temporary, path)
    sync_folder(path.parent)


@contextmanager
def atomic_output(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    On any failure or interruption the temporary file is removed and ``path`` is untouched. On
    success the file is synced to disk before the rename and its folder after it. The block
    only writes the temporary: an ``OSError`` in it, as in the rename, is an
    :class:`OutputError` naming ``path`` (:func:`write_errors`).
    """
    with write_errors(path), temporary_beside(path, suffix) as temporary:
        yield temporary
        commit(temporary, path)


def save_torch(payload, path: Path) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically. It is serialised in memory first:
    torch's own file writer reports a full disk as a ``RuntimeError``, not an ``OSError``."""
    import torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_output(path) as temporary:
        temporary.write_bytes(buffer.getbuffer())


@contextmanager
def staging_folder(destination: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A new, empty folder beside ``destination`` under a hidden name its run owns, with the
    usual permissions (0777 less the umask), to be filled and renamed into place; whatever is
    still under that name when the block ends is removed."""
    with owned(destination.parent) as tag:
        folder = new_name(destination, suffix, tag, lambda candidate: os.mkdir(candidate, 0o777))
        try:
            yield folder
        finally:
            if os.path.lexists(folder):
                shutil.rmtree(folder)


def sync_file(path: Path) -> None:
    """Flush a written file's data to disk (fsync)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (files created, renamed or removed in it) to disk. File systems
    that cannot sync a folder (some network and FUSE mounts) are left as they are."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # platforms without folder descriptors
    try:
        os.fsync(descriptor)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(descriptor)


def move_into_place(staging: Path, folder: Path) -> None:
    """Rename a complete staged folder (a DICOM series, a bundle) to ``folder``: in one step onto nothing or an empty
    folder; a previous output is first moved aside, then removed. The rename is synced."""
    if folder.exists() and not is_empty_folder(folder):
        with staging_folder(folder, ".old") as retired:  # removed with the previous output in it
            os.replace(folder, retired / folder.name)
            try:
                os.replace(staging, folder)
            except BaseException:
                os.replace(retired / folder.name, folder)  # the previous output stays
                raise
            sync_folder(folder.parent)
    else:
        os.replace(staging, folder)
        sync_folder(folder.parent)


def is_empty_folder(path: Path) -> bool:
    """Whether ``path`` is an existing folder with nothing in it."""
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except (NotADirectoryError, FileNotFoundError):
        return False


def output_taken(output: Path) -> bool:
    """Whether writing ``output`` would replace something: it exists, unless it is an empty
    folder given for a DICOM series (users often create the folder first)."""
    if not output.exists():
        return False
    return output.name.lower().endswith(NIFTI_SUFFIXES) or not is_empty_folder(output)


def check_output_path(output: Path, inputs: list[Path], overwrite: bool = False) -> None:
    """Refuse outputs that would replace an input, land inside an input series folder, go to a
    missing folder, or replace an existing output without ``overwrite`` (an existing empty
    folder is not an output yet: a DICOM series is written in its place)."""
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
    if output_taken(output) and not overwrite:
        raise OutputError(f"{output}: already exists; pass --overwrite to replace it")


def nifti_header(shape: tuple[int, int, int], affine: np.ndarray, description: str = "",
                 xform_codes: tuple[int, int] = SCANNER_XFORM_CODES,
                 display_range: tuple[float, float] | None = None) -> nib.Nifti1Header:
    """Header of a float32 NIfTI-1 whose sform is ``affine`` (RAS, mm) and whose qform is the
    nearest rotation + zooms.

    Args:
        shape: ``(I, J, K)`` of the volume.
        affine: ``(4, 4)`` voxel index -> RAS+ mm.
        description: the ``descrip`` text (79 characters kept).
        xform_codes: ``(qform_code, sform_code)``, NIfTI's meaning of the coordinates: 0
            unknown, 1 scanner, 2 aligned, 3 Talairach, 4 MNI, 5 template; usually the input
            scan's :attr:`~medsr.reading.Scan.xform_codes`. A qform that cannot place the
            voxels where ``affine`` does (a shear, as from a gantry tilt) gets code 0 instead,
            so the two never claim a space while they disagree.
        display_range: ``(cal_min, cal_max)`` for viewers, in the volume's units: the input
            NIfTI's own, so the output opens with the same display; None leaves 0, 0 (unset).

    Raises:
        ValueError: a code outside 0-5.
    """
    qform_code, sform_code = (int(code) for code in xform_codes)
    for code in (qform_code, sform_code):
        if code not in nib.nifti1.xform_codes.value_set():
            raise ValueError(f"NIfTI xform codes must be 0 to 5, not {tuple(xform_codes)}")
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_sform(affine, code=sform_code)
    header.set_qform(affine, code=qform_code)
    if qform_code and not affines_agree(header.get_qform(), affine, shape):
        header.set_qform(affine, code=0)
    header.set_xyzt_units(xyz="mm")
    header["descrip"] = description.encode("ascii", "replace")[:79]
    if display_range is not None:
        header["cal_min"], header["cal_max"] = display_range
    return header


def nifti_description(description: str, photometric: str | None) -> str:
    """The NIfTI ``descrip`` of an enhanced volume: for MONOCHROME1 input, whose values stay as
    they are (original units, as dcm2niix converts them), :data:`MONOCHROME1_NOTE` comes first,
    since NIfTI viewers show low values dark where DICOM viewers showed them white."""
    if photometric == "MONOCHROME1":
        return f"{MONOCHROME1_NOTE}; {description}"
    return description


def gzip_writer(path: Path):
    """A file object writing ``path`` as gzip: ISA-L's deflate at level 1 on a few threads.

    About 4.5x faster than zlib at level 1 on one thread, with a slightly smaller file
    (``benchmarks/pipeline_overhead.py``); the result is one standard gzip member that nibabel,
    ITK and FSL (zlib's gzread) read like any other. Memory in flight is a few blocks per
    thread, whatever the length of the volume.
    """
    return igzip_threaded.open(path, "wb", compresslevel=1, threads=GZIP_THREADS, block_size=GZIP_BLOCK)


class NiftiSliceWriter:
    """Write a float32 NIfTI slab by slab along ``slice_axis``, as the enhancer produces it.

    NIfTI stores voxels with the first index fastest, so consecutive slices along axis 2 are
    consecutive bytes: the file (gzip-compressed for ``.nii.gz``) is streamed to a temporary
    name beside ``path``. Slices along axis 0 or 1 interleave in the file, so they go into a
    memory-mapped uncompressed scratch file (compressed at the end for ``.nii.gz``). Either way
    memory holds one slab, and ``path`` appears only when every slice arrived.

    ``xform_codes`` and ``display_range`` are as in :func:`nifti_header`.

    Example:
        >>> with NiftiSliceWriter(out, (512, 512, 120), affine, xform_codes=scan.xform_codes) as writer:
        ...     for slab in slabs:  # (512, 512, n) float32, in order
        ...         writer.write(slab)
    """

    VOX_OFFSET = 352  # 348-byte header + 4-byte extension flag (no extensions)

    def __init__(self, path: str | Path, shape: tuple[int, int, int], affine: np.ndarray,
                 description: str = "", overwrite: bool = False, slice_axis: int = 2, *,
                 xform_codes: tuple[int, int] = SCANNER_XFORM_CODES,
                 display_range: tuple[float, float] | None = None) -> None:
        self.path, self.shape = Path(path), tuple(int(n) for n in shape)
        self.slice_axis = slice_axis
        if not self.path.name.lower().endswith(NIFTI_SUFFIXES):
            raise OutputError(f"{self.path}: NIfTI output must end in .nii or .nii.gz")
        if output_taken(self.path) and not overwrite:
            raise OutputError(f"{self.path}: already exists; pass --overwrite to replace it")
        self.header = nifti_header(self.shape, affine, description, xform_codes, display_range)
        self.header["vox_offset"] = self.VOX_OFFSET
        self.written = 0
        self.compressed = self.path.name.lower().endswith(".nii.gz")

    def __enter__(self) -> NiftiSliceWriter:
        self._temporaries = ExitStack()
        try:
            with write_errors(self.path):
                self._open()
        except BaseException:
            with self._temporaries, suppress(OSError):
                self._close()
            raise
        return self

    def _open(self) -> None:
        self._temporary = self._temporaries.enter_context(
            temporary_beside(self.path, ".tmp.nii.gz" if self.compressed else ".tmp.nii"))
        self._scratch = None
        if self.slice_axis == 2:
            self._file = (gzip_writer(self._temporary) if self.compressed
                          else open(self._temporary, "wb"))  # noqa: SIM115 (closed by __exit__)
            self._write_header(self._file)
            return
        if self.compressed:  # the scratch holds the uncompressed file until the end
            self._scratch = self._temporaries.enter_context(temporary_beside(self.path, ".scratch.nii"))
        target = self._scratch or self._temporary
        with open(target, "r+b") as file:
            self._write_header(file)
            _allocate(file, self.VOX_OFFSET + 4 * int(np.prod(self.shape)))
        self._voxels = np.memmap(target, dtype="<f4", mode="r+", offset=self.VOX_OFFSET,
                                 shape=self.shape, order="F")

    def _write_header(self, file) -> None:
        encoded = io.BytesIO()
        self.header.write_to(encoded)  # nibabel writes the extension flag too
        file.write(encoded.getvalue().ljust(self.VOX_OFFSET, b"\0"))

    def write(self, slab: np.ndarray) -> None:
        """Append the next ``n`` slices: ``slab`` spans the volume but ``n`` along the slice axis."""
        expected = list(self.shape)
        expected[self.slice_axis] = slab.shape[self.slice_axis]
        if list(slab.shape) != expected or self.written + slab.shape[self.slice_axis] > self.shape[self.slice_axis]:
            raise ValueError(f"slab {slab.shape} does not continue a volume of {self.shape}")
        with write_errors(self.path):
            if self.slice_axis == 2:
                self._file.write(np.asarray(slab, dtype=np.float32).tobytes(order="F"))
            else:
                where = [slice(None)] * 3
                where[self.slice_axis] = slice(self.written, self.written + slab.shape[self.slice_axis])
                self._voxels[tuple(where)] = slab
        self.written += slab.shape[self.slice_axis]

    def __exit__(self, kind, error, traceback) -> bool:
        """Rename the complete file into place; on any failure (in the block or here) remove
        every temporary and leave ``path`` as it was."""
        commit_or_discard(kind is not None, self._temporaries, self.path, self._close, self._commit)
        return False

    def _close(self) -> None:
        file, self._file = getattr(self, "_file", None), None
        if file is not None:
            file.close()
        voxels, self._voxels = getattr(self, "_voxels", None), None  # unmapped once unreferenced
        if voxels is not None:
            voxels.flush()

    def _commit(self) -> None:
        self._finish()
        commit(self._temporary, self.path)

    def _finish(self) -> None:
        if self.written != self.shape[self.slice_axis]:
            raise ValueError(f"{self.path}: only {self.written} of {self.shape[self.slice_axis]} "
                             "slices were written")
        if self._scratch is not None:
            with open(self._scratch, "rb") as source, \
                    gzip_writer(self._temporary) as compressed:
                shutil.copyfileobj(source, compressed, 16 * 2**20)


def _allocate(file, size: int) -> None:
    """Give ``file`` its full ``size`` on disk now, so a full disk is an ``OSError`` here rather
    than a SIGBUS (which kills the process, leaving its temporaries) when a page of the
    memory-mapped file is first written. File systems without ``fallocate`` get a sparse file."""
    file.truncate(size)
    try:
        os.posix_fallocate(file.fileno(), 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            raise
