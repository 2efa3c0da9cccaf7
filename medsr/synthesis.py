"""A second look at the grid when the degradation classifier is unsure: analysis by synthesis.

The classifier (:mod:`medsr.degradation`) reads the spectrum of the low-res slices. On scans
unlike its training sources it is often unsure, and a wrong grid costs 3-10 dB. Here the model
itself is asked: told each grid ``g``, its output ``x_g`` is degraded back with ``g``'s own
operator ``D_g`` (:func:`medsr.consistency.degrade`), and ``||D_g(x_g) - y||`` says how well
that grid explains the input ``y``. The raw residuals do not name the grid (the ``bicubic``
operator leaves the smaller one whatever the truth), so the input's log ratio
``log(r_bicubic / r_kspace)`` is compared with the same ratio on the input degraded once more
each way (``D_kspace(y)``, ``D_bicubic(y)``), where the last step is known: the scan's content
and history cancel in the two differences (:func:`probe_features`).

Those two numbers put k-space truncation and Rician noise on one side of the resampling
kernels (median first difference +0.50 and +0.55 against -0.06 to -0.33), but Gaussian blur,
also on the k-space grid, far on the other (-1.59). Alone, even through a quadratic rule, they
decide worse than the classifier. So they are combined with the classifier's probability: a
logistic rule on the classifier's logit, the two differences, their squares and their product
(:class:`SynthesisRule`; the quadratic terms let one rule put Gaussian blur and truncation on
the same grid), fitted on the leave-one-source-out decisions of the training and validation
sources, and asked only where the classifier is unsure (under 0.8). Leave one source out, x2,
views below the best classical answer: protocol 15 -> 10 of 96, stress 22 -> 22 of 192; test
split 1 -> 0 of 26 and 8 -> 3 of 52 (model card, "A second look by synthesis").

Every model call of the probe normalises with the scan's intensity window (the output's), so
the input and its smaller, smoother self-references are normalised alike and a slice's answer
does not depend on the slices given with it; and it runs in float32 on any device, since bf16
rounding (which differs between a CPU and a GPU's autocast) is a sizeable part of the small
residuals compared. It costs the model on four slices told each grid, and on the same four
degraded once more each way (a quarter of the pixels at x2) told each grid: on a 2-core CPU,
about 5% of the model time of a 384-slice series (not measured on a GPU), and only for unsure
scans.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from medsr.consistency import GRIDS, degrade
from medsr.errors import CheckpointError

if TYPE_CHECKING:
    from medsr.transforms import IntensityWindow

PROBE_SLICES = 4  # slices enhanced on each grid (the rule was fitted on 4 per view)
MIN_SIDE = 16  # low-res slices smaller than this (after halving) are not probed
N_WEIGHTS = 7  # logit, two differences, their squares, their product, bias
# the residuals compared are small: in bfloat16, or under a GPU's autocast, their rounding moves
# with the device, so the second look runs in float32 wherever it runs
PROBE_PRECISION = "fp32"


def _log_ratio(residual: dict[str, float]) -> float:
    """``log(r_bicubic / r_kspace)``: above 0 when the k-space grid reproduces its input better."""
    return math.log(residual["bicubic"] + 1e-12) - math.log(residual["kspace"] + 1e-12)


def as_stored(image: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``image`` as a file of ``like``'s kind holds it: rounded when ``like`` is integer-valued,
    clipped at zero when ``like`` has no negative value (how the once-more-degraded references
    are made, so their storage matches the input's)."""
    if np.all(like == np.round(like)):
        image = np.round(image)
    if like.min() >= 0:
        image = np.maximum(image, 0)
    return image


def grid_residuals(enhance, low_res: np.ndarray, scale: int) -> np.ndarray:
    """``(N, 2)``: per slice, ``||D_g(x_g) - y||^2`` for each grid of :data:`GRIDS`.

    Args:
        enhance: ``(slices, grid) -> (N, H*s, W*s)`` the model's answer on ``grid`` (no projection).
        low_res: ``(N, H, W)`` low-res slices ``y`` in original units.
        scale: integer factor.
    """
    out = []
    for grid in GRIDS:
        again = degrade(torch.from_numpy(np.asarray(enhance(low_res, grid), dtype=np.float64)), grid, scale)
        out.append(((again.numpy() - low_res) ** 2).sum(axis=(-2, -1)))
    return np.stack(out, axis=1)


