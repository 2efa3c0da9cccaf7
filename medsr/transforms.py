"""Intensity normalisation and resolution degradation, as MONAI transforms.

Degradations follow the evaluation protocol exactly (``bicubic`` and ``kspace``), slice by slice
in the plane given by ``slice_axis``. The stress degradations (``area``, ``gaussian``,
``lanczos``, ``rician``) are other common ways a scan loses resolution; they measure how the
default path copes with what the protocol does not name. Every degradation puts the low-res
pixels on one of two grids (:data:`GRID_OF`): resampling centres each low-res pixel on the
block of high-res pixels it covers (the ``bicubic`` grid); k-space truncation and plain
decimation sample every ``scale``-th high-res pixel (the ``kspace`` grid). The model is told the
grid (see :mod:`medsr.model`), and the low-res affine :func:`degrade_volume` returns is that
grid's (:func:`medsr.geometry.degraded_affine`). Training draws randomised variants of all of them
(:class:`RandomDegradePair`), so the model does not overfit one kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from monai.transforms import RandomizableTransform, Transform
from PIL import Image
from scipy.ndimage import gaussian_filter, zoom
from skimage.transform import downscale_local_mean, rescale

from medsr.errors import MedsrError
from medsr.geometry import degraded_affine

DEGRADATIONS = ("bicubic", "kspace")  # protocol v1, and the two grids the model knows
STRESS_DEGRADATIONS = ("area", "gaussian", "lanczos", "rician")
# which grid each degradation puts the low-res pixels on (the model mode that fits it)
GRID_OF = {"bicubic": "bicubic", "kspace": "kspace", "area": "bicubic", "lanczos": "bicubic",
           "gaussian": "kspace", "rician": "kspace"}
FWHM_TO_SIGMA = 1.0 / 2.3548  # 2 sqrt(2 ln 2), rounded as PROTOCOL.md (v1-z) writes it
RICIAN_NOISE_FRACTION = 0.02  # evaluation noise: 2% of the volume's robust intensity range


def __getattr__(name: str):
    # the model as a transform lives in medsr.monai_transforms (it needs the engine, which
    # imports this module); imported on first use
    if name in ("SuperResolve", "SuperResolved"):
        from medsr import monai_transforms

        return getattr(monai_transforms, name)
    raise AttributeError(f"module 'medsr.transforms' has no attribute {name!r}")


# ---------------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class IntensityWindow:
    """The linear map between original units and the network's range.

    ``normalised = (original - low) / (high - low)``: ``low`` maps to 0 and ``high`` to 1.
    Values outside the window are kept (not clipped), so the inverse is exact.
    """

    low: float
    high: float

    # float32 arithmetic into one new array: the values NumPy's promotion rules gave for
    # float32 input before, with one pass and one allocation fewer (a slice is streamed per call)
    def forward(self, original: np.ndarray) -> np.ndarray:
        normalised = np.subtract(original, np.float32(self.low), dtype=np.float32)
        normalised /= np.float32(self.high - self.low)
        return normalised

    def inverse(self, normalised: np.ndarray) -> np.ndarray:
        original = np.multiply(normalised, np.float32(self.high - self.low), dtype=np.float32)
        original += np.float32(self.low)
        return original


def robust_window(volume: np.ndarray, lower_percentile: float = 0.5,
                  upper_percentile: float = 99.5) -> IntensityWindow:
    """Window from robust percentiles of a volume in original units.

    Raises:
        MedsrError: the volume is constant (or nearly), so there is nothing to enhance.
    """
    if not 0 <= lower_percentile < upper_percentile <= 100:
        raise ValueError(
            f"percentiles must satisfy 0 <= lower < upper <= 100, not {lower_percentile}, {upper_percentile}"
        )
    low, high = np.percentile(volume, [lower_percentile, upper_percentile])
    return _window_or_constant(low, high, float(volume.min()), float(volume.max()))


def _window_or_constant(low: float, high: float, minimum: float, maximum: float) -> IntensityWindow:
    if not high > low:  # a mostly constant image: fall back to its full range
        low, high = minimum, maximum
    if not high > low:
        raise MedsrError(f"the image is constant (every voxel is {low:g}); there is nothing to enhance")
    return IntensityWindow(float(low), float(high))


class IntensityCounts:
    """Exact percentiles of a volume seen one slice at a time, without keeping the slices.

    It counts how often each value occurs: scans store integers (12-16 bits, one rescale), so
    there are at most tens of thousands of distinct values however long the series is. The
    percentiles use NumPy's default linear interpolation between order statistics, so
    :meth:`window` equals :func:`robust_window` on the whole volume (to float rounding).
    Float volumes (resampled or filtered NIfTI) can hold a distinct value per voxel: past
    :data:`MAX_DISTINCT` values, every value is cut to a 12-bit mantissa, which bounds memory
    and moves a percentile by less than 0.025% of its value. Non-finite voxels are counted in
    ``non_finite`` and left out.

    Example:
        >>> counts = IntensityCounts()
        >>> for plane in scan.planes():
        ...     counts.add(plane)
        >>> window = counts.window(0.5, 99.5)
    """

    MERGE_EVERY = 32  # slices between merges of the pending value lists
    MAX_DISTINCT = 2**20  # distinct values kept exactly (16 MB of values and counts)
    MANTISSA_BITS = 12  # precision of the values once there are more

    def __init__(self) -> None:
        self.values = np.empty(0, dtype=np.float64)
        self.counts = np.empty(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.non_finite = 0
        self.coarse = False  # True once values are cut to MANTISSA_BITS

    def _coarsen(self, values: np.ndarray) -> np.ndarray:
        """``values`` with their float64 mantissa cut to :data:`MANTISSA_BITS` (toward zero)."""
        mask = np.uint64(~((1 << (52 - self.MANTISSA_BITS)) - 1) & (2**64 - 1))
        return (values.astype(np.float64).view(np.uint64) & mask).view(np.float64)

    def add(self, plane: np.ndarray) -> None:
        plane = np.asarray(plane).ravel()
        finite = np.isfinite(plane)
        if not finite.all():
            self.non_finite += int(plane.size - np.count_nonzero(finite))
            plane = plane[finite]
        if plane.size == 0:
            return
        low, high = float(plane.min()), float(plane.max())
        if high - low < 2**20 and np.array_equal(plane, np.rint(plane)):
            # whole numbers (HU, most MR): counting beats sorting by an order of magnitude
            tally = np.bincount((plane - low).astype(np.int64))
            present = np.flatnonzero(tally)
            self._pending.append((present + low, tally[present]))
        else:
            plane = self._coarsen(plane) if self.coarse else plane.astype(np.float64)
            self._pending.append(np.unique(plane, return_counts=True))
        if len(self._pending) >= self.MERGE_EVERY:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        values = np.concatenate([self.values, *(v for v, _ in self._pending)])
        counts = np.concatenate([self.counts, *(c for _, c in self._pending)])
        if self.coarse:
            values = self._coarsen(values)
        self.values, inverse = np.unique(values, return_inverse=True)
        self.counts = np.bincount(inverse, weights=counts, minlength=len(self.values)).astype(np.int64)
        self._pending = []
        if len(self.values) > self.MAX_DISTINCT and not self.coarse:
            self.coarse = True
            self._pending = [(self.values, self.counts)]
            self.values, self.counts = np.empty(0, dtype=np.float64), np.empty(0, dtype=np.int64)
            self._merge()

    @property
    def total(self) -> int:
        self._merge()
        return int(self.counts.sum())

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) of every finite value added so far."""
        self._merge()
        if not len(self.values):
            raise MedsrError("the image has no finite voxels; there is nothing to enhance")
        ends = np.cumsum(self.counts)  # values[i] holds ranks ends[i-1] .. ends[i]-1
        position = (ends[-1] - 1) * q / 100.0
        below = int(np.floor(position))
        at = lambda rank: self.values[np.searchsorted(ends, rank, side="right")]  # noqa: E731
        low = at(below)
        high = at(min(below + 1, ends[-1] - 1))
        return float(low + (high - low) * (position - below))

    def window(self, lower_percentile: float = 0.5, upper_percentile: float = 99.5) -> IntensityWindow:
        """The same window :func:`robust_window` gives for the whole volume."""
        if not 0 <= lower_percentile < upper_percentile <= 100:
            raise ValueError(
                f"percentiles must satisfy 0 <= lower < upper <= 100, not {lower_percentile}, {upper_percentile}"
            )
        low, high = self.percentile(lower_percentile), self.percentile(upper_percentile)
        return _window_or_constant(low, high, float(self.values[0]), float(self.values[-1]))


