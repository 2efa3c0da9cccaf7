"""Two-iteration training on the shipped sample scans through the real CLI and MONAI engines."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml
from typer.testing import CliRunner

from medsr.checkpoint import load_checkpoint, load_model
from medsr.cli import app
from medsr.config import load_config
from medsr.data import PatchPairDataset, discover_scans, load_cached_scan
from medsr.errors import MedsrError
from medsr.training import BorderCroppedLoss, learning_rate_schedule
from medsr.transforms import RandomDegradePair

from conftest import MR_NIFTI, SAMPLES

runner = CliRunner()


def smoke_args(out, cache, epochs=1):
    return ["train", "--config", "configs/srresnet_l1_x2.yaml", "--out", str(out),
            "--set", f"data_root={SAMPLES}", "--set", f"cache_dir={cache}",
            "--set", "train_scans=[ct_chest_3slice_dicom, mr_t1_nifti]",
            "--set", "val_scans=[mr_pd_oblique_dicom]",
            "--set", "model.features=8", "--set", "model.num_res_blocks=1",
            "--set", "batch_size=2", "--set", "patch_size=32", "--set", "iterations_per_epoch=2",
            "--set", f"epochs={epochs}", "--set", "warmup_iterations=1"]


@pytest.fixture
def trained_run(tmp_path, monkeypatch):
    monkeypatch.chdir(SAMPLES.parent)
    out = tmp_path / "run"
    result = runner.invoke(app, smoke_args(out, tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    return out


def test_two_iteration_training_writes_checkpoints_config_and_history(trained_run, tmp_path):
    assert {p.name for p in trained_run.iterdir()} == {"best.pt", "last.pt", "config.yaml", "history.csv",
                                                       "curves.png", "tensorboard"}
    assert any((trained_run / "tensorboard").iterdir())
    saved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert saved["model"]["features"] == 8 and saved["train_scans"] == ["ct_chest_3slice_dicom", "mr_t1_nifti"]
    last = load_checkpoint(trained_run / "last.pt")
    assert last["epoch"] == 1 and last["iteration"] == 2 and "optimizer" in last
    rows = list(csv.DictReader((trained_run / "history.csv").open()))
    assert len(rows) == 1 and float(rows[0]["val_psnr"]) > 20 and 0 < float(rows[0]["val_ssim"]) <= 1
    assert 0 < float(rows[0]["val_loss"]) < 1
    # the checkpoint alone is enough to enhance
    model, config = load_model(trained_run / "best.pt")
    assert config.model.features == 8
    result = runner.invoke(app, ["enhance", str(MR_NIFTI), "-o", str(tmp_path / "e.nii.gz"),
                                 "--weights", str(trained_run / "best.pt"), "--slice-axis", "2"])
    assert result.exit_code == 0, result.output


def test_resume_continues_to_the_configured_epochs(trained_run, tmp_path):
    result = runner.invoke(app, smoke_args(trained_run, tmp_path / "cache"))
    assert result.exit_code == 1 and "already holds a run; pass --resume" in result.stderr
    result = runner.invoke(app, smoke_args(trained_run, tmp_path / "cache", epochs=2) + ["--resume"])
    assert result.exit_code == 0, result.output
    last = load_checkpoint(trained_run / "last.pt")
    assert last["epoch"] == 2 and last["iteration"] == 4
    rows = list(csv.DictReader((trained_run / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def test_patch_pairs_are_aligned_and_flagged(tmp_path):
    scans = [load_cached_scan(s, tmp_path, 0.5, 99.5) for s in discover_scans(SAMPLES / "ct_chest_3slice_dicom")]
    assert scans[0].is_ct
    dataset = PatchPairDataset(scans, 32, 2, 8, RandomDegradePair(2, {"kspace": 1.0}), seed=3)
    item = dataset[0]
    assert item["image"].shape == (1, 24, 24) and item["label"].shape == (1, 48, 48)
    assert int(item["degradation"]) == 1
    torch.testing.assert_close(dataset[0]["image"], item["image"])  # reproducible
    # the low-res patch is the degraded high-res patch: their means agree
    assert float(item["image"].mean()) == pytest.approx(float(item["label"].mean()), abs=0.05)


def test_border_cropped_loss_ignores_the_context():
    prediction, target = torch.zeros(1, 1, 10, 10), torch.zeros(1, 1, 10, 10)
    prediction[..., 0, :] = 5.0  # error only in the context border
    assert BorderCroppedLoss(torch.nn.L1Loss(), 2)(prediction, target) == 0


def test_learning_rate_warms_up_then_decays():
    config = load_config(None, ["epochs=2", "iterations_per_epoch=10", "warmup_iterations=5"])
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=config.learning_rate)
    scheduler = learning_rate_schedule(optimizer, config)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] < rates[4] <= config.learning_rate
    assert rates[-1] < rates[6] and rates[-1] >= config.min_learning_rate


@pytest.mark.parametrize("train_scans, val_scans", [
    (["nifti"], ["nifti/patient12"]),  # validation inside a training folder
    (["nifti/patient12/t1.nii.gz"], ["nifti/patient12"]),  # training file inside validation
    (["dicom/a"], ["dicom/a"]),
])
def test_patient_level_split_refuses_overlap(train_scans, val_scans):
    from medsr.training import check_patient_split

    config = load_config(None, [f"train_scans={train_scans}", f"val_scans={val_scans}"])
    with pytest.raises(MedsrError, match="overlap training scans"):
        check_patient_split(config)


def test_patient_level_split_accepts_separate_patients():
    from medsr.training import check_patient_split

    for path in ("configs/srresnet_l1_x2.yaml", "configs/srresnet_mse_x2.yaml"):
        check_patient_split(load_config(SAMPLES.parent / path))


def test_tiny_end_to_end_train_then_evaluate(trained_run, tmp_path):
    result = runner.invoke(app, ["evaluate", str(SAMPLES / "ct_chest_3slice_dicom"),
                                 "--weights", str(trained_run / "best.pt"), "--degradation", "kspace",
                                 "--report", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "best PSNR/SSIM" in result.stdout and "kspace: best" in result.stdout
    assert (tmp_path / "report" / "ct_chest_3slice_dicom_kspace.png").exists()


@pytest.mark.slow  # two processes with their own imports
def test_torchrun_two_processes_with_gloo(tmp_path):
    """DistributedDataParallel on the CPU: 2 ranks, rank 0 alone writes the run."""
    import subprocess
    import sys

    out = tmp_path / "run"
    arguments = smoke_args(out, tmp_path / "cache", epochs=2)[1:]  # drop the "train" subcommand
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "medsr.cli", "train", *arguments]
    finished = subprocess.run(command, cwd=SAMPLES.parent, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert finished.stdout.count("trained 2 epochs (4 iterations)") == 1
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 2 and last["iteration"] == 4
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # one writer


def test_validation_metrics_match_the_protocol_on_a_real_slice():
    """MONAI's SSIM after to_protocol_range equals the protocol's scikit-image SSIM."""
    import numpy as np
    from monai.metrics import SSIMMetric

    from medsr.metrics import ssim, trim_border
    from medsr.reading import read_scan
    from medsr.training import to_protocol_range
    from medsr.transforms import robust_window

    volume = read_scan(SAMPLES / "mr_pd_oblique_dicom").array
    window = robust_window(volume)
    reference = volume[:, :, 10:11]
    estimate = reference + np.random.default_rng(0).normal(0, 20, reference.shape).astype(np.float32)
    normalised = window.forward(volume)
    item = {"pred": torch.from_numpy(window.forward(estimate)[..., 0])[None],
            "label": torch.from_numpy(window.forward(reference)[..., 0])[None],
            "volume_range": torch.tensor([normalised.min(), normalised.max()])}
    item = to_protocol_range(item, 2)
    ours = float(SSIMMetric(spatial_dims=2, data_range=1.0)(item["pred"][None], item["label"][None]).mean())
    data_range = float(volume.max() - volume.min())
    expected = ssim(trim_border(reference, 2, 2), trim_border(estimate, 2, 2), 2, data_range, float(volume.min()))
    assert ours == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_fit_degradation_writes_a_classifier_with_its_validation_report(tmp_path, monkeypatch):
    """`medsr fit-degradation` on real samples: the classifier loads for its scale, the report
    inside scores every degradation on the validation scan and names it below the data root."""
    from medsr.checkpoint import safe_torch_load
    from medsr.degradation import CLASSES, load_classifier

    monkeypatch.chdir(SAMPLES.parent)
    out = tmp_path / "degradation_x2.pt"
    arguments = ["fit-degradation", "--config", "configs/srresnet_l1_x2.yaml", "--out", str(out),
                 "--set", f"data_root={SAMPLES}", "--set", f"cache_dir={tmp_path / 'cache'}",
                 "--set", "train_scans=[ct_chest_3slice_dicom, mr_t1_nifti]",
                 "--set", "val_scans=[mr_pd_oblique_dicom]", "--members", "2",
                 "--temperature", "1.2", "--temperature", "0.9"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "training slices, x2" in result.stdout and "validation volumes right" in result.stdout
    ensemble = load_classifier(out, 2)
    assert [float(m.temperature) for m in ensemble.members] == pytest.approx([1.2, 0.9])
    report = safe_torch_load(out)["report"]
    assert report["members"] == 2
    assert set(report["validation"]) == set(CLASSES)
    assert report["history"] is True and report["storage"] is True  # the shipped x2 recipe by default
    for found in report["validation"].values():
        assert found["volume_names"] == ["mr_pd_oblique_dicom"] and found["volumes"] == 1
        assert 0 <= found["slice_accuracy"] <= 1
    again = runner.invoke(app, arguments)  # an existing classifier is kept
    assert again.exit_code == 1 and "pass --overwrite" in again.stderr
