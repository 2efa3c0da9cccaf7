"""Write an enhanced volume as a new DICOM series joined to the original study.

MONAI cannot write DICOM series, so medsr derives each output object from its source header:
same SOP Class, study, patient, frame of reference and modality; new series and instance UIDs;
``DERIVED\\SECONDARY`` image type, a derivation description and references to the source
images; geometry on the grid of the NIfTI output (in-plane: the grid the model was told,
:func:`medsr.geometry.enhanced_affine`, whose pixels tile the source's for a resampled scan and
keep the first pixel's position for a k-space truncated one; through-plane: the tiling rule of
:func:`medsr.geometry.rescaled_affine`); pixel data in the source's bits and signedness, with a
rescale chosen so the enhanced values (HU, MR units) fit without clipping.

Nothing a viewer relies on changes silently: the photometric interpretation is the source's
(MONOCHROME1 stays MONOCHROME1, values not inverted); only geometry the source had is written
(a lone image without ImageOrientationPatient/ImagePositionPatient stays without them, and the
spacing attributes it had, PixelSpacing or ImagerPixelSpacing, are scaled to the finer matrix);
padding stays padding (pixels equal to the scan's padding value are stored as the source's
PixelPaddingValue, which the header keeps, and no other pixel is stored in the padding range).
Input in any transfer syntax, big-endian included, is written as Explicit VR Little Endian.

Single-frame input gives one file per slice; multi-frame (Enhanced / Legacy Converted) input
gives one multi-frame object. The writers take the slices as the enhancer produces them, so
memory holds one batch: single-frame files are written at once, multi-frame pixel data goes to
a scratch file and is joined to its header at the end. The series is written into a temporary
folder beside the destination and renamed into place only when every file is complete; files
and folders are synced to disk before and after the rename.

Two grids, one derivation: :class:`DicomSeriesWriter` writes in-plane super-resolution
(``scale`` times the rows and columns, one image per source slice), :class:`ThinSliceSeriesWriter`
writes through-plane output (``factor`` thin images per source slice, rows and columns as they
were). Thin slice ``j`` of source slice ``k`` sits at slice index ``k + (j - (factor - 1) / 2) /
factor``, the grid of :func:`medsr.geometry.rescaled_affine`. Its position is placed between the
real positions of the two source slices it lies between (linear in the slice index; beyond the
first and last slice, the first and last step): evenly spaced series land exactly on the
affine's grid, and unevenly spaced ones keep every source position, with thin slices that stay
in order and never overlap however uneven the gaps (the real CT with gaps of 7.5 then 115 mm
would overlap if both halves of a slice used the step to the next one). SliceLocation follows
the same rule; SliceThickness and SpacingBetweenSlices are divided by the factor; slice numbers
(InstanceNumber, InStackPositionNumber, a Dimension Index that counts the slices) run 1..N in
the source's direction.

Both writers share one outline, :class:`_DerivedSeriesWriter` (stage, encode, write, sync,
rename into place), and hand its jobs to small pieces: :class:`_SeriesIdentity` names the series
and its images (UIDs, time, description), :class:`~medsr.dicom_pixels.PixelEncoder` (its own
module) turns values into stored pixels (bits, rescale, padding), :class:`_SliceLayout` places and
numbers the images, and :class:`_DerivedHeaders` builds each header from its source's with them.
"""

from __future__ import annotations

import copy
import datetime
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import VR

from medsr import __version__
from medsr.dicom_pixels import PIXEL_DATA, PixelEncoder, append_pixel_data, drop_shared_rescale
from medsr.dicom_reading import functional_group
from medsr.errors import OutputError
from medsr.geometry import LPS_TO_RAS, enhanced_affine, rescaled_affine
from medsr.reading import OpenScan
from medsr.transforms import IntensityWindow
from medsr.writing import (
    commit_or_discard,
    move_into_place,
    output_taken,
    staging_folder,
    sync_file,
    sync_folder,
    write_errors,
)

logger = logging.getLogger(__name__)

SERIES_NUMBER_OFFSET = 1000
IS_MAX = 2**31 - 1
# pixel spacings of the image plane: whichever the source has is scaled to the finer matrix
# (DetectorElementSpacing describes the detector, not the image, and stays)
IMAGE_SPACINGS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
# distances along the slice axis: divided by the factor for thin slices
SLICE_MEASURES = ("SliceThickness", "SpacingBetweenSlices")
# a slice's number in its stack: thin slices are numbered again, in the source's direction
SLICE_NUMBERS = ("InstanceNumber", "InStackPositionNumber")
# the scratch file of a multi-frame object's stored frames, in the staging folder
FRAMES_SCRATCH = "frames.raw"
# how far the affine given to a writer may be from the grid the writer derives (mm)
AFFINE_TOLERANCE = 1e-3
# threads syncing written files to disk: fsync waits for the disk without the GIL, and the file
# system joins concurrent syncs into fewer journal commits (384 files of 0.5 MB on a 2-core VM:
# 1.5 s one after the other, 0.2 s on 4 threads; benchmarks/README.md)
SYNC_THREADS = 4


