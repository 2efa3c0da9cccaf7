"""The second look at the grid for unsure scans: analysis by synthesis (issue #21)."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medsr.degradation
from medsr.checkpoint import default_weights, load_model
from medsr.cli import app
from medsr.degradation import (
    DegradationEstimate,
    estimate_degradation,
    find_degradation,
    informative_planes,
    load_classifier,
    save_classifier,
    second_look,
)
from medsr.errors import CheckpointError
from medsr.reading import read_scan
from medsr.synthesis import (
    N_WEIGHTS,
    PROBE_SLICES,
    ModelAnswer,
    SynthesisRule,
    as_stored,
    can_probe,
    differences_of,
    model_fingerprint,
    probe_features,
    probe_slices,
    residual_table,
)
from medsr.transforms import degrade_volume, robust_window

from conftest import MR_NIFTI

DIGEST = "0" * 64


@pytest.fixture(scope="module")
def shipped_model():
    model, _ = load_model(default_weights(2))
    return model.eval()


@pytest.fixture(scope="module")
def real_low_res():
    """Four informative slices of the shipped T1 NIfTI, degraded by each protocol grid and
    stored as the file stores it (rounded, not below zero)."""
    scan = read_scan(MR_NIFTI)
    out = {}
    for degradation in ("bicubic", "kspace"):
        low_res, _, _ = degrade_volume(scan.array, scan.affine, scan.slice_axis, 2, degradation)
        slices = np.moveaxis(low_res, scan.slice_axis, 0)
        middle = len(slices) // 2
        out[degradation] = as_stored(slices[middle - 6:middle + 6:3].astype(np.float64), scan.array)
    return out


def test_the_shipped_x2_classifier_holds_a_rule_for_the_shipped_model_and_x4_none(shipped_model):
    rule = load_classifier(None, 2).synthesis
    assert rule is not None and len(rule.weights) == N_WEIGHTS
    assert rule.applies_to(shipped_model)
    assert load_classifier(None, 4).synthesis is None


def test_probe_features_move_towards_kspace_on_real_kspace_truncated_slices(shipped_model, real_low_res):
    """The model, told each grid and degraded back, reproduces a k-space truncated input
    relatively better on the k-space grid than it does a resampled one (both differences
    larger), on the same anatomy."""
    answer = ModelAnswer(shipped_model)
    with torch.inference_mode():
        kspace = probe_features(answer, real_low_res["kspace"], 2)
        bicubic = probe_features(answer, real_low_res["bicubic"], 2)
    assert kspace.shape == bicubic.shape == (2,)
    assert np.all(np.isfinite(kspace)) and np.all(np.isfinite(bicubic))
    assert kspace[0] > bicubic[0] and kspace[1] > bicubic[1]



def test_the_second_look_answers_each_slice_the_same_whatever_slices_come_with_it(shipped_model, real_low_res):
    """Normalised with the scan's window, in float32 (the default), a slice's answer does not
    depend on the other slices of the call: the input and its self-references, smaller and
    smoother, are enhanced as the output will be. Each call's own percentiles (no window)
    would move it."""
    slices = np.asarray(real_low_res["kspace"], dtype=np.float32)
    brighter = np.concatenate([slices[:2], 4 * slices[2:3]])
    fixed = ModelAnswer(shipped_model, window=robust_window(slices))
    assert fixed.precision == "fp32"
    with torch.inference_mode():
        np.testing.assert_allclose(fixed(brighter, "kspace")[:2], fixed(slices[:2], "kspace"), rtol=1e-5, atol=1e-3)
        own = ModelAnswer(shipped_model)
        moved = np.abs(own(brighter, "kspace")[:2] - own(slices[:2], "kspace")).max()
    assert moved > 1.0  # original units (the T1's values reach about 1,500)

def test_the_residual_table_holds_each_slice_and_sums_to_the_probe_the_rule_was_fitted_on(shipped_model,
                                                                                          real_low_res):
    """Per slice, the residual of each grid on the input and on both self-references (the
    slices enhanced together, in one intensity window). Summed, it must give the probe the
    shipped rule was fitted on, written out here as it was then: each grid's squared residual
    over all the slices at once, then the log ratios."""
    from medsr.consistency import degrade

    answer = ModelAnswer(shipped_model, precision="fp32")
    slices = np.asarray(real_low_res["kspace"][:, :-1, :-1], dtype=np.float64)  # odd sides: the crop counts

    def log_ratio(low_res):
        residual = {grid: float(((degrade(torch.from_numpy(np.asarray(answer(low_res, grid), dtype=np.float64)),
                                          grid, 2).numpy() - low_res) ** 2).sum()) for grid in ("bicubic", "kspace")}
        return np.log(residual["bicubic"] + 1e-12) - np.log(residual["kspace"] + 1e-12)

    with torch.inference_mode():
        table = residual_table(answer, slices, 2)
        probed = probe_features(answer, slices, 2)
        cropped = torch.from_numpy(np.ascontiguousarray(slices[:, :-1, :-1]))
        at_input = log_ratio(slices)
        then = [at_input - log_ratio(as_stored(degrade(cropped, last, 2).numpy(), slices))
                for last in ("bicubic", "kspace")]
    assert table.shape == (len(slices), 3, 2) and np.all(table > 0)
    np.testing.assert_allclose(differences_of(table), probed, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(probed, then, rtol=1e-9, atol=1e-9)


def test_as_stored_rounds_and_clips_like_the_file_it_comes_from():
    image = np.array([[-0.6, 1.4], [2.5, 3.49]])
    np.testing.assert_array_equal(as_stored(image, np.array([0.0, 7.0])), [[0.0, 1.0], [2.0, 3.0]])
    np.testing.assert_array_equal(as_stored(image, np.array([-1.0, 7.0])), [[-1.0, 1.0], [2.0, 3.0]])
    np.testing.assert_array_equal(as_stored(image, np.array([-0.5, 7.0])), image)


def test_the_rule_is_fitted_towards_the_truth():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 400).astype(float)
    differences = np.column_stack([truth - 0.5 + 0.3 * rng.standard_normal(400), rng.standard_normal(400)])
    uninformed = np.full(400, 0.5)
    rule = SynthesisRule.fit(uninformed, differences, truth, DIGEST)
    assert rule.probability(0.5, np.array([0.5, 0.0])) > 0.9
    assert rule.probability(0.5, np.array([-0.5, 0.0])) < 0.1


@pytest.mark.parametrize("weights, model, match", [
    ((1.0,) * (N_WEIGHTS - 1), DIGEST, "7 finite weights"),
    ((float("nan"),) + (1.0,) * (N_WEIGHTS - 1), DIGEST, "7 finite weights"),
    ((1.0,) * N_WEIGHTS, "abc", "SHA-256"),
])
def test_a_bad_rule_is_refused(weights, model, match):
    with pytest.raises(ValueError, match=match):
        SynthesisRule(weights, model)


@pytest.mark.parametrize("synthesis, match", [
    ({"weights": [1.0] * 3, "model": DIGEST}, "7 finite weights"),
    ({"weights": ["1"] * N_WEIGHTS, "model": DIGEST}, "7 finite weights"),
    ({"weights": [float("inf")] * N_WEIGHTS, "model": DIGEST}, "7 finite weights"),
    ({"weights": [1.0] * N_WEIGHTS, "model": "Z" * 64}, "SHA-256"),
    ({"weights": [1.0] * N_WEIGHTS}, "SHA-256"),
    ("run me", "7 finite weights"),
])
def test_a_classifier_file_with_a_hostile_rule_is_refused(tmp_path, synthesis, match):
    path = tmp_path / "classifier.pt"
    save_classifier(path, load_classifier(None, 2), 2, {})
    payload = torch.load(path, weights_only=True)
    payload["synthesis"] = synthesis
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=match):
        load_classifier(path, 2)


def test_the_rule_is_saved_and_loaded_with_the_classifier(tmp_path):
    path = tmp_path / "classifier.pt"
    shipped = load_classifier(None, 2)
    save_classifier(path, shipped, 2, {})
    assert load_classifier(path, 2).synthesis == shipped.synthesis


def test_the_fingerprint_follows_the_weights(shipped_model):
    other, _ = load_model(default_weights(2))
    assert model_fingerprint(other) == model_fingerprint(shipped_model)
    with torch.no_grad():
        other.tail.conv.bias.add_(1e-3)
    assert model_fingerprint(other) != model_fingerprint(shipped_model)


def _classifier_with_rule(bias: float, model: torch.nn.Module):
    """The shipped classifier with a rule that ignores the classifier and the probe and says
    ``kspace`` (bias > 0) or ``bicubic`` (bias < 0), for the model given."""
    classifier = load_classifier(None, 2)
    classifier.synthesis = SynthesisRule((0.0,) * (N_WEIGHTS - 1) + (bias,), model_fingerprint(model))
    return classifier


def test_an_unsure_estimate_gets_a_second_look_on_real_slices(shipped_model, real_low_res):
    planes = list(real_low_res["bicubic"])
    unsure = DegradationEstimate("bicubic", 0.6, "bicubic", len(planes))
    with torch.inference_mode():
        looked = second_look(unsure, planes, _classifier_with_rule(8.0, shipped_model), ModelAnswer(shipped_model))
    assert looked.grid == "kspace" and looked.confidence > 0.99
    assert looked.probed == min(PROBE_SLICES, len(planes)) and looked.likely == "bicubic"
    assert "analysis by synthesis" in looked.describe() and "synthesis" in looked.short()
    # the line says whose confidence it prints, and where the classifier alone stood
    assert looked.classifier_alone == ("bicubic", 0.6)
    assert "confidence 1.00 after a second look: the classifier alone was unsure (bicubic, 0.60)" in looked.describe()
    assert f"on {looked.probed} slices on each grid" in looked.describe()


def test_no_second_look_with_another_model_or_without_a_rule(shipped_model, session_tiny_checkpoint, real_low_res):
    planes = list(real_low_res["bicubic"])
    unsure = DegradationEstimate("bicubic", 0.6, "bicubic", len(planes))
    tiny, _ = load_model(session_tiny_checkpoint)
    classifier = _classifier_with_rule(8.0, shipped_model)
    assert second_look(unsure, planes, classifier, ModelAnswer(tiny)) == unsure
    classifier.synthesis = None
    assert second_look(unsure, planes, classifier, ModelAnswer(shipped_model)) == unsure


def test_a_sure_estimate_runs_no_model(real_low_res):
    """find_degradation looks again only when the classifier is unsure: a sure scan costs no
    model pass (the answer here would fail if it were called)."""
    class Refusing(ModelAnswer):
        def __call__(self, low_res, grid):
            raise AssertionError("the model ran on a sure scan")

    stack = np.moveaxis(real_low_res["kspace"], 0, 2)
    classifier = load_classifier(None, 2)
    estimate = find_degradation(lambda i: stack[..., i], stack.shape[2], robust_window(stack), classifier,
                                enhance=Refusing(torch.nn.Identity()))
    assert estimate.sure and estimate.probed == 0


def test_slices_too_small_are_not_probed():
    assert can_probe((4, 64, 64), 2) and can_probe((32, 32), 2)
    assert not can_probe((4, 30, 64), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_second_look_on_the_gpu_matches_the_cpu(real_low_res):
    """The second look runs in float32 on any device (``PROBE_PRECISION``); on CUDA (where
    convolutions may use TF32) the two differences move by far less than the rule's margins."""
    model = load_model(default_weights(2))[0].eval()  # its own copy: the engine moves it to the GPU
    with torch.inference_mode():
        cpu = probe_features(ModelAnswer(model, "cpu", "fp32"), real_low_res["kspace"], 2)
        gpu = probe_features(ModelAnswer(model, "cuda"), real_low_res["kspace"], 2)
    np.testing.assert_allclose(gpu, cpu, atol=0.05)


