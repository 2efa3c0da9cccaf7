"""Find out from the pixels how a scan lost its resolution, so the default path needs no flag.

The model must be told which grid the low-res pixels sit on (:mod:`medsr.model`): a wrong guess
costs 5-6 dB, far worse than plain interpolation. A scan's modality does not tell: an MR image
may have been resampled (MNI space, a resliced research volume, an archive copy), and the
hidden history of a file is what matters.

What the pixels do tell is the kernel that made them. K-space truncation is a brick-wall
low-pass: no aliasing, full energy up to the edge of the spectrum, Gibbs ringing beside edges.
Anti-aliased resampling rolls the spectrum off and folds what is left above the new Nyquist
frequency back below it; Gaussian blur rolls off further, Lanczos rolls off late and rings a
little. Each slice is summarised by 65 numbers (:func:`spectrum_features`): its 2-D power
spectrum in bins of (|fy|, |fx|) (symmetrised, log, relative to the lowest band) and the
spectrum along the axes over the upper half of the band. (Classifiers saved by medsr 0.2.0 also
read how far the darkest and brightest voxels reach beyond the 1st and 99th percentiles,
:func:`slice_features`; a file that clips at zero or rounds loses most of that ringing, and on
sources the classifier never saw it cost more than it gave.) A small classifier (two hidden
layers of 32) names the degradation among six (the protocol's ``bicubic`` and ``kspace``, and
``area``, ``lanczos``, ``gaussian``, ``rician``); the probabilities of the degradations on each
grid are added, and the slice probabilities are averaged over up to :data:`MAX_SLICES`
informative slices. It is fitted on slices given a random history first
(:func:`medsr.data.source_history`: resampled, blurred or noisier), so that the roll-off of a
scan resampled before, which is no part of how it lost its resolution, is not taken for the
kernel's.

Alternatives measured on the validation volumes (x2, per-slice accuracy of the grid, then
volumes right): a linear classifier on the same features 0.91, all volumes right but with
margins down to 0.63; a CNN on 32x32 low-res patches stayed at chance (0.50) after 2,000 steps;
the 1-D radial spectrum cannot tell ``bicubic`` from ``kspace`` at all (their mean profiles
differ by less than their spread). The classifier here: 0.93, every volume right (model card).

When the classifier is unsure (under :data:`SURE`) and its file holds a synthesis rule fitted
with the model that will run, the model itself takes a second look on four slices
(:mod:`medsr.synthesis`, :func:`second_look`). When the two grids are still close to equally
likely, it takes the grid whose mistake costs less (:data:`WRONG_GRID_COST_DB`, measured) and
says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medsr.errors import CheckpointError, MedsrError
from medsr.metrics import FOREGROUND_FRACTION, FOREGROUND_LEVEL
from medsr.synthesis import ModelAnswer, SynthesisRule, can_probe, probe_features, probe_slices
from medsr.transforms import GRID_OF

logger = logging.getLogger(__name__)

CLASSES = ("bicubic", "kspace", "area", "lanczos", "gaussian", "rician")
GRID_DESCRIPTIONS = {"bicubic": "resampled image", "kspace": "k-space truncation"}
# Frequency bins (fractions of the Nyquist frequency), finer towards the edge of the band.
SPECTRUM_EDGES = np.array([0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.8125, 0.875, 0.9375, 1.0001])
AXIS_EDGES = np.linspace(0.5, 1.0001, 11)
N_SPECTRUM = 55 + 10
N_FEATURES = N_SPECTRUM + 3
MAX_SLICES = 64  # slices summarised per scan, evenly spaced (enough: volumes agree by then)
SURE = 0.8  # below this grid probability the estimate says it could not tell
# What choosing the wrong grid costs (mean PSNR over the validation volumes, shipped x2 model
# told the wrong grid vs the right one): bicubic-degraded scans enhanced as kspace, and
# kspace-degraded scans enhanced as bicubic. Re-measured with every shipped x2 model (this one:
# 5.73 and 6.57 dB; x4 uses the same rule).
WRONG_GRID_COST_DB = {"kspace": 5.7, "bicubic": 6.6}
FORMAT = "medsr-degradation-classifier"
DEFAULT_CLASSIFIERS = {2: "degradation_x2.pt", 4: "degradation_x4.pt"}


def slice_features(low_res: np.ndarray) -> np.ndarray:
    """The 68 numbers that describe how one low-res slice was made: :func:`spectrum_features`
    and :func:`tail_features` (what classifiers saved by medsr 0.2.0 read).

    Args:
        low_res: ``(H, W)`` slice in any units (every feature is unchanged by an increasing
            linear map of the intensities; a decreasing one swaps the two tails, so
            MONOCHROME1 slices are negated first, see :func:`first_look`).

    Returns:
        float64 ``(68,)``.
    """
    return np.concatenate([spectrum_features(low_res), tail_features(low_res)])


def tail_features(low_res: np.ndarray) -> np.ndarray:
    """Three measures of how far the tails of the slice's intensity histogram reach past its
    1st and 99th percentiles (ringing overshoots)."""
    plane = np.asarray(low_res, dtype=np.float64)
    low, high = np.percentile(plane, [1, 99])
    spread = max(high - low, 1e-12)
    darkest, brightest = np.percentile(plane, [0.1, 99.9])
    return np.array([(low - darkest) / spread, (brightest - high) / spread,
                     100.0 * float(np.mean(plane < low - 0.02 * spread))])


def spectrum_features(low_res: np.ndarray) -> np.ndarray:
    """The spectrum alone, what the x2 classifier reads: 55 symmetrised 2-D log-spectrum bins
    and 10 bins of the spectrum along the axes over the upper half of the band, both relative
    to the lowest 3x3 bins (float64 ``(65,)``).

    The tails (:func:`tail_features`) are lost when a file clips at zero or rounds, and measured
    on sources the classifier never saw they cost more than they gave (model card, "Leave one
    source out")."""
    plane = np.asarray(low_res, dtype=np.float64)
    power = np.abs(np.fft.fft2(plane - plane.mean())) ** 2
    fy = 2 * np.abs(np.fft.fftfreq(plane.shape[0]))  # fractions of Nyquist
    fx = 2 * np.abs(np.fft.fftfreq(plane.shape[1]))
    n = len(SPECTRUM_EDGES) - 1
    by = np.searchsorted(SPECTRUM_EDGES, fy, side="right") - 1
    bx = np.searchsorted(SPECTRUM_EDGES, fx, side="right") - 1
    bins = (by[:, None] * n + bx[None, :]).ravel()
    counts = np.maximum(np.bincount(bins, minlength=n * n), 1)
    mean_power = (np.bincount(bins, power.ravel(), n * n) / counts).reshape(n, n)
    mean_power = (mean_power + mean_power.T) / 2  # the two axes are alike for every degradation
    reference = np.log10(mean_power[:3, :3].mean() + 1e-30)
    spectrum = np.log10(mean_power + 1e-30) - reference
    axis_profiles = [_axis_profile(power, fx, fy < 0.25), _axis_profile(power.T, fy, fx < 0.25)]
    along_axes = np.log10((axis_profiles[0] + axis_profiles[1]) / 2 + 1e-30) - reference
    return np.concatenate([spectrum[np.triu_indices(n)], along_axes])


def _axis_profile(power: np.ndarray, along: np.ndarray, near_axis: np.ndarray) -> np.ndarray:
    """Mean power of the rows ``near_axis`` in bins of ``along`` over the upper half band."""
    rows = power[near_axis]
    bins = np.searchsorted(AXIS_EDGES, along, side="right") - 1
    inside = (bins >= 0) & (bins < len(AXIS_EDGES) - 1)
    n = len(AXIS_EDGES) - 1
    totals = np.bincount(bins[inside], rows[:, inside].sum(axis=0), n)
    return totals / np.maximum(np.bincount(bins[inside], minlength=n) * len(rows), 1)


# what a classifier reads from each slice, by the name it is saved with ("spectrum and tails"
# for classifiers saved before there was a choice)
FEATURE_SETS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"spectrum": spectrum_features,
                                                                "spectrum and tails": slice_features}
