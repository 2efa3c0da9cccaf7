"""medsr export-bundle: a MONAI bundle that MONAI's own tools accept and that writes what medsr enhance writes."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out
from monai.bundle import run as monai_bundle_run
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from typer.testing import CliRunner

import medsr
from medsr import __version__
from medsr.cli import app
from medsr.export import TOLERANCE, check_inputs

from conftest import MR_NIFTI

runner = CliRunner()
SCHEMA = Path(__file__).parent / "data" / "bundle_meta_schema.json"


@pytest.fixture(scope="module")
def x2_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundles") / "medsr_x2"
    result = runner.invoke(app, ["export-bundle", str(root)])
    assert result.exit_code == 0, result.output
    return root


def _files(root: Path) -> tuple[str, str]:
    return str(root / "configs" / "metadata.json"), str(root / "configs" / "inference.json")


def _ckpt_exported(root: Path, path: Path) -> torch.jit.ScriptModule:
    """What MONAI's ckpt_export makes of the bundle's models/model.pt (traced on the image alone), loaded."""
    meta, config = _files(root)
    ckpt_export(net_id="network_def", filepath=str(path), ckpt_file=str(root / "models" / "model.pt"),
                meta_file=meta, config_file=config, bundle_root=str(root), use_trace=True,
                input_shape=[1, 1, 16, 16])
    return torch.jit.load(path)


def _network(root: Path) -> torch.nn.Module:
    meta, config = _files(root)
    parser = ConfigParser()
    parser.read_config(config)
    parser.read_meta(meta)
    parser["bundle_root"] = str(root)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    return network.eval()


def declared_distributions(metadata_file: Path) -> set[str]:
    """The distributions a bundle's metadata declares: MONAI, PyTorch, NumPy and its packages."""
    declared = json.loads(metadata_file.read_text())
    packages = declared.get("required_packages_version", declared.get("optional_packages_version", {}))
    return {"monai", "torch", "numpy", *packages}


def requirement_closure(names) -> set[str]:
    """``names`` and every distribution they require, by their installed metadata; an extra
    counts only where a requirement asks for it."""
    extras_of: dict[str, set[str]] = {}
    wanted = [Requirement(name) for name in names]
    while wanted:
        requirement = wanted.pop()
        name = canonicalize_name(requirement.name)
        if name in extras_of and set(requirement.extras) <= extras_of[name]:
            continue
        extras = extras_of[name] = extras_of.get(name, set()) | set(requirement.extras)
        for line in metadata.requires(name) or []:
            needed = Requirement(line)
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra}) for extra in extras or {""}):
                wanted.append(needed)
    return set(extras_of)


def fresh_environment(root: Path, distributions) -> Path:
    """A new virtual environment at ``root`` whose site-packages holds exactly ``distributions``,
    each one's own files linked from this environment (no network); medsr, installed editable,
    is linked from the source being tested. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for name in distributions:
        installed = metadata.distribution(name)
        for file in installed.files or []:
            source, target = Path(installed.locate_file(file)), site / file
            # outside site-packages (console scripts), the editable install's path hook, or medsr's
            # own sources (some installers list them; the package is linked whole below)
            if (".." in file.parts or file.name.startswith("__editable__") or not source.exists()
                    or file.parts[0] == "medsr"):
                continue
            if not os.path.lexists(target):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(source)
    (site / "medsr").symlink_to(Path(medsr.__file__).parent)
    return python


def isolated(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the PYTHON* variables (PYTHONPATH would reach past the fresh site-packages)."""
    return {key: value for key, value in env.items() if not key.startswith("PYTHON")}


@pytest.fixture(scope="module")
def bundle_python(tmp_path_factory, x2_bundle) -> Path:
    """A python that has what the x2 bundle's metadata declares, their requirements, and nothing else."""
    distributions = requirement_closure(declared_distributions(x2_bundle / "configs" / "metadata.json"))
    return fresh_environment(tmp_path_factory.mktemp("fresh") / "venv", distributions)


