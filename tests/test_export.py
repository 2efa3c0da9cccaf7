"""medsr export: TorchScript and ONNX files that answer as the PyTorch model does."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from medsr.checkpoint import load_model
from medsr.cli import app
from medsr.errors import ExportError
from medsr.export import TOLERANCE, check_inputs, export_model, run_exported, zero_fill_matrices
from medsr.model import SRResNet, ThroughPlaneNet, zero_fill_upsample

from conftest import MR_NIFTI

runner = CliRunner()


@pytest.mark.parametrize("shape", [(2, 1, 40, 36), (1, 1, 33, 17), (1, 1, 5, 8)])
@pytest.mark.parametrize("scale", [2, 4])
def test_zero_fill_without_complex_numbers_is_the_fft_one(shape, scale):
    low_res = torch.rand(shape)
    real_h, imag_h = zero_fill_matrices(shape[2], scale, low_res)
    real_w, imag_w = zero_fill_matrices(shape[3], scale, low_res)
    by_matrices = real_h @ low_res @ real_w.T - imag_h @ low_res @ imag_w.T
    torch.testing.assert_close(by_matrices, zero_fill_upsample(low_res, scale), atol=1e-5, rtol=0)


def _tiny(kind: str, tiny_checkpoint) -> torch.nn.Module:
    if kind == "through-plane":
        torch.manual_seed(0)
        model = ThroughPlaneNet(features=4, num_res_blocks=1)
        torch.nn.init.normal_(model.tail.conv.weight, std=1e-2)  # not the identity: the body counts
        return model.eval()
    return load_model(tiny_checkpoint)[0]


EXPORTS = [("in-plane", "torchscript"), ("through-plane", "torchscript"), ("through-plane", "onnx"),
           # torch.export traces the in-plane graph (both upsamplers) for ~12 s on two cores
           pytest.param("in-plane", "onnx", marks=pytest.mark.slow)]


@pytest.mark.parametrize(("kind", "fmt"), EXPORTS)
def test_export_matches_pytorch_on_real_slices_of_any_size(tmp_path, fmt, kind, tiny_checkpoint):
    """Checked on four slices of the sample T1 (both degradation codes in-plane), then run again
    on a batch and plane size the export never saw."""
    model = _tiny(kind, tiny_checkpoint)
    inputs, source = check_inputs(model, MR_NIFTI)
    check = export_model(model, tmp_path / f"model.{fmt}", fmt, inputs, source)
    assert check.max_difference <= TOLERANCE and check.slices == 4 and check.source == str(MR_NIFTI)
    other = (inputs[0][:3, :, 10:70, 20:61], inputs[1][:3])
    with torch.inference_mode():
        expected = model(*other)
    answer = run_exported(tmp_path / f"model.{fmt}", fmt, other)
    assert answer.shape == expected.shape
    torch.testing.assert_close(answer, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_shipped_x2_model_exports_within_tolerance(tmp_path, fmt):
    result = runner.invoke(app, ["export", str(tmp_path / "x2.model"), "--format", fmt, "--check-on", str(MR_NIFTI)])
    assert result.exit_code == 0, result.output
    assert "matches PyTorch on 4 slices" in result.output


def test_cli_export_reports_the_check(tmp_path, tiny_checkpoint):
    result = runner.invoke(app, ["export", str(tmp_path / "tiny.ts"), "--weights", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert "torchscript, in-plane x2 model" in result.output and "slices of phantom" in result.output
    assert isinstance(torch.jit.load(tmp_path / "tiny.ts"), torch.jit.ScriptModule)


BAD_EXPORTS = [
    (["--format", "tflite"], r"--format must be auto or one of torchscript, onnx, not 'tflite'"),
    (["--format", "onnx"], r"out.ts: the name says torchscript but --format is onnx"),
    (["--through-plane", "--scale", "4"], r"drop --scale with --through-plane"),
    (["--scale", "3"], r"no shipped weights for scale 3"),
    (["--check-on", "missing.nii.gz"], r"missing.nii.gz"),
]


@pytest.mark.parametrize(("options", "message"), BAD_EXPORTS)
def test_cli_refuses_bad_exports_in_one_line(tmp_path, options, message):
    result = runner.invoke(app, ["export", str(tmp_path / "out.ts"), *options])
    assert result.exit_code == 1
    assert result.output.count("error:") == 1
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "out.ts").exists()


def test_the_format_follows_the_name_and_a_name_that_tells_none_is_refused(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "model.bin")])
    assert result.exit_code == 1 and "ends with neither .ts nor .onnx; pass --format" in result.output
    assert not (tmp_path / "model.bin").exists()
    result = runner.invoke(app, ["export", str(tmp_path / "model.onnx"), "--format", "torchscript"])
    assert result.exit_code == 1 and "the name says onnx but --format is torchscript" in result.output


def test_existing_output_is_kept_without_overwrite(tmp_path, tiny_checkpoint):
    (tmp_path / "out.ts").write_text("keep")
    result = runner.invoke(app, ["export", str(tmp_path / "out.ts"), "--weights", str(tiny_checkpoint)])
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.output
    assert (tmp_path / "out.ts").read_text() == "keep"


def test_an_export_outside_tolerance_is_an_error_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("medsr.export.TOLERANCE", -1.0)
    model = SRResNet(scale=2, features=4, num_res_blocks=1).eval()
    inputs, source = check_inputs(model)
    with pytest.raises(ExportError, match=r"differs from the PyTorch model by up to .* on 4 slices of phantom"):
        export_model(model, tmp_path / "model.ts", "torchscript", inputs, source)
    assert list(tmp_path.iterdir()) == []