class NormalizeIntensityRobust(Transform):
    """Map a volume in original units to the network's range from its own robust percentiles.

    Returns the normalised float32 array; the :class:`IntensityWindow` used is kept in
    ``self.window`` for :meth:`inverse`.

    Example:
        >>> normalise = NormalizeIntensityRobust()
        >>> ct_hu = np.array([-1000.0, 0.0, 40.0, 1000.0])
        >>> restored = normalise.inverse(normalise(ct_hu))  # back in HU
    """

    def __init__(self, lower_percentile: float = 0.5, upper_percentile: float = 99.5) -> None:
        self.lower_percentile = lower_percentile
        self.upper_percentile = upper_percentile
        self.window: IntensityWindow | None = None

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        self.window = robust_window(np.asarray(volume), self.lower_percentile, self.upper_percentile)
        return self.window.forward(np.asarray(volume, dtype=np.float32))

    def inverse(self, normalised: np.ndarray) -> np.ndarray:
        if self.window is None:
            raise RuntimeError("inverse() needs a previous call that set the window")
        return self.window.inverse(np.asarray(normalised))


# ---------------------------------------------------------------------------- degradation


def crop_to_multiple(image: np.ndarray, scale: int, axes: tuple[int, int] = (-2, -1)) -> np.ndarray:
    """Crop the end of each of ``axes`` so its length is a multiple of ``scale``."""
    slices = [slice(None)] * image.ndim
    for axis in axes:
        slices[axis] = slice(0, image.shape[axis] - image.shape[axis] % scale)
    return image[tuple(slices)]