def test_probe_slices_skip_blank_ones():
    blank, varied = np.zeros((40, 40)), np.arange(1600.0).reshape(40, 40)
    assert probe_slices([blank, blank]) is None
    picked = probe_slices([blank, varied, blank, 2 * varied, blank])
    assert picked.shape == (2, 40, 40) and all(np.ptp(p) > 0 for p in picked)
    assert len(probe_slices([varied + i for i in range(20)])) == PROBE_SLICES


def test_a_sparse_scan_the_classifier_is_unsure_of_is_enhanced_with_no_flags(tmp_path):
    """A 40-slice volume blank but for a 20 x 20 patch of the real T1 on 11 slices: no slice has
    enough foreground, so the classifier reads evenly spaced slices (most of them blank) and is
    unsure. The second look must probe the slices that hold something, not fail on blank ones."""
    scan = read_scan(MR_NIFTI)
    source = np.moveaxis(scan.array, scan.slice_axis, 2)
    volume = np.zeros((96, 96, 40), np.float32)
    middle = source.shape[2] // 2
    for j, k in enumerate(range(14, 25)):
        volume[38:58, 38:58, k] = source[source.shape[0] // 2 - 10:source.shape[0] // 2 + 10,
                                         source.shape[1] // 2 - 10:source.shape[1] // 2 + 10, middle - 5 + j]
    path = tmp_path / "sparse.nii.gz"
    nib.save(nib.Nifti1Image(np.round(volume).astype(np.int16), np.diag([1.0, 1.0, 3.0, 1.0])), path)
    window = robust_window(volume)
    planes = informative_planes(lambda i: volume[..., i], 40, window.low, window.high)
    assert not estimate_degradation(planes, load_classifier(None, 2)).sure  # what the test is about

    result = CliRunner().invoke(app, ["enhance", str(path), "-o", str(tmp_path / "out.nii.gz")])

    assert result.exit_code == 0, result.output
    assert "analysis by synthesis" in result.output
    assert nib.load(tmp_path / "out.nii.gz").shape == (192, 192, 40)


def test_a_monochrome1_scan_is_probed_on_its_stored_values(real_low_res):
    """The classifier reads MONOCHROME1 slices negated (dark and bright swapped), but the model
    makes the output from the stored values, so the second look is taken on those."""
    seen = []

    class Recording(ModelAnswer):
        def __call__(self, low_res, grid):
            seen.append(np.asarray(low_res))
            return super().__call__(low_res, grid)

    stored = real_low_res["bicubic"].astype(np.float32)
    stack = np.moveaxis(stored, 0, 2)
    model = load_model(default_weights(2))[0].eval()
    classifier = _classifier_with_rule(0.0, model)
    for member in classifier.members:  # flat probabilities: the classifier is unsure
        member.temperature.fill_(1e4)
    with torch.inference_mode():
        estimate = find_degradation(lambda i: stack[..., i], stack.shape[2], robust_window(stack), classifier,
                                    photometric="MONOCHROME1", enhance=Recording(model))
    assert estimate.probed and seen
    first = seen[0]  # the input slices of the first model pass
    assert all(any(np.array_equal(plane, candidate) for candidate in stored) for plane in first)


@pytest.mark.parametrize("grid", ["kspace", "bicubic"])
def test_a_rule_that_trusts_the_classifier_keeps_its_grid_and_confidence(shipped_model, real_low_res, grid):
    """The probability handed to the rule, and the confidence made from the rule's, point the
    right way for either grid: a rule that is the classifier's logit alone changes nothing."""
    classifier = load_classifier(None, 2)
    classifier.synthesis = SynthesisRule((1.0,) + (0.0,) * (N_WEIGHTS - 1), model_fingerprint(shipped_model))
    unsure = DegradationEstimate(grid, 0.7, grid, 4)
    with torch.inference_mode():
        looked = second_look(unsure, list(real_low_res["bicubic"]), classifier, ModelAnswer(shipped_model))
    assert looked.grid == grid and looked.confidence == pytest.approx(0.7, abs=1e-4) and looked.probed


def test_a_weight_too_large_for_a_float_is_refused(tmp_path):
    path = tmp_path / "classifier.pt"
    save_classifier(path, load_classifier(None, 2), 2, {})
    payload = torch.load(path, weights_only=True)
    payload["synthesis"] = {"weights": [10 ** 400] + [1.0] * (N_WEIGHTS - 1), "model": DIGEST}
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="7 finite weights"):
        load_classifier(path, 2)


