"""What users meet on messy clinical data: one clear error line, nothing written, nothing leaked."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from medsr.checkpoint import load_checkpoint
from medsr.cli import app
from medsr.errors import ScanReadError
from medsr.reading import read_scan

from conftest import MR_NIFTI, MR_SERIES, SAMPLES, pydicom_test_file

runner = CliRunner()


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_jp2klossless.dcm"])
def test_compressed_transfer_syntaxes_decode_to_the_same_values(name):
    reference = read_scan(pydicom_test_file("MR_small.dcm"))
    np.testing.assert_array_equal(read_scan(pydicom_test_file(name)).array, reference.array)


def test_undecodable_pixel_data_is_one_clear_line(monkeypatch):
    with pytest.raises(ScanReadError, match=r"cannot decode JPEG Extended .*decoders failed") as caught:
        read_scan(pydicom_test_file("JPEG-lossy.dcm"))
    assert "\n" not in str(caught.value)
    # without the optional decoders, the message says which extra to install
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ScanReadError, match=r"pip install 'medsr\[codecs\]'"):
        read_scan(pydicom_test_file("JPEG-lossy.dcm"))


def test_errors_never_print_patient_identity(tmp_path):
    dataset = pydicom.dcmread(pydicom_test_file("rtstruct.dcm"), force=True)
    dataset.PatientName, dataset.PatientID, dataset.PatientBirthDate = "DOE^JANE", "MRN-4711", "19600101"
    dataset.save_as(tmp_path / "rs.dcm", enforce_file_format=False)
    result = runner.invoke(app, ["enhance", str(tmp_path / "rs.dcm"), "-o", str(tmp_path / "o.nii.gz")])
    assert result.exit_code == 1 and "no pixel data" in result.stderr
    for secret in ("DOE", "JANE", "MRN-4711", "19600101"):
        assert secret not in result.output


def test_a_damaged_dicom_file_is_called_damaged_not_an_image_without_pixels(tmp_path):
    """A DICM marker followed by bytes DICOM cannot name parses to an empty header: the error
    says the file is damaged, not that some DICOM object lacks pixel data."""
    rng = np.random.default_rng(0)
    damaged = tmp_path / "damaged.dcm"
    damaged.write_bytes(b"\0" * 128 + b"DICM" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    result = runner.invoke(app, ["enhance", str(damaged), "-o", str(tmp_path / "o.nii.gz")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "damaged or is not DICOM" in result.stderr and "no pixel data" not in result.stderr
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_dicomdir_is_named_and_the_folder_asked_for(tmp_path):
    """A DICOMDIR is an index, valid DICOM without an image: the error says what it is and what
    to pass instead, not that the file is damaged."""
    dicomdir = pydicom_test_file("DICOMDIR")
    result = runner.invoke(app, ["enhance", str(dicomdir), "-o", str(tmp_path / "o.nii.gz")])
    assert result.exit_code == 1 and result.stderr.startswith("error: ")
    assert "a DICOMDIR" in result.stderr and "pass the folder" in result.stderr
    assert "damaged" not in result.stderr and not (tmp_path / "o.nii.gz").exists()


def test_hostile_checkpoint_via_cli_is_refused_without_running(tmp_path):
    import torch

    marker = tmp_path / "owned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"format": "medsr-checkpoint", "model": Exploit()}, tmp_path / "evil.pt")
    result = runner.invoke(app, ["enhance", str(MR_NIFTI), "-o", str(tmp_path / "o.nii.gz"),
                                 "--weights", str(tmp_path / "evil.pt")])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "refused to load" in result.stderr
    assert not marker.exists() and not (tmp_path / "o.nii.gz").exists()


def test_inputs_are_never_modified(tmp_path, tiny_checkpoint):
    before = {p: p.read_bytes() for p in MR_SERIES.iterdir()}
    result = runner.invoke(app, ["enhance", str(MR_SERIES), "-o", str(tmp_path / "o.nii.gz"),
                                 "--weights", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert {p: p.read_bytes() for p in MR_SERIES.iterdir()} == before


@pytest.mark.slow  # 18 s of training runs: with the whole-model checks (pytest -m slow, CI runs it)
def test_training_killed_hard_resumes_to_the_same_epoch_count(tmp_path):
    """kill -9 in the middle of a run, then --resume: the run ends with all its epochs."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "medsr.cli", "train", "--config", "configs/srresnet_l1_x2.yaml",
               "--out", str(out), "--set", f"data_root={SAMPLES}", "--set", f"cache_dir={tmp_path / 'cache'}",
               "--set", "train_scans=[ct_chest_3slice_dicom]", "--set", "val_scans=[]",
               "--set", "model.features=4", "--set", "model.num_res_blocks=1", "--set", "batch_size=2",
               "--set", "patch_size=16", "--set", "iterations_per_epoch=10", "--set", "epochs=4"]
    cwd = SAMPLES.parent
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(out / "last.pt")["epoch"]
    assert killed_at < 4, "the run finished before it could be killed; make it longer"
    finished = subprocess.run(command + ["--resume"], cwd=cwd, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    final = load_checkpoint(out / "last.pt")
    assert final["epoch"] == 4 and final["iteration"] == 4 * 10


def test_a_bug_on_one_scan_of_a_batch_does_not_stop_the_others(tmp_path, session_tiny_checkpoint, monkeypatch):
    """Any exception on one scan (here a library error outside medsr's own) fails that scan
    alone, as one line; the rest are written."""
    import nibabel as nib

    from medsr import enhance

    from conftest import MR_NIFTI

    block = nib.load(MR_NIFTI).slicer[60:63, 40:72, 40:72]
    for name in ("a", "b", "c"):
        nib.save(block, tmp_path / f"{name}.nii.gz")
    real = enhance.enhance_file

    def broken_on_b(source, *args, **kwargs):
        if source.name == "b.nii.gz":
            raise struct.error("unpack requires a buffer of 4 bytes")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(enhance, "enhance_file", broken_on_b)
    result = CliRunner().invoke(app, ["enhance", *(str(tmp_path / f"{n}.nii.gz") for n in "abc"),
                                      "-o", str(tmp_path / "out"), "--weights", str(session_tiny_checkpoint)])
    assert result.exit_code == 1
    assert "2 done, 0 skipped, 1 failed" in result.stdout
    assert "internal error (error: unpack requires a buffer of 4 bytes)" in result.stdout
    assert "Traceback" not in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x2.nii.gz", "c_x2.nii.gz"]


def test_evaluate_with_weights_of_another_scale_is_one_error_line(tiny_checkpoint):
    from conftest import CT_SERIES

    result = CliRunner().invoke(app, ["evaluate", str(CT_SERIES), "--weights", str(tiny_checkpoint), "--scale", "4"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "error: --weights tiny upscale by 2, but --scale is 4; pass --scale to match")
