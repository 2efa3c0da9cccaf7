"""Enhance a whole volume slice by slice: normalise, upscale in batches, map back to units.

The output grid follows :func:`medsr.geometry.rescaled_affine`: in-plane voxel size divided by
the scale, same physical extent, slice axis untouched.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsr.errors import MedsrError
from medsr.geometry import in_plane_factors, rescaled_affine, voxel_sizes
from medsr.model import DEGRADATION_CODES, SRResNet
from medsr.transforms import IntensityWindow, robust_window

logger = logging.getLogger(__name__)

MIN_SLICE_SIZE = 4  # smaller slices carry too little context for a 9x9 head
DEFAULT_BATCH = {"cuda": 16, "cpu": 4}


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


def enhance_volume(volume: np.ndarray, affine: np.ndarray, slice_axis: int, model: SRResNet,
                   degradation: str = "bicubic",
                   device: torch.device | str = "cpu", batch_size: int | None = None,
                   lower_percentile: float = 0.5, upper_percentile: float = 99.5,
                   progress: Callable[[int, int], None] | None = None,
                   sink: Callable[[np.ndarray], None] | None = None) -> EnhancedVolume:
    """Upscale every slice of ``volume`` in-plane by the model's scale.

    Args:
        volume: ``(I, J, K)`` in original units (HU for CT).
        affine: its ``(4, 4)`` RAS affine in mm.
        slice_axis: axis of the slices (0, 1 or 2).
        model: a trained :class:`SRResNet`.
        degradation: how the input lost its resolution, ``"bicubic"`` (resampled, CT) or
            ``"kspace"`` (MR acquired with fewer k-space lines); see :mod:`medsr.model`.
        device: where the model runs; CUDA uses bfloat16 autocast.
        batch_size: slices per forward pass (default 16 on CUDA, 4 on CPU).
        progress: called with ``(slices_done, slices_total)`` after every batch.
        sink: if given, receives each batch of enhanced slices ``(n, I', J')`` (original units,
            in order) on a writer thread while the next batch runs, and no full output is kept.

    Returns:
        The :class:`EnhancedVolume` in original units with its affine.

    Raises:
        MedsrError: slices too small, or a constant volume.
    """
    device = torch.device(device)
    if degradation not in DEGRADATION_CODES:
        raise MedsrError(f"degradation must be one of {', '.join(DEGRADATION_CODES)}, not {degradation!r}")
    in_plane = [volume.shape[a] for a in range(3) if a != slice_axis]
    if min(in_plane) < MIN_SLICE_SIZE:
        raise MedsrError(
            f"slices of {in_plane[0]}x{in_plane[1]} voxels are too small; medsr needs at least "
            f"{MIN_SLICE_SIZE}x{MIN_SLICE_SIZE} (check --slice-axis)"
        )
    window = robust_window(volume, lower_percentile, upper_percentile)
    slices = np.moveaxis(volume, slice_axis, 0)
    total, scale = slices.shape[0], model.scale
    batch_size = batch_size or DEFAULT_BATCH[device.type]
    if batch_size < 1:
        raise MedsrError(f"--batch-size must be >= 1, not {batch_size}")
    out_plane = (in_plane[0] * scale, in_plane[1] * scale)
    output = None if sink is not None else np.empty((total, *out_plane), dtype=np.float32)
    model = model.to(device).eval()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast, _BackgroundSink(sink) as deliver:
        for start in range(0, total, batch_size):
            batch = window.forward(slices[start:start + batch_size])
            low_res = torch.from_numpy(batch)[:, None].to(device, non_blocking=True)
            codes = torch.full((len(batch),), DEGRADATION_CODES[degradation], device=device)
            high_res = window.inverse(model(low_res, codes).float()[:, 0].cpu().numpy())
            if output is not None:
                output[start:start + len(batch)] = high_res
            else:
                deliver(high_res)
            if progress is not None:
                progress(min(start + batch_size, total), total)
    shape = [total, *out_plane]
    shape.insert(slice_axis, shape.pop(0))
    return EnhancedVolume(
        array=None if output is None else np.ascontiguousarray(np.moveaxis(output, 0, slice_axis)),
        affine=rescaled_affine(affine, in_plane_factors(slice_axis, scale)),
        slice_axis=slice_axis,
        window=window,
        shape=tuple(shape),
    )


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


def enhance_file(input_path: str | Path, output: str | Path, scale: int = 2,
                 slice_axis: int | None = None, weights: str | Path | None = None,
                 degradation: str = "auto", device: str = "auto", batch_size: int | None = None,
                 series_uid: str | None = None, overwrite: bool = False,
                 output_format: str = "auto",
                 progress: Callable[[int, int], None] | None = None,
                 loaded: tuple | None = None) -> EnhancedVolume:
    """Read a scan, enhance it with ``weights`` (default: the shipped model), write NIfTI or a
    DICOM series (see :func:`resolve_format`).

    ``degradation="auto"`` picks ``kspace`` for MR and ``bicubic`` for everything else
    (:func:`default_degradation`). Every check that can fail (output path, weights, scale)
    runs before the slow work, and the output appears only when complete. ``loaded`` is a
    ``(model, config)`` pair from :func:`load_enhancer`, to reuse one model over many scans.
    """
    from medsr.reading import read_scan
    from medsr.writing import NiftiSliceWriter, check_output_path, write_nifti

    input_path, output = Path(input_path), Path(output)
    if degradation != "auto" and degradation not in DEGRADATION_CODES:
        raise MedsrError(f"--degradation must be auto, {' or '.join(DEGRADATION_CODES)}, not {degradation!r}")
    output_format = resolve_format(output, output_format)
    check_output_path(output, [input_path], overwrite)
    torch_device = pick_device(device)
    model, config = loaded if loaded is not None else load_enhancer(weights, scale)
    scan = read_scan(input_path, series_uid)
    axis = scan.slice_axis if slice_axis is None else slice_axis
    if output_format == "dicom" and (scan.source_format != "dicom" or axis != 2):
        raise MedsrError(f"{output}: DICOM output needs DICOM input enhanced along its own "
                         "slices; write .nii or .nii.gz instead")
    if degradation == "auto":
        degradation = default_degradation(scan)
        logger.info("%s: treating it as %s-degraded", input_path, degradation)
    description = f"medsr SRResNet x{scale} in-plane, {degradation} model"
    run = functools.partial(enhance_volume, scan.array, scan.affine, axis, model, degradation,
                            torch_device, batch_size, config.lower_percentile,
                            config.upper_percentile, progress)
    if output_format == "nifti" and axis == 2:
        # slices along the last axis are contiguous in NIfTI: stream them as they come
        shape = tuple(n * (scale if a != axis else 1) for a, n in enumerate(scan.array.shape))
        affine = rescaled_affine(scan.affine, in_plane_factors(axis, scale))
        with NiftiSliceWriter(output, shape, affine, description, overwrite) as writer:
            return run(sink=lambda slab: writer.write(np.moveaxis(slab, 0, 2)))
    enhanced = run()
    if output_format == "dicom":
        from medsr.dicom_writing import derive_series, write_dicom_series

        write_dicom_series(output, derive_series(scan, enhanced.array, enhanced.affine, scale,
                                                 f"{description} super-resolution by medsr"), overwrite)
    else:
        write_nifti(output, enhanced.array, enhanced.affine, description=description, overwrite=overwrite)
    return enhanced


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

    if output_format not in OUTPUT_FORMATS:
        raise MedsrError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, not {output_format!r}")
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

    if output_format not in OUTPUT_FORMATS:
        raise MedsrError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, not {output_format!r}")
    is_nifti_name = output.name.lower().endswith(NIFTI_SUFFIXES)
    if output_format == "auto":
        return "nifti" if is_nifti_name else "dicom"
    if output_format == "nifti" and not is_nifti_name:
        raise MedsrError(f"{output}: NIfTI output must end in .nii or .nii.gz")
    if output_format == "dicom" and is_nifti_name:
        raise MedsrError(f"{output}: a DICOM series is written into a folder, not a .nii file")
    return output_format


def default_degradation(scan) -> str:
    """``kspace`` for MR (acquired in k-space), ``bicubic`` for CT and anything else.

    DICOM says its modality; for NIfTI, CT is recognised by air far below zero (HU).
    """
    from medsr.data import is_ct

    if scan.modality:
        return "kspace" if scan.modality == "MR" else "bicubic"
    return "bicubic" if is_ct(scan.array, None) else "kspace"
