"""Data consistency: make an enhanced slice reproduce its low-res input exactly.

A network's output ``x`` is an estimate; degraded again by the operator ``D`` that made the
low-res slice ``y`` (the grid found or told, :data:`medsr.transforms.GRID_OF`), it need not give
``y`` back. The projection moves it, by the least change in the least-squares sense, onto the
images that do:

    x' = x + D^T (D D^T)^-1 (y - D x)

Both operators are known in closed form, so the projection is solved directly, not
iteratively; it is exact to float rounding and costs about as much as ``D`` itself:

- ``kspace`` (:func:`medsr.batch_degradation.kspace_truncate`: keep the central
  ``(H/s, W/s)`` block of the centred spectrum, real part, over ``s * s``). ``D D^T`` is diagonal
  in the low-res spectrum: ``1 / s^2`` everywhere except on the low-res Nyquist row and column
  (even sides), where the real part keeps half of it, ``1 / (2 s^2)``. So the projection is the
  coarse band of the output's spectrum replaced by the input's (``s^2`` times its spectrum), the
  Nyquist lines counted as they are measured.
- ``bicubic`` (:func:`medsr.batch_degradation.bicubic_linear`: scikit-image's anti-aliased cubic
  downsampling, one matrix ``A`` per axis, ``D x = A_r x A_c^T``). ``D`` is separable, so
  ``D^T (D D^T)^-1`` is too: ``x' = x + P_r (y - D x) P_c^T`` with ``P = A^T (A A^T)^-1``, a
  ``(size, size / s)`` matrix per axis, computed once (float64) and kept on the device.
  ``A A^T`` is well conditioned (condition number 1.17 at x2, 2.05 at x4 for 64-512 pixels), so
  the direct solve loses nothing to rounding; conjugate gradients would need several iterations
  of ``D`` and ``D^T`` to reach what two matrix products give exactly. scikit-image clips its
  result to the input's range; ``D`` here is the linear part (the clip only bites at the
  sharpest edges, where the spline overshoots).

What it guarantees: the output, degraded as the input was, gives the input back (relative
error :func:`consistency_error` below :data:`TOLERANCE` after the projection, float32
rounding). Every detail the network added lies where the measurement says nothing (above the
low-res band for ``kspace``, in the null space of the resampling for ``bicubic``). When the
operator is right, the true image reproduces the input too, so the projection can only bring
the output closer to it (in the least-squares sense). When it is only approximately right (a
scan resampled by another kernel, noise), it forces the output to fit the wrong model; which
scans ``auto`` projects was decided on validation (:data:`AUTO_DEGRADATIONS`: those named k-space
truncated, the model card).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from medsr.batch_degradation import bicubic_linear, bicubic_matrix, cached_on, kspace_truncate
from medsr.errors import MedsrError
from medsr.transforms import central_block_origin

CONSISTENCY_CHOICES = ("auto", "on", "off")
# the degradations --consistency auto projects: those named (found from the pixels, or told)
# k-space truncation, whose operator the projection applies exactly. It gains there (+0.17 dB on
# validation, +0.8-0.95 dB on the collection's CTs, where it also lifts the model above zero-
# filled k-space) but loses where the kspace grid holds another kernel (Gaussian blur -0.67 dB,
# Rician noise -0.50 dB), which the classifier mostly names apart (on the 12 validation and test
# volumes, the shipped x2 classifier names one k-space FLAIR Rician, left unprojected, and two
# Rician volumes k-space, projected at -0.55 dB: model card);
# on the bicubic grid the gain is small (+0.04 dB) and Lanczos or area loses (model card,
# "Data consistency")
AUTO_DEGRADATIONS: frozenset[str] = frozenset({"kspace"})
TOLERANCE = 1e-5  # relative consistency error reached after the projection (float32 output)
GRIDS = ("bicubic", "kspace")


def check_consistency(consistency: str, through_plane: bool) -> None:
    """Refuse what no command can do: an unknown choice, or ``on`` through-plane (no projection
    exists for the thick-slice profile yet). ``enhance`` and ``evaluate`` both call this.

    Raises:
        MedsrError: the choice and the rule.
    """
    if consistency not in CONSISTENCY_CHOICES:
        raise MedsrError(f"--consistency must be one of {', '.join(CONSISTENCY_CHOICES)}, not {consistency!r}")
    if through_plane and consistency == "on":
        raise MedsrError("--consistency on is an in-plane choice; --through-plane has no projection yet")


def projects(consistency: str, grid: str, named: str | None = None) -> bool:
    """Whether ``--consistency`` (``auto``, ``on`` or ``off``) projects a scan enhanced on
    ``grid``. ``named`` is the degradation the classifier names (the estimate's ``likely``);
    None when the grid was told, which names that degradation itself."""
    if consistency not in CONSISTENCY_CHOICES:
        raise MedsrError(f"--consistency must be one of {', '.join(CONSISTENCY_CHOICES)}, not {consistency!r}")
    named = grid if named is None else named
    return consistency == "on" or (consistency == "auto" and named == grid and named in AUTO_DEGRADATIONS)


def resolved(consistency: str, grid: str, named: str | None = None) -> str:
    """``on`` or ``off``: what ``consistency`` means for this scan (:func:`projects`), for the
    engine, which knows the grid but not what the classifier named."""
    return "on" if projects(consistency, grid, named) else "off"


def describe(consistency: str, grid: str) -> str:
    """What an output's description says about the projection (``consistent`` or ``plain``)."""
    return "consistent" if projects(consistency, grid) else "plain"


def _check(grid: str, scale: int) -> None:
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, not {grid!r}")
    if int(scale) != scale or scale < 2:
        raise ValueError(f"scale must be an integer >= 2, not {scale}")


def degrade(high_res: torch.Tensor, grid: str, scale: int) -> torch.Tensor:
    """The linear operator ``D`` of ``grid`` on every slice.

    Args:
        high_res: ``(B, H, W)``, any units, H and W multiples of ``scale``, on any device.
        grid: ``"bicubic"`` or ``"kspace"``.
        scale: integer factor.

    Returns:
        ``(B, H/s, W/s)`` float64 in the same units, on the same device.
    """
    _check(grid, scale)
    if grid == "kspace":
        return kspace_truncate(high_res[:, None], scale)[:, 0]
    return bicubic_linear(high_res, scale)


def project(high_res: torch.Tensor, low_res: torch.Tensor, grid: str, scale: int) -> torch.Tensor:
    """The least change to every slice of ``high_res`` that makes it reproduce ``low_res``:
    ``x + D^T (D D^T)^-1 (y - D x)`` (see the module docstring).

    Args:
        high_res: ``(B, H, W)`` the enhanced slices ``x``, in original units (HU, scanner units).
        low_res: ``(B, H/s, W/s)`` the measured slices ``y``, same units, same device.
        grid: how ``low_res`` was made from the high-res image: ``"bicubic"`` or ``"kspace"``.
        scale: integer factor.

    Returns:
        ``(B, H, W)`` float64 on ``high_res.device``.

    Example:
        >>> enhanced = project(enhanced_hu, acquired_hu, "kspace", 2)
        >>> consistency_error(enhanced, acquired_hu, "kspace", 2)  # about 1e-16
    """
    _check(grid, scale)
    height, width = high_res.shape[-2:]
    if low_res.shape[-2:] != (height // scale, width // scale) or height % scale or width % scale:
        raise ValueError(f"low_res must be (B, H/{scale}, W/{scale}) for high_res {tuple(high_res.shape)}, "
                         f"not {tuple(low_res.shape)}")
    images = high_res.double()
    residual = low_res.double() - degrade(images, grid, scale)
    if grid == "kspace":
        return images + _kspace_correction(residual, scale)
    device = images.device
    rows = cached_on(("bicubic least change", height, scale), device, lambda: least_change_matrix(height, scale))
    columns = cached_on(("bicubic least change", width, scale), device, lambda: least_change_matrix(width, scale))
    return images + rows @ residual @ columns.T


def _kspace_correction(residual: torch.Tensor, scale: int) -> torch.Tensor:
    """``D^T (D D^T)^-1 residual`` for ``kspace``: the residual's spectrum times ``s^2``, its
    Nyquist row and column (even sides, where ``D`` keeps half) doubled, placed around DC of the
    high-res spectrum."""
    low_h, low_w = residual.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fft2(residual), dim=(-2, -1))
    weight = torch.ones(low_h, low_w, dtype=torch.float64, device=residual.device)
    if low_h % 2 == 0:  # after fftshift the Nyquist frequency -h/2 is the first row
        weight[0, :] = 2.0
    if low_w % 2 == 0:
        weight[:, 0] = 2.0
    spectrum = spectrum * weight
    height, width = low_h * scale, low_w * scale
    top, left = central_block_origin(height, low_h), central_block_origin(width, low_w)
    padded = spectrum.new_zeros(*residual.shape[:-2], height, width)
    padded[..., top:top + low_h, left:left + low_w] = spectrum
    return torch.fft.ifft2(torch.fft.ifftshift(padded, dim=(-2, -1))).real * (scale * scale)


@functools.lru_cache(maxsize=64)
def least_change_matrix(size: int, scale: int) -> np.ndarray:
    """``(size, size // scale)`` matrix ``A^T (A A^T)^-1`` of :func:`bicubic_matrix` ``A``: the
    least change along one axis that makes it downsample to given values."""
    matrix = bicubic_matrix(size, scale)
    return np.linalg.solve(matrix @ matrix.T, matrix).T


def consistency_error(high_res: torch.Tensor | np.ndarray, low_res: torch.Tensor | np.ndarray, grid: str,
                      scale: int) -> float:
    """Relative consistency error ``||D(x) - y|| / ||y||`` over every slice (Frobenius norms).

    Args:
        high_res: ``(B, H, W)`` the enhanced slices, original units.
        low_res: ``(B, H/s, W/s)`` the low-res slices they came from, same units.
        grid, scale: the operator ``D`` (:func:`degrade`).
    """
    high_res, low_res = torch.as_tensor(high_res), torch.as_tensor(low_res)
    residual = degrade(high_res, grid, scale) - low_res.double()
    return float(torch.linalg.vector_norm(residual) / torch.linalg.vector_norm(low_res.double()))


def volume_consistency_error(high_res: np.ndarray, low_res: np.ndarray, slice_axis: int, grid: str,
                             scale: int, batch: int = 16) -> float:
    """:func:`consistency_error` of two volumes, slices along ``slice_axis``, ``batch`` slices at
    a time (bounded memory)."""
    high_slices, low_slices = np.moveaxis(high_res, slice_axis, 0), np.moveaxis(low_res, slice_axis, 0)
    squared_residual = squared_low = 0.0
    for start in range(0, len(low_slices), batch):
        low = torch.from_numpy(np.ascontiguousarray(low_slices[start:start + batch], dtype=np.float64))
        high = torch.from_numpy(np.ascontiguousarray(high_slices[start:start + batch]))
        squared_residual += float((degrade(high, grid, scale) - low).square().sum())
        squared_low += float(low.square().sum())
    return float(np.sqrt(squared_residual / squared_low))