@pytest.mark.slow
def test_fresh_environment_holds_only_what_the_metadata_declares(tmp_path, bundle_python):
    """The environment the bundle runs in below proves what its metadata declares: medsr comes
    from the source tested, and what is not declared (nor required by what is) does not import:
    medsr's dev and export extras, nor the test runner."""
    probe = ("import importlib.util, medsr; print(medsr.__file__); "
             "print(*[m for m in ('hypothesis', 'pytest', 'onnx', 'SimpleITK', 'highdicom') "
             "if importlib.util.find_spec(m)])")
    # run outside the checkout: python puts its working folder first on sys.path
    done = subprocess.run([bundle_python, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env=isolated(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    source, importable = done.stdout.splitlines()
    assert Path(source).resolve() == Path(medsr.__file__).resolve()
    assert importable == ""


def test_layout_and_metadata_pass_the_schema(tmp_path, x2_bundle):
    expected = {"configs/metadata.json", "configs/inference.json", "configs/logging.conf", "models/model.pt",
                "models/model.ts", "docs/README.md", "LICENSE"}
    assert {str(p.relative_to(x2_bundle)) for p in x2_bundle.rglob("*") if p.is_file()} == expected
    shutil.copy(SCHEMA, tmp_path / "schema.json")  # an existing schema file is used as it is: no download
    verify_metadata(meta_file=_files(x2_bundle)[0], filepath=str(tmp_path / "schema.json"))
    metadata = json.loads((x2_bundle / "configs" / "metadata.json").read_text())
    assert metadata["version"] == __version__ and __version__ in metadata["changelog"]
    assert metadata["required_packages_version"]["medsr"] == __version__
    readme = (x2_bundle / "docs" / "README.md").read_text()
    assert "448,234 parameters" in readme and "python -m monai.bundle run" in readme  # the model card's numbers
    assert "Apache License, Version 2.0" in (x2_bundle / "LICENSE").read_text()


def test_metadata_missing_a_mandatory_key_fails_the_schema(tmp_path, x2_bundle):
    metadata = json.loads((x2_bundle / "configs" / "metadata.json").read_text())
    del metadata["copyright"]
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    shutil.copy(SCHEMA, tmp_path / "schema.json")
    with pytest.raises(ValueError, match="copyright"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(tmp_path / "schema.json"))


@pytest.mark.parametrize(("n", "expected"), [(1, (1, 1, 16, 16)), (3, (1, 1, 48, 48))])
def test_network_in_and_out(x2_bundle, n, expected):
    meta, config = _files(x2_bundle)
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, device="cpu", n=n,
                      bundle_root=str(x2_bundle))
    with torch.inference_mode():  # and the shape itself: x2 on both sides, one channel
        assert tuple(_network(x2_bundle)(torch.rand(1, 1, 8 * n, 8 * n)).shape) == expected


def test_model_ts_and_ckpt_export_reproduce_model_pt(tmp_path, x2_bundle):
    """models/model.ts (both inputs) and what MONAI's ckpt_export makes of models/model.pt (the
    image alone: the bicubic grid) load and answer as the network does, on real slices."""
    network = _network(x2_bundle)
    (images, codes), _ = check_inputs(network, MR_NIFTI)
    images, codes = images[1:3, :, 60:124, 40:104], codes[1:3]  # 64x64 of two slices: kspace, then bicubic
    with torch.inference_mode():
        expected, expected_bicubic = network(images, codes), network(images)
    shipped = torch.jit.load(x2_bundle / "models" / "model.ts")
    torch.testing.assert_close(shipped(images, codes), expected, atol=TOLERANCE, rtol=0)
    exported = _ckpt_exported(x2_bundle, tmp_path / "exported.ts")
    torch.testing.assert_close(exported(images), expected_bicubic, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("how", ["monai.bundle.run",
                                 pytest.param("python -m monai.bundle run", marks=pytest.mark.slow)])
def test_bundle_run_writes_what_medsr_enhance_writes(request, tmp_path, x2_bundle, how):
    """The bundle run as zoo bundles run, dataset_dir and output_dir given as overrides, on a
    16-slice crop of the sample T1: the voxels and affine medsr enhance writes (both told
    bicubic, the bundle's default; both grids are checked in test_monai_transforms). The function
    the command calls, in this process; and the command itself, in a fresh environment holding
    only what the metadata declares (bundle_python), which costs 7 s more to start (slow)."""
    (tmp_path / "scans").mkdir()
    nib.save(nib.load(MR_NIFTI).slicer[72:88, 68:164, 32:128], tmp_path / "scans" / "t1.nii.gz")
    meta, config = _files(x2_bundle)
    overrides = {"bundle_root": str(x2_bundle), "dataset_dir": str(tmp_path / "scans"),
                 "output_dir": str(tmp_path / "out"), "inferer#degradation": "bicubic"}
    if how == "monai.bundle.run":
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        try:
            monai_bundle_run(config_file=config, meta_file=meta, **overrides)
        finally:  # the bundle's logging.conf sets up the root logger: give later tests theirs back
            root.handlers[:] = handlers
            root.setLevel(level)
    else:
        python = request.getfixturevalue("bundle_python")
        command = [python, "-m", "monai.bundle", "run", "--config_file", config, "--meta_file", meta,
                   *[item for key, value in overrides.items() for item in (f"--{key}", value)]]
        done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                              env={**isolated(os.environ), "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
    result = runner.invoke(app, ["enhance", str(tmp_path / "scans" / "t1.nii.gz"), "-o", str(tmp_path / "cli.nii.gz"),
                                 "--degradation", "bicubic"])
    assert result.exit_code == 0, result.output
    bundle, cli = nib.load(tmp_path / "out" / "t1_x2.nii.gz"), nib.load(tmp_path / "cli.nii.gz")
    assert bundle.shape == cli.shape == (16, 192, 192)
    assert bundle.get_data_dtype() == cli.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(bundle.dataobj), np.asarray(cli.dataobj))
    np.testing.assert_allclose(bundle.affine, cli.affine, atol=1e-6)
    for field in ("descrip", "qform_code", "sform_code", "xyzt_units", "cal_min", "cal_max"):
        assert bundle.header[field] == cli.header[field], field
    assert bundle.header["descrip"].item().startswith(b"medsr x2 bicubic")


@pytest.fixture(scope="module")
def through_plane_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundles") / "thin"
    result = runner.invoke(app, ["export-bundle", str(root), "--through-plane"])
    assert result.exit_code == 0, result.output
    return root


def test_through_plane_bundle(tmp_path, through_plane_bundle):
    """Valid metadata, and network_def runs as MONAI's tools call it: with the factor, and without."""
    shutil.copy(SCHEMA, tmp_path / "schema.json")
    meta, config = _files(through_plane_bundle)
    verify_metadata(meta_file=meta, filepath=str(tmp_path / "schema.json"))
    for extra in ({"factor": torch.tensor([3.0])}, None):
        verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, device="cpu", n=2,
                          bundle_root=str(through_plane_bundle), extra_forward_args=extra)
    assert json.loads(Path(config).read_text())["inferer"]["through_plane"] is True


def test_through_plane_ckpt_export_reproduces_model_pt(tmp_path, through_plane_bundle):
    """What MONAI's ckpt_export makes of the through-plane models/model.pt (traced on the image
    alone, so the factor fixed at default_factor, 4) loads and answers as the network told
    factor 4 does, on real planes across the sample T1's slices, to TOLERANCE (1e-4 of the
    intensity window); and models/model.ts (both inputs) as it does for another factor."""
    network = _network(through_plane_bundle)
    (planes, fours), _ = check_inputs(network, MR_NIFTI)  # 4 planes holding the slice axis, factor 4
    planes = planes[:2, :, 40:104, 40:104]
    threes = torch.full((2,), 3.0)
    with torch.inference_mode():
        expected, expected_three = network(planes, fours[:2]), network(planes, threes)
    assert float((expected - expected_three).abs().max()) > 100 * TOLERANCE  # the factor fixed is one that shows
    exported = _ckpt_exported(through_plane_bundle, tmp_path / "exported.ts")
    torch.testing.assert_close(exported(planes), expected, atol=TOLERANCE, rtol=0)
    shipped = torch.jit.load(through_plane_bundle / "models" / "model.ts")
    torch.testing.assert_close(shipped(planes, threes), expected_three, atol=TOLERANCE, rtol=0)


BAD_BUNDLES = [
    (["--through-plane", "--scale", "2"], r"drop --scale with --through-plane"),
    (["--scale", "3"], r"no shipped weights for scale 3"),
]


@pytest.mark.parametrize(("options", "message"), BAD_BUNDLES)
def test_bad_options_are_one_error_line(tmp_path, options, message):
    result = runner.invoke(app, ["export-bundle", str(tmp_path / "bundle"), *options])
    assert result.exit_code == 1 and result.output.count("error:") == 1
    assert re.search(message, result.output), result.output
    assert list(tmp_path.iterdir()) == []


def test_an_existing_bundle_is_kept_without_overwrite(tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "keep.txt").write_text("keep")
    result = runner.invoke(app, ["export-bundle", str(tmp_path / "bundle")])
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.output
    assert (tmp_path / "bundle" / "keep.txt").read_text() == "keep"