def degrade_bicubic(high_res: np.ndarray, scale: int) -> np.ndarray:
    """Anti-aliased bicubic downsampling of one 2-D slice, exactly as the protocol states.

    Args:
        high_res: ``(H, W)`` slice, H and W multiples of ``scale``, any units.
        scale: integer factor.

    Returns:
        ``(H / scale, W / scale)`` float32 slice in the same units.
    """
    return rescale(high_res.astype(np.float64), 1.0 / scale, order=3, anti_aliasing=True,
                   preserve_range=True, mode="reflect").astype(np.float32)


def degrade_kspace(high_res: np.ndarray, scale: int) -> np.ndarray:
    """MRI-style k-space truncation of one 2-D slice: keep the central (H/s x W/s) block.

    The centred 2-D FFT is cropped, inverted, and its real part divided by ``s * s`` so that
    the mean intensity is unchanged.
    """
    height, width = high_res.shape
    low_h, low_w = height // scale, width // scale
    spectrum = np.fft.fftshift(np.fft.fft2(high_res.astype(np.float64)))
    top, left = central_block_origin(height, low_h), central_block_origin(width, low_w)
    central = spectrum[top:top + low_h, left:left + low_w]
    low_res = np.fft.ifft2(np.fft.ifftshift(central)).real / (scale * scale)
    return low_res.astype(np.float32)


def central_block_origin(size: int, block: int) -> int:
    """Start of the ``block`` frequencies around DC in a centred (fftshift-ed) spectrum.

    After fftshift, DC sits at ``size // 2``; the block keeps DC at its own ``block // 2``, so
    its frequencies are exactly those of a length-``block`` FFT (this equals the plain centre
    crop ``(size - block) // 2`` whenever both lengths are even).
    """
    return size // 2 - block // 2