def residual_table(enhance, low_res: np.ndarray, scale: int) -> np.ndarray:
    """``(N, 3, 2)``: per slice, :func:`grid_residuals` of the input, of the input degraded once
    more on the ``bicubic`` grid, and once more on the ``kspace`` grid (stored like the input,
    :func:`as_stored`); the last axis follows :data:`GRIDS`.

    Args:
        enhance: ``(slices, grid) -> (N, H*s, W*s)`` the model's answer on ``grid``.
        low_res: ``(N, H, W)`` low-res slices in original units (a few informative ones).
        scale: integer factor.
    """
    low_res = np.asarray(low_res, dtype=np.float64)
    height, width = (side - side % scale for side in low_res.shape[-2:])
    cropped = torch.from_numpy(np.ascontiguousarray(low_res[:, :height, :width]))
    coarser = {last: as_stored(degrade(cropped, last, scale).numpy(), low_res) for last in GRIDS}
    return np.stack([grid_residuals(enhance, low_res, scale), grid_residuals(enhance, coarser["bicubic"], scale),
                     grid_residuals(enhance, coarser["kspace"], scale)], axis=1)


def differences_of(table: np.ndarray) -> np.ndarray:
    """The two differences of a :func:`residual_table`, its slices' residuals summed first (a
    median of each slice's own differences, or more slices, decided worse: model card)."""
    residuals = np.asarray(table, dtype=np.float64).sum(axis=0)
    ratios = [_log_ratio(dict(zip(GRIDS, row, strict=True))) for row in residuals]
    return np.array([ratios[0] - ratios[1], ratios[0] - ratios[2]])


def probe_features(enhance, low_res: np.ndarray, scale: int) -> np.ndarray:
    """The input's log ratio less each self-reference's: ``[a - a_bicubic, a - a_kspace]``,
    the residuals of the slices summed (:func:`residual_table`, :func:`differences_of`).

    Args:
        enhance: ``(slices, grid) -> (N, H*s, W*s)`` the model's answer on ``grid``.
        low_res: ``(N, H, W)`` low-res slices in original units (a few informative ones).
        scale: integer factor.
    """
    return differences_of(residual_table(enhance, low_res, scale))


@dataclass(frozen=True)
class ModelAnswer:
    """``model`` told a grid on a few ``(N, H, W)`` slices in original units, through the engine
    the output is made with (no projection, no ensemble): the ``enhance`` callable
    :func:`probe_features` takes. ``model`` is kept so a rule runs only with its own.

    ``window`` is the scan's intensity window: the input slices and their self-references are
    then normalised alike, and as the output will be (without it, each call takes the
    percentiles of the slices it is given)."""

    model: torch.nn.Module
    device: torch.device | str = "cpu"
    precision: str = PROBE_PRECISION
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    window: IntensityWindow | None = None

    def __call__(self, low_res: np.ndarray, grid: str) -> np.ndarray:
        from medsr.engine import enhance_volume  # not needed to read a classifier file

        return enhance_volume(low_res, np.eye(4), 0, self.model, grid, device=self.device, precision=self.precision,
                              lower_percentile=self.lower_percentile, upper_percentile=self.upper_percentile,
                              consistency="off", window=self.window).array


def probe_slices(planes: list[np.ndarray]) -> np.ndarray | None:
    """``(N, H, W)``: up to :data:`PROBE_SLICES` evenly spaced slices among ``planes`` that are
    not constant (a blank slice says nothing, and the model's intensity window needs a range),
    or None when none is left."""
    varied = [plane for plane in planes if np.ptp(plane) > 0]
    if not varied:
        return None
    picks = np.unique(np.linspace(0, len(varied) - 1, min(PROBE_SLICES, len(varied))).round().astype(int))
    return np.stack([varied[i] for i in picks])


def can_probe(low_res_shape: tuple[int, ...], scale: int) -> bool:
    """Whether slices of this shape are large enough to be degraded once more and enhanced."""
    return min(low_res_shape[-2:]) // scale >= MIN_SIDE


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights (names, shapes, float32 values), wherever they live."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}{tuple(values.shape)}".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def logistic_probability(weights: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """``(N,)`` the probabilities of a logistic rule: ``weights`` for the ``(N, K)`` ``terms``,
    then the bias."""
    z = np.asarray(terms, dtype=np.float64) @ weights[:-1] + weights[-1]
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))


