"""Thick slices made thin: through-plane enhancement of a whole volume, plane by plane.

The slice axis is first B-splined onto the thin grid (the protocol v1-z baseline), then the
:class:`~medsr.model.ThroughPlaneNet` refines every plane that contains the slice axis, in both
orientations (for axial slices: every sagittal and every coronal plane), and the two answers
are averaged: each sees the slice axis beside a different in-plane axis, and their errors are
partly independent. Memory holds the input and two output-sized arrays; the work is still 2-D,
batch by batch, on the GPU when there is one.

The output grid: the slice axis is divided into ``factor`` thin slices per thick one, so the
new slices tile the old exactly (:func:`medsr.geometry.rescaled_affine`); in-plane is untouched.
A slice spacing that is not a whole multiple of the in-plane spacing (3.0 / 0.9 mm) is divided
by the nearest whole factor (3: 1.0 mm slices), never below 2: see :func:`default_factor`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from medsr.engine import EnhancedVolume, autocast_for, fill_blocks, flat_neighbourhoods
from medsr.ensemble import PLANE_FLIPS, flipped_mean
from medsr.errors import MedsrError
from medsr.geometry import rescaled_affine, through_plane_factors, voxel_sizes
from medsr.model import THROUGH_PLANE_FACTORS, ThroughPlaneNet
from medsr.transforms import IntensityWindow, bspline_upsample

logger = logging.getLogger(__name__)

DEFAULT_PLANES_PER_BATCH = {"cpu": 8, "cuda": 64}


def default_factor(affine: np.ndarray, slice_axis: int) -> int:
    """Thin slices per thick slice: slice spacing / in-plane spacing, to the nearest whole
    number (so new slices tile the old ones exactly), at least 2.

    Raises:
        MedsrError: the slices are already about as thin as the in-plane voxels, or thicker
            than the factors the model was trained for.
    """
    sizes = voxel_sizes(affine)
    in_plane = float(np.mean([sizes[a] for a in range(3) if a != slice_axis]))
    ratio = sizes[slice_axis] / in_plane
    factor = int(round(ratio))
    if ratio < 1.5:
        raise MedsrError(f"slices are {sizes[slice_axis]:.3g} mm apart and voxels {in_plane:.3g} mm "
                         "in-plane: nothing to make thinner (pass --scale to force a factor)")
    if factor not in THROUGH_PLANE_FACTORS:
        raise MedsrError(f"a factor of {ratio:.3g} ({sizes[slice_axis]:.3g} / {in_plane:.3g} mm) is "
                         f"beyond the {max(THROUGH_PLANE_FACTORS)} the through-plane model knows; "
                         "pass --scale")
    return factor


def check_factor(factor: int) -> None:
    if factor not in THROUGH_PLANE_FACTORS:
        raise MedsrError(f"--scale for --through-plane must be {min(THROUGH_PLANE_FACTORS)} to "
                         f"{max(THROUGH_PLANE_FACTORS)}, not {factor}")


def enhance_through_plane(volume: np.ndarray, affine: np.ndarray, slice_axis: int, model: ThroughPlaneNet,
                          factor: int, window: IntensityWindow, device: torch.device | str = "cpu",
                          batch_size: int | None = None, precision: str = "auto",
                          progress: Callable[[int, int], None] | None = None,
                          ensemble: bool = False) -> EnhancedVolume:
    """Make the slices of ``volume`` ``factor`` times thinner.

    Args:
        volume: ``(I, J, K)`` in original units.
        affine: its RAS affine (mm).
        slice_axis: the thick axis.
        model: a trained :class:`ThroughPlaneNet`.
        factor: thin slices per thick slice (2-8).
        window: the intensity window that maps original units to the network's range.
        device: where the network runs.
        batch_size: planes per forward pass (default 8 on the CPU, 64 on CUDA).
        precision: ``auto`` (bf16 autocast on CUDA and on CPUs with native bf16, else fp32),
            ``fp32`` or ``bf16``.
        progress: called with ``(planes_done, planes_total)``.
        ensemble: each plane is also run flipped along either axis and both, and the four
            answers, flipped back, averaged (:func:`medsr.ensemble.flipped_mean`: eight passes
            with the two orientations); the batch then counts four copies of each plane.

    Returns:
        The :class:`EnhancedVolume` (``array`` in original units) on the thin grid.
    """
    check_factor(factor)
    if batch_size is not None and batch_size < 1:
        raise MedsrError(f"--batch-size must be >= 1, not {batch_size}")
    if volume.shape[slice_axis] < 2:
        raise MedsrError(f"one slice along axis {slice_axis}: thin slices are made between thick ones, "
                         "so through-plane needs at least two")
    device = torch.device(device)
    volume = np.asarray(volume, dtype=np.float32)
    upsampled = bspline_upsample(window.forward(volume), slice_axis, factor)
    in_plane = [a for a in range(3) if a != slice_axis]
    total = sum(upsampled.shape[a] for a in in_plane)
    batch_size = batch_size or DEFAULT_PLANES_PER_BATCH.get(device.type, 8)
    if ensemble:  # images per forward pass stay batch_size
        batch_size = max(1, batch_size // len(PLANE_FLIPS))
    # channels-last: oneDNN and cuDNN both run these convolutions faster in that layout
    # (measured 1.6x on a 2-core AVX-512 CPU)
    model = model.to(device, memory_format=torch.channels_last).eval()
    autocast = autocast_for(device, precision)
    refined = np.zeros_like(upsampled)
    done = 0
    with torch.inference_mode(), autocast:
        for across in in_plane:
            # planes indexed along ``across``; each holds the other in-plane axis and the slice
            # axis, the slice axis last as the network expects
            other = next(a for a in in_plane if a != across)
            planes = np.moveaxis(upsampled, (across, other, slice_axis), (0, 1, 2))
            result = np.moveaxis(refined, (across, other, slice_axis), (0, 1, 2))
            for start in range(0, len(planes), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(planes[start:start + batch_size]))[:, None]
                batch = batch.to(device).contiguous(memory_format=torch.channels_last)
                factors = torch.full((len(batch),), float(factor), device=device)
                output = (flipped_mean(model, batch, factors) if ensemble else model(batch, factors).float())
                output = output[:, 0].cpu().numpy()
                result[start:start + len(output)] += output / 2.0
                done += len(output)
                if progress is not None:
                    progress(done, total)
    thin_per_thick = through_plane_factors(slice_axis, factor)
    new_affine = rescaled_affine(affine, thin_per_thick)
    enhanced = window.inverse(refined)
    # as in-plane (medsr.engine.keep_flat_regions): a thick voxel whose neighbourhood (7x7
    # in-plane, the thick slices either side) holds one exact value, the empty background of a
    # skull-stripped volume, keeps it in its thin voxels; the network painted up to 52 there on
    # a range of about 1,100 (open_ms_mni patient26 T2, every 4th slice made thin again x4)
    fill_blocks(enhanced, volume, _flat_across_thick_slices(volume, slice_axis), thin_per_thick)
    return EnhancedVolume(array=enhanced, affine=new_affine, slice_axis=slice_axis,
                          window=window, shape=tuple(refined.shape))


def _flat_across_thick_slices(volume: np.ndarray, slice_axis: int) -> np.ndarray:
    """Thick voxels whose :data:`~medsr.engine.FLAT_WINDOW` square in-plane neighbourhood, on
    their own thick slice and the one either side (the first and last have one), holds their
    value: flat in-plane on all three, and the same value on all three."""
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, slice_axis, 0)))
    own = flat_neighbourhoods(slices[:, None])[:, 0]
    flat = own.clone()
    for step in (1, -1):
        neighbour = (torch.arange(len(slices)) - step).clamp(0, len(slices) - 1)
        flat &= own[neighbour] & (slices[neighbour] == slices)
    return np.moveaxis(flat.numpy(), 0, slice_axis)

