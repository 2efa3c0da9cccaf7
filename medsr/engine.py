"""The streaming engine: enhance every slice of an opened scan, in batches, memory bounded.

A survey pass counts values (the exact intensity window, the NaN check) and keeps the first
slices; then a reader thread decodes and normalises the next batch while the model runs on
this one, and a writer thread hands finished slices to a sink. Each output batch is projected,
when asked, onto the images that reproduce its low-res slices (:mod:`medsr.consistency`, on the
model's device, in original units), then the flat-background and padding rules run. With the
self-ensemble (:mod:`medsr.ensemble`) the eight flips/transposes of a batch go through the model
as one larger batch and the output is their mean; a detail map (:mod:`medsr.detail_map`) made
from the same passes follows the same rules (flat: 0, padding: the padding value). Device,
batch size, precision and ``torch.compile`` are decided here. What to enhance, where to write
it and how the scan lost its resolution is the application's business (:mod:`medsr.enhance`).

The output grid follows the grid the model is told (:func:`medsr.geometry.enhanced_affine`):
in-plane voxel size divided by the scale, the slice axis untouched; for ``bicubic`` the new
pixels tile the old ones, for ``kspace`` the first pixel keeps its position (coarse pixel ``n``
is fine pixel ``scale * n``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medsr.consistency import project, projects
from medsr.detail_map import classical_answer, detail_map
from medsr.ensemble import IDENTITY, SYMMETRIES, ensemble_passes
from medsr.errors import MedsrError
from medsr.geometry import enhanced_affine, nearest_block_start, voxel_sizes
from medsr.model import DEGRADATION_CODES, SRResNet
from medsr.reading import OpenScan, plane_of, refuse_non_finite
from medsr.transforms import IntensityCounts, IntensityWindow

logger = logging.getLogger(__name__)

MIN_SLICE_SIZE = 4  # smaller slices carry too little context for a 9x9 head
DEFAULT_BATCH = {"cpu": 4}
MAX_GPU_BATCH = 256
# slices kept in memory from the survey pass, so short series are decoded once; longer
# series decode the rest again, so memory stays bounded whatever the series length
READ_CACHE_BYTES = 256 * 2**20
# torch.compile costs ~17 s the first time on a 2-core CPU (1-5 s once inductor's disk cache
# has the graphs) and makes the forward pass 2.2x faster in bf16 there, 1.4x in float32
# (benchmarks/cpu_precision.py): it repays itself after about 90 slices (110 in float32),
# so auto waits for series clearly past that
COMPILE_MIN_SLICES = 256
COMPILE_CHOICES = ("auto", "on", "off")
# low-res neighbourhood (pixels a side) that, holding one exact value, keeps that value in the
# output (keep_flat_regions): 3 low-res pixels each way, so the nearest pixel of another value
# is at least 4 away (8 output pixels at x2)
FLAT_WINDOW = 7
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on CUDA and CPUs with native bf16


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
    """Read every slice once: count values (padding left out, so it never sets the intensity
    window), refuse NaN/infinite voxels, keep the first slices up to ``keep_bytes`` (default
    :data:`READ_CACHE_BYTES`); ``progress(read, total)`` after each slice.

    Raises:
        ScanReadError: damaged pixel data or non-finite voxels (counted over the whole scan).
    """
    keep_bytes = READ_CACHE_BYTES if keep_bytes is None else keep_bytes
    counts, kept, kept_bytes = IntensityCounts(), {}, 0
    for index, plane in enumerate(scan.planes()):
        counts.add(plane if scan.padding is None else plane[~is_padding(plane, scan.padding)])
        if kept_bytes + plane.nbytes <= keep_bytes:
            kept[index] = plane
            kept_bytes += plane.nbytes
        if progress is not None:
            progress(index + 1, scan.n_slices)
    refuse_non_finite(scan.path, counts.non_finite)
    if scan.padding is not None and counts.total == 0:
        raise MedsrError(f"{scan.path}: every pixel is padding (PixelPaddingValue); there is nothing to enhance")
    return Survey(counts, kept)


def is_padding(values: np.ndarray, padding: tuple[float, float]) -> np.ndarray:
    """Where ``values`` fall in the scan's padding range (original units, inclusive)."""
    return (values >= padding[0]) & (values <= padding[1])