def _scaled_spacing(value, scale: int) -> list[str]:
    """A source spacing (between rows, between columns; mm) for a matrix ``scale`` times finer."""
    return [_ds(float(v) / scale) for v in value]


def _pixel_spacing(affine: np.ndarray) -> list[str]:
    """PixelSpacing (between rows, between columns) of a (column, row, slice) affine."""
    col_spacing, row_spacing = np.linalg.norm(affine[:3, 0]), np.linalg.norm(affine[:3, 1])
    return [_ds(row_spacing), _ds(col_spacing)]


def _position_text(position: np.ndarray) -> list[str]:
    """An ImagePositionPatient value (LPS mm)."""
    return [f"{v:.6f}" for v in position]


def _set_position(item: pydicom.Dataset, position: np.ndarray) -> None:
    """ImagePositionPatient of an image (LPS mm), and the retired ACR-NEMA ImagePosition copy
    that some vendors still write beside it, where the source had one."""
    item.ImagePositionPatient = _position_text(position)
    if "ImagePosition" in item:
        item.ImagePosition = _position_text(position)


def _along_thin_slices(per_slice: np.ndarray, factor: int) -> np.ndarray:
    """Values given per source slice, at the ``factor`` thin slices of each.

    Thin slice ``j`` of source slice ``k`` sits at slice index ``k + (j - (factor - 1) / 2) /
    factor``; a value there is interpolated linearly between the two source slices around it
    (beyond the first and last slice, extrapolated with the first and last step). With
    ``factor`` 1 the values come back unchanged.

    Args:
        per_slice: ``(K, ...)`` one value per source slice in slice order, e.g. the
            ImagePositionPatient of each, ``(K, 3)`` LPS mm, or SliceLocation, ``(K,)`` mm.
        factor: thin slices per source slice.

    Returns:
        ``(K * factor, ...)`` float64, in thin slice order.
    """
    per_slice = np.asarray(per_slice, dtype=np.float64)
    if factor == 1:
        return per_slice.copy()
    if len(per_slice) < 2:
        raise ValueError(f"thin slices are placed between source slices; got {len(per_slice)} slice")
    index = (np.arange(len(per_slice) * factor) + 0.5) / factor - 0.5
    below = np.clip(np.floor(index).astype(int), 0, len(per_slice) - 2)
    weight = (index - below).reshape(-1, *[1] * (per_slice.ndim - 1))
    return per_slice[below] * (1 - weight) + per_slice[below + 1] * weight


def _thin_numbers(numbers: list[int], factor: int) -> list[int] | None:
    """Numbers that count the source slices (all different: InstanceNumber, InStackPositionNumber,
    a Dimension Index along the stack), given again to the ``factor`` times as many thin slices:
    1..N, rising where the source's rise along the slices and falling where they fall. None for
    numbers that do not tell the slices apart (a StackID, a repeated number): those stay."""
    if len(numbers) < 2 or len(set(numbers)) != len(numbers):
        return None
    count = len(numbers) * factor
    return list(range(1, count + 1)) if numbers[0] < numbers[-1] else list(range(count, 0, -1))


