"""Self-ensemble: run the model on the eight flips and transposes of each slice, undo each on
its output, and average.

The eight in-plane symmetries of the square (transpose or not, flip the rows or not, flip the
columns or not) map a slice onto another slice the model could have been given; the network
is not exactly equivariant, so the eight answers differ, and their mean is a better estimate
than any one of them (the model card, "Self-ensemble and detail map"). Their spread says where the network
is unsure (:mod:`medsr.detail_map`).

The grid matters when a flip is undone (:func:`medsr.geometry.nearest_block_start`):

- ``bicubic``: the fine pixels tile the coarse ones (coarse pixel ``n`` covers fine pixels
  ``s n .. s n + s - 1``), and a flip maps that tiling onto itself: flipping the output back
  is exact.
- ``kspace``: coarse pixel ``n`` is fine pixel ``s n``. Flipping a slice of ``N`` coarse pixels
  sends pixel ``n`` to ``N - 1 - n``, at fine position ``s (N - 1 - n)``; flipping the output
  (``s N`` pixels) back puts it at ``s N - 1 - s (N - 1 - n) = s n + s - 1``, ``s - 1`` fine
  pixels past where it belongs. Each flip is undone by a flip and a circular shift of
  ``s - 1`` fine pixels back. Circular is exact for this grid: the zero-filled reconstruction
  is periodic, so the ``s - 1`` pixels that wrap round are the image's own continuation (the
  network's detail there is an edge guess either way; the protocol leaves a border of ``s``
  pixels out of the score).

A transpose maps either grid onto itself.

Through-plane (:func:`flipped_mean`), each plane holds an in-plane axis and the slice axis,
already B-splined onto the thin grid. A transpose would swap the thin axis with an untouched
one, which the network never sees, so only the four flips make sense. Both are exact: the
in-plane axis keeps its grid, and the thin slices tile the thick ones symmetrically (thick
slice ``k`` covers thin ``s k .. s k + s - 1``; reversed, thick ``K - 1 - k``). With the two
plane orientations :mod:`medsr.through_plane` already averages, that makes eight passes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch

from medsr.errors import MedsrError

GRIDS = ("bicubic", "kspace")


class Symmetry(NamedTuple):
    """One of the eight: transpose first, then flip the rows (``-2``) and the columns (``-1``)."""

    transpose: bool
    flip_rows: bool
    flip_columns: bool


SYMMETRIES: tuple[Symmetry, ...] = tuple(Symmetry(*flags) for flags in itertools.product((False, True), repeat=3))
IDENTITY = SYMMETRIES[0]


def apply(images: torch.Tensor, symmetry: Symmetry) -> torch.Tensor:
    """``symmetry`` applied to ``(..., H, W)`` low-res ``images`` (``(..., W, H)`` when it
    transposes)."""
    if symmetry.transpose:
        images = images.transpose(-1, -2)
    dims = [d for d, flip in ((-2, symmetry.flip_rows), (-1, symmetry.flip_columns)) if flip]
    return images.flip(dims) if dims else images


def undo(outputs: torch.Tensor, symmetry: Symmetry, scale: int, grid: str) -> torch.Tensor:
    """Undo ``symmetry`` on ``(..., s H, s W)`` model outputs of transformed low-res slices, on
    ``grid``: each flip is flipped back, and on the ``kspace`` grid shifted ``scale - 1`` fine
    pixels back (circularly; see the module docstring); then the transpose."""
    if grid not in GRIDS:
        raise MedsrError(f"grid must be one of {', '.join(GRIDS)}, not {grid!r}")
    for dim, flip in ((-2, symmetry.flip_rows), (-1, symmetry.flip_columns)):
        if flip:
            outputs = outputs.flip(dim)
            if grid == "kspace" and scale > 1:
                outputs = outputs.roll(-(scale - 1), dims=dim)
    return outputs.transpose(-1, -2) if symmetry.transpose else outputs


def ensemble_passes(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], low_res: torch.Tensor,
                    codes: torch.Tensor, scale: int, grid: str,
                    symmetries: tuple[Symmetry, ...] = SYMMETRIES) -> torch.Tensor:
    """The model's answer for each symmetry, each brought back onto the input's grid.

    The transformed copies go through the model together: one forward pass for the untransposed
    ones and one for the transposed ones (one for all when the slices are square), so the
    device sees ``len(symmetries)`` times the batch.

    Args:
        forward: the model, ``(B, 1, H, W)`` normalised slices and ``(B,)`` codes to
            ``(B, 1, s H, s W)``.
        low_res: ``(B, 1, H, W)`` normalised low-res slices.
        codes: ``(B,)`` degradation codes.
        scale: ``s``.
        grid: the grid the model is told, ``"bicubic"`` or ``"kspace"``.

    Returns:
        ``(len(symmetries), B, 1, s H, s W)`` float32.
    """
    height, width = low_res.shape[-2:]
    groups = ([symmetries] if height == width else
              [[s for s in symmetries if not s.transpose], [s for s in symmetries if s.transpose]])
    answers: dict[Symmetry, torch.Tensor] = {}
    for group in groups:
        if not group:
            continue
        batch = torch.cat([apply(low_res, s) for s in group]).contiguous(memory_format=_layout(low_res))
        outputs = forward(batch, codes.repeat(len(group))).float()
        for symmetry, output in zip(group, outputs.chunk(len(group)), strict=True):
            answers[symmetry] = undo(output, symmetry, scale, grid)
    return torch.stack([answers[s] for s in symmetries])


def _layout(tensor: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if tensor.is_contiguous(memory_format=torch.channels_last) and \
        not tensor.is_contiguous() else torch.contiguous_format


PLANE_FLIPS: tuple[tuple[int, ...], ...] = ((), (-2,), (-1,), (-2, -1))


def flipped_mean(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], planes: torch.Tensor,
                 factors: torch.Tensor) -> torch.Tensor:
    """The mean of the model's answers to the four flips of ``(B, 1, H, Z)`` planes (each
    flipped back), the four copies in one forward pass; ``factors`` ``(B,)``. Float32
    ``(B, 1, H, Z)``."""
    copies = torch.cat([planes.flip(dims) if dims else planes for dims in PLANE_FLIPS])
    outputs = forward(copies.contiguous(memory_format=_layout(planes)), factors.repeat(len(PLANE_FLIPS))).float()
    return torch.stack([output.flip(dims) if dims else output
                        for output, dims in zip(outputs.chunk(len(PLANE_FLIPS)), PLANE_FLIPS, strict=True)]).mean(0)