def test_evaluate_decides_per_model_each_with_its_own_second_look(session_tiny_checkpoint, monkeypatch):
    """`medsr evaluate --degradation auto` scores each model as `medsr enhance --weights` would
    run it: the rule's model takes a second look, another model is decided by the classifier
    alone (the order of the models does not matter)."""
    from medsr.evaluation import evaluate_scan

    scan = read_scan(MR_NIFTI)
    small = dataclasses.replace(scan, array=scan.array[60:76].copy())  # 16 sagittal planes
    classifier = load_classifier(None, 2)
    for member in classifier.members:  # flat probabilities: the classifier is unsure
        member.temperature.fill_(1e4)
    tiny = load_model(session_tiny_checkpoint)[0].eval()
    shipped = load_model(default_weights(2))[0].eval()
    looks = []
    real_estimate = medsr.degradation.estimate_degradation
    monkeypatch.setattr(medsr.degradation, "estimate_degradation",
                        lambda *args: looks.append(1) or real_estimate(*args))
    result = evaluate_scan(small, {"tiny": tiny, "shipped": shipped}, "bicubic", 2, slice_axis=0,
                           classifier=classifier)
    assert result.decisions["tiny auto"].probed == 0
    assert result.decisions["shipped auto"].probed > 0
    assert len(looks) == 1  # the classifier's look is taken once, whatever the number of models