def _macro_items(groups: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The functional-group macros of a multi-frame object's shared or per-frame ``groups``
    item: the first item of each of its sequences."""
    return [element.value[0] for element in groups if element.VR == "SQ" and element.value]


def _per_slice_values(scan: OpenScan, keyword: str) -> list | None:
    """``keyword`` of every source slice in array order (of every frame, from its per-frame
    functional groups, for a multi-frame object); None when some slice lacks it."""
    if scan.multiframe:
        per_frame = scan.dicom_headers[0].PerFrameFunctionalGroupsSequence
        values = []
        for frame in scan.frame_order:
            holders = [item for item in _macro_items(per_frame[frame]) if keyword in item]
            values.append(holders[0].get(keyword) if holders else None)
    else:
        values = [header.get(keyword) for header in scan.dicom_headers]
    return None if any(value is None or value == "" for value in values) else values


def _divide_slice_measures(item: pydicom.Dataset, factor: int) -> None:
    """SliceThickness and SpacingBetweenSlices of ``item`` (where present) for thin slices."""
    for keyword in SLICE_MEASURES:
        if item.get(keyword) not in (None, ""):
            item[keyword].value = _ds(float(item.get(keyword)) / factor)


def _ds(value: float) -> str:
    """A DS string of at most 16 characters."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6e}"


# raw elements that may hold a sequence (whose items may hold private elements): SQ, and the
# VRs that do not say (implicit VR: None; UN, which pydicom may resolve to SQ)
_MAYBE_SEQUENCE = (VR.SQ, VR.UN, None)


def _kept_copy(header: pydicom.Dataset) -> pydicom.Dataset:
    """A deep copy of ``header`` without private elements, at any depth (vendor data no longer
    describes the new pixels), and without command-set or stray meta elements (groups 0000 and
    0002, which do not belong in a stored object).

    What is left out is never copied: a deep copy of a whole header (then pruned) took a
    quarter of the time to write a 256x256 MR slice. Elements still in their raw form are
    shared, since a raw element never changes: most stay raw and are written as read; those
    that may hold a sequence are converted in the copy, to prune its items. The others are
    deep-copied. The header itself is left as it is, raw elements included, so the headers
    kept for a long series do not grow as it is written.
    """
    # its Python attributes (encoding, character set, file meta) as a deep copy would have them;
    # the file object a header may have been read from is not copied
    attributes = {name: value for name, value in vars(header).items() if name not in ("_dict", "buffer")}
    dataset = header.__class__.__new__(header.__class__)
    vars(dataset).update(copy.deepcopy(attributes), _dict={})
    if "buffer" in vars(header):
        dataset.buffer = None
    for tag in header.keys():
        if tag.is_private or tag.group in (0x0000, 0x0002):
            continue
        element = header.get_item(tag)
        if element.is_raw and element.VR not in _MAYBE_SEQUENCE:
            dataset[tag] = element  # written as read (dcmwrite converts it if the encoding changes)
            continue
        dataset[tag] = element if element.is_raw else copy.deepcopy(element)
        element = dataset[tag]  # converted now, in the copy
        if element.VR == VR.SQ:
            for item in element.value:
                item.remove_private_tags()
    return dataset


def _derive_common(header: pydicom.Dataset, series_uid: str, description: str, series_suffix: str,
                   now: datetime.datetime, series_number_offset: int = SERIES_NUMBER_OFFSET) -> pydicom.Dataset:
    """A copy of a source header as an image of the new series (its pixel module, geometry and
    rescale are the writer's to set); ``series_suffix`` ends the SeriesDescription, the
    SeriesNumber is the source's plus ``series_number_offset``."""
    dataset = _kept_copy(header)
    dataset.SeriesInstanceUID = series_uid
    dataset.SeriesNumber = min(int(header.get("SeriesNumber", 0) or 0) + series_number_offset, IS_MAX)
    original = str(header.get("SeriesDescription", "") or "")
    dataset.SeriesDescription = (original[:64 - len(series_suffix)] + series_suffix).strip()
    image_type = list(header.get("ImageType", []) or [])
    dataset.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]] if len(image_type) > 2 else ["DERIVED", "SECONDARY"]
    dataset.DerivationDescription = description[:1024]
    dataset.ContentDate, dataset.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    dataset.InstanceCreationDate, dataset.InstanceCreationTime = dataset.ContentDate, dataset.ContentTime
    dataset.SoftwareVersions = f"medsr {__version__}"
    # stale pixel statistics and icon; a Modality LUT is replaced by the output's rescale
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "IconImageSequence",
                    "SmallestPixelValueInSeries", "LargestPixelValueInSeries", "ModalityLUTSequence"):
        if keyword in dataset:
            del dataset[keyword]
    return dataset


def _derived_uid(seed: str | None, *names) -> str:
    """A new UID; with a ``seed``, the same UID every time for the same seed and ``names``
    (pydicom's ``generate_uid`` hashes them): a series enhanced again from the same input with
    the same weights and options gets the same series and instance UIDs, so sending it again
    replaces what was sent rather than adding a copy (``medsr serve``)."""
    if seed is None:
        return generate_uid()
    return generate_uid(entropy_srcs=["medsr derived", seed, *(str(name) for name in names)])