def degrade_blur_noise(high_res: np.ndarray, scale: int, blur_sigma: float, noise_std: float,
                       rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (sigma in high-res pixels), bicubic downsampling, then Gaussian noise."""
    blurred = gaussian_filter(high_res.astype(np.float64), blur_sigma, mode="reflect")
    low_res = degrade_bicubic(blurred, scale)
    return (low_res + rng.normal(0.0, noise_std, low_res.shape)).astype(np.float32)


def degrade_area(high_res: np.ndarray, scale: int) -> np.ndarray:
    """Area averaging: each low-res pixel is the mean of its ``scale x scale`` block (binning)."""
    return downscale_local_mean(high_res.astype(np.float64), (scale, scale)).astype(np.float32)


def degrade_gaussian(high_res: np.ndarray, scale: int, fwhm: float | None = None) -> np.ndarray:
    """Gaussian blur of full width at half maximum ``fwhm`` high-res pixels (default
    ``scale``), then decimation: every ``scale``-th pixel from the first (the k-space grid)."""
    sigma = (scale if fwhm is None else fwhm) * FWHM_TO_SIGMA
    blurred = gaussian_filter(high_res.astype(np.float64), sigma, mode="reflect")
    return blurred[::scale, ::scale].astype(np.float32)


def degrade_lanczos(high_res: np.ndarray, scale: int) -> np.ndarray:
    """Anti-aliased Lanczos-3 resampling, as Pillow's ``resize(..., LANCZOS)`` does it (the
    kernel widened by ``scale``, low-res pixels centred on their blocks)."""
    height, width = high_res.shape
    image = Image.fromarray(high_res.astype(np.float32), mode="F")
    return np.asarray(image.resize((width // scale, height // scale), Image.Resampling.LANCZOS),
                      dtype=np.float32)


def degrade_rician(high_res: np.ndarray, scale: int, noise_std: float,
                   rng: np.random.Generator) -> np.ndarray:
    """``kspace`` truncation, then Rician noise: the magnitude of the image plus complex
    Gaussian noise of standard deviation ``noise_std`` (same units), as in a magnitude MR image."""
    low_res = degrade_kspace(high_res, scale).astype(np.float64)
    real = low_res + rng.normal(0.0, noise_std, low_res.shape)
    imaginary = rng.normal(0.0, noise_std, low_res.shape)
    return np.hypot(real, imaginary).astype(np.float32)


DEGRADE_SLICE = {"bicubic": degrade_bicubic, "kspace": degrade_kspace, "area": degrade_area,
                 "gaussian": degrade_gaussian, "lanczos": degrade_lanczos}
ALL_DEGRADATIONS = (*DEGRADATIONS, *STRESS_DEGRADATIONS)


def degrade_volume(volume: np.ndarray, affine: np.ndarray, slice_axis: int, scale: int,
                   degradation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Protocol step 1-3: crop in-plane to a multiple of ``scale`` and degrade every slice.

    Args:
        volume: ``(I, J, K)`` volume in original units.
        affine: its ``(4, 4)`` RAS affine (mm).
        slice_axis: the axis that is not degraded.
        scale: integer factor.
        degradation: ``"bicubic"`` or ``"kspace"`` (protocol v1), or a stress degradation
            (``"area"``, ``"gaussian"``, ``"lanczos"``, ``"rician"``; see the module docstring).

    Returns:
        ``(low_res, high_res, low_res_affine)``: the degraded volume, the cropped reference
        and the affine of the low-res grid, voxel size x ``scale`` in-plane on the
        degradation's grid (:data:`GRID_OF`): the same extent on the ``bicubic`` grid (its
        pixels tile the reference's), the reference's first pixel on the ``kspace`` grid (low-res
        pixel ``n`` is high-res pixel ``scale * n``). Enhancing on that grid
        (:func:`medsr.geometry.enhanced_affine`) gives the reference's affine back.
    """
    if degradation not in ALL_DEGRADATIONS:
        raise MedsrError(f"degradation must be one of {', '.join(ALL_DEGRADATIONS)}, not {degradation!r}")
    in_plane = tuple(a for a in range(3) if a != slice_axis)
    high_res = crop_to_multiple(volume, scale, axes=in_plane)
    slices = np.moveaxis(high_res, slice_axis, 0)
    if min(slices.shape[1:]) < 2 * scale:
        raise MedsrError(f"slices of {slices.shape[1:]} voxels are too small to degrade by {scale}")
    if degradation == "rician":  # a fixed noise level and seed, so scores are reproducible
        window = robust_window(high_res)
        noise_std = RICIAN_NOISE_FRACTION * (window.high - window.low)
        low_res = np.stack([degrade_rician(s, scale, noise_std, np.random.default_rng(index))
                            for index, s in enumerate(slices)], axis=0)
    else:
        degrade = DEGRADE_SLICE[degradation]
        low_res = np.stack([degrade(s, scale) for s in slices], axis=0)
    low_res = np.moveaxis(low_res, 0, slice_axis)
    return low_res, high_res, degraded_affine(affine, slice_axis, scale, GRID_OF[degradation])


class DegradeResolution(Transform):
    """Make a (low_res, high_res) pair from a high-res volume, with the low-res affine.

    Args:
        scale: integer in-plane factor (2 or 4).
        degradation: ``"bicubic"`` or ``"kspace"`` as in the evaluation protocol.
        slice_axis: axis of the slices; the other two are degraded.

    Example:
        >>> degrade = DegradeResolution(scale=2, degradation="kspace", slice_axis=2)
        >>> low_res, high_res, low_res_affine = degrade(t1_volume, t1_affine)
    """

    def __init__(self, scale: int = 2, degradation: str = "bicubic", slice_axis: int = 2) -> None:
        if scale < 2 or int(scale) != scale:
            raise ValueError(f"scale must be an integer >= 2, not {scale}")
        if degradation not in DEGRADATIONS:
            raise ValueError(f"degradation must be one of {DEGRADATIONS}, not {degradation!r}")
        self.scale, self.degradation, self.slice_axis = int(scale), degradation, slice_axis

    def __call__(self, volume: np.ndarray, affine: np.ndarray):
        return degrade_volume(volume, affine, self.slice_axis, self.scale, self.degradation)


