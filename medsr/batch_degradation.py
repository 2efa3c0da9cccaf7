"""Training degradations for a whole batch at once, in PyTorch, on the batch's device.

:class:`medsr.transforms.RandomDegradePair` degrades one patch at a time with NumPy, SciPy,
scikit-image and Pillow. On an H100 that kept the model waiting for data 67% of the time
(issue #12). Here the same degradations run as a few batched tensor operations where the
model runs, and only the cheap part stays on the CPU: cropping patches and drawing, for each
one, which degradation it gets, its parameters and its noise.

Every degradation is the same operator as its NumPy counterpart, borders included, to float
rounding (the tests compare each with the NumPy function on real slices). The resamplings are
linear and separable, so each is written as one matrix per image axis,
``low_res = A_rows @ high_res @ A_columns.T``, whatever its kernel and border rule:

- ``kspace``: the centred FFT crop with ``torch.fft``; ``rician`` adds Rician noise to it.
- ``area``: average pooling over ``scale x scale`` blocks.
- ``gaussian``: Gaussian blur (SciPy's ``reflect`` borders, 4-sigma kernel) at every
  ``scale``-th pixel from the first; ``blur_noise``'s pre-blur is the same blur at every pixel.
- ``bicubic``: scikit-image's ``rescale(order=3, anti_aliasing=True, mode="reflect")`` is a
  Gaussian of sigma ``(scale - 1) / 2`` followed by cubic B-spline interpolation (SciPy's
  ``zoom``, ``mirror`` borders) at ``scale * i + (scale - 1) / 2``, then a clip to the input's
  range. Both steps are linear and separable, so their product is one matrix per axis; the
  B-spline's prefilter is an infinite filter, cut where its taps fall below 1e-9.
  ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` is another kernel (Keys'
  cubic widened by ``scale``, as Pillow's): on the real sample slices (8 per scan) it is
  40.6-59.2 dB PSNR from scikit-image's result at x2 and 38.2-48.4 dB at x4 (data range: the
  slice's); the Gaussian pre-blur of sigma ``(scale - 1) / 2`` followed by plain bicubic
  interpolation comes closer, 51.2-64.0 dB at x2 and 59.1-69.5 dB at x4, but is still not the
  protocol's degradation. The matrices are (157-175 dB: float rounding), so they are used.
- ``lanczos``: no PyTorch kernel exists; Pillow's anti-aliased Lanczos-3 (the kernel widened
  by ``scale``, cut to the image and renormalised at its borders) is written out as its
  matrix, so it is exact rather than mapped onto ``bicubic``.

The arithmetic is float64 (as NumPy's), whatever the device: these are a few small
matrix products per batch, and float64 keeps the two routes equal to 1e-6.

Randomness: :meth:`RandomBatchDegradation.draw` draws one item's degradation on the CPU
from a ``numpy.random.RandomState`` seeded as ``RandomDegradePair`` seeds its own, and draws
in the same order (the degradation, its parameters, then its noise), so one seed gives both
routes the same degradation, parameters and noise. An item's degradation depends on its own
seed only, never on the batch it lands in.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from medsr.model import DEGRADATION_CODES
from medsr.transforms import FWHM_TO_SIGMA, GRID_OF, RandomDegradePair, central_block_origin

FAMILIES = RandomDegradePair.NAMES  # the index of a name here is its family code
# the grid each family puts the low-res pixels on; blur_noise is a resampling (bicubic grid)
GRID_OF_FAMILY = {**GRID_OF, "blur_noise": "bicubic"}
GAUSSIAN_TRUNCATE = 4.0  # SciPy's gaussian_filter default: the kernel reaches 4 sigma
SPLINE_POLE = math.sqrt(3.0) - 2.0  # the cubic B-spline prefilter's pole
SPLINE_TAPS = 16  # prefilter taps each side: |pole|^16 * sqrt(3) < 1e-9
LANCZOS_LOBES = 3


# ---------------------------------------------------------------------------- 1-D operators


def fold_indices(positions: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Where ``positions`` (any integers) land in ``[0, size)`` when a signal is extended by
    mirroring it at its ends.

    ``symmetric`` repeats the edge sample (``d c b a | a b c d``: SciPy's ``reflect``, NumPy's
    ``symmetric``); ``mirror`` does not (``d c b | a b c d``: SciPy's ``mirror``, NumPy's and
    PyTorch's ``reflect``). Both repeat with their period, however far out ``positions`` go.
    """
    if mode == "symmetric":
        period = 2 * size
        folded = np.mod(positions, period)
        return np.where(folded < size, folded, period - 1 - folded)
    if mode == "mirror":
        if size == 1:
            return np.zeros_like(positions)
        period = 2 * size - 2
        folded = np.mod(positions, period)
        return np.where(folded < size, folded, period - folded)
    raise ValueError(f"mode must be 'symmetric' or 'mirror', not {mode!r}")