def _file_meta(dataset: pydicom.Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    dataset.file_meta = meta


def _window(dataset: pydicom.Dataset, window: IntensityWindow, keep_source: bool = True) -> None:
    """Keep the source window (same units) if it is valid and ``keep_source``; else show
    ``window`` (the robust percentile range the enhancer normalised with, or the detail map's)."""
    width = dataset.get("WindowWidth")
    widths = list(width) if isinstance(width, pydicom.multival.MultiValue) else [width]
    if keep_source and dataset.get("WindowCenter") is not None and width is not None and all(
            w is not None and float(w) >= 1 for w in widths):
        return
    low, high = window.low, window.high
    dataset.WindowCenter, dataset.WindowWidth = _ds((low + high) / 2), _ds(max(high - low, 1.0))


def _save(dataset: pydicom.Dataset, target: Path) -> None:
    """Write ``dataset`` as a DICOM file (not yet synced: see :class:`_Syncs`). ``dcmwrite``
    (unlike ``save_as``) re-encodes a header read from a big-endian file into the
    little-endian file meta."""
    with open(target, "wb") as file:
        pydicom.dcmwrite(file, dataset, enforce_file_format=True)


class _Syncs:
    """Syncs written files to disk on :data:`SYNC_THREADS` threads while the next ones are
    written; :meth:`wait` returns once every file handed over is on disk (it raises the first
    failure), so the folder can be synced and renamed after it."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="medsr-sync")
        self._pending: list[Future] = []

    def add(self, path: Path) -> None:
        self._pending = [future for future in self._pending if not self._finished(future)]
        self._pending.append(self._pool.submit(sync_file, path))

    @staticmethod
    def _finished(future: Future) -> bool:
        if future.done():
            future.result()  # a failed sync fails the series now
            return True
        return False

    def wait(self) -> None:
        for future in self._pending:
            future.result()
        self._pending = []

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _source_reference(header: pydicom.Dataset, frame: int | None = None) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame + 1
    return item


def _image_name(index: int) -> str:
    """The file name of output image ``index`` (0-based): ``IM0001.dcm``..."""
    return f"IM{index + 1:04d}.dcm"


class _SeriesIdentity:
    """What names the new series and its images: the series UID, instance UIDs (random, or
    derived from ``uid_seed``), creation time, description and series number. Each output
    header starts as its source header made an image of this series (:func:`_derive_common`)."""

    def __init__(self, uid_seed: str | None, description: str, series_suffix: str,
                 series_number_offset: int) -> None:
        self.uid_seed, self.description = uid_seed, description
        self.series_suffix, self.series_number_offset = series_suffix, series_number_offset
        self.now = datetime.datetime.now()  # one creation time for every image of the series
        self.series_uid = _derived_uid(uid_seed, "series")

    def derive(self, header: pydicom.Dataset) -> pydicom.Dataset:
        """A copy of source ``header`` as an image of the new series."""
        return _derive_common(header, self.series_uid, self.description, self.series_suffix, self.now,
                              self.series_number_offset)

    def instance_uid(self, *names) -> str:
        """The SOPInstanceUID of the output image named by ``names`` (its source image's UID,
        and for a thin slice its place among that slice's thin ones)."""
        return _derived_uid(self.uid_seed, "image", *names)


class _SliceLayout:
    """Where each output image lies and how it is numbered: ``factor`` images per source slice
    (thin slices, placed between the real source positions: see the module docstring) on a grid
    ``scale`` times finer in-plane, moved with the grid; spacing, SliceLocation and slice
    numbers to match."""

    def __init__(self, scan: OpenScan, affine: np.ndarray, scale: int, factor: int, positions: list | None) -> None:
        self.scan, self.scale, self.factor = scan, scale, factor
        self.spacing = _pixel_spacing(affine)
        self.n_images = scan.n_slices * factor
        # the in-plane part of the grid's move is the same for every slice (the origin's move
        # less the half step the slice axis adds; none on the k-space grid, where the first
        # pixel stays); along the slice axis each image is placed from
        # the real positions of its source slices, so uneven or tilted series stay exact
        shift = LPS_TO_RAS[:3, :3] @ ((affine[:3, 3] - scan.affine[:3, 3]) - (affine[:3, 2] - scan.affine[:3, 2]) / 2)
        self.positions = None
        if positions is not None:
            source_positions = np.array([[float(v) for v in position] for position in positions])
            self.positions = _along_thin_slices(source_positions, factor) + shift
        locations = _per_slice_values(scan, "SliceLocation") if factor > 1 else None
        self.slice_locations = None if locations is None else _along_thin_slices([float(v) for v in locations], factor)
        # thin slices are numbered again: {keyword: number of every image}, where the source's
        # numbers count its slices
        self.slice_numbers = {}
        for keyword in SLICE_NUMBERS if factor > 1 else ():
            numbers = _per_slice_values(scan, keyword)
            numbers = None if numbers is None else _thin_numbers([int(n) for n in numbers], factor)
            if numbers is not None:
                self.slice_numbers[keyword] = numbers

    def source_slices(self, index: int) -> list[int]:
        """The source slices (array order) output image ``index`` comes from: its own, then, for
        a thin slice off its source slice's centre, the neighbour on its side (if any)."""
        own, offset = divmod(index, self.factor)
        side = int(np.sign(2 * offset - (self.factor - 1)))  # -1 below the centre, +1 above
        neighbour = own + side
        return [own, neighbour] if side and 0 <= neighbour < self.scan.n_slices else [own]

    def place_image(self, dataset: pydicom.Dataset, header: pydicom.Dataset, index: int) -> None:
        """The geometry of single-frame image ``index`` (derived from source ``header``): only
        the geometry the source had, so an absent position or orientation stays absent."""
        if self.scale > 1:
            for keyword in IMAGE_SPACINGS:
                if header.get(keyword):
                    dataset[keyword].value = _scaled_spacing(header.get(keyword), self.scale)
        if header.get("ImagePositionPatient"):
            _set_position(dataset, self.positions[index])
        if self.factor > 1:
            self.thin_image(dataset, index)
            dataset.InstanceNumber = self.slice_numbers.get("InstanceNumber", range(1, self.n_images + 1))[index]

    def place_frame(self, group: pydicom.Dataset, index: int) -> None:
        """The position of frame ``index`` in its per-frame functional ``group``."""
        position = pydicom.Dataset()
        position.ImagePositionPatient = _position_text(self.positions[index])
        group.PlanePositionSequence = Sequence([position])
        for item in _macro_items(group):
            if "ImagePosition" in item:  # the retired copy, in converted legacy attributes
                item.ImagePosition = position.ImagePositionPatient

    def thin_image(self, item: pydicom.Dataset, index: int) -> None:
        """The attributes that make ``item`` (an image's header, or a macro of a frame's
        functional groups) describe thin image ``index``, where it has them: slice measures
        divided, SliceLocation placed, slice numbers counted again."""
        _divide_slice_measures(item, self.factor)
        if "SliceLocation" in item:
            if self.slice_locations is not None:
                item.SliceLocation = _ds(self.slice_locations[index])
            else:  # some source slice has none: no thin slice gets a location it cannot vouch for
                del item.SliceLocation
        for keyword, numbers in self.slice_numbers.items():
            if keyword in item:
                item[keyword].value = numbers[index]

    def thin_frames(self, dataset: pydicom.Dataset, frames: list[pydicom.Dataset]) -> None:
        """What makes the copied per-frame groups of ``frames`` thin slices: slice measures
        divided (shared and per-frame), SliceLocation placed, slice numbers and the Dimension
        Index that counts the slices numbered again."""
        shared = dataset.get("SharedFunctionalGroupsSequence")
        for item in [dataset, *(_macro_items(shared[0]) if shared else [])]:
            _divide_slice_measures(item, self.factor)
        for index, group in enumerate(frames):
            for item in _macro_items(group):
                self.thin_image(item, index)
        per_frame_source = self.scan.dicom_headers[0].PerFrameFunctionalGroupsSequence
        source = [_dimension_index(per_frame_source[frame]) for frame in self.scan.frame_order]
        if any(values is None for values in source):
            return
        renumbered = [_thin_numbers(list(column), self.factor) for column in zip(*source, strict=True)]
        for index, group in enumerate(frames):
            values = [own if numbers is None else numbers[index]
                      for own, numbers in zip(source[index // self.factor], renumbered, strict=True)]
            group.FrameContentSequence[0].DimensionIndexValues = values if len(values) > 1 else values[0]


class _DerivedHeaders:
    """The complete header of each output object, derived from its source header: named by
    :class:`_SeriesIdentity`, placed by :class:`_SliceLayout`, its pixels described by
    :class:`PixelEncoder`, referencing its source images, with a display window."""

    def __init__(self, scan: OpenScan, identity: _SeriesIdentity, layout: _SliceLayout, encoder: PixelEncoder,
                 window: IntensityWindow, keep_source_window: bool) -> None:
        self.scan, self.identity, self.layout, self.encoder = scan, identity, layout, encoder
        self.window, self.keep_source_window = window, keep_source_window

    def image(self, index: int, stored: np.ndarray, mapping: tuple[float, float]) -> pydicom.Dataset:
        """Single-frame output image ``index``, its pixels ``stored`` under rescale ``mapping``."""
        sources = self.layout.source_slices(index)
        header = self.scan.dicom_headers[sources[0]]
        dataset = self.identity.derive(header)
        # a thin slice is named by its source slice and its place among that slice's thin ones
        dataset.SOPInstanceUID = self.identity.instance_uid(header.SOPInstanceUID, index % self.layout.factor)
        self.layout.place_image(dataset, header, index)
        dataset.RescaleSlope, dataset.RescaleIntercept = _ds(mapping[0]), _ds(mapping[1])
        if "RescaleType" not in dataset and self.scan.modality != "CT":
            dataset.RescaleType = "US"  # unspecified units: MR signal
        dataset.SourceImageSequence = Sequence([_source_reference(self.scan.dicom_headers[k]) for k in sources])
        _window(dataset, self.window, self.keep_source_window)
        _file_meta(dataset)
        self.encoder.set_pixel_data(dataset, stored)
        return dataset

    def multiframe(self, mappings: list[tuple[float, float]]) -> pydicom.Dataset:
        """The multi-frame object's header (everything but the pixel data, which is appended)
        for one frame per rescale of ``mappings``, the frames' in order."""
        scan, header = self.scan, self.scan.dicom_headers[0]
        dataset = self.identity.derive(header)
        # enhanced IODs have no General Image module: the description is each frame's
        # Derivation Image macro's (below), and at the top level it would make the object an
        # extended SOP class
        del dataset.DerivationDescription
        for tag in [t for t in dataset.keys() if t >= PIXEL_DATA]:
            del dataset[tag]  # the pixel data goes last, appended by the writer
        dataset.SOPInstanceUID = self.identity.instance_uid(header.SOPInstanceUID)
        columns, rows = (n * self.layout.scale for n in scan.shape[:2])
        self.encoder.set_pixel_module(dataset, rows, columns)
        dataset.NumberOfFrames = len(mappings)
        # one rescale for every frame stays where the source has it; else every frame says its own
        shared_mapping = mappings[0] if len(set(mappings)) == 1 else None
        frames = [self._frame_group(index, None if shared_mapping is not None else mapping)
                  for index, mapping in enumerate(mappings)]
        if self.layout.factor > 1:
            self.layout.thin_frames(dataset, frames)
        if shared_mapping is None:
            drop_shared_rescale(dataset)
        dataset.PerFrameFunctionalGroupsSequence = Sequence(frames)
        # enhanced IODs: value 2 stays PRIMARY (SECONDARY is not an enumerated value there), the
        # frame types say DERIVED, and derived objects list their sources as evidence
        dataset.ImageType = ["DERIVED", "PRIMARY", *list(header.ImageType)[2:]]
        dataset.SourceImageEvidenceSequence = Sequence([_evidence(header)])
        self._derive_macros(dataset, frames, shared_mapping)
        self.encoder.set_padding(dataset)
        _file_meta(dataset)
        return dataset

    def _frame_group(self, index: int, own_mapping: tuple[float, float] | None) -> pydicom.Dataset:
        """Per-frame functional groups of output frame ``index``: its source frame's, placed,
        referencing the source frames, with ``own_mapping`` as its rescale when given."""
        header = self.scan.dicom_headers[0]
        sources = [self.scan.frame_order[k] for k in self.layout.source_slices(index)]
        group = copy.deepcopy(header.PerFrameFunctionalGroupsSequence[sources[0]])
        self.layout.place_frame(group, index)
        derivation = pydicom.Dataset()
        derivation.DerivationDescription = self.identity.description[:1024]
        derivation.SourceImageSequence = Sequence([_source_reference(header, frame) for frame in sources])
        group.DerivationImageSequence = Sequence([derivation])
        if own_mapping is not None:  # some frames needed a wider rescale: every frame says its own
            transform = pydicom.Dataset()
            transform.RescaleSlope = _ds(own_mapping[0])
            transform.RescaleIntercept = _ds(own_mapping[1])
            transform.RescaleType = "HU" if self.scan.modality == "CT" else "US"
            group.PixelValueTransformationSequence = Sequence([transform])
        return group

    def _derive_macros(self, dataset: pydicom.Dataset, frames: list[pydicom.Dataset],
                       shared_mapping: tuple[float, float] | None) -> None:
        """The shared and per-frame macros made the output's: frame types DERIVED, display
        windows, the finer pixel spacing, and ``shared_mapping`` (when every frame has that one
        rescale) where the source says its rescale."""
        shared = dataset.get("SharedFunctionalGroupsSequence")
        for groups in [*(shared or []), *frames]:
            for name in [k for k in groups.dir() if k.endswith("FrameTypeSequence")]:
                frame_type = list(groups.get(name)[0].FrameType)
                groups.get(name)[0].FrameType = ["DERIVED", *frame_type[1:]]
            if groups.get("FrameVOILUTSequence"):
                _window(groups.FrameVOILUTSequence[0], self.window, self.keep_source_window)
            if self.layout.scale > 1 and groups.get("PixelMeasuresSequence"):
                groups.PixelMeasuresSequence[0].PixelSpacing = self.layout.spacing
            if shared_mapping is not None and groups.get("PixelValueTransformationSequence"):
                groups.PixelValueTransformationSequence[0].RescaleSlope = _ds(shared_mapping[0])
                groups.PixelValueTransformationSequence[0].RescaleIntercept = _ds(shared_mapping[1])
        if shared_mapping is not None and not functional_group(dataset, None, "PixelValueTransformationSequence"):
            dataset.RescaleSlope, dataset.RescaleIntercept = _ds(shared_mapping[0]), _ds(shared_mapping[1])


class _DerivedSeriesWriter:
    """Write a new series derived image by image from an opened DICOM scan, on a grid ``scale``
    times finer in-plane (on ``grid``) with ``factor`` thin slices per source slice (one of the
    two is 1: see :class:`DicomSeriesWriter` and :class:`ThinSliceSeriesWriter`, which hold the
    contract).

    Each slab is encoded (:class:`PixelEncoder`) and written at once, one file per image, or
    for multi-frame input appended to a scratch file joined to its header on leaving the block;
    the headers come from :class:`_DerivedHeaders`. Files are synced as they are written and
    the series is renamed into place when it is complete.
    """

    def __init__(self, folder: str | Path, scan: OpenScan, affine: np.ndarray, description: str,
                 window: IntensityWindow, overwrite: bool, *, scale: int, factor: int,
                 series_suffix: str, grid: str = "bicubic", series_number_offset: int = SERIES_NUMBER_OFFSET,
                 keep_source_window: bool = True, uid_seed: str | None = None) -> None:
        _check_source(scan)
        _check_grid(scan, affine, scale, factor, grid)
        positions = _per_slice_values(scan, "ImagePositionPatient")
        _check_thin_slices_placeable(scan, factor, positions)
        self.folder, self.scan = Path(folder), scan
        _check_destination(self.folder, overwrite)
        identity = _SeriesIdentity(uid_seed, description, series_suffix, series_number_offset)
        self.encoder = PixelEncoder(scan)
        self.layout = _SliceLayout(scan, affine, scale, factor, positions)
        self.headers = _DerivedHeaders(scan, identity, self.layout, self.encoder, window, keep_source_window)
        self.written, self.mappings = 0, []

    def __enter__(self) -> _DerivedSeriesWriter:
        self._cleanup = ExitStack()
        with write_errors(self.folder):
            self.staging = self._cleanup.enter_context(staging_folder(self.folder))
        self._syncs = _Syncs()
        self._cleanup.callback(self._syncs.close)  # first out: the syncs end before the staging goes
        self._frames = None
        if self.scan.multiframe:
            try:
                with write_errors(self.folder):
                    self._frames = open(self.staging / FRAMES_SCRATCH, "wb")
            except BaseException as failure:
                self.__exit__(type(failure), failure, failure.__traceback__)
                raise
        return self

    def write(self, slab: np.ndarray) -> None:
        """Store the next ``n`` enhanced images, ``(n, I, J)`` float32 in original units."""
        with write_errors(self.folder):
            self._write(slab)

    def _write(self, slab: np.ndarray) -> None:
        for plane in slab:
            stored, mapping = self.encoder.encode(plane)
            if self.scan.multiframe:
                self._frames.write(stored.tobytes())
            else:
                self._write_image(self.written, stored, mapping)
            self.mappings.append(mapping)
            self.written += 1

    def _write_image(self, index: int, stored: np.ndarray, mapping: tuple[float, float]) -> None:
        target = self.staging / _image_name(index)
        _save(self.headers.image(index, stored, mapping), target)
        self._syncs.add(target)

    def __exit__(self, kind, error, traceback) -> bool:
        """Rename the complete series into place; on any failure (in the block or here) remove
        the staging folder and leave ``folder`` as it was."""
        commit_or_discard(kind is not None, self._cleanup, self.folder, self._close_frames, self._commit)
        return False

    def _commit(self) -> None:
        if self.written != self.layout.n_images:
            raise OutputError(f"{self.folder}: only {self.written} of {self.layout.n_images} slices were written")
        if self.scan.multiframe:
            self._write_multiframe()
        self._syncs.wait()  # every file is on disk before the folder is
        sync_folder(self.staging)
        move_into_place(self.staging, self.folder)

    def _close_frames(self) -> None:
        frames, self._frames = self._frames, None
        if frames is not None:
            frames.close()

    def _write_multiframe(self) -> None:
        raw = self.staging / FRAMES_SCRATCH
        target = self.staging / _image_name(0)
        _save(self.headers.multiframe(self.mappings), target)
        append_pixel_data(target, raw, self.encoder.dtype)
        self._syncs.add(target)
        raw.unlink()


class DicomSeriesWriter(_DerivedSeriesWriter):
    """Write an in-plane enhanced volume as a new DICOM series, slice by slice, into ``folder``.

    One image per source slice (one multi-frame object for multi-frame input) with ``scale``
    times the rows and columns; each keeps its source slice's own position, moved onto the
    finer grid: by a quarter of a source pixel (x2) towards the first pixel's corner on the
    ``bicubic`` grid, not at all on the ``kspace`` grid.

    Args:
        folder: the series folder to create (files ``IM0001.dcm``...).
        scan: the opened source DICOM scan (headers in slice order, or one multi-frame header).
        affine: RAS affine of the enhanced grid (slice axis 2):
            ``enhanced_affine(scan.affine, 2, scale, grid)``.
        scale: in-plane factor.
        description: DerivationDescription text.
        window: the intensity window the enhancer used (display window when the source's is
            missing or invalid).
        overwrite: replace an existing ``folder`` (an empty one is replaced without it).
        grid: the grid of the source's pixels, the one the model was told: ``"bicubic"``
            (resampled) or ``"kspace"`` (k-space truncated).
        detail_map: the series is the detail map of an enhanced series (:mod:`medsr.detail_map`),
            a second series of the same study on the same grid: SeriesDescription ending
            ``medsr detail map x<scale>``, SeriesNumber one past the enhanced series', and
            ``window`` as its display window (the source's would not fit a map of differences).
        uid_seed: None (the default) for new random series and instance UIDs; any text for
            UIDs that are the same every time for the same text and source images (a hash of
            the source series, the weights and the options: what ``medsr serve`` passes). A
            detail map derives its own from the same text, so it never shares the output's.

    Example:
        >>> affine = enhanced_affine(scan.affine, 2, 2, "kspace")
        >>> with DicomSeriesWriter(out, scan, affine, 2, text, window, grid="kspace") as writer:
        ...     for slab in slabs:  # (n, I', J') in original units, in slice order
        ...         writer.write(slab)

    Raises:
        OutputError: ``folder`` exists and is not empty (without ``overwrite``), or its parent
            is missing; the scan is not DICOM; on leaving the block, fewer slices were written
            than the scan has.
        ValueError: ``affine`` is not the grid above.
    """

    def __init__(self, folder: str | Path, scan: OpenScan, affine: np.ndarray, scale: int,
                 description: str, window: IntensityWindow, overwrite: bool = False, *,
                 grid: str = "bicubic", detail_map: bool = False, uid_seed: str | None = None) -> None:
        suffix = f" medsr detail map x{scale}" if detail_map else f" medsr SR x{scale}"
        if detail_map and uid_seed is not None:
            uid_seed = f"{uid_seed} detail map"
        super().__init__(folder, scan, affine, description, window, overwrite, scale=scale, factor=1,
                         series_suffix=suffix, grid=grid,
                         series_number_offset=SERIES_NUMBER_OFFSET + (1 if detail_map else 0),
                         keep_source_window=not detail_map, uid_seed=uid_seed)


class ThinSliceSeriesWriter(_DerivedSeriesWriter):
    """Write a through-plane enhanced volume (thick slices made thin) as a new DICOM series.

    ``factor`` images per source slice, in slice order: thin image ``k * factor + j`` is thin
    slice ``j`` of source slice ``k``, derived from that slice's header (one multi-frame object
    with ``factor`` times the frames for multi-frame input). Rows, columns and pixel spacing stay;
    each thin image is placed between the real positions of its source slice and the neighbour on
    its side (see the module docstring), with SliceThickness and SpacingBetweenSlices divided by
    ``factor``, SliceLocation placed alike, InstanceNumber 1..N in the source's direction, and
    references to the source slices it lies between.

    Args:
        folder: the series folder to create (files ``IM0001.dcm``...).
        scan: the opened source DICOM scan, at least two slices with ImagePositionPatient.
        affine: RAS affine of the thin grid (slice axis 2):
            ``rescaled_affine(scan.affine, (1, 1, factor))``.
        factor: thin slices per source slice (2-8 for the through-plane model).
        description: DerivationDescription text, e.g. ``"medsr through-plane x4"``.
        window: the intensity window the enhancer used (display window when the source's is
            missing or invalid).
        overwrite: replace an existing ``folder`` (an empty one is replaced without it).
        uid_seed: as :class:`DicomSeriesWriter`.

    Example:
        >>> with ThinSliceSeriesWriter(out, scan, enhanced.affine, 4, text, window) as writer:
        ...     writer.write(np.moveaxis(enhanced.array, 2, 0))  # (4 K, I, J) in original units

    Raises:
        OutputError: as :class:`DicomSeriesWriter`, and a scan of one slice (nothing to place
            thin slices between).
        ValueError: ``affine`` is not the grid above.
    """

    def __init__(self, folder: str | Path, scan: OpenScan, affine: np.ndarray, factor: int,
                 description: str, window: IntensityWindow, overwrite: bool = False, *,
                 uid_seed: str | None = None) -> None:
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 2:
            raise ValueError(f"factor must be a whole number of thin slices per slice, 2 or more, not {factor!r}")
        super().__init__(folder, scan, affine, description, window, overwrite, scale=1, factor=int(factor),
                         series_suffix=f" medsr thin x{factor}", uid_seed=uid_seed)


def _check_source(scan: OpenScan) -> None:
    if scan.source_format != "dicom" or scan.slice_axis != 2:
        raise OutputError("DICOM output needs DICOM input enhanced along its acquired slices")


def _check_grid(scan: OpenScan, affine: np.ndarray, scale: int, factor: int, grid: str) -> None:
    """Refuse an ``affine`` other than the grid the writer places the images on."""
    if factor > 1:
        expected, rule = rescaled_affine(scan.affine, (1, 1, factor)), "medsr.geometry.rescaled_affine"
    else:
        expected, rule = enhanced_affine(scan.affine, 2, scale, grid), f"medsr.geometry.enhanced_affine, {grid}"
    if not np.allclose(affine, expected, atol=AFFINE_TOLERANCE):
        raise ValueError(f"affine must be the source grid divided by ({scale}, {scale}, {factor}) "
                         f"({rule}), not {np.round(affine, 4).tolist()}")


def _check_thin_slices_placeable(scan: OpenScan, factor: int, positions: list | None) -> None:
    """Thin slices are placed between the positions of neighbouring source slices: refuse a
    scan without two slices or without every slice's position (``positions``)."""
    if factor > 1 and scan.n_slices < 2:
        raise OutputError(f"{scan.path}: thin slices are placed between neighbouring source slices; "
                          "this scan has one slice")
    if factor > 1 and positions is None:
        raise OutputError(f"{scan.path}: thin slices are placed between the ImagePositionPatient of "
                          "neighbouring source slices; not every slice has one")


def _check_destination(folder: Path, overwrite: bool) -> None:
    if output_taken(folder) and not overwrite:
        raise OutputError(f"{folder}: already exists; pass --overwrite to replace it")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder")
    if not folder.parent.is_dir():
        raise OutputError(f"{folder}: folder {folder.parent} does not exist; create it first")


def _evidence(header: pydicom.Dataset) -> pydicom.Dataset:
    """A Hierarchical SOP Instance Reference item pointing at the source object."""
    sop = pydicom.Dataset()
    sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
    series = pydicom.Dataset()
    series.SeriesInstanceUID = header.SeriesInstanceUID
    series.ReferencedSOPSequence = Sequence([sop])
    study = pydicom.Dataset()
    study.StudyInstanceUID = header.StudyInstanceUID
    study.ReferencedSeriesSequence = Sequence([series])
    return study


def _dimension_index(group: pydicom.Dataset) -> list[int] | None:
    """A frame's DimensionIndexValues (one per dimension), or None without them."""
    content = group.get("FrameContentSequence")
    value = content[0].get("DimensionIndexValues") if content else None
    if value is None:
        return None
    return [int(v) for v in (value if isinstance(value, pydicom.multival.MultiValue) else [value])]
