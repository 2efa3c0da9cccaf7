"""The default path finds out from the pixels how a scan lost its resolution (issue #10)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from typer.testing import CliRunner

import medsr
from medsr.cli import app
from medsr.degradation import (
    CLASSES,
    FEATURE_COUNTS,
    N_FEATURES,
    WRONG_GRID_COST_DB,
    DegradationClassifier,
    DegradationEstimate,
    choose_grid,
    estimate_degradation,
    load_classifier,
    slice_features,
)
from medsr.errors import CheckpointError
from medsr.reading import read_scan
from medsr.transforms import degrade_volume

from conftest import CT_SERIES, MR_NIFTI, MR_SERIES, degraded_series

runner = CliRunner()


def _low_res(source, degradation, scale=2):
    scan = read_scan(source)
    low_res, high_res, affine = degrade_volume(scan.array, scan.affine, scan.slice_axis, scale, degradation)
    return scan, low_res, affine


@pytest.mark.parametrize("source", [MR_NIFTI, MR_SERIES, CT_SERIES], ids=["mr-nifti", "mr-dicom", "ct-dicom"])
@pytest.mark.parametrize("degradation", ["bicubic", "kspace"])
def test_the_grid_is_found_on_real_slices_degraded_each_way(source, degradation):
    scan, low_res, _ = _low_res(source, degradation)
    planes = list(np.moveaxis(low_res, scan.slice_axis, 0))
    estimate = estimate_degradation(planes, load_classifier(None, 2))
    assert estimate.grid == degradation
    assert estimate.confidence >= 0.6


def test_x4_classifier_finds_the_protocol_grids():
    for degradation in ("bicubic", "kspace"):
        scan, low_res, _ = _low_res(MR_NIFTI, degradation, scale=4)
        estimate = estimate_degradation(list(np.moveaxis(low_res, scan.slice_axis, 0)), load_classifier(None, 4))
        assert estimate.grid == degradation


def test_features_ignore_a_linear_change_of_units():
    plane = read_scan(MR_NIFTI).array[:, :, 80]
    np.testing.assert_allclose(slice_features(plane), slice_features(3.5 * plane - 1000.0), atol=1e-6)
    assert slice_features(plane).shape == (N_FEATURES,)


def test_when_unsure_it_takes_the_cheaper_mistake_and_says_so():
    # a wrong bicubic costs more than a wrong kspace, so an even chance goes to kspace
    assert WRONG_GRID_COST_DB["bicubic"] > WRONG_GRID_COST_DB["kspace"]
    assert choose_grid(0.5) == "kspace"
    assert choose_grid(0.40) == "bicubic" and choose_grid(0.95) == "kspace"
    unsure = DegradationEstimate("kspace", 0.55, "kspace", 10)
    assert not unsure.sure and "could not tell" in unsure.describe()
    # the line weighs each choice by its chance of being wrong, as choose_grid does: an unsure
    # bicubic is the smaller expected loss even though a wrong bicubic costs more
    unsure_bicubic = DegradationEstimate("bicubic", 0.75, "bicubic", 10).describe()
    assert "0.250 x 6.6 dB if bicubic is wrong, against 0.750 x 5.7 dB if kspace were" in unsure_bicubic
    # just past the threshold (kspace at 0.464: 0.536 x 5.7 = 3.055 < 0.464 x 6.6 = 3.062)
    assert choose_grid(0.464) == "kspace"
    assert "0.536 x 5.7 dB if kspace is wrong, against 0.464 x 6.6 dB" in DegradationEstimate(
        "kspace", 0.464, "kspace", 10).describe()
    sure = DegradationEstimate("bicubic", 0.97, "bicubic", 10)
    assert sure.describe() == "bicubic (resampled image), confidence 0.97"
    # a single image probed: one slice, said so
    single = DegradationEstimate("kspace", 0.97, "kspace", 1, probed=1, classifier_alone=("kspace", 0.7)).describe()
    assert "run on 1 slice on each grid" in single and "unsure (kspace, 0.70)" in single


def test_a_resampled_mr_nifti_gets_bicubic_with_no_flag(tmp_path, session_tiny_checkpoint):
    """The case that was 3 dB worse than cubic interpolation: an MR image that was resampled."""
    scan, low_res, affine = _low_res(MR_NIFTI, "bicubic")
    source, output = tmp_path / "resampled.nii.gz", tmp_path / "enhanced.nii.gz"
    nib.save(nib.Nifti1Image(low_res, affine), source)
    result = runner.invoke(app, ["enhance", str(source), "-o", str(output), "--weights", str(session_tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("degradation:"))
    assert line.startswith("degradation: bicubic (resampled image), confidence ")
    description = nib.load(output).header["descrip"].tobytes().decode().rstrip("\0")
    assert "x2 bicubic auto p=" in description
    assert nib.load(output).shape == scan.array[:low_res.shape[0] * 2, :low_res.shape[1] * 2].shape


def test_dicom_output_records_the_decision(tmp_path, session_tiny_checkpoint):
    source = degraded_series(MR_SERIES, tmp_path / "resampled", "bicubic")
    result = runner.invoke(app, ["enhance", str(source), "-o", str(tmp_path / "out"),
                                 "--weights", str(session_tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert "degradation: bicubic" in result.output
    written = pydicom.dcmread(sorted((tmp_path / "out").glob("*.dcm"))[0])
    assert "degradation bicubic (found from the pixels" in written.DerivationDescription


def test_a_told_degradation_is_recorded_as_given(tmp_path, session_tiny_checkpoint):
    output = tmp_path / "o.nii.gz"
    result = runner.invoke(app, ["enhance", str(MR_SERIES), "-o", str(output), "--degradation", "kspace",
                                 "--weights", str(session_tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert "degradation:" not in result.output  # nothing was estimated
    # told k-space truncation: --consistency auto projects it (the exact operator)
    assert nib.load(output).header["descrip"].tobytes().decode().rstrip("\0") == "medsr x2 kspace consistent"


def test_evaluate_auto_scores_the_default_path_next_to_the_told_runs(tmp_path, session_tiny_checkpoint):
    result = runner.invoke(app, ["evaluate", str(MR_SERIES), "--weights", str(session_tiny_checkpoint),
                                 "--degradation", "auto"])
    assert result.exit_code == 0, result.output
    assert "tiny PSNR/SSIM" in result.output and "tiny auto PSNR/SSIM" in result.output
    assert "bicubic: auto found the bicubic grid on 1 of 1 scans" in result.output
    assert "kspace: auto found the kspace grid on 1 of 1 scans" in result.output


def test_evaluate_takes_the_stress_degradations(session_tiny_checkpoint):
    result = runner.invoke(app, ["evaluate", str(CT_SERIES), "--weights", str(session_tiny_checkpoint),
                                 "--degradation", "lanczos,gaussian"])
    assert result.exit_code == 0, result.output
    assert "lanczos: tiny auto" in result.output and "gaussian: tiny auto" in result.output
    bad = runner.invoke(app, ["evaluate", str(CT_SERIES), "--degradation", "blurry"])
    assert bad.exit_code == 2 and "blurry" in bad.output


def test_classifier_files_are_checked(tmp_path):
    classifier = load_classifier(None, 2)
    assert classifier.probabilities(np.zeros((1, FEATURE_COUNTS[classifier.feature_set]))).shape == (1, len(CLASSES))
    shipped_x2 = Path(medsr.__file__).parent / "weights" / "degradation_x2.pt"
    with pytest.raises(CheckpointError, match="for scale 2, not 4"):
        load_classifier(shipped_x2, 4)
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": "medsr-degradation-classifier", "scale": 2, "code": print}, hostile)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_classifier(hostile, 2)


def test_monochrome1_and_padding_do_not_change_the_decision():
    """The decision is made on the slices as the model sees them: inverted storage
    (MONOCHROME1) and a padded field of view give the same answer as the plain image."""
    from medsr.degradation import find_degradation
    from medsr.reading import plane_of
    from medsr.transforms import robust_window

    scan, low_res, _ = _low_res(MR_NIFTI, "kspace")
    classifier = load_classifier(None, 2)
    axis = scan.slice_axis

    def decide(volume, padding=None, photometric=None):
        window = robust_window(volume if padding is None else volume[volume > padding[1]])
        return find_degradation(lambda k: plane_of(volume, axis, k), volume.shape[axis], window, classifier,
                                padding, photometric)

    plain = decide(low_res)
    inverted = decide(-low_res, photometric="MONOCHROME1")
    assert inverted.grid == plain.grid and inverted.confidence == pytest.approx(plain.confidence, rel=1e-6)
    # the x4 classifier also reads the intensity tails, which a negation swaps unless undone
    tails = load_classifier(None, 4)
    assert tails.feature_set == "spectrum and tails"
    x4_low_res = _low_res(MR_NIFTI, "kspace", scale=4)[1]

    def decide_x4(volume, photometric=None):
        return find_degradation(lambda k: plane_of(volume, axis, k), volume.shape[axis], robust_window(volume),
                                tails, None, photometric)

    plain_x4, inverted_x4 = decide_x4(x4_low_res), decide_x4(-x4_low_res, "MONOCHROME1")
    assert inverted_x4.grid == plain_x4.grid
    assert inverted_x4.confidence == pytest.approx(plain_x4.confidence, rel=1e-6)
    padded = low_res.copy()
    padded[:, :6, :] = -3024.0  # a band of padding at the edge of every slice
    assert decide(padded, padding=(-3024.0, -3024.0)).grid == plain.grid == "kspace"


def test_the_temperature_softens_the_probabilities_and_older_files_load_without_it(tmp_path):
    """The calibrated temperature divides the logits; a classifier saved before calibration
    (no temperature in its weights) loads with 1, i.e. as it was fitted."""
    from medsr.degradation import save_classifier

    classifier = load_classifier(None, 4)  # a single classifier (the shipped x2 is an ensemble)
    features = np.stack([classifier.features(np.asarray(pydicom.dcmread(p).pixel_array, np.float32)[::4, ::4])
                         for p in sorted(MR_SERIES.glob("*.dcm"))[8:12]])
    state = {k: v.clone() for k, v in classifier.state_dict().items()}
    state["temperature"] = torch.tensor(1.0)
    classifier.load_state_dict(state)
    sharp = classifier.probabilities(features)
    state["temperature"] = torch.tensor(4.0)
    classifier.load_state_dict(state)
    soft = classifier.probabilities(features)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
    assert np.all(soft.max(axis=1) < sharp.max(axis=1))  # less sure, same features
    np.testing.assert_array_equal(soft.argmax(axis=1), sharp.argmax(axis=1))  # same ranking

    state["temperature"] = torch.tensor(1.0)
    classifier.load_state_dict(state)
    save_classifier(tmp_path / "old.pt", classifier, 4, {})
    payload = torch.load(tmp_path / "old.pt", weights_only=True)
    payload["state_dict"].pop("temperature", None)
    torch.save(payload, tmp_path / "old.pt")
    loaded = load_classifier(tmp_path / "old.pt", 4)
    assert float(loaded.temperature) == 1.0
    np.testing.assert_allclose(loaded.probabilities(features), sharp, rtol=1e-6)



def test_a_classifier_reads_the_features_it_was_saved_with(tmp_path):
    """The shipped classifier reads the spectrum alone; one saved before there was a choice (no
    "features" in the file) reads the spectrum and tails it was fitted on; an unknown name is
    refused rather than guessed."""
    from medsr.degradation import save_classifier, spectrum_features

    plane = read_scan(MR_NIFTI).array[::2, ::2, 80]
    shipped = load_classifier(None, 2)
    assert shipped.feature_set == "spectrum"
    np.testing.assert_array_equal(shipped.features(plane), spectrum_features(plane))
    np.testing.assert_array_equal(spectrum_features(plane), slice_features(plane)[:FEATURE_COUNTS["spectrum"]])

    older = DegradationClassifier(feature_set="spectrum and tails")
    save_classifier(tmp_path / "older.pt", older, 2, {})
    payload = torch.load(tmp_path / "older.pt", weights_only=True)
    payload.pop("features")
    torch.save(payload, tmp_path / "older.pt")
    loaded = load_classifier(tmp_path / "older.pt", 2)
    assert loaded.feature_set == "spectrum and tails" and loaded.features(plane).shape == (N_FEATURES,)
    estimate_degradation([plane], loaded)  # reads its own features end to end

    for odd in ("tea leaves", [1], {"a": 1}):
        payload["features"] = odd
        torch.save(payload, tmp_path / "odd.pt")
        with pytest.raises(CheckpointError, match="unknown features"):
            load_classifier(tmp_path / "odd.pt", 2)
    payload["features"] = "spectrum and tails"
    for temperature in (0.0, float("inf"), float("nan")):
        payload["state_dict"]["temperature"] = torch.tensor(temperature)
        torch.save(payload, tmp_path / "odd.pt")
        with pytest.raises(CheckpointError, match="temperature must be finite and positive"):
            load_classifier(tmp_path / "odd.pt", 2)


def test_an_ensemble_averages_its_members_and_round_trips(tmp_path):
    """The shipped x2 classifier is three members, each with its own temperature; the ensemble's
    probabilities are the mean of theirs, and it saves and loads as it was. A file whose members
    are not a short list of fitting weights is refused."""
    from medsr.degradation import MAX_MEMBERS, ClassifierEnsemble, save_classifier

    shipped = load_classifier(None, 2)
    assert isinstance(shipped, ClassifierEnsemble) and len(shipped.members) == 3
    assert len({float(m.temperature) for m in shipped.members}) == 3  # calibrated one by one
    planes = [read_scan(MR_NIFTI).array[::2, ::2, k] for k in (70, 80, 90)]
    features = np.stack([shipped.features(p) for p in planes])
    np.testing.assert_allclose(shipped.probabilities(features),
                               np.mean([m.probabilities(features) for m in shipped.members], axis=0))
    np.testing.assert_allclose(shipped.probabilities(features).sum(axis=1), 1.0, rtol=1e-6)

    save_classifier(tmp_path / "ensemble.pt", shipped, 2, {})
    again = load_classifier(tmp_path / "ensemble.pt", 2)
    assert isinstance(again, ClassifierEnsemble)
    np.testing.assert_array_equal(again.probabilities(features), shipped.probabilities(features))
    payload = torch.load(tmp_path / "ensemble.pt", weights_only=True)
    for members, message in ((payload["members"][0], "members must be a list"), ([], "members must be a list"),
                             (payload["members"] * (MAX_MEMBERS + 1), "members must be a list"),
                             ([{"layers.0.weight": torch.zeros(2, 2)}], "weights do not fit")):
        torch.save({**payload, "members": members}, tmp_path / "odd.pt")
        with pytest.raises(CheckpointError, match=message):
            load_classifier(tmp_path / "odd.pt", 2)
    with pytest.raises(ValueError, match="read the same features"):
        ClassifierEnsemble([shipped.members[0], DegradationClassifier(feature_set="spectrum and tails")])


@pytest.mark.parametrize("option", [["--features", "tea leaves"], ["--temperature", "0"], ["--temperature", "inf"],
                                    ["--members", "2", "--temperature", "1", "--temperature", "2",
                                     "--temperature", "3"],
                                    ["--members", "0"]])
def test_fit_degradation_refuses_bad_options_before_any_work(tmp_path, option):
    result = runner.invoke(app, ["fit-degradation", "--config", str(Path(medsr.__file__).parents[1] / "configs" /
                                                                    "srresnet_l1_x2.yaml"),
                                 "--out", str(tmp_path / "c.pt"), *option])
    assert result.exit_code == 1 and "error:" in result.output
    assert any(reason in result.output for reason in ("features must be one of", "temperature must be finite",
                                                      "one per member", "members must be"))
    assert not (tmp_path / "c.pt").exists()


def test_training_slices_get_a_random_history_before_the_degradation():
    """Each training slice is first left alone, resampled, blurred or made noisier (at random,
    reproducibly), so the classifier learns the kernel rather than its training sources' look;
    validation examples (randomise=False) stay the plain slices."""
    from medsr.data import degradation_examples, source_history

    slice_ = read_scan(MR_NIFTI).array[:, :, 80].astype(np.float32)
    draws = [source_history(slice_, np.random.default_rng(seed)) for seed in range(24)]
    changed = [not np.array_equal(d, slice_) for d in draws]
    assert all(d.shape == slice_.shape and d.dtype == np.float32 and np.isfinite(d).all() for d in draws)
    assert 0 < sum(changed) < len(draws)  # some left alone, most given a history
    np.testing.assert_array_equal(source_history(slice_, np.random.default_rng(3)), draws[3])

    class _Scan:
        slices = read_scan(MR_NIFTI).array.transpose(2, 0, 1)[70:90:10]

    plain_a, labels, _ = degradation_examples([_Scan()], 2, 2, seed=0, randomise=False)
    plain_b = degradation_examples([_Scan()], 2, 2, seed=1, randomise=False)[0]
    noiseless = labels != CLASSES.index("rician")  # Rician noise is random by nature
    np.testing.assert_array_equal(plain_a[noiseless], plain_b[noiseless])  # no history without randomise
    varied = degradation_examples([_Scan()], 2, 2, seed=0)[0]
    assert varied.shape == plain_a.shape and not np.allclose(varied[noiseless], plain_a[noiseless])


def test_training_slices_are_stored_as_a_file_may_store_them():
    """After the degradation, half the training slices are rounded to 256-4096 levels over the
    source slice's range and clipped at its minimum, as an integer file holds them; --no-storage
    (storage=False) leaves them as computed, as the first 2026-12-06 x2 classifier was fitted."""
    from medsr.data import degradation_examples, stored_as_file
    from medsr.transforms import degrade_bicubic

    original = read_scan(MR_NIFTI).array[:, :, 80].astype(np.float32)
    low_res = degrade_bicubic(original, 2)
    draws = [stored_as_file(low_res, original, np.random.default_rng(seed)) for seed in range(16)]
    rounded = [d for d in draws if not np.array_equal(d, low_res)]
    assert 0 < len(rounded) < len(draws)  # about half
    low, width = float(original.min()), float(original.max() - original.min())
    for stored in rounded:
        assert stored.dtype == np.float32 and stored.min() >= low
        levels = np.unique(stored)
        assert len(levels) <= 4097 and np.diff(levels).min() >= width / 4096 * 0.99  # at most 4096 steps
        assert np.abs(stored - np.maximum(low_res, low)).max() <= width / 256 / 2 * 1.01  # half a step at most
    np.testing.assert_array_equal(stored_as_file(low_res, original, np.random.default_rng(5)), draws[5])

    class _Scan:
        slices = read_scan(MR_NIFTI).array.transpose(2, 0, 1)[70:90:10]

    unrounded = degradation_examples([_Scan()], 2, 2, seed=0, storage=False)[0]
    stored = degradation_examples([_Scan()], 2, 2, seed=0)[0]
    assert stored.shape == unrounded.shape and not np.allclose(stored, unrounded)