def logistic_weights(terms: np.ndarray, truth: np.ndarray, l2: float = 1.0, steps: int = 50) -> np.ndarray:
    """``(K + 1,)`` L2-regularised logistic regression of ``truth`` (0 or 1) on ``(N, K)``
    ``terms``, by Newton's method; the last weight is the bias, which is not penalised."""
    terms = np.asarray(terms, dtype=np.float64)
    design = np.hstack([terms, np.ones((len(terms), 1))])
    penalty = np.diag([l2] * terms.shape[1] + [0.0])
    weights = np.zeros(design.shape[1])
    for _ in range(steps):
        p = logistic_probability(weights, terms)
        gradient = design.T @ (p - np.asarray(truth, dtype=np.float64)) + penalty @ weights
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(len(weights))
        weights = weights - np.linalg.solve(hessian, gradient)
    return weights


@dataclass(frozen=True)
class SynthesisRule:
    """The logistic rule that turns the classifier's ``kspace`` probability and the probe's
    two differences into the probability of the ``kspace`` grid.

    Attributes:
        weights: :data:`N_WEIGHTS` numbers: for the classifier's logit, the two differences
            ``d1``, ``d2``, ``d1^2``, ``d2^2``, ``d1 d2``, and the bias.
        model: :func:`model_fingerprint` of the model the probe ran when the rule was fitted.
            The residuals are that model's, so the rule is used with no other (other weights,
            even fine-tuned from it, were never validated with it).
    """

    weights: tuple[float, ...]
    model: str

    def __post_init__(self) -> None:
        if len(self.weights) != N_WEIGHTS or not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"a synthesis rule needs {N_WEIGHTS} finite weights, not {self.weights!r}")
        if not _is_digest(self.model):
            raise ValueError(f"a synthesis rule's model must be a SHA-256 hex digest, not {self.model!r}")

    def applies_to(self, model: torch.nn.Module) -> bool:
        """Whether ``model`` is the one the rule was fitted with."""
        return model_fingerprint(model) == self.model

    @staticmethod
    def terms(probability_kspace: np.ndarray, differences: np.ndarray) -> np.ndarray:
        """``(N, 6)`` the rule's inputs (before the bias) for ``(N,)`` probabilities and ``(N, 2)``
        differences."""
        p = np.clip(np.asarray(probability_kspace, dtype=np.float64), 1e-4, 1 - 1e-4)
        d = np.atleast_2d(np.asarray(differences, dtype=np.float64))
        return np.column_stack([np.log(p / (1 - p)), d, d ** 2, d.prod(axis=1)])

    def probability(self, probability_kspace: float, differences: np.ndarray) -> float:
        """The combined probability of the ``kspace`` grid for one scan."""
        terms = self.terms(np.array([probability_kspace]), differences)
        return float(logistic_probability(np.asarray(self.weights), terms)[0])

    @classmethod
    def fit(cls, probability_kspace: np.ndarray, differences: np.ndarray, kspace_truth: np.ndarray,
            model: str, l2: float = 1.0, steps: int = 50) -> SynthesisRule:
        """L2-regularised logistic regression (Newton's method; the bias is not penalised).

        Args:
            probability_kspace: ``(N,)`` the classifier's calibrated ``kspace`` probability per
                view, each from a classifier that never saw the view's source.
            differences: ``(N, 2)`` :func:`probe_features` per view.
            kspace_truth: ``(N,)`` 1 where the view's true grid is ``kspace``.
            model: :func:`model_fingerprint` of the model that gave ``differences``.
        """
        weights = logistic_weights(cls.terms(probability_kspace, differences), kspace_truth, l2, steps)
        return cls(tuple(float(w) for w in weights), model)

    def to_payload(self) -> dict:
        return {"weights": list(self.weights), "model": self.model}

    @classmethod
    def from_payload(cls, path, payload) -> SynthesisRule:
        """The rule a classifier file holds, checked (a hostile file gets a clear error)."""
        weights = payload.get("weights") if isinstance(payload, dict) else None
        try:
            numbers = [float(w) for w in weights if isinstance(w, (int, float))] if isinstance(weights, list) else []
        except OverflowError:  # an integer too large for a float
            numbers = []
        if len(numbers) != N_WEIGHTS or len(weights) != N_WEIGHTS or not all(map(math.isfinite, numbers)):
            raise CheckpointError(f"{path}: the synthesis rule must hold {N_WEIGHTS} finite weights")
        if not _is_digest(payload.get("model")):
            raise CheckpointError(f"{path}: the synthesis rule must name its model by a SHA-256 hex digest")
        return cls(tuple(numbers), payload["model"])


def _is_digest(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