FEATURE_COUNTS = {"spectrum": N_SPECTRUM, "spectrum and tails": N_FEATURES}
DEFAULT_FEATURE_SET = "spectrum"


class DegradationClassifier(nn.Module):
    """Names the degradation of a slice from its features (six classes, logits;
    :meth:`probabilities` divides them by the calibrated ``temperature`` buffer first).

    Args:
        feature_mean, feature_std: standardisation learnt with the weights.
        hidden: units in each of the two hidden layers.
        feature_set: which :data:`FEATURE_SETS` entry it reads.
    """

    def __init__(self, feature_mean: torch.Tensor | None = None, feature_std: torch.Tensor | None = None,
                 hidden: int = 32, feature_set: str = DEFAULT_FEATURE_SET) -> None:
        super().__init__()
        if feature_set not in FEATURE_SETS:
            raise ValueError(f"feature_set must be one of {', '.join(FEATURE_SETS)}, not {feature_set!r}")
        self.feature_set = feature_set
        n_features = FEATURE_COUNTS[feature_set]
        self.register_buffer("feature_mean", torch.zeros(n_features) if feature_mean is None else feature_mean)
        self.register_buffer("feature_std", torch.ones(n_features) if feature_std is None else feature_std)
        # logits are divided by this before the softmax: fitted so that the stated confidence
        # matches how often the grid is right on sources the classifier never saw (model card)
        self.register_buffer("temperature", torch.ones(()))
        self.layers = nn.Sequential(nn.Linear(n_features, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                    nn.GELU(), nn.Linear(hidden, len(CLASSES)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers((features - self.feature_mean) / self.feature_std)

    def features(self, plane: np.ndarray) -> np.ndarray:
        """What this classifier reads from one low-res slice."""
        return FEATURE_SETS[self.feature_set](plane)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """``(N, 6)`` class probabilities of ``(N, n_features)`` features."""
        with torch.no_grad():
            logits = self(torch.as_tensor(np.asarray(features), dtype=torch.float32))
        return torch.softmax(logits / self.temperature, dim=1).double().numpy()


class ClassifierEnsemble(nn.Module):
    """Several :class:`DegradationClassifier` fitted with other seeds, each with its own
    calibrated temperature: :meth:`probabilities` is the mean of theirs.

    Why: fitted on the same slices with another seed, one classifier decides a few views of an
    unseen source differently each time (leave one source out: 80-84 of 96 protocol views right
    over three seeds); the mean of three takes most of that chance out (model card, "Seeds").
    """

    def __init__(self, members: list[DegradationClassifier]) -> None:
        super().__init__()
        if not members or len({m.feature_set for m in members}) != 1:
            raise ValueError("an ensemble needs one or more members that read the same features")
        self.members = nn.ModuleList(members)
        self.feature_set = members[0].feature_set

    def features(self, plane: np.ndarray) -> np.ndarray:
        """What every member reads from one low-res slice."""
        return FEATURE_SETS[self.feature_set](plane)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """``(N, 6)`` the mean of the members' class probabilities."""
        return np.mean([member.probabilities(features) for member in self.members], axis=0)


@dataclass(frozen=True)
class DegradationEstimate:
    """What :func:`estimate_degradation` found for one scan.

    Attributes:
        grid: the grid the model is told, ``"bicubic"`` or ``"kspace"``.
        confidence: the probability of ``grid`` (from about 0.46 for ``kspace``, 0.54 for
            ``bicubic``, to 1; below :data:`SURE` it could not tell and ``grid`` is the smaller
            expected loss, :func:`choose_grid`).
        likely: the most probable of the six degradations.
        slices: how many slices were looked at.
        probed: how many slices the second look enhanced on each grid (:mod:`medsr.synthesis`;
            0 when the classifier was sure, or no rule ships for the scale).
        classifier_alone: after a second look, the classifier's own grid and confidence.
    """

    grid: str
    confidence: float
    likely: str
    slices: int
    probed: int = 0
    classifier_alone: tuple[str, float] | None = None

    @property
    def sure(self) -> bool:
        return self.confidence >= SURE

    def describe(self) -> str:
        """One line for people: ``bicubic (resampled image), confidence 0.97``."""
        text = f"{self.grid} ({GRID_DESCRIPTIONS[self.grid]}), confidence {self.confidence:.2f}"
        if self.probed:
            # the confidence above is the second look's: say where the first one stood
            before = (f" ({self.classifier_alone[0]}, {self.classifier_alone[1]:.2f})" if self.classifier_alone else "")
            text += (f" after a second look: the classifier alone was unsure{before}, so the model was run on "
                     f"{self.probed} slice{'s' if self.probed != 1 else ''} on each grid and each answer "
                     "degraded back (analysis by synthesis)")
        if not self.sure:
            other = "bicubic" if self.grid == "kspace" else "kspace"
            # the expected loss of each choice, as choose_grid weighs it
            # three decimals: two could print the choice's loss as the larger near the threshold
            text += (f"; could not tell, so the smaller expected loss: {1 - self.confidence:.3f} x "
                     f"{WRONG_GRID_COST_DB[self.grid]:.1f} dB if {self.grid} is wrong, against "
                     f"{self.confidence:.3f} x {WRONG_GRID_COST_DB[other]:.1f} dB if {other} were "
                     "(the measured cost of each wrong grid, validation)")
        return text

    def short(self) -> str:
        """A few characters for tight header fields: ``kspace p=0.97``."""
        return (f"{self.grid} p={self.confidence:.2f}{' synthesis' if self.probed else ''}"
                f"{'' if self.sure else ' unsure'}")


def choose_grid(probability_kspace: float) -> str:
    """The grid with the smaller expected cost of being wrong (:data:`WRONG_GRID_COST_DB`)."""
    cost_if_kspace = (1.0 - probability_kspace) * WRONG_GRID_COST_DB["kspace"]
    cost_if_bicubic = probability_kspace * WRONG_GRID_COST_DB["bicubic"]
    return "kspace" if cost_if_kspace < cost_if_bicubic else "bicubic"


def estimate_degradation(planes: Iterable[np.ndarray],
                         classifier: DegradationClassifier | ClassifierEnsemble) -> DegradationEstimate:
    """Estimate how the low-res ``planes`` of one scan were made.

    Args:
        planes: low-res slices ``(H, W)`` of the scan (informative ones: mostly empty slices
            carry no signal); at most :data:`MAX_SLICES` are used.
        classifier: the classifier for the scan's scale (:func:`load_classifier`).

    Returns:
        The :class:`DegradationEstimate`.
    """
    features = np.stack([classifier.features(plane) for plane in planes])
    probabilities = classifier.probabilities(features).mean(axis=0)
    on_kspace_grid = np.array([GRID_OF[name] == "kspace" for name in CLASSES])
    probability_kspace = float(probabilities[on_kspace_grid].sum())
    grid = choose_grid(probability_kspace)
    confidence = probability_kspace if grid == "kspace" else 1.0 - probability_kspace
    return DegradationEstimate(grid, confidence, CLASSES[int(np.argmax(probabilities))], len(features))


def find_degradation(read_plane: Callable[[int], np.ndarray], n_slices: int, window,
                     classifier: DegradationClassifier | ClassifierEnsemble,
                     padding: tuple[float, float] | None = None,
                     photometric: str | None = None,
                     enhance: ModelAnswer | None = None) -> DegradationEstimate:
    """How a scan lost its resolution, as the default path decides it (``medsr enhance`` calls
    this; ``medsr evaluate --degradation auto`` calls its two halves, so that several models
    share one first look): the classifier's :func:`first_look`, then, when it is unsure, the
    model's :func:`second_look`.

    Args:
        read_plane: index -> low-res slice in original units.
        n_slices: slices in the scan.
        window: the scan's :class:`~medsr.transforms.IntensityWindow` (padding left out).
        classifier: the classifier for the model's scale (:func:`load_classifier`).
        padding: the scan's padding range, or None.
        photometric: the DICOM photometric interpretation, or None.
        enhance: the model's answer on a grid for a few slices
            (:class:`medsr.synthesis.ModelAnswer`): when given and the classifier is unsure, the
            file's synthesis rule takes a second look (:func:`second_look`) if that model is
            the one the rule was fitted with. None: the classifier alone.
    """
    estimate, stored = first_look(read_plane, n_slices, window, classifier, padding, photometric)
    return estimate if enhance is None else second_look(estimate, stored, classifier, enhance)


def first_look(read_plane: Callable[[int], np.ndarray], n_slices: int, window,
               classifier: DegradationClassifier | ClassifierEnsemble,
               padding: tuple[float, float] | None = None,
               photometric: str | None = None) -> tuple[DegradationEstimate, list[np.ndarray]]:
    """The classifier's estimate, and the informative slices it read as stored (what a
    :func:`second_look` probes; arguments as :func:`find_degradation`'s). It needs no model, so
    ``medsr evaluate`` takes it once per scan whatever the number of models.

    The slices are looked at as the model sees them: padding (``padding``, original units)
    replaced by the window's low end, since the cliff at the edge of a field of view is no part
    of how the image was made; MONOCHROME1 values negated, since the intensity-tail features
    tell dark from bright (ringing undershoots the dark side).
    """
    def prepared(index: int) -> np.ndarray:
        plane = read_plane(index)
        if padding is not None:
            plane = np.where((plane >= padding[0]) & (plane <= padding[1]), np.float32(window.low), plane)
        return -plane if photometric == "MONOCHROME1" else plane

    low, high = (-window.high, -window.low) if photometric == "MONOCHROME1" else (window.low, window.high)
    planes = informative_planes(prepared, n_slices, low, high)
    # the model makes the output from the values as stored, so it is probed on them
    stored = [-plane for plane in planes] if photometric == "MONOCHROME1" else planes
    return estimate_degradation(planes, classifier), stored


def second_look(estimate: DegradationEstimate, planes: list[np.ndarray],
                classifier: DegradationClassifier | ClassifierEnsemble,
                enhance: ModelAnswer) -> DegradationEstimate:
    """The estimate after analysis by synthesis (:mod:`medsr.synthesis`) on the
    :func:`~medsr.synthesis.probe_slices` of ``planes`` (the informative slices the classifier
    read, in stored values). ``estimate`` unchanged when the classifier was sure (the rule was
    fitted for unsure scans only, and a sure one costs no model pass), the classifier file holds
    no synthesis rule, the rule was fitted with another model than ``enhance`` runs, the slices
    are too small or blank, or the model refuses them."""
    rule = getattr(classifier, "synthesis", None)
    scale = getattr(classifier, "scale", None)
    if (estimate.sure or rule is None or scale is None or not planes or not can_probe(planes[0].shape, scale)
            or not rule.applies_to(enhance.model)):
        return estimate
    slices = probe_slices(planes)
    if slices is None:
        return estimate
    try:
        differences = probe_features(enhance, slices, scale)
    except MedsrError as exc:  # a second opinion is optional: without it the classifier decides
        logger.warning("second look skipped: %s", exc)
        return estimate
    probability_kspace = estimate.confidence if estimate.grid == "kspace" else 1.0 - estimate.confidence
    combined = rule.probability(probability_kspace, differences)
    grid = choose_grid(combined)
    logger.debug("second look: kspace probability %.3f -> %.3f", probability_kspace, combined)
    return DegradationEstimate(grid, combined if grid == "kspace" else 1.0 - combined, estimate.likely,
                               estimate.slices, probed=len(slices),
                               classifier_alone=(estimate.grid, estimate.confidence))


def informative_planes(read_plane: Callable[[int], np.ndarray], n_slices: int, low: float, high: float,
                       limit: int = MAX_SLICES) -> list[np.ndarray]:
    """Up to ``limit`` evenly spaced slices with enough foreground: above ``low`` + 10% of
    ``high - low`` on at least 5% of the slice (the protocol's foreground rule, here on the
    scan's intensity window rather than its min and max, which padding and outliers set).
    When no slice qualifies, the evenly spaced candidates (at most ``4 * limit``) are used."""
    threshold = low + FOREGROUND_LEVEL * (high - low)
    chosen = []
    # walk the slices from evenly spaced starting points so long series read few of them
    order = np.unique(np.linspace(0, n_slices - 1, min(n_slices, 4 * limit)).round().astype(int))
    for index in order:
        plane = read_plane(int(index))
        if np.mean(plane > threshold) >= FOREGROUND_FRACTION:
            chosen.append(plane)
    if not chosen:
        chosen = [read_plane(int(i)) for i in order]
    keep = np.unique(np.linspace(0, len(chosen) - 1, min(len(chosen), limit)).round().astype(int))
    return [chosen[i] for i in keep]


def usable_temperature(value: float) -> bool:
    """Whether ``value`` can divide the logits: finite and positive (0 or NaN makes every
    probability NaN, infinity makes them all equal)."""
    return math.isfinite(value) and value > 0


MAX_MEMBERS = 16  # a classifier file holding more is refused, not loaded


def save_classifier(path: Path, classifier: DegradationClassifier | ClassifierEnsemble, scale: int,
                    report: dict) -> None:
    """Write the classifier, or each member of an ensemble (plain tensors and data: loads with
    ``weights_only=True``)."""
    from medsr.writing import save_torch

    payload = {"format": FORMAT, "version": 1, "scale": scale, "classes": list(CLASSES),
               "features": classifier.feature_set, "report": report}
    if isinstance(classifier, ClassifierEnsemble):
        payload["members"] = [member.state_dict() for member in classifier.members]
    else:
        payload["state_dict"] = classifier.state_dict()
    if getattr(classifier, "synthesis", None) is not None:
        payload["synthesis"] = classifier.synthesis.to_payload()
    save_torch(payload, Path(path))


def load_classifier(path: str | Path | None, scale: int) -> DegradationClassifier | ClassifierEnsemble:
    """The classifier (or ensemble) in ``path``, or the one shipped for ``scale``.

    Raises:
        CheckpointError: missing, unsafe, or not a classifier for ``scale``.
    """
    from medsr.checkpoint import safe_torch_load

    if path is None:
        if scale not in DEFAULT_CLASSIFIERS:
            raise CheckpointError(f"no shipped degradation classifier for scale {scale}; "
                                  "pass --degradation bicubic or kspace")
        path = Path(str(resources.files("medsr") / "weights" / DEFAULT_CLASSIFIERS[scale]))
    payload = safe_torch_load(Path(path))
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a medsr degradation classifier")
    if payload.get("scale") != scale or list(payload.get("classes", [])) != list(CLASSES):
        raise CheckpointError(f"{path}: a classifier for scale {payload.get('scale')}, not {scale}")
    feature_set = payload.get("features", "spectrum and tails")  # saved before there was a choice
    if not isinstance(feature_set, str) or feature_set not in FEATURE_SETS:
        raise CheckpointError(f"{path}: reads unknown features {str(feature_set)[:40]!r}")
    states = payload.get("members", [payload.get("state_dict")])
    if not isinstance(states, list) or not 1 <= len(states) <= MAX_MEMBERS:
        raise CheckpointError(f"{path}: members must be a list of 1 to {MAX_MEMBERS} classifiers")
    members = [_member(path, state, feature_set) for state in states]
    classifier = members[0] if "members" not in payload else ClassifierEnsemble(members).eval()
    # the second look for unsure scans (medsr.synthesis), fitted for this file's decisions
    classifier.synthesis = (SynthesisRule.from_payload(path, payload["synthesis"])
                            if "synthesis" in payload else None)
    classifier.scale = scale
    return classifier


def _member(path: str | Path, state, feature_set: str) -> DegradationClassifier:
    """One classifier of a file from its weights, checked."""
    classifier = DegradationClassifier(feature_set=feature_set)
    try:
        state = dict(state)
        state.setdefault("temperature", torch.ones(()))  # classifiers saved before calibration
        classifier.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: classifier weights do not fit ({str(exc).splitlines()[0]})") from None
    temperature = float(classifier.temperature)
    if not usable_temperature(temperature):
        raise CheckpointError(f"{path}: temperature must be finite and positive, not {temperature}")
    return classifier.eval()