class RandomDegradePair(RandomizableTransform):
    """Training pairs: degrade a 2-D high-res patch by a randomly chosen degradation.

    Picks one of :attr:`NAMES` with the given probabilities. ``bicubic`` and ``kspace`` are the
    protocol's; the others are randomised so no single kernel is learnt by heart:
    ``blur_noise`` (Gaussian blur, bicubic, Gaussian noise), ``area`` (binning), ``lanczos``,
    ``gaussian`` (blur of FWHM 0.7-1.3 x scale, then decimation) and ``rician`` (k-space
    truncation plus Rician noise). Input and output are in the network's normalised range;
    the high-res patch is returned unchanged.

    Args:
        scale: integer factor.
        probabilities: mapping of degradation name -> probability (summing to 1).
        blur_sigma_range: (min, max) Gaussian sigma in high-res pixels for ``blur_noise``.
        noise_std_range: (min, max) noise standard deviation in normalised units, for
            ``blur_noise`` and ``rician``.
    """

    NAMES = ("bicubic", "kspace", "blur_noise", "area", "lanczos", "gaussian", "rician")
    GAUSSIAN_FWHM_RANGE = (0.7, 1.3)  # x scale

    def __init__(self, scale: int, probabilities: dict[str, float],
                 blur_sigma_range: tuple[float, float] = (0.3, 1.0),
                 noise_std_range: tuple[float, float] = (0.0, 0.02)) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        unknown = set(probabilities) - set(self.NAMES)
        if unknown:
            raise ValueError(f"unknown degradations {sorted(unknown)}; choose from {self.NAMES}")
        weights = np.array([probabilities.get(n, 0.0) for n in self.NAMES], dtype=np.float64)
        if np.any(weights < 0) or not np.isclose(weights.sum(), 1.0):
            raise ValueError(f"degradation probabilities must be >= 0 and sum to 1, not {probabilities}")
        self.scale, self.weights = scale, weights
        self.blur_sigma_range, self.noise_std_range = blur_sigma_range, noise_std_range

    def __call__(self, high_res: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
        """Returns ``(low_res, high_res, grid)``; ``grid`` is the model mode the pair trains
        (:data:`GRID_OF`; ``blur_noise`` is a resampling, so it is on the ``bicubic`` grid)."""
        name = self.NAMES[self.R.choice(len(self.NAMES), p=self.weights)]
        if name == "blur_noise":
            sigma = self.R.uniform(*self.blur_sigma_range)
            noise = self.R.uniform(*self.noise_std_range)
            return degrade_blur_noise(high_res, self.scale, sigma, noise, self.R), high_res, "bicubic"
        if name == "gaussian":
            fwhm = self.scale * self.R.uniform(*self.GAUSSIAN_FWHM_RANGE)
            return degrade_gaussian(high_res, self.scale, fwhm), high_res, "kspace"
        if name == "rician":
            noise = self.R.uniform(*self.noise_std_range)
            return degrade_rician(high_res, self.scale, noise, self.R), high_res, "kspace"
        return DEGRADE_SLICE[name](high_res, self.scale), high_res, GRID_OF[name]


# ---------------------------------------------------------------------------- through-plane

SLICE_PROFILES = ("gaussian", "box")  # protocol v1-z


def slice_profile_weights(n_thin: int, factor: int, profile: str, width: float | None = None) -> np.ndarray:
    """How each thick slice mixes the thin slices it is made of, protocol v1-z step 2.

    Thick slice ``k`` is centred on thin position ``c_k = factor * k + (factor - 1) / 2``.
    ``gaussian``: weights proportional to ``exp(-(j - c_k)^2 / (2 sigma^2))`` with FWHM =
    ``width`` thin slices (default ``factor``), ``j`` within 4 sigma, indices clamped at the
    ends. ``box``: the thin slices inside ``[c_k - width/2, c_k + width/2]`` (default width
    ``factor``: exactly slices ``factor*k .. factor*k + factor - 1``), partly covered slices
    weighted by their covered fraction; a width below ``factor`` leaves gaps between slices.

    Args:
        n_thin: thin slices, a multiple of ``factor``.
        factor: thin slices per thick slice.
        profile: ``"gaussian"`` or ``"box"``.
        width: FWHM (gaussian) or width (box) in thin slices.

    Returns:
        ``(n_thin // factor, n_thin)`` float64 matrix whose rows sum to 1.
    """
    if profile not in SLICE_PROFILES:
        raise MedsrError(f"slice profile must be one of {', '.join(SLICE_PROFILES)}, not {profile!r}")
    width = float(factor if width is None else width)
    n_thick = n_thin // factor
    weights = np.zeros((n_thick, n_thin))
    for k in range(n_thick):
        centre = factor * k + (factor - 1) / 2.0
        if profile == "gaussian":
            sigma = width * FWHM_TO_SIGMA
            reach = np.arange(int(np.ceil(centre - 4 * sigma)), int(np.floor(centre + 4 * sigma)) + 1)
            np.add.at(weights[k], np.clip(reach, 0, n_thin - 1),
                      np.exp(-((reach - centre) ** 2) / (2 * sigma**2)))
        else:
            thin = np.arange(n_thin)
            weights[k] = np.clip(np.minimum(thin + 0.5, centre + width / 2)
                                 - np.maximum(thin - 0.5, centre - width / 2), 0.0, None)
        weights[k] /= weights[k].sum()
    return weights


def thick_slices(volume: np.ndarray, axis: int, factor: int, profile: str,
                 width: float | None = None) -> np.ndarray:
    """Simulate a thick-slice acquisition along ``axis`` (protocol v1-z): the axis is cropped to
    a multiple of ``factor`` and every ``factor`` thin slices become one (float32, same units)."""
    volume = np.asarray(volume)
    n_thin = volume.shape[axis] - volume.shape[axis] % factor
    if n_thin < factor:
        raise MedsrError(f"{volume.shape[axis]} slices are too few to thicken by {factor}")
    thin = np.take(volume, np.arange(n_thin), axis=axis).astype(np.float64)
    weights = slice_profile_weights(n_thin, factor, profile, width)
    thick = np.tensordot(weights, np.moveaxis(thin, axis, 0), axes=1)
    return np.moveaxis(thick, 0, axis).astype(np.float32)


def bspline_upsample(low_res: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """Cubic B-spline interpolation along ``axis`` onto the grid that tiles the thick slices
    (protocol v1-z's baseline: ``zoom(order=3, grid_mode=True, mode="nearest")``)."""
    factors = [1] * low_res.ndim
    factors[axis] = factor
    return zoom(np.asarray(low_res, dtype=np.float64), factors, order=3, grid_mode=True,
                mode="nearest").astype(np.float32)


class RandomThickSlices(RandomizableTransform):
    """Through-plane training pairs from a 2-D high-res patch: thicken it along its last axis
    with a random factor and slice profile, then B-spline it back to the patch's grid.

    This is the self-similarity idea of SMORE/ECLARE without per-scan training: in-plane detail
    of real scans stands in for the detail thick slices lose. Profiles: ``gaussian`` (FWHM
    0.8-1.2 x factor), ``box`` (the protocol's) and ``gap`` (a box 0.5-0.9 x factor wide:
    slices thinner than their spacing).

    Args:
        factors: the factors to draw from (thin slices per thick slice).

    Returns (from a call on a ``(H, W)`` patch whose W is a multiple of every factor):
        ``(upsampled, high_res, factor)``: the B-spline estimate and the patch, both ``(H, W)``.
    """

    PROFILE_PROBABILITIES = {"gaussian": 0.4, "box": 0.4, "gap": 0.2}

    def __init__(self, factors: tuple[int, ...]) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        if not factors or min(factors) < 2:
            raise ValueError(f"factors must be integers >= 2, not {factors}")
        self.factors = tuple(int(f) for f in factors)

    def __call__(self, high_res: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        factor = int(self.R.choice(self.factors))
        names = list(self.PROFILE_PROBABILITIES)
        name = names[self.R.choice(len(names), p=list(self.PROFILE_PROBABILITIES.values()))]
        if name == "gaussian":
            low_res = thick_slices(high_res, 1, factor, "gaussian", factor * self.R.uniform(0.8, 1.2))
        elif name == "gap":
            low_res = thick_slices(high_res, 1, factor, "box", factor * self.R.uniform(0.5, 0.9))
        else:
            low_res = thick_slices(high_res, 1, factor, "box")
        return bspline_upsample(low_res, 1, factor), high_res, factor