def enhance_scan(scan: OpenScan, model: torch.nn.Module, degradation: str = "bicubic",
                 device: torch.device | str = "cpu", batch_size: int | None = None,
                 lower_percentile: float = 0.5, upper_percentile: float = 99.5,
                 progress: Callable[[int, int], None] | None = None,
                 sink: Callable[[np.ndarray], None] | None = None,
                 survey: Survey | None = None, channels_last: bool | None = None,
                 compile_model: str = "auto", precision: str = "auto", consistency: str = "auto",
                 plain_sink: Callable[[np.ndarray], None] | None = None, ensemble: bool = False,
                 detail_sink: Callable[[np.ndarray], None] | None = None,
                 window: IntensityWindow | None = None) -> EnhancedVolume:
    """Upscale every slice of ``scan`` in-plane by the model's scale, streaming.

    A reader thread decodes and normalises the next batch (into pinned memory on CUDA) while
    the model runs on this one, and a writer thread hands finished slices to ``sink``; host
    memory holds a few batches, plus at most ``READ_CACHE_BYTES`` of slices kept from the
    survey pass, however long the series.

    Args:
        scan: an opened scan (:func:`medsr.reading.open_scan`).
        model: a trained :class:`SRResNet`, or any module with a ``scale`` attribute that maps
            ``(B, 1, H, W)`` normalised slices and ``(B,)`` degradation codes to
            ``(B, 1, scale*H, scale*W)``.
        degradation: how the input lost its resolution, ``"bicubic"`` (resampled, CT) or
            ``"kspace"`` (MR acquired with fewer k-space lines); see :mod:`medsr.model`. It
            is also the grid of the output (:func:`medsr.geometry.enhanced_affine`).
        device: where the model runs; CUDA uses channels-last tensors.
        batch_size: slices per forward pass (default: 4 on CPU; on CUDA as many as fit in
            half of the free GPU memory, at most 256).
        progress: called with ``(slices_done, slices_total)`` after every batch.
        sink: if given, receives each batch of enhanced slices ``(n, I', J')`` (original units,
            in order) on a writer thread, and no full output is kept. Pixels whose low-res pixel
            was padding (``scan.padding``) come out exactly ``scan.padding[0]``.
        survey: the first pass, if the caller already ran :func:`survey_scan`.
        channels_last: NHWC tensors (default: on CUDA only, where the convolutions run faster).
        compile_model: ``torch.compile`` the model: ``on``, ``off``, or ``auto`` (on from
            :data:`COMPILE_MIN_SLICES` slices, where the compile time pays). If compiling fails
            (no C++ compiler, say), a warning is logged and the model runs as it is.
        precision: ``bf16`` (bfloat16 autocast; the k-space upsampler stays float32), ``fp32``,
            or ``auto``: bf16 on CUDA and on CPUs with native bf16 (:func:`native_bf16`),
            else fp32.
        consistency: ``on`` projects every output slice, in original units on ``device``, onto
            the images that ``degradation`` turns into its low-res slice exactly
            (:func:`medsr.consistency.project`), before the flat-background and padding rules;
            ``off`` does not; ``auto`` does on the grids where validation found it never worse
            (:data:`medsr.consistency.AUTO_DEGRADATIONS`: here, told ``kspace``; callers that
            found the grid from the pixels pass what :func:`medsr.consistency.resolved` says).
        plain_sink: if given, receives each batch as it would be without the projection (the
            same batch when there is none), on this thread: for comparisons (``medsr evaluate``).
        ensemble: the output is the mean of the model's answers to the eight flips and
            transposes of each slice, each undone on the output grid
            (:mod:`medsr.ensemble`); the eight go through the model together, so a forward
            pass holds eight times the slices of a batch (the batch shrinks to keep
            ``batch_size`` images per pass).
        detail_sink: if given, receives each batch's detail map ``(n, I', J')``
            (:func:`medsr.detail_map.detail_map`, original units of intensity difference), on
            this thread: flat regions 0, padded pixels ``scan.padding[0]``. It needs the eight
            passes, which run whether or not the output is their mean (``ensemble``).
        window: the intensity window the slices are normalised with (default: the scan's
            ``lower_percentile`` and ``upper_percentile``, from the survey). The second look
            passes the whole scan's, so a few slices are enhanced as they will be in the output.

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
    consistent = projects(consistency, degradation)
    survey = survey if survey is not None else survey_scan(scan)
    window = window or survey.counts.window(lower_percentile, upper_percentile)
    total, scale = scan.n_slices, model.scale
    out_plane = (in_plane[0] * scale, in_plane[1] * scale)
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=layout).eval()
    code = DEGRADATION_CODES[degradation]
    autocast = autocast_for(device, precision)
    batch_size = batch_size or default_batch_size(model, device, tuple(in_plane), code, autocast)
    symmetries = SYMMETRIES if ensemble or detail_sink is not None else (IDENTITY,)
    batch_size = max(1, batch_size // len(symmetries))  # images per forward pass stay batch_size
    forward = _Forward(model, compile_model, total, device, degradation)
    output = None if sink is not None else np.empty((total, *out_plane), dtype=np.float32)

    def batches():  # on the reader thread
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            planes = [survey.kept.pop(k) if k in survey.kept else scan.read_plane(k)
                      for k in range(start, stop)]
            if forward.compiled:  # a compiled graph fits one batch shape: pad the last batch
                planes += planes[-1:] * (batch_size - len(planes))
            stack, padded = np.stack(planes), None
            if scan.padding is not None:
                # padding is no image: the model sees the window's low end there, and the
                # padded pixels of the output are padding again
                padded = is_padding(stack, scan.padding)
                stack = np.where(padded, np.float32(window.low), stack)
            # flat neighbourhoods, in original units (values the window would round together
            # stay apart), so they come back exact
            flat = flat_neighbourhoods(torch.from_numpy(stack)[:, None])[:, 0].numpy()
            low_res = torch.from_numpy(window.forward(stack))[:, None]
            yield (start, stop - start, low_res.pin_memory() if device.type == "cuda" else low_res, padded,
                   stack, flat if flat.any() else None)

    def apply_rules(high_res, stack, padded, flat, count, keep_flat: bool = True) -> None:  # in place
        # a projected output keeps no flat-background rule: the k-space projection moves every
        # pixel of the slice, so resetting the flat ones would undo it (padding is not image data
        # and is restored either way)
        if flat is not None and keep_flat:
            keep_flat_regions(stack[:count], flat[:count], high_res, scale, degradation)
        if padded is not None:
            fill_blocks(high_res, np.float32(scan.padding[0]), padded[:count], (1, scale, scale),
                        in_plane_block_starts(scale, degradation))

    with (torch.inference_mode(), autocast, _BackgroundSink(sink) as deliver,
          _Prefetch(batches()) as prefetched):
        for start, count, low_res, padded, stack, flat in prefetched:
            low_res = low_res.to(device, non_blocking=True).contiguous(memory_format=layout)
            codes = torch.full((len(low_res),), code, device=device)
            passes = ensemble_passes(forward, low_res, codes, scale, degradation, symmetries)[:, :count, 0]
            normalised = passes.mean(0) if ensemble else passes[0]
            if consistent:  # against the low-res values in original units, not the normalised ones
                measured = torch.from_numpy(stack[:count]).to(device)
                original = normalised.double() * (window.high - window.low) + window.low
                high_res = project(original, measured, degradation, scale).float().cpu().numpy()
            else:
                high_res = window.inverse(normalised.cpu().numpy())
            apply_rules(high_res, stack, padded, flat, count, keep_flat=not consistent)
            if detail_sink is not None:
                classical = classical_answer(model, low_res[:count], degradation)[:, 0]
                detail = (detail_map(passes, classical) * np.float32(window.high - window.low)).cpu().numpy()
                if flat is not None and not consistent:  # the output is the input there: nothing departs
                    fill_blocks(detail, np.float32(0), flat[:count], (1, scale, scale),
                                in_plane_block_starts(scale, degradation))
                if padded is not None:
                    fill_blocks(detail, np.float32(scan.padding[0]), padded[:count], (1, scale, scale),
                                in_plane_block_starts(scale, degradation))
                detail_sink(detail)
            if plain_sink is not None:
                plain = high_res
                if consistent:
                    plain = window.inverse(normalised.cpu().numpy())
                    apply_rules(plain, stack, padded, flat, count)
                plain_sink(plain)
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
        affine=enhanced_affine(scan.affine, axis, scale, degradation),
        slice_axis=axis,
        window=window,
        shape=tuple(shape),
    )


def keep_flat_regions(low_res: np.ndarray, flat: np.ndarray, high_res: np.ndarray, scale: int,
                      grid: str = "bicubic") -> None:
    """Give every output pixel whose low-res pixel sits in a flat neighbourhood (one value on
    all of its :data:`FLAT_WINDOW` x :data:`FLAT_WINDOW` low-res pixels, image edges left out:
    :func:`flat_neighbourhoods`) that value, in place: the masked or skull-stripped background,
    an empty slice.

    There the network's biases would paint faint texture that no interpolation makes and no
    scan had: on a skull-stripped MR (open_ms_mni patient26 T2, 84% zeros) the output had
    almost no zero left, up to 29 in the background and 16.5 on slices that were all zero, on
    a range of about 1,100.

    The output pixels of a low-res pixel are those nearest to it on ``grid``
    (:func:`in_plane_block_starts`). Where the neighbourhood is flat the value would be right a
    pixel either way (every low-res pixel within 3 holds it); the block only decides where the
    kept region ends, and on the k-space grid at x4 the tiling block would end it three quarters
    of a low-res pixel past the last flat pixel on one side and at it on the other.

    Args:
        low_res: ``(n, h, w)`` the input slices in original units.
        flat: ``(n, h, w)`` where their neighbourhood is flat.
        high_res: ``(n, s*h, s*w)`` float32, the output in original units, changed in place.
        scale: ``s``.
        grid: the grid of the low-res pixels, ``"bicubic"`` or ``"kspace"``.
    """
    fill_blocks(high_res, low_res, flat, (1, scale, scale), in_plane_block_starts(scale, grid))


def in_plane_block_starts(scale: int, grid: str) -> tuple[int, int, int]:
    """``starts`` of :func:`fill_blocks` for ``(n, h, w)`` slices upscaled by ``scale`` on
    ``grid``: each low-res pixel's block is the output pixels nearest to it
    (:func:`medsr.geometry.nearest_block_start`)."""
    start = nearest_block_start(scale, grid)
    return (0, start, start)


def fill_blocks(fine: np.ndarray, values, where: np.ndarray, factors: tuple[int, ...],
                starts: tuple[int, ...] | None = None) -> None:
    """Set the block of ``fine`` that each marked element of the coarse ``where`` covers
    (``factors[i]`` fine elements per coarse one along axis ``i``) to ``values``: one value, or
    an array shaped like ``where`` (one per coarse element). In place, through a view of
    ``fine`` with each axis split in two (coarse, within the block), every coarse element
    broadcast against its block: no upsampled mask or values are made.

    The output tiles of low-res pixels in-plane (``factors`` 1, s, s) and the thin voxels of
    thick ones through-plane (``factor`` along the slice axis) are both such blocks.

    ``starts`` (default all 0) moves the blocks: along axis ``i`` the block of coarse element
    ``n`` begins ``starts[i]`` fine elements before ``factors[i] * n`` (the k-space grid at x4,
    :func:`in_plane_block_starts`). The first block then loses its first ``starts[i]`` elements
    (they lie before the image) and the last one gains the ``starts[i]`` fine elements left at
    the end, so every fine element still belongs to exactly one coarse element.
    """
    if starts is not None and any(starts):
        # where each fine element's coarse element is, per axis: an upsampled mask, made only
        # for moved blocks
        owners = np.ix_(*[np.minimum((np.arange(size) + start) // factor, coarse - 1)
                          for size, factor, start, coarse in zip(fine.shape, factors, starts, where.shape,
                                                                 strict=True)])
        np.copyto(fine, values[owners] if np.ndim(values) else values, where=where[owners])
        return
    blocks = fine.view()
    blocks.shape = [n for size, factor in zip(where.shape, factors, strict=True) for n in (size, factor)]
    inside = tuple(range(1, 2 * where.ndim, 2))  # the within-block axes of the view
    values = np.expand_dims(values, inside) if np.ndim(values) else values
    np.copyto(blocks, values, where=np.expand_dims(where, inside))


def flat_neighbourhoods(values: torch.Tensor) -> torch.Tensor:
    """Where all of a pixel's :data:`FLAT_WINDOW` x :data:`FLAT_WINDOW` neighbourhood (image
    edges left out) holds one value, for ``(B, C, H, W)`` ``values``: the same answer as the
    window's largest value equal to its smallest, found from the pairs of neighbours that
    differ, counted in windows with integral images (0.9 against 6.9 ms per batch of 4
    256x256 slices on the CPU, against separable max pooling)."""
    reach = FLAT_WINDOW // 2
    across = torch.zeros(values.shape, dtype=torch.int32, device=values.device)
    down = torch.zeros_like(across)
    across[..., :, :-1] = values[..., :, 1:] != values[..., :, :-1]  # pixel and the one right of it
    down[..., :-1, :] = values[..., 1:, :] != values[..., :-1, :]  # pixel and the one below it
    # pairs whose two pixels both lie in the window: one fewer column (row) of pairs than pixels
    differing = (_window_sums(across, (reach, reach), (reach, reach - 1))
                 + _window_sums(down, (reach, reach - 1), (reach, reach)))
    return differing == 0


def _window_sums(counts: torch.Tensor, rows: tuple[int, int], columns: tuple[int, int]) -> torch.Tensor:
    """For each pixel of ``(B, C, H, W)`` ``counts``, the sum over rows ``rows[0]`` above to
    ``rows[1]`` below it and columns ``columns[0]`` left to ``columns[1]`` right (0 outside)."""
    height, width = counts.shape[-2:]
    (above, below), (left, right) = rows, columns
    padded = F.pad(counts, (left + 1, right, above + 1, below))
    total = padded.cumsum(-1, dtype=torch.int32).cumsum(-2, dtype=torch.int32)
    tall, wide = above + below + 1, left + right + 1
    return (total[..., tall:tall + height, wide:wide + width] - total[..., :height, wide:wide + width]
            - total[..., tall:tall + height, :width] + total[..., :height, :width])


def enhance_volume(volume: np.ndarray, affine: np.ndarray, slice_axis: int, model: torch.nn.Module,
                   degradation: str = "bicubic", device: torch.device | str = "cpu",
                   batch_size: int | None = None, lower_percentile: float = 0.5,
                   upper_percentile: float = 99.5, progress: Callable[[int, int], None] | None = None,
                   sink: Callable[[np.ndarray], None] | None = None, precision: str = "auto",
                   consistency: str = "auto",
                   plain_sink: Callable[[np.ndarray], None] | None = None, ensemble: bool = False,
                   detail_sink: Callable[[np.ndarray], None] | None = None,
                   window: IntensityWindow | None = None) -> EnhancedVolume:
    """:func:`enhance_scan` for a volume already in memory: ``(I, J, K)`` in original units
    with its RAS ``affine``, slices along ``slice_axis``."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise MedsrError(f"expected a 3-D volume, got shape {volume.shape}")
    scan = OpenScan(shape=tuple(volume.shape), affine=np.asarray(affine, dtype=np.float64),
                    slice_axis=slice_axis, path=Path("<volume>"), source_format="array",
                    read_plane=functools.partial(plane_of, volume, slice_axis))
    return enhance_scan(scan, model, degradation, device, batch_size, lower_percentile,
                        upper_percentile, progress, sink, survey=survey_scan(scan, keep_bytes=0),
                        precision=precision, consistency=consistency, plain_sink=plain_sink,
                        ensemble=ensemble, detail_sink=detail_sink, window=window)


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse a value of ``--option`` outside ``choices``, naming them."""
    if value not in choices:
        raise MedsrError(f"--{option} must be one of {', '.join(choices)}, not {value!r}")


def autocast_for(device: torch.device, precision: str):
    """The autocast context ``--precision`` asks for on ``device`` (a no-op for fp32)."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 runs natively on ``device``: CUDA, or a CPU with AVX-512 BF16 or AMX.
    There the shipped x2 model runs 1.7x faster in bf16 autocast than in float32 (2.8x once
    compiled, against compiled float32), and the protocol's scores move by less than 0.001 dB
    in-plane, 0.003 dB through-plane (benchmarks/README.md); a CPU without them would emulate
    bf16, slower than float32."""
    if device.type == "cuda":
        return True
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return device.type == "cpu" and any(bool(getattr(torch.cpu, check, lambda: False)()) for check in checks)


def default_batch_size(model: torch.nn.Module, device: torch.device, plane: tuple[int, int], code: int,
                       autocast=None) -> int:
    """Slices per forward pass: 4 on CPU (more only adds latency); on CUDA, measured: one
    slice's peak activation memory (under ``autocast``, default bf16), then as many slices as
    fit in half the free memory."""
    if device.type != "cuda":
        return DEFAULT_BATCH["cpu"]
    autocast = autocast if autocast is not None else autocast_for(device, "auto")
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

    def __init__(self, model: torch.nn.Module, compile_model: str, n_slices: int,
                 device: torch.device | None = None, grid: str | None = None) -> None:
        check_choice("compile", compile_model, COMPILE_CHOICES)
        self.model = model
        self.compiled = compile_model == "on" or (
            compile_model == "auto" and should_compile(device or torch.device("cpu"), n_slices))
        self.run = torch.compile(model, dynamic=False) if self.compiled else model
        self.checked = not self.compiled
        # an SRResNet told the one grid of the whole scan computes only that upsampler
        self.options = {"grid": grid} if grid is not None and isinstance(model, SRResNet) else {}

    def __call__(self, low_res: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        if self.checked:
            return self.run(low_res, codes, **self.options)
        try:
            with warnings.catch_warnings():
                # inductor leaves the FFT of the k-space upsampler to eager code, and says so
                warnings.simplefilter("ignore", UserWarning)
                result = self.run(low_res, codes, **self.options)
        except Exception as exc:  # compilation happens on the first call
            reason = " ".join(str(exc).split())[:200]
            logger.warning("torch.compile failed (%s: %s); running the model uncompiled",
                           type(exc).__name__, reason)
            self.run = self.model
            result = self.run(low_res, codes, **self.options)
        self.checked = True
        return result


def should_compile(device: torch.device, n_slices: int) -> bool:
    """``--compile auto``: only where it was measured to pay. On the CPU it makes the forward
    pass 2.2x faster (bf16; 1.4x float32) and repays its ~17 s first compile after about 90
    slices (110), so from :data:`COMPILE_MIN_SLICES`. On CUDA the one measurement there is
    (an H100, issue #12) found the compiled model 10x slower than plain bf16 eager, so auto
    leaves it off until a GPU measurement says otherwise; ``--compile on`` still forces it."""
    return device.type == "cpu" and n_slices >= COMPILE_MIN_SLICES


class _BackgroundSink:
    """Hands batches to ``sink`` on a writer thread (compression overlaps the next forward
    pass; zlib and PyTorch both release the GIL). At most two batches wait, so memory stays
    bounded; an error in the sink is raised in the caller when the block ends. When the block
    fails (an error, Ctrl-C, SIGTERM) the batches still waiting are dropped: the caller waits
    for the one being written, not for the queue."""

    def __init__(self, sink: Callable[[np.ndarray], None] | None) -> None:
        self.sink, self.error = sink, None
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.cancelled = False

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
            if self.error is None and not self.cancelled:
                try:
                    self.sink(item)
                except BaseException as exc:  # handed to the caller's thread
                    self.error = exc

    def __exit__(self, kind, error, traceback) -> bool:
        if self.sink is not None:
            if kind is not None:
                self.cancelled = True
                with contextlib.suppress(queue.Empty):
                    while True:
                        self.queue.get_nowait()
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
            with contextlib.suppress(queue.Empty):
                self.queue.get(timeout=0.1)
        return False