def _gaussian_weights(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """SciPy's ``gaussian_filter`` kernel: offsets ``-r..r`` with ``r = int(4 sigma + 0.5)``
    and their normalised weights."""
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * offsets**2 / sigma**2)
    return offsets, weights / weights.sum()


@functools.lru_cache(maxsize=64)
def gaussian_matrix(size: int, sigma: float, mode: str) -> np.ndarray:
    """``(size, size)`` matrix of SciPy's 1-D Gaussian filter with ``mode`` borders
    (:func:`fold_indices`)."""
    offsets, weights = _gaussian_weights(sigma)
    rows = np.arange(size)[:, None]
    matrix = np.zeros((size, size))
    np.add.at(matrix, (np.broadcast_to(rows, (size, len(offsets))),
                       fold_indices(rows + offsets, size, mode)), weights)
    return matrix


def cubic_bspline(x: np.ndarray) -> np.ndarray:
    """The cubic B-spline, beta3(x)."""
    x = np.abs(x)
    return np.where(x < 1, 2.0 / 3.0 - x**2 + x**3 / 2.0, np.where(x < 2, (2.0 - x) ** 3 / 6.0, 0.0))


def cardinal_cubic_spline(x: np.ndarray) -> np.ndarray:
    """The interpolating kernel of cubic B-spline interpolation with its prefilter (SciPy's
    ``order=3``): ``sum_k sqrt(3) * pole^|k| * beta3(x - k)``, the prefilter cut at
    :data:`SPLINE_TAPS` taps each side."""
    taps = np.arange(-SPLINE_TAPS, SPLINE_TAPS + 1)
    prefilter = math.sqrt(3.0) * SPLINE_POLE ** np.abs(taps)
    return (prefilter * cubic_bspline(np.asarray(x, dtype=np.float64)[..., None] - taps)).sum(axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(size: int, scale: int) -> np.ndarray:
    """``(size // scale, size)`` matrix of scikit-image's anti-aliased cubic downsampling along
    one axis (``rescale(..., 1 / scale, order=3, anti_aliasing=True, mode="reflect")`` before
    its clip): a Gaussian of sigma ``(scale - 1) / 2``, then the cubic spline sampled at
    ``scale * i + (scale - 1) / 2``, both with ``mirror`` borders."""
    low = size // scale
    centres = scale * np.arange(low) + (scale - 1) / 2.0
    reach = SPLINE_TAPS + 2
    taps = np.floor(centres)[:, None].astype(int) + np.arange(-reach, reach + 2)
    spline = np.zeros((low, size))
    np.add.at(spline, (np.broadcast_to(np.arange(low)[:, None], taps.shape), fold_indices(taps, size, "mirror")),
              cardinal_cubic_spline(centres[:, None] - taps))
    return spline @ gaussian_matrix(size, (scale - 1) / 2.0, "mirror")


def lanczos3(x: np.ndarray) -> np.ndarray:
    """Pillow's Lanczos kernel: ``sinc(x) * sinc(x / 3)`` on ``[-3, 3)``."""
    x = np.asarray(x, dtype=np.float64)
    return np.where((x >= -LANCZOS_LOBES) & (x < LANCZOS_LOBES), np.sinc(x) * np.sinc(x / LANCZOS_LOBES), 0.0)


@functools.lru_cache(maxsize=64)
def lanczos_matrix(size: int, scale: int) -> np.ndarray:
    """``(size // scale, size)`` matrix of Pillow's ``resize(..., LANCZOS)`` along one axis
    (``precompute_coeffs`` in Pillow's ``Resample.c``): output pixel ``i`` is centred at
    ``(i + 0.5) * scale`` in pixel-edge coordinates, the kernel is stretched by ``scale``, cut
    to the image and renormalised."""
    low = size // scale
    support = LANCZOS_LOBES * scale
    matrix = np.zeros((low, size))
    for i in range(low):
        centre = (i + 0.5) * scale
        first = max(int(math.floor(centre - support + 0.5)), 0)
        end = min(int(math.floor(centre + support + 0.5)), size)
        taps = np.arange(first, end)
        weights = lanczos3((taps - centre + 0.5) / scale)
        matrix[i, first:end] = weights / weights.sum()
    return matrix


# ---------------------------------------------------------------------------- batch operators

_ON_DEVICE: dict[tuple, torch.Tensor] = {}


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``. On CUDA through pinned memory without blocking: a copy from
    pageable memory would first wait for every operation already queued on the device."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def cached_on(key: tuple, device: torch.device, make) -> torch.Tensor:
    """``make()`` (a host array) on ``device``, made and copied once per ``key`` and device."""
    key = (*key, str(device))
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = _to_device(make(), device)
    return _ON_DEVICE[key]


def _matrix_on(kind: str, size: int, scale: int, device: torch.device) -> torch.Tensor:
    """:func:`bicubic_matrix` or :func:`lanczos_matrix` on ``device`` (float64, cached)."""
    make = bicubic_matrix if kind == "bicubic" else lanczos_matrix
    return cached_on((kind, size, scale), device, lambda: make(size, scale))


def _separable(images: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``rows @ images @ columns.T`` over the last two axes (matrices broadcast over the batch)."""
    return rows @ images @ columns.transpose(-1, -2)


def _check_batch(high_res: torch.Tensor, scale: int) -> None:
    if high_res.ndim != 4 or high_res.shape[1] != 1:
        raise ValueError(f"high_res must be (B, 1, H, W), not {tuple(high_res.shape)}")
    height, width = high_res.shape[-2:]
    if height % scale or width % scale or min(height, width) < 2 * scale:
        raise ValueError(f"high_res sides must be multiples of scale ({scale}) and at least {2 * scale}, "
                         f"not {height} x {width}")


def kspace_truncate(high_res: torch.Tensor, scale: int) -> torch.Tensor:
    """:func:`medsr.transforms.degrade_kspace` of every item: keep the central
    ``(H/s, W/s)`` block of the centred 2-D spectrum, invert, real part over ``s * s``.

    Args:
        high_res: ``(B, 1, H, W)``, any units, H and W multiples of ``scale``.
        scale: integer factor.

    Returns:
        ``(B, 1, H/s, W/s)`` float64 in the same units.
    """
    _check_batch(high_res, scale)
    height, width = high_res.shape[-2:]
    low_h, low_w = height // scale, width // scale
    spectrum = torch.fft.fftshift(torch.fft.fft2(high_res.double()), dim=(-2, -1))
    top, left = central_block_origin(height, low_h), central_block_origin(width, low_w)
    central = spectrum[..., top:top + low_h, left:left + low_w]
    return torch.fft.ifft2(torch.fft.ifftshift(central, dim=(-2, -1))).real / (scale * scale)


def area_average(high_res: torch.Tensor, scale: int) -> torch.Tensor:
    """:func:`medsr.transforms.degrade_area`: the mean of each ``scale x scale`` block.
    ``(B, 1, H, W)`` -> ``(B, 1, H/s, W/s)`` float64."""
    _check_batch(high_res, scale)
    return F.avg_pool2d(high_res.double(), scale)


def bicubic_linear(high_res: torch.Tensor, scale: int) -> torch.Tensor:
    """The linear part of :func:`medsr.transforms.degrade_bicubic` (scikit-image's
    anti-aliased cubic spline, see the module docstring) of every item, before scikit-image's
    clip to the item's range: ``bicubic_matrix(H) @ image @ bicubic_matrix(W).T``.
    ``(..., H, W)`` -> ``(..., H/s, W/s)`` float64."""
    images = high_res.double()
    height, width = images.shape[-2:]
    return _separable(images, _matrix_on("bicubic", height, scale, images.device),
                      _matrix_on("bicubic", width, scale, images.device))


def bicubic_downsample(high_res: torch.Tensor, scale: int) -> torch.Tensor:
    """:func:`medsr.transforms.degrade_bicubic` of every item: :func:`bicubic_linear`,
    clipped to each item's own range as scikit-image clips.
    ``(B, 1, H, W)`` -> ``(B, 1, H/s, W/s)`` float64."""
    _check_batch(high_res, scale)
    images = high_res.double()
    low_res = bicubic_linear(images, scale)
    return low_res.clamp(images.amin(dim=(-3, -2, -1), keepdim=True), images.amax(dim=(-3, -2, -1), keepdim=True))


def lanczos_downsample(high_res: torch.Tensor, scale: int) -> torch.Tensor:
    """:func:`medsr.transforms.degrade_lanczos` of every item (Pillow's anti-aliased
    Lanczos-3). ``(B, 1, H, W)`` -> ``(B, 1, H/s, W/s)`` float64."""
    _check_batch(high_res, scale)
    images = high_res.double()
    height, width = images.shape[-2:]
    return _separable(images, _matrix_on("lanczos", height, scale, images.device),
                      _matrix_on("lanczos", width, scale, images.device))


def _gaussian_matrices(sigmas: np.ndarray, size: int, step: int, device: torch.device) -> torch.Tensor:
    """``(B, 1, ceil(size / step), size)``: each item's Gaussian filter matrix (SciPy's
    ``reflect`` borders), every ``step``-th row. The kernels are computed on the host from the
    host's sigmas and spread into matrices on ``device``."""
    sigmas = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if np.any(sigmas <= 0):
        raise ValueError(f"Gaussian sigmas must be positive, not {sigmas.tolist()}")
    reach = int(GAUSSIAN_TRUNCATE * sigmas.max() + 0.5)
    offsets = np.arange(-reach, reach + 1)
    weights = np.zeros((len(sigmas), len(offsets)))
    for item, sigma in enumerate(sigmas):  # each item's own radius, as SciPy cuts it
        own_offsets, own_weights = _gaussian_weights(sigma)
        weights[item, own_offsets + reach] = own_weights
    rows = np.arange(0, size, step)
    columns = cached_on(("gaussian columns", size, step, reach), device,
                         lambda: fold_indices(rows[:, None] + offsets, size, "symmetric"))
    shape = (len(sigmas), len(rows), len(offsets))
    matrices = torch.zeros(len(sigmas), len(rows), size, dtype=torch.float64, device=device)
    matrices.scatter_add_(2, columns.expand(shape), _to_device(weights, device)[:, None, :].expand(shape))
    return matrices[:, None]


def gaussian_blur(high_res: torch.Tensor, sigmas: np.ndarray) -> torch.Tensor:
    """SciPy's ``gaussian_filter(image, sigma, mode="reflect")`` of every item with its own
    sigma (high-res pixels, given on the host: they size the kernels).
    ``(B, 1, H, W)`` -> ``(B, 1, H, W)`` float64."""
    images = high_res.double()
    height, width = images.shape[-2:]
    return _separable(images, _gaussian_matrices(sigmas, height, 1, images.device),
                      _gaussian_matrices(sigmas, width, 1, images.device))


def gaussian_decimate(high_res: torch.Tensor, scale: int, fwhms: np.ndarray) -> torch.Tensor:
    """:func:`medsr.transforms.degrade_gaussian` of every item with its own FWHM (high-res
    pixels, on the host): Gaussian blur, then every ``scale``-th pixel from the first.
    ``(B, 1, H, W)`` -> ``(B, 1, H/s, W/s)`` float64."""
    _check_batch(high_res, scale)
    images = high_res.double()
    height, width = images.shape[-2:]
    sigmas = np.asarray(fwhms, dtype=np.float64) * FWHM_TO_SIGMA
    return _separable(images, _gaussian_matrices(sigmas, height, scale, images.device),
                      _gaussian_matrices(sigmas, width, scale, images.device))


# ---------------------------------------------------------------------------- random batches


class RandomBatchDegradation:
    """:class:`medsr.transforms.RandomDegradePair` for a batch on its device.

    Two halves: :meth:`draw` picks one item's degradation, parameters and noise on the CPU
    (cheap; a DataLoader worker can do it); calling the object degrades the whole batch where
    it lies. One seed gives the same degradation, parameters and noise as
    ``RandomDegradePair`` after ``set_random_state(seed)``, so the two routes train on the same
    distribution item for item.

    Args:
        scale: integer factor.
        probabilities: degradation name -> probability, as for ``RandomDegradePair``.
        blur_sigma_range: (min, max) Gaussian sigma in high-res pixels for ``blur_noise``.
        noise_std_range: (min, max) noise standard deviation in normalised units, for
            ``blur_noise`` and ``rician``.

    Example:
        >>> degrade = RandomBatchDegradation(2, {"bicubic": 0.5, "kspace": 0.5})
        >>> crops = torch.rand(16, 1, 128, 128, device="cuda")  # normalised high-res patches
        >>> draws = [degrade.draw(seed, (128, 128)) for seed in range(16)]
        >>> low_res, codes = degrade(crops, **torch.utils.data.default_collate(draws))
        >>> low_res.shape, codes.shape
        (torch.Size([16, 1, 64, 64]), torch.Size([16]))
    """

    def __init__(self, scale: int, probabilities: dict[str, float],
                 blur_sigma_range: tuple[float, float] = (0.3, 1.0),
                 noise_std_range: tuple[float, float] = (0.0, 0.02)) -> None:
        if int(scale) != scale or scale < 2:
            raise ValueError(f"scale must be an integer >= 2, not {scale}")
        # RandomDegradePair checks the names and probabilities, and holds the draw order
        self.pair = RandomDegradePair(int(scale), probabilities, blur_sigma_range, noise_std_range)
        self.scale = int(scale)
        self.code_table = np.array([DEGRADATION_CODES[GRID_OF_FAMILY[name]] for name in FAMILIES])

    def draw(self, seed: int, high_res_shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """One item's degradation, drawn as ``RandomDegradePair`` draws it with this seed.

        Args:
            seed: the item's seed (``0 <= seed < 2**32``).
            high_res_shape: ``(H, W)`` of the item's high-res patch.

        Returns:
            ``{"family": () int64 index into FAMILIES, "blur_sigma": () float64 (blur_noise),
            "fwhm": () float64 (gaussian), "noise": (2, H/s, W/s) float32}``: unused parameters
            are 1.0 and unused noise is zero; ``noise[0]`` is added to the image (blur_noise)
            or to its real part (rician), ``noise[1]`` is rician's imaginary part.
        """
        state = np.random.RandomState(seed)
        pair = self.pair
        family = int(state.choice(len(FAMILIES), p=pair.weights))
        name = FAMILIES[family]
        low_shape = (high_res_shape[0] // self.scale, high_res_shape[1] // self.scale)
        noise = np.zeros((2, *low_shape), dtype=np.float32)
        blur_sigma = fwhm = 1.0
        if name == "blur_noise":
            blur_sigma = state.uniform(*pair.blur_sigma_range)
            noise[0] = state.normal(0.0, state.uniform(*pair.noise_std_range), low_shape)
        elif name == "gaussian":
            fwhm = self.scale * state.uniform(*pair.GAUSSIAN_FWHM_RANGE)
        elif name == "rician":
            std = state.uniform(*pair.noise_std_range)
            noise[0] = state.normal(0.0, std, low_shape)
            noise[1] = state.normal(0.0, std, low_shape)
        return {"family": torch.tensor(family), "blur_sigma": torch.tensor(blur_sigma, dtype=torch.float64),
                "fwhm": torch.tensor(fwhm, dtype=torch.float64), "noise": torch.from_numpy(noise)}

    def __call__(self, high_res: torch.Tensor, family: torch.Tensor, blur_sigma: torch.Tensor,
                 fwhm: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Degrade each item of ``high_res`` as its draw says, on ``high_res.device``.

        Args:
            high_res: ``(B, 1, H, W)`` patches in the normalised range, on any device.
            family, blur_sigma, fwhm: ``(B,)`` from :meth:`draw`, collated, on the host (they
                choose which operations run, so reading them must not wait for the device).
            noise: ``(B, 2, H/s, W/s)`` from :meth:`draw`, collated, on any device.

        Returns:
            ``(low_res (B, 1, H/s, W/s) float32, codes (B,) int64)`` on ``high_res.device``:
            the degraded patches and the degradation code (grid) the model is told.
        """
        _check_batch(high_res, self.scale)
        device = high_res.device
        families = np.asarray(family.cpu(), dtype=np.int64)
        if len(families) != len(high_res) or families.min() < 0 or families.max() >= len(FAMILIES):
            raise ValueError(f"family must hold {len(high_res)} codes from 0 to {len(FAMILIES) - 1}, "
                             f"not {families.tolist()}")
        blur_sigma, fwhm = np.asarray(blur_sigma.cpu()), np.asarray(fwhm.cpu())
        # items sorted by family: each family is one slice of the batch, and the order and the
        # codes reach the device in one copy
        order = np.argsort(families, kind="stable")
        counts = np.bincount(families, minlength=len(FAMILIES))
        order_and_codes = _to_device(np.concatenate([order, self.code_table[families]]), device)
        order_on_device, codes = order_and_codes[:len(order)], order_and_codes[len(order):]
        images = high_res.index_select(0, order_on_device)
        noisy = counts[FAMILIES.index("blur_noise")] + counts[FAMILIES.index("rician")] > 0
        noise = noise.to(device=device).index_select(0, order_on_device).double() if noisy else None
        parts, start = [], 0
        for code, name in enumerate(FAMILIES):
            if not counts[code]:
                continue
            members = slice(start, start + counts[code])
            part, start = images[members], start + counts[code]
            if name == "bicubic":
                part = bicubic_downsample(part, self.scale)
            elif name == "kspace":
                part = kspace_truncate(part, self.scale)
            elif name == "area":
                part = area_average(part, self.scale)
            elif name == "lanczos":
                part = lanczos_downsample(part, self.scale)
            elif name == "gaussian":
                part = gaussian_decimate(part, self.scale, fwhm[order[members]])
            elif name == "blur_noise":
                blurred = gaussian_blur(part, blur_sigma[order[members]])
                part = bicubic_downsample(blurred, self.scale) + noise[members, :1]
            else:  # rician: the magnitude of the truncated image plus complex noise
                part = torch.hypot(kspace_truncate(part, self.scale) + noise[members, :1], noise[members, 1:])
            parts.append(part.float())
        in_order = torch.cat(parts)
        return torch.empty_like(in_order).index_copy_(0, order_on_device, in_order), codes
