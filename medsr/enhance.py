"""Enhance scans: the application around the streaming engine (:mod:`medsr.engine`).

:func:`enhance_file` is the whole job for one scan, and the Python API the CLI uses: open it,
decide how it lost its resolution, choose the output format, stream it through the model into
a NIfTI file or a DICOM series. :func:`enhance_many` does it for a batch of scans, one failure
not stopping the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from medsr import __version__
from medsr.consistency import check_consistency, projects
from medsr.degradation import DegradationEstimate, find_degradation, load_classifier
from medsr.engine import (
    COMPILE_CHOICES,
    PRECISIONS,
    EnhancedVolume,
    Survey,
    check_choice,
    enhance_scan,
    pick_device,
    survey_scan,
)
from medsr.errors import MedsrError
from medsr.geometry import enhanced_affine, through_plane_factors
from medsr.model import DEGRADATION_CODES, ThroughPlaneNet
from medsr.reading import NIFTI_SUFFIXES, OpenScan, open_scan, planes_from_whole
from medsr.synthesis import ModelAnswer
from medsr.transforms import IntensityWindow
from medsr.writing import write_errors

logger = logging.getLogger(__name__)


@dataclass
class Enhancer:
    """A network ready to enhance scans, with what it was trained with.

    Attributes:
        model: an :class:`~medsr.model.SRResNet` (or any module with a ``scale`` attribute that
            maps ``(B, 1, H, W)`` normalised slices and ``(B,)`` degradation codes to
            ``(B, 1, scale*H, scale*W)``), or a :class:`~medsr.model.ThroughPlaneNet`.
        lower_percentile, upper_percentile: the intensity window it was trained with.
        name: how descriptions name it.
    """

    model: torch.nn.Module
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    name: str = "SRResNet"
    _classifiers: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def through_plane(self) -> bool:
        return isinstance(self.model, ThroughPlaneNet)

    def classifier(self, scale: int):
        """The shipped degradation classifier for ``scale``, loaded once."""
        if scale not in self._classifiers:
            self._classifiers[scale] = load_classifier(None, scale)
        return self._classifiers[scale]


def load_enhancer(weights: str | Path | None, scale: int, through_plane: bool = False) -> Enhancer:
    """The :class:`Enhancer` in ``weights``, or the shipped one for ``scale`` (in-plane) or the
    shipped through-plane model.

    Raises:
        CheckpointError: unreadable weights; MedsrError: weights of another kind or scale.
    """
    from medsr.checkpoint import default_weights, load_model

    path = weights if weights is not None else default_weights(scale, through_plane)
    model, config = load_model(path)
    if through_plane != isinstance(model, ThroughPlaneNet):
        kind = "through-plane" if isinstance(model, ThroughPlaneNet) else "in-plane"
        raise MedsrError(f"{path}: these are {kind} weights; "
                         f"{'drop' if through_plane else 'add'} --through-plane or pass other --weights")
    if not through_plane and model.scale != scale:
        raise MedsrError(f"--scale {scale} does not match the weights, which upscale by {model.scale}")
    name = "ThroughPlaneNet" if through_plane else "SRResNet"
    return Enhancer(model, config.lower_percentile, config.upper_percentile, name)


@dataclass(frozen=True)
class EnhancedFile:
    """What :func:`enhance_file` wrote.

    Attributes:
        output: the NIfTI file or DICOM series folder.
        volume: the enhanced grid (``volume.array`` is None: the slices were streamed out).
        degradation: the grid the model was told (in-plane), None for through-plane.
        estimate: how ``degradation`` was found from the pixels; None when it was given.
        factor: thin slices per thick slice (through-plane), else None.
        consistent: whether every slice was projected onto the images that reproduce the
            low-res input (``--consistency``, :mod:`medsr.consistency`).
        ensemble: whether the output is the mean of the eight flips/transposes
            (:mod:`medsr.ensemble`).
        detail_map: the detail map written beside the output (:mod:`medsr.detail_map`), or None.
    """

    output: Path
    volume: EnhancedVolume
    degradation: str | None = None
    estimate: DegradationEstimate | None = None
    factor: int | None = None
    consistent: bool = False
    ensemble: bool = False
    detail_map: Path | None = None


def enhance_file(input_path: str | Path, output: str | Path, *, model: torch.nn.Module | Enhancer | None = None,
                 scale: int | None = None, weights: str | Path | None = None,
                 through_plane: bool = False, slice_axis: int | None = None,
                 degradation: str = "auto", device: str = "auto", batch_size: int | None = None,
                 series_uid: str | None = None, select: tuple[str, str] | None = None,
                 overwrite: bool = False, output_format: str = "auto", compile_model: str = "auto",
                 precision: str = "auto", consistency: str = "auto", ensemble: bool = False,
                 detail_map: str | Path | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 reading: Callable[[int, int], None] | None = None,
                 uid_seed: str | None = None) -> EnhancedFile:
    """Enhance one scan and write it: the Python API behind ``medsr enhance``.

    Reads a DICOM series folder, a DICOM file or a NIfTI file; finds out from its pixels how it
    lost its resolution (``degradation="auto"``, :mod:`medsr.degradation`) unless told; streams
    every slice through the model; writes NIfTI (``.nii``/``.nii.gz``) or a new DICOM series
    (any other name; DICOM input only). Every check that can fail (output path, weights, scale,
    options) runs before the slow work, and the output appears only when complete.

    Args:
        input_path: the scan.
        output: the NIfTI file or DICOM series folder to write.
        model: the network: an :class:`Enhancer`, a bare module (trained on the 0.5-99.5
            percentile window; see :class:`Enhancer` for what it must map), or None for
            ``weights`` / the shipped weights.
        scale: in-plane factor (default 2; must match the model), or with ``through_plane``
            thin slices per thick slice (default: slice spacing / in-plane spacing, rounded).
        weights: a checkpoint from ``medsr train`` (when ``model`` is None).
        through_plane: make the slices thinner instead of the in-plane voxels smaller.
        slice_axis: the slice axis (default: DICOM's acquired slices; for NIfTI the odd one out
            of the voxel sizes, :func:`medsr.geometry.slice_axis_of`).
        degradation: ``auto``, ``bicubic`` or ``kspace`` (in-plane). The grid found or told is
            also the output's geometry (:func:`medsr.geometry.enhanced_affine`): for
            ``bicubic`` the new pixels tile the input's, for ``kspace`` the first pixel keeps
            its position and only the spacing is divided.
        device: ``auto`` (CUDA when there is one), ``cpu`` or ``cuda``.
        batch_size: slices per forward pass (default: 4 on the CPU, from free memory on CUDA).
        series_uid: the series to take from a folder that holds several.
        select: ``(keyword, value)`` picking one echo or phase of a series that holds several.
        overwrite: replace an existing output.
        output_format: ``auto`` (by the output's name), ``nifti`` or ``dicom``.
        compile_model: ``torch.compile``: ``auto``, ``on`` or ``off``.
        precision: ``auto`` (bf16 on CUDA and on CPUs with native bf16, else fp32),
            ``fp32`` or ``bf16``.
        consistency: ``on`` projects every enhanced slice onto the images that, degraded as
            the scan was (``degradation``, found or given), reproduce its low-res slice
            (:mod:`medsr.consistency`); ``off`` leaves the network's output; ``auto`` projects
            the scans named (found or told) k-space truncated, where the operator is exact and
            validation found it never worse (:data:`medsr.consistency.AUTO_DEGRADATIONS`; the
            model card, "Data consistency"). In-plane only.
        ensemble: write the mean of the model's answers to the eight flips and transposes of
            every slice, each undone on the output grid (:mod:`medsr.ensemble`): about 8 times
            the compute, +0.08-0.15 dB PSNR on average on validation and test (the model card,
            "Self-ensemble and detail map"). Through-plane: the four flips of each plane (a
            transpose would swap the thin axis with an untouched one).
        detail_map: also write, at this path and in the output's format (a NIfTI file, or a
            second DICOM series of the same study), a volume on the output's grid showing how
            unsure the network is at each voxel (:mod:`medsr.detail_map`: the spread of the
            eight passes times the output's gradient, as a geometric mean, with the noise
            floor of the signal, in the output's units). It runs the eight passes even without
            ``ensemble``. In-plane only.
        progress, reading: called with ``(slices_done, total)`` while enhancing and while
            reading (the survey pass).
        uid_seed: DICOM output: None for new random UIDs (``medsr enhance``), any text for
            series and instance UIDs that are the same for the same text and source images
            (:class:`~medsr.dicom_writing.DicomSeriesWriter`; ``medsr serve``).

    Returns:
        The :class:`EnhancedFile`.

    Raises:
        MedsrError: anything wrong with the input, the options or the output path.

    Example:
        >>> from medsr import enhance_file
        >>> result = enhance_file("sample_scans/mr_pd_oblique_dicom", "enhanced.nii.gz")
        >>> result.degradation, result.estimate.confidence
    """
    from medsr.writing import check_output_path

    input_path, output = Path(input_path), Path(output)
    if degradation != "auto" and degradation not in DEGRADATION_CODES:
        raise MedsrError(f"--degradation must be auto, {' or '.join(DEGRADATION_CODES)}, not {degradation!r}")
    output_format = resolve_format(output, output_format)
    check_output_path(output, [input_path], overwrite)
    if detail_map is not None:
        detail_map = Path(detail_map)
        if resolve_format(detail_map, "auto") != output_format:
            raise MedsrError(f"--detail-map {detail_map}: the map is written in the output's format "
                             f"({output_format}); name it like the output"
                             + (" (.nii or .nii.gz)" if output_format == "nifti" else " (a folder)"))
        if os.path.abspath(detail_map) == os.path.abspath(output):
            raise MedsrError(f"--detail-map {detail_map} is the output itself; give the map its own path")
        check_output_path(detail_map, [input_path], overwrite)
    torch_device = pick_device(device)
    check_choice("precision", precision, PRECISIONS)  # before the slow work
    check_choice("compile", compile_model, COMPILE_CHOICES)
    if batch_size is not None and batch_size < 1:
        raise MedsrError(f"--batch-size must be >= 1, not {batch_size}")
    if through_plane and degradation != "auto":
        raise MedsrError("--degradation is an in-plane choice; --through-plane makes thick slices thin")
    check_consistency(consistency, through_plane)
    if through_plane and detail_map is not None:
        raise MedsrError("--detail-map is an in-plane choice; --through-plane has no map yet")
    enhancer = enhancer_for(model, weights, scale, through_plane)
    scan = open_scan(input_path, series_uid, select)
    if slice_axis is not None and slice_axis != scan.slice_axis:
        # slices across the acquired ones: the volume is read once, whole
        acquired = scan
        scan = dataclasses.replace(acquired, slice_axis=slice_axis,
                                   read_plane=planes_from_whole(lambda: acquired.load().array, slice_axis))
    if output_format == "dicom" and (scan.source_format != "dicom" or scan.slice_axis != 2):
        raise MedsrError(f"{output}: DICOM output needs DICOM input enhanced along its own "
                         "slices; write .nii or .nii.gz instead")
    if scan.photometric == "MONOCHROME1" and output_format == "nifti":
        logger.warning("%s: MONOCHROME1 (low values white); the NIfTI keeps its values, as dcm2niix "
                       "does, so NIfTI viewers show it inverted; write a DICOM series to keep its look",
                       input_path)
    if enhancer.through_plane:
        return _through_plane(scan, enhancer, output, output_format, scale, torch_device, batch_size,
                              precision, overwrite, progress, reading, ensemble, uid_seed)
    survey, window, degradation, estimate = plan_in_plane(scan, enhancer, degradation, reading, torch_device)
    told = (f"{degradation} (given)" if estimate is None
            else f"{degradation} (found from the pixels, {estimate.short()})")
    consistent = projects(consistency, degradation, None if estimate is None else estimate.likely)
    projection = (f"consistency projection {'on' if consistent else 'off'} (--consistency {consistency}): "
                  + ("the output degraded as the input reproduces it" if consistent else "the network's output"))
    model_scale = enhancer.model.scale
    run = functools.partial(enhance_scan, scan, enhancer.model, degradation, torch_device, batch_size,
                            enhancer.lower_percentile, enhancer.upper_percentile, progress,
                            survey=survey, compile_model=compile_model, precision=precision,
                            consistency="on" if consistent else "off", ensemble=ensemble)
    axis = scan.slice_axis
    shape = tuple(n * (model_scale if a != axis else 1) for a, n in enumerate(scan.shape))
    # the output grid is the grid found or told: tiling for a resampled scan, the first pixel
    # kept for k-space truncation
    affine = enhanced_affine(scan.affine, axis, model_scale, degradation)
    volume = _write(scan, output, output_format, shape, affine, degradation, window, overwrite,
                    long_description=f"medsr {__version__} {enhancer.name} x{model_scale} in-plane "
                                     f"super-resolution; degradation {told}; {projection}"
                                     + ("; mean of the 8 flips/transposes (--ensemble)" if ensemble else ""),
                    short_description=short_description(model_scale, degradation, estimate, consistent, ensemble),
                    run=run, detail_map=detail_map, uid_seed=uid_seed)
    return EnhancedFile(output, volume, degradation, estimate, consistent=consistent, ensemble=ensemble,
                        detail_map=detail_map)


def short_description(scale: int, degradation: str, estimate: DegradationEstimate | None, consistent: bool,
                      ensemble: bool = False) -> str:
    """What a NIfTI ``descrip`` (79 characters) says of an in-plane enhancement: the scale, the
    grid, how sure the decision was when it was found from the pixels, and what was applied."""
    return (f"medsr x{scale} {degradation}"
            + ("" if estimate is None else f" auto p={estimate.confidence:.2f}")
            + (" 2nd look" if estimate is not None and estimate.probed else "")
            + (" consistent" if consistent else "") + (" ens8" if ensemble else ""))


def through_plane_description(factor: int) -> str:
    """What a NIfTI ``descrip`` says of a through-plane enhancement."""
    return f"medsr through-plane x{factor}"


def enhancer_for(model: torch.nn.Module | Enhancer | None, weights: str | Path | None, scale: int | None,
                 through_plane: bool) -> Enhancer:
    """The :class:`Enhancer` for ``model`` (a bare module or an Enhancer), else for ``weights``
    or the shipped weights (in-plane ``scale``, default 2), checked against what was asked.

    Raises:
        MedsrError: a model of the other kind, or whose scale is not ``scale``;
            CheckpointError: unreadable weights.
    """
    if model is None:
        return load_enhancer(weights, scale or 2, through_plane)
    enhancer = model if isinstance(model, Enhancer) else Enhancer(model, name=type(model).__name__)
    if enhancer.through_plane != through_plane:
        raise MedsrError("the model given is a through-plane model" if enhancer.through_plane
                         else "the model given upscales in-plane; pass a through-plane model")
    if not through_plane:
        model_scale = getattr(enhancer.model, "scale", None)
        if not isinstance(model_scale, int) or model_scale < 2:
            raise MedsrError(f"the model given has no integer scale attribute (got {model_scale!r})")
        if scale is not None and scale != model_scale:
            raise MedsrError(f"--scale {scale} does not match the model, which upscales by {model_scale}")
    return enhancer


class InPlanePlan(NamedTuple):
    """What in-plane enhancement decides before the model runs (:func:`plan_in_plane`)."""

    survey: Survey
    window: IntensityWindow
    degradation: str
    estimate: DegradationEstimate | None


def plan_in_plane(scan: OpenScan, enhancer: Enhancer, degradation: str = "auto",
                  reading: Callable[[int, int], None] | None = None,
                  device: torch.device | str = "cpu") -> InPlanePlan:
    """The survey pass, the intensity window the model was trained with, and the grid:
    ``degradation`` when told (``bicubic`` or ``kspace``), else found from the pixels (where the
    classifier is unsure, with a second look that runs the model on a few slices, on ``device``
    in float32 whatever the enhance precision, normalised with this window: :mod:`medsr.synthesis`).
    ``medsr enhance`` and :class:`medsr.transforms.SuperResolve` both decide here; pass the
    result's ``survey`` and ``degradation`` on to :func:`~medsr.engine.enhance_scan`."""
    survey = survey_scan(scan, progress=reading)
    window = survey.counts.window(enhancer.lower_percentile, enhancer.upper_percentile)
    estimate = None
    if degradation == "auto":
        estimate = _estimate(scan, survey, enhancer, window, device)
        degradation = estimate.grid
    return InPlanePlan(survey, window, degradation, estimate)


def _estimate(scan: OpenScan, survey: Survey, enhancer: Enhancer, window, device) -> DegradationEstimate:
    """How the scan lost its resolution, from up to 64 informative slices (those the survey
    kept in memory are not decoded again)."""
    def read(index: int) -> np.ndarray:
        return survey.kept[index] if index in survey.kept else scan.read_plane(index)

    answer = ModelAnswer(enhancer.model, device, lower_percentile=enhancer.lower_percentile,
                         upper_percentile=enhancer.upper_percentile, window=window)
    estimate = find_degradation(read, scan.n_slices, window, enhancer.classifier(enhancer.model.scale),
                                scan.padding, scan.photometric, enhance=answer)
    logger.info("%s: degradation %s", scan.path, estimate.describe())
    return estimate


def _write(scan: OpenScan, output: Path, output_format: str, shape, affine, grid: str, window, overwrite: bool,
           long_description: str, short_description: str, run, detail_map: Path | None = None,
           uid_seed: str | None = None) -> EnhancedVolume:
    """Run ``run(sink=...)`` into the output format's writer (and, with ``detail_map``,
    ``detail_sink=...`` into a second one); NIfTI ``descrip`` holds 80 characters, so it gets
    the short description (the long one goes to DICOM). Both outputs appear only when both are
    complete. ``uid_seed``: stable derived DICOM UIDs (:class:`~medsr.dicom_writing.DicomSeriesWriter`)."""
    from medsr.writing import NiftiSliceWriter, nifti_description

    axis = scan.slice_axis
    # the map is a difference of intensities (its 99.9th percentile about 0.06-0.09 of the
    # window on validation): shown from 0 to a tenth of the window
    map_window = IntensityWindow(0.0, 0.1 * (window.high - window.low))
    map_text = ("medsr detail map: geometric mean of the spread of the 8 flipped/transposed passes (5x5 mean) "
                "and the output's gradient (3x3 mean), with the slice's noise floor on the signal added in "
                "quadrature, same units as the enhanced series; high = the network is unsure where the image "
                "has structure")
    with contextlib.ExitStack() as writers:
        if output_format == "dicom":
            from medsr.dicom_writing import DicomSeriesWriter

            scale = int(round(shape[0] / scan.shape[0]))
            sink = writers.enter_context(DicomSeriesWriter(output, scan, affine, scale, long_description, window,
                                                           overwrite, grid=grid, uid_seed=uid_seed)).write
            detail_sink = None if detail_map is None else writers.enter_context(DicomSeriesWriter(
                detail_map, scan, affine, scale, f"{map_text}; {long_description}", map_window, overwrite,
                grid=grid, detail_map=True, uid_seed=uid_seed)).write
        else:
            def nifti(path: Path, description: str, display_range):
                writer = writers.enter_context(NiftiSliceWriter(
                    path, shape, affine, nifti_description(description, scan.photometric), overwrite,
                    slice_axis=axis, xform_codes=scan.xform_codes, display_range=display_range))
                return lambda slab: writer.write(np.moveaxis(slab, 0, axis))

            sink = nifti(output, short_description, scan.display_range)
            detail_sink = None if detail_map is None else nifti(
                detail_map, f"medsr detail map (spread x gradient); {short_description}"[:80],
                (map_window.low, map_window.high))
        return run(sink=sink, detail_sink=detail_sink)


def thin_slices(scan: OpenScan, enhancer: Enhancer, factor: int | None = None,
                device: torch.device | str = "cpu", batch_size: int | None = None, precision: str = "auto",
                progress: Callable[[int, int], None] | None = None,
                reading: Callable[[int, int], None] | None = None,
                ensemble: bool = False) -> tuple[EnhancedVolume, int]:
    """Through-plane enhancement of a whole scan in memory (planes cross every slice), as
    ``medsr enhance --through-plane`` does it: the intensity window, padding shown to the
    network as the window's low end and put back on the thin voxels of padded thick ones.

    Args:
        factor: thin slices per thick slice (default: :func:`~medsr.through_plane.default_factor`).

    Returns:
        The :class:`EnhancedVolume` (``array`` in original units) and the factor used.
    """
    from medsr.engine import fill_blocks, is_padding
    from medsr.through_plane import check_factor, default_factor, enhance_through_plane

    if factor is None:
        factor = default_factor(scan.affine, scan.slice_axis)
    check_factor(factor)
    survey = survey_scan(scan, progress=reading)
    window = survey.counts.window(enhancer.lower_percentile, enhancer.upper_percentile)
    volume = np.stack([survey.kept[k] if k in survey.kept else scan.read_plane(k)
                       for k in range(scan.n_slices)], axis=scan.slice_axis)
    padded = None if scan.padding is None else is_padding(volume, scan.padding)
    if padded is not None:
        volume = np.where(padded, np.float32(window.low), volume)
    enhanced = enhance_through_plane(volume, scan.affine, scan.slice_axis, enhancer.model, factor, window,
                                     device, batch_size, precision, progress, ensemble)
    if padded is not None:  # a thin voxel is padding where its thick voxel was
        fill_blocks(enhanced.array, np.float32(scan.padding[0]), padded, through_plane_factors(scan.slice_axis, factor))
    return enhanced, factor


def _through_plane(scan: OpenScan, enhancer: Enhancer, output: Path, output_format: str,
                   factor: int | None, device, batch_size, precision, overwrite, progress, reading,
                   ensemble: bool = False, uid_seed: str | None = None) -> EnhancedFile:
    """Through-plane enhancement into the output file."""
    enhanced, factor = thin_slices(scan, enhancer, factor, device, batch_size, precision, progress, reading,
                                   ensemble)
    window = enhanced.window
    description = (f"medsr {__version__} {enhancer.name} through-plane x{factor}: thin slices from thick"
                   + ("; mean of the 4 flips of each plane (--ensemble)" if ensemble else ""))
    slabs = np.moveaxis(enhanced.array, scan.slice_axis, 0)
    if output_format == "dicom":
        from medsr.dicom_writing import ThinSliceSeriesWriter

        with ThinSliceSeriesWriter(output, scan, enhanced.affine, factor, description, window, overwrite,
                                   uid_seed=uid_seed) as writer:
            writer.write(slabs)
    else:
        from medsr.writing import NiftiSliceWriter, nifti_description

        with NiftiSliceWriter(output, enhanced.shape, enhanced.affine,
                              nifti_description(through_plane_description(factor), scan.photometric),
                              overwrite, slice_axis=scan.slice_axis, xform_codes=scan.xform_codes,
                              display_range=scan.display_range) as writer:
            writer.write(enhanced.array)
    return EnhancedFile(output, dataclasses.replace(enhanced, array=None), factor=factor, ensemble=ensemble)


@dataclass(frozen=True)
class BatchOutcome:
    """What happened to one scan of a batch: ``status`` is done, skipped or failed."""

    source: str
    output: Path | None
    status: str
    detail: str = ""


def batch_outputs(inputs: list[Path], out_dir: Path, tag: str, output_format: str = "auto"):
    """Every scan under ``inputs`` with the output path it gets inside ``out_dir``.

    The output mirrors where the scan sits: its path relative to the folder that holds every
    input (an input folder itself, when it is the only one) is kept under ``out_dir``, so two
    scans of the same name in different folders never meet. The name is the scan's file or
    series folder with ``_`` and ``tag`` (``<name>_x2.nii.gz`` or ``<name>_x2/``); a folder holding
    several series adds each SeriesInstanceUID's last digits (the whole UID if those repeat);
    two scans of one folder that would still share a name (``scan.nii.gz`` and a series folder
    ``scan/`` written as NIfTI) are numbered, ``scan_x2.nii.gz`` and ``scan_2_x2.nii.gz``.
    """
    from medsr.data import discover_scans
    check_choice("format", output_format, OUTPUT_FORMATS)
    # absolute paths without following links: a linked file (DataLad, git-annex) is named
    # after its link, where the user sees it, not after the store it points into
    roots = [Path(os.path.abspath(root)) for root in inputs]
    base = roots[0] if len(roots) == 1 and roots[0].is_dir() else Path(
        os.path.commonpath([root.parent for root in roots]))
    planned, taken = [], set()
    for root in roots:
        sources = discover_scans(root)
        for source in sources:
            is_nifti = source.path.name.lower().endswith(NIFTI_SUFFIXES)
            relative = Path(os.path.abspath(source.path)).relative_to(base)
            name = scan_name(relative)
            if source.series_uid:
                siblings = [s.series_uid for s in sources if s.path == source.path]
                short = [uid.split(".")[-1][-8:] for uid in siblings]
                name += f"_{source.series_uid.split('.')[-1][-8:]}" if len(set(short)) == len(short) \
                    else f"_{source.series_uid}"
            fmt = output_format if output_format != "auto" else ("nifti" if is_nifti else "dicom")
            parent = out_dir / relative.parent if relative.parent != Path(".") else out_dir
            extension = ".nii.gz" if fmt == "nifti" else ""
            output, copy = parent / f"{name}_{tag}{extension}", 1
            while str(output).lower() in taken:  # scan.nii.gz and a series folder scan/, say
                copy += 1
                output = parent / f"{name}_{copy}_{tag}{extension}"
            taken.add(str(output).lower())
            planned.append((source, output, fmt))
    return planned


def scan_name(path: Path) -> str:
    """A scan's name for its outputs: its file or folder name without ``.nii``/``.nii.gz``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        name = name[: -len(suffix)] if name.lower().endswith(suffix) else name
    return name


def output_tag(through_plane: bool, scale: int | None) -> str:
    """What output names end with: ``x2``/``x4`` in-plane (default 2); through-plane ``z4`` for
    a factor given, else ``thin`` (the factor may differ per scan)."""
    if through_plane:
        return f"z{scale}" if scale else "thin"
    return f"x{scale or 2}"


def enhance_many(inputs: list[Path], out_dir: Path, scale: int | None = None, weights=None,
                 through_plane: bool = False, output_format: str = "auto", overwrite: bool = False,
                 on_scan: Callable[[str], None] | None = None,
                 on_outcome: Callable[[BatchOutcome], None] | None = None, **options) -> list[BatchOutcome]:
    """Enhance every scan under ``inputs`` into ``out_dir`` (see :func:`batch_outputs` for the
    names); one failure, of any kind, does not stop the rest.

    Existing outputs are skipped unless ``overwrite``. ``options`` go to :func:`enhance_file`.
    """
    from medsr.writing import output_taken

    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        raise MedsrError(f"{out_dir}: folder {out_dir.parent} does not exist; create it first")
    for root in inputs:
        if root.resolve().is_dir() and root.resolve() in [out_dir.resolve(), *out_dir.resolve().parents]:
            raise MedsrError(f"{out_dir}: the output folder must not be inside the input {root}")
    enhancer = enhancer_for(None, weights, scale, through_plane)
    tag = output_tag(through_plane, scale if through_plane else enhancer.model.scale)
    planned = batch_outputs(inputs, out_dir, tag, output_format)
    # under torchrun (or any launcher that sets RANK/WORLD_SIZE) each process takes every
    # WORLD_SIZE-th scan, on its own GPU when there are several
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    planned = planned[rank::world_size]
    if world_size > 1 and torch.cuda.is_available() and options.get("device", "auto") in ("auto", "cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    with write_errors(out_dir):
        out_dir.mkdir(exist_ok=True)
    outcomes = []
    for source, output, fmt in planned:
        if on_scan is not None:
            on_scan(str(source))
        if output_taken(output) and not overwrite:
            outcome = BatchOutcome(str(source), output, "skipped", "output exists (use --overwrite)")
        else:
            outcome = _enhance_one(source, output, fmt, enhancer, scale, overwrite, options)
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return outcomes


@contextlib.contextmanager
def folders_for(output: Path):
    """Make the folders ``output`` needs that do not exist yet; if the block fails, remove them
    again (those still empty), so a failed scan leaves no trace."""
    made = [folder for folder in [output.parent, *output.parent.parents] if not folder.exists()]
    with write_errors(output):
        output.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _enhance_one(source, output: Path, fmt: str, enhancer: Enhancer, scale, overwrite: bool,
                 options: dict) -> BatchOutcome:
    """One scan of a batch. Any failure is this scan's alone: a MedsrError says what is wrong
    with it; anything else is a bug in medsr, reported as such (its traceback at debug level)
    rather than stopping the scans after it."""
    try:
        with folders_for(output):  # the mirror folders made for this scan alone
            result = enhance_file(source.path, output, model=enhancer, scale=scale,
                                  through_plane=enhancer.through_plane, series_uid=source.series_uid,
                                  overwrite=overwrite, output_format=fmt, **options)
    except Exception as exc:  # any failure is this scan's alone
        if isinstance(exc, MedsrError):
            return BatchOutcome(str(source), None, "failed", str(exc))
        logger.debug("%s", traceback.format_exc())
        reason = " ".join(str(exc).split())[:300]
        return BatchOutcome(str(source), None, "failed",
                            f"internal error ({type(exc).__name__}: {reason}); please report it")
    detail = "" if result.estimate is None else f"degradation {result.estimate.describe()}"
    if result.factor is not None:
        detail = f"through-plane x{result.factor}"
    return BatchOutcome(str(source), output, "done", detail)


def is_single_scan(path: Path) -> bool:
    """A file, or a folder holding DICOM files itself (one series, or several to pick from);
    a folder of folders or of NIfTI files is a batch."""
    from medsr.dicom_reading import dicom_series_in_folder

    return not path.is_dir() or bool(dicom_series_in_folder(path))


OUTPUT_FORMATS = ("auto", "nifti", "dicom")


def resolve_format(output: Path, output_format: str = "auto") -> str:
    """``auto``: NIfTI for a ``.nii``/``.nii.gz`` path, else a DICOM series folder."""
    check_choice("format", output_format, OUTPUT_FORMATS)
    is_nifti_name = output.name.lower().endswith(NIFTI_SUFFIXES)
    if output_format == "auto":
        return "nifti" if is_nifti_name else "dicom"
    if output_format == "nifti" and not is_nifti_name:
        raise MedsrError(f"{output}: NIfTI output must end in .nii or .nii.gz")
    if output_format == "dicom" and is_nifti_name:
        raise MedsrError(f"{output}: a DICOM series is written into a folder, not a .nii file")
    return output_format
