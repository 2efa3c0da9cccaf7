"""Enhance a whole volume slice by slice: normalise, upscale in batches, map back to units.

The output grid follows :func:`medsr.geometry.rescaled_affine`: in-plane voxel size divided by
the scale, same physical extent, slice axis untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import queue
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsr.errors import MedsrError
from medsr.geometry import in_plane_factors, rescaled_affine, voxel_sizes
from medsr.model import DEGRADATION_CODES, SRResNet
from medsr.reading import OpenScan, planes_from_whole, refuse_non_finite
from medsr.transforms import IntensityCounts, IntensityWindow

logger = logging.getLogger(__name__)

MIN_SLICE_SIZE = 4  # smaller slices carry too little context for a 9x9 head
DEFAULT_BATCH = {"cpu": 4}
MAX_GPU_BATCH = 256
# slices kept in memory from the survey pass, so short series are decoded once; longer
# series decode the rest again, so memory stays bounded whatever the series length
READ_CACHE_BYTES = 256 * 2**20
# torch.compile costs ~13 s the first time on a 2-core CPU (~4 s once inductor's disk cache
# has the graphs) and makes the forward pass 1.8x faster there (benchmarks/README.md): it
# repays itself after about 100 slices, so auto waits for series clearly past that
COMPILE_MIN_SLICES = 256
COMPILE_CHOICES = ("auto", "on", "off")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on CUDA, fp32 on the CPU


@dataclass(frozen=True)
class EnhancedVolume:
    """Result of :func:`enhance_volume`.

    Attributes:
        array: ``(I', J', K')`` float32 in the input's original units, in-plane axes x scale;
            None when the slices were streamed to a ``sink`` instead.
        affine: ``(4, 4)`` RAS affine of the enhanced grid (mm).
        slice_axis: the untouched axis.
        window: the intensity window used to normalise the input.
        shape: ``(I', J', K')``.
    """

    array: np.ndarray | None
    affine: np.ndarray
    slice_axis: int
    window: IntensityWindow
    shape: tuple[int, int, int]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each axis."""
        return voxel_sizes(self.affine)


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise MedsrError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise MedsrError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


@dataclass
class Survey:
    """What a first pass over the slices learns: the value counts that give the intensity
    window, and the first slices read, kept (up to a memory budget) so the enhancing pass
    need not decode them again."""

    counts: IntensityCounts
    kept: dict[int, np.ndarray]


def survey_scan(scan: OpenScan, keep_bytes: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> Survey:
    """Read every slice once: count values, refuse NaN/infinite voxels, keep the first slices
    up to ``keep_bytes`` (default :data:`READ_CACHE_BYTES`); ``progress(read, total)`` after
    each slice.

    Raises:
        ScanReadError: damaged pixel data or non-finite voxels (counted over the whole scan).
    """
    keep_bytes = READ_CACHE_BYTES if keep_bytes is None else keep_bytes
    counts, kept, kept_bytes = IntensityCounts(), {}, 0
    for index, plane in enumerate(scan.planes()):
        counts.add(plane)
        if kept_bytes + plane.nbytes <= keep_bytes:
            kept[index] = plane
            kept_bytes += plane.nbytes
        if progress is not None:
            progress(index + 1, scan.n_slices)
    refuse_non_finite(scan.path, counts.non_finite)
    return Survey(counts, kept)


def enhance_scan(scan: OpenScan, model: SRResNet, degradation: str = "bicubic",
                 device: torch.device | str = "cpu", batch_size: int | None = None,
                 lower_percentile: float = 0.5, upper_percentile: float = 99.5,
                 progress: Callable[[int, int], None] | None = None,
                 sink: Callable[[np.ndarray], None] | None = None,
                 survey: Survey | None = None, channels_last: bool | None = None,
                 compile_model: str = "auto", precision: str = "auto") -> EnhancedVolume:
    """Upscale every slice of ``scan`` in-plane by the model's scale, streaming.

    A reader thread decodes and normalises the next batch (into pinned memory on CUDA) while
    the model runs on this one, and a writer thread hands finished slices to ``sink``; host
    memory holds a few batches, plus at most ``READ_CACHE_BYTES`` of slices kept from the
    survey pass, however long the series.

    Args:
        scan: an opened scan (:func:`medsr.reading.open_scan`).
        model: a trained :class:`SRResNet`.
        degradation: how the input lost its resolution, ``"bicubic"`` (resampled, CT) or
            ``"kspace"`` (MR acquired with fewer k-space lines); see :mod:`medsr.model`.
        device: where the model runs; CUDA uses channels-last tensors.
        batch_size: slices per forward pass (default: 4 on CPU; on CUDA as many as fit in
            half of the free GPU memory, at most 256).
        progress: called with ``(slices_done, slices_total)`` after every batch.
        sink: if given, receives each batch of enhanced slices ``(n, I', J')`` (original units,
            in order) on a writer thread, and no full output is kept.
        survey: the first pass, if the caller already ran :func:`survey_scan`.
        channels_last: NHWC tensors (default: on CUDA only, where the convolutions run faster).
        compile_model: ``torch.compile`` the model: ``on``, ``off``, or ``auto`` (on from
            :data:`COMPILE_MIN_SLICES` slices, where the compile time pays). If compiling fails
            (no C++ compiler, say), a warning is logged and the model runs as it is.
        precision: ``bf16`` (bfloat16 autocast; the k-space upsampler stays float32), ``fp32``,
            or ``auto``: bf16 on CUDA, fp32 on the CPU.

    Returns:
        The :class:`EnhancedVolume` in original units with its affine.

    Raises:
        MedsrError: slices too small, a constant volume, damaged or non-finite voxels.
    """
    device = torch.device(device)
    if degradation not in DEGRADATION_CODES:
        raise MedsrError(f"degradation must be one of {', '.join(DEGRADATION_CODES)}, not {degradation!r}")
    axis = scan.slice_axis
    in_plane = [scan.shape[a] for a in range(3) if a != axis]
    if min(in_plane) < MIN_SLICE_SIZE:
        raise MedsrError(
            f"slices of {in_plane[0]}x{in_plane[1]} voxels are too small; medsr needs at least "
            f"{MIN_SLICE_SIZE}x{MIN_SLICE_SIZE} (check --slice-axis)"
        )
    if batch_size is not None and batch_size < 1:
        raise MedsrError(f"--batch-size must be >= 1, not {batch_size}")
    survey = survey if survey is not None else survey_scan(scan)
    window = survey.counts.window(lower_percentile, upper_percentile)
    total, scale = scan.n_slices, model.scale
    out_plane = (in_plane[0] * scale, in_plane[1] * scale)
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=layout).eval()
    code = DEGRADATION_CODES[degradation]
    autocast = _autocast(device, precision)
    batch_size = batch_size or default_batch_size(model, device, tuple(in_plane), code, autocast)
    forward = _Forward(model, compile_model, total)
    output = None if sink is not None else np.empty((total, *out_plane), dtype=np.float32)

    def batches():  # on the reader thread
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            planes = [survey.kept.pop(k) if k in survey.kept else scan.read_plane(k)
                      for k in range(start, stop)]
            if forward.compiled:  # a compiled graph fits one batch shape: pad the last batch
                planes += planes[-1:] * (batch_size - len(planes))
            low_res = torch.from_numpy(window.forward(np.stack(planes)))[:, None]
            yield start, stop - start, low_res.pin_memory() if device.type == "cuda" else low_res

    with (torch.inference_mode(), autocast, _BackgroundSink(sink) as deliver,
          _Prefetch(batches()) as prefetched):
        for start, count, low_res in prefetched:
            low_res = low_res.to(device, non_blocking=True).contiguous(memory_format=layout)
            codes = torch.full((len(low_res),), code, device=device)
            high_res = forward(low_res, codes).float()[:count, 0].cpu().numpy()
            high_res = window.inverse(high_res)
            if output is not None:
                output[start:start + len(high_res)] = high_res
            else:
                deliver(high_res)
            if progress is not None:
                progress(start + len(high_res), total)
    shape = [total, *out_plane]
    shape.insert(axis, shape.pop(0))
    return EnhancedVolume(
        array=None if output is None else np.ascontiguousarray(np.moveaxis(output, 0, axis)),
        affine=rescaled_affine(scan.affine, in_plane_factors(axis, scale)),
        slice_axis=axis,
        window=window,
        shape=tuple(shape),
    )


def enhance_volume(volume: np.ndarray, affine: np.ndarray, slice_axis: int, model: SRResNet,
                   degradation: str = "bicubic", device: torch.device | str = "cpu",
                   batch_size: int | None = None, lower_percentile: float = 0.5,
                   upper_percentile: float = 99.5, progress: Callable[[int, int], None] | None = None,
                   sink: Callable[[np.ndarray], None] | None = None, precision: str = "auto") -> EnhancedVolume:
    """:func:`enhance_scan` for a volume already in memory: ``(I, J, K)`` in original units
    with its RAS ``affine``, slices along ``slice_axis``."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise MedsrError(f"expected a 3-D volume, got shape {volume.shape}")
    scan = OpenScan(shape=tuple(volume.shape), affine=np.asarray(affine, dtype=np.float64),
                    slice_axis=slice_axis, path=Path("<volume>"), source_format="array",
                    read_plane=lambda index: np.take(volume, index, axis=slice_axis))
    return enhance_scan(scan, model, degradation, device, batch_size, lower_percentile,
                        upper_percentile, progress, sink, survey=survey_scan(scan, keep_bytes=0),
                        precision=precision)


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse a value of ``--option`` outside ``choices``, naming them."""
    if value not in choices:
        raise MedsrError(f"--{option} must be one of {', '.join(choices)}, not {value!r}")


def _autocast(device: torch.device, precision: str):
    check_choice("precision", precision, PRECISIONS)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_batch_size(model: SRResNet, device: torch.device, plane: tuple[int, int], code: int,
                       autocast=None) -> int:
    """Slices per forward pass: 4 on CPU (more only adds latency); on CUDA, measured: one
    slice's peak activation memory (under ``autocast``, default bf16), then as many slices as
    fit in half the free memory."""
    if device.type != "cuda":
        return DEFAULT_BATCH["cpu"]
    autocast = autocast if autocast is not None else _autocast(device, "auto")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode(), autocast:
        model(torch.zeros(1, 1, *plane, device=device), torch.full((1,), code, device=device))
    torch.cuda.synchronize(device)
    per_slice = torch.cuda.max_memory_allocated(device) - before
    free, _ = torch.cuda.mem_get_info(device)
    return batch_size_for_memory(free, per_slice)


def batch_size_for_memory(free_bytes: int, per_slice_bytes: int, fraction: float = 0.5,
                          largest: int = MAX_GPU_BATCH) -> int:
    """As many slices as fit in ``fraction`` of ``free_bytes``, between 1 and ``largest``."""
    return int(max(1, min(largest, fraction * free_bytes // max(per_slice_bytes, 1))))


class _Forward:
    """The model, compiled with ``torch.compile`` when asked (or, for ``auto``, when the series
    is long enough to pay for it); falls back to the plain model if compiling fails."""

    def __init__(self, model: SRResNet, compile_model: str, n_slices: int) -> None:
        check_choice("compile", compile_model, COMPILE_CHOICES)
        self.model = model
        self.compiled = compile_model == "on" or (compile_model == "auto" and n_slices >= COMPILE_MIN_SLICES)
        self.run = torch.compile(model, dynamic=False) if self.compiled else model
        self.checked = not self.compiled

    def __call__(self, low_res: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        if self.checked:
            return self.run(low_res, codes)
        try:
            with warnings.catch_warnings():
                # inductor leaves the FFT of the k-space upsampler to eager code, and says so
                warnings.simplefilter("ignore", UserWarning)
                result = self.run(low_res, codes)
        except Exception as exc:  # compilation happens on the first call
            reason = " ".join(str(exc).split())[:200]
            logger.warning("torch.compile failed (%s: %s); running the model uncompiled",
                           type(exc).__name__, reason)
            self.run = self.model
            result = self.run(low_res, codes)
        self.checked = True
        return result


class _BackgroundSink:
    """Hands batches to ``sink`` on a writer thread (compression overlaps the next forward
    pass; zlib and PyTorch both release the GIL). At most two batches wait, so memory stays
    bounded; an error in the sink is raised in the caller when the block ends."""

    def __init__(self, sink: Callable[[np.ndarray], None] | None) -> None:
        self.sink, self.error = sink, None
        self.queue: queue.Queue = queue.Queue(maxsize=2)

    def __enter__(self) -> Callable[[np.ndarray], None]:
        if self.sink is not None:
            self.thread = threading.Thread(target=self._run, name="medsr-writer", daemon=True)
            self.thread.start()
        return self._put

    def _put(self, item: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.sink(item)
                except BaseException as exc:  # handed to the caller's thread
                    self.error = exc

    def __exit__(self, kind, error, traceback) -> bool:
        if self.sink is not None:
            self.queue.put(None)
            self.thread.join()
            if kind is None and self.error is not None:
                raise self.error
        return False


class _Prefetch:
    """Runs a generator on a reader thread, at most two items ahead; an error in it is raised
    in the consumer when it reaches that point. Decoding and NumPy release the GIL, so the
    reading overlaps the model."""

    DONE = object()

    def __init__(self, items) -> None:
        self.items, self.error, self.stopped = items, None, threading.Event()
        self.queue: queue.Queue = queue.Queue(maxsize=2)

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, name="medsr-reader", daemon=True)
        self.thread.start()
        return self._consume()

    def _run(self) -> None:
        try:
            for item in self.items:
                while not self.stopped.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stopped.is_set():
                    return
        except BaseException as exc:  # handed to the consumer's thread
            self.error = exc
        self.queue.put(self.DONE)

    def _consume(self):
        while (item := self.queue.get()) is not self.DONE:
            yield item
        if self.error is not None:
            raise self.error

    def __exit__(self, kind, error, traceback) -> bool:
        self.stopped.set()  # the consumer stopped early (an error): let the reader finish
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.1)
            except queue.Empty:
                pass
        return False


def enhance_file(input_path: str | Path, output: str | Path, scale: int = 2,
                 slice_axis: int | None = None, weights: str | Path | None = None,
                 degradation: str = "auto", device: str = "auto", batch_size: int | None = None,
                 series_uid: str | None = None, overwrite: bool = False,
                 output_format: str = "auto",
                 progress: Callable[[int, int], None] | None = None,
                 loaded: tuple | None = None, compile_model: str = "auto",
                 precision: str = "auto",
                 reading: Callable[[int, int], None] | None = None) -> EnhancedVolume:
    """Read a scan, enhance it with ``weights`` (default: the shipped model), write NIfTI or a
    DICOM series (see :func:`resolve_format`).

    ``degradation="auto"`` picks ``kspace`` for MR and ``bicubic`` for everything else
    (:func:`default_degradation`). Every check that can fail (output path, weights, scale)
    runs before the slow work, and the output appears only when complete. ``loaded`` is a
    ``(model, config)`` pair from :func:`load_enhancer`, to reuse one model over many scans.
    ``reading`` and ``progress`` report ``(slices_done, total)`` of the survey pass and of the
    enhancing pass.
    """
    from medsr.reading import open_scan
    from medsr.writing import NiftiSliceWriter, check_output_path

    input_path, output = Path(input_path), Path(output)
    if degradation != "auto" and degradation not in DEGRADATION_CODES:
        raise MedsrError(f"--degradation must be auto, {' or '.join(DEGRADATION_CODES)}, not {degradation!r}")
    output_format = resolve_format(output, output_format)
    check_output_path(output, [input_path], overwrite)
    torch_device = pick_device(device)
    check_choice("precision", precision, PRECISIONS)  # before the slow work
    check_choice("compile", compile_model, COMPILE_CHOICES)
    model, config = loaded if loaded is not None else load_enhancer(weights, scale)
    scan = open_scan(input_path, series_uid)
    if slice_axis is not None and slice_axis != scan.slice_axis:
        # slices across the acquired ones: the volume is read once, whole
        acquired = scan
        scan = dataclasses.replace(acquired, slice_axis=slice_axis,
                                   read_plane=planes_from_whole(lambda: acquired.load().array, slice_axis))
    axis = scan.slice_axis
    if output_format == "dicom" and (scan.source_format != "dicom" or axis != 2):
        raise MedsrError(f"{output}: DICOM output needs DICOM input enhanced along its own "
                         "slices; write .nii or .nii.gz instead")
    survey = survey_scan(scan, progress=reading)
    if degradation == "auto":
        degradation = default_degradation(scan, survey.counts)
        logger.info("%s: treating it as %s-degraded", input_path, degradation)
    description = f"medsr SRResNet x{scale} in-plane, {degradation} model"
    run = functools.partial(enhance_scan, scan, model, degradation, torch_device, batch_size,
                            config.lower_percentile, config.upper_percentile, progress,
                            survey=survey, compile_model=compile_model, precision=precision)
    shape = tuple(n * (scale if a != axis else 1) for a, n in enumerate(scan.shape))
    affine = rescaled_affine(scan.affine, in_plane_factors(axis, scale))
    if output_format == "dicom":
        from medsr.dicom_writing import DicomSeriesWriter

        window = survey.counts.window(config.lower_percentile, config.upper_percentile)
        with DicomSeriesWriter(output, scan, affine, scale, f"{description} super-resolution by medsr",
                               window, overwrite) as writer:
            return run(sink=writer.write)
    with NiftiSliceWriter(output, shape, affine, description, overwrite, slice_axis=axis) as writer:
        return run(sink=lambda slab: writer.write(np.moveaxis(slab, 0, axis)))


def load_enhancer(weights: str | Path | None, scale: int):
    """``(model, config)`` from ``weights`` or the shipped weights for ``scale``."""
    from medsr.checkpoint import default_weights, load_model

    model, config = load_model(weights if weights is not None else default_weights(scale))
    if model.scale != scale:
        raise MedsrError(f"--scale {scale} does not match the weights, which upscale by {model.scale}")
    return model, config


@dataclass(frozen=True)
class BatchOutcome:
    """What happened to one scan of a batch: ``status`` is done, skipped or failed."""

    source: str
    output: Path | None
    status: str
    detail: str = ""


def batch_outputs(inputs: list[Path], out_dir: Path, scale: int, output_format: str = "auto"):
    """Every scan under ``inputs`` with the output path it gets inside ``out_dir``.

    Names come from the scan's file or series folder (``<name>_x2.nii.gz`` or ``<name>_x2/``);
    a folder holding several series adds the last digits of each SeriesInstanceUID, and a name
    already taken gets its parent folder's name in front.
    """
    from medsr.data import discover_scans
    from medsr.reading import NIFTI_SUFFIXES

    check_choice("format", output_format, OUTPUT_FORMATS)
    planned, taken = [], set()
    for root in inputs:
        for source in discover_scans(root):
            is_nifti = source.path.name.lower().endswith(NIFTI_SUFFIXES)
            name = source.path.name
            for suffix in NIFTI_SUFFIXES:
                name = name[: -len(suffix)] if name.lower().endswith(suffix) else name
            if source.series_uid:
                name += f"_{source.series_uid.split('.')[-1][-8:]}"
            if name in taken:
                name = f"{source.path.parent.name}_{name}"
            taken.add(name)
            fmt = output_format if output_format != "auto" else ("nifti" if is_nifti else "dicom")
            output = out_dir / (f"{name}_x{scale}.nii.gz" if fmt == "nifti" else f"{name}_x{scale}")
            planned.append((source, output, fmt))
    return planned


def enhance_many(inputs: list[Path], out_dir: Path, scale: int = 2, weights=None,
                 output_format: str = "auto", overwrite: bool = False,
                 on_scan: Callable[[str], None] | None = None, **options) -> list[BatchOutcome]:
    """Enhance every scan under ``inputs`` into ``out_dir``; one failure does not stop the rest.

    Existing outputs are skipped unless ``overwrite``. ``options`` go to :func:`enhance_file`.
    """
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        raise MedsrError(f"{out_dir}: folder {out_dir.parent} does not exist; create it first")
    for root in inputs:
        if root.resolve().is_dir() and root.resolve() in [out_dir.resolve(), *out_dir.resolve().parents]:
            raise MedsrError(f"{out_dir}: the output folder must not be inside the input {root}")
    loaded = load_enhancer(weights, scale)
    planned = batch_outputs(inputs, out_dir, scale, output_format)
    # under torchrun (or any launcher that sets RANK/WORLD_SIZE) each process takes every
    # WORLD_SIZE-th scan, on its own GPU when there are several
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    planned = planned[rank::world_size]
    if world_size > 1 and torch.cuda.is_available() and options.get("device", "auto") in ("auto", "cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    out_dir.mkdir(exist_ok=True)
    outcomes = []
    for source, output, fmt in planned:
        if on_scan is not None:
            on_scan(str(source))
        if output.exists() and not overwrite:
            outcomes.append(BatchOutcome(str(source), output, "skipped", "output exists (use --overwrite)"))
            continue
        try:
            enhance_file(source.path, output, scale=scale, series_uid=source.series_uid,
                         overwrite=overwrite, output_format=fmt, loaded=loaded, **options)
            outcomes.append(BatchOutcome(str(source), output, "done"))
        except MedsrError as exc:
            outcomes.append(BatchOutcome(str(source), None, "failed", str(exc)))
    return outcomes


def is_single_scan(path: Path) -> bool:
    """A file, or a folder holding DICOM files itself (one series, or several to pick from);
    a folder of folders or of NIfTI files is a batch."""
    from medsr.reading import dicom_series_in_folder

    return not path.is_dir() or bool(dicom_series_in_folder(path))


OUTPUT_FORMATS = ("auto", "nifti", "dicom")


def resolve_format(output: Path, output_format: str = "auto") -> str:
    """``auto``: NIfTI for a ``.nii``/``.nii.gz`` path, else a DICOM series folder."""
    from medsr.reading import NIFTI_SUFFIXES

    check_choice("format", output_format, OUTPUT_FORMATS)
    is_nifti_name = output.name.lower().endswith(NIFTI_SUFFIXES)
    if output_format == "auto":
        return "nifti" if is_nifti_name else "dicom"
    if output_format == "nifti" and not is_nifti_name:
        raise MedsrError(f"{output}: NIfTI output must end in .nii or .nii.gz")
    if output_format == "dicom" and is_nifti_name:
        raise MedsrError(f"{output}: a DICOM series is written into a folder, not a .nii file")
    return output_format


def default_degradation(scan: OpenScan, counts: IntensityCounts) -> str:
    """``kspace`` for MR (acquired in k-space), ``bicubic`` for CT and anything else.

    DICOM says its modality; for NIfTI, CT is recognised by air far below zero (HU), from the
    scan's value ``counts``.
    """
    from medsr.data import CT_AIR_PERCENTILE, CT_AIR_THRESHOLD

    if scan.modality:
        return "kspace" if scan.modality == "MR" else "bicubic"
    return "bicubic" if counts.percentile(CT_AIR_PERCENTILE) < CT_AIR_THRESHOLD else "kspace"
