"""Shared fixtures: the real scans shipped in sample_scans/ and small checkpoints."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pydicom.data
import pytest
import torch

from medsr.checkpoint import build_model, load_model, save_checkpoint
from medsr.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_scans"
MR_SERIES = SAMPLES / "mr_pd_oblique_dicom"
MR_MULTIFRAME = SAMPLES / "mr_pd_oblique_multiframe" / "mr_pd_oblique_multiframe.dcm"
CT_SERIES = SAMPLES / "ct_chest_3slice_dicom"
MR_NIFTI = SAMPLES / "mr_t1_nifti" / "MR.nii.gz"
# The project's shared scan collection, when this checkout sits beside it (CI and developers).
SHARED_SCANS = ROOT.parent / "shared" / "scans"


NEEDS_DCIODVFY = pytest.mark.skipif(shutil.which("dciodvfy") is None,
                                    reason="dciodvfy (dicom3tools) is not installed")


def new_dciodvfy_errors(source: Path, derived: Path) -> set[str]:
    """dciodvfy errors in ``derived`` that ``source`` does not have; errors naming the
    source's own invalid UIDs (which the derived object must reference) do not count."""

    def errors(path: Path) -> set[str]:
        output = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        return {line.strip() for line in (output.stdout + output.stderr).splitlines()
                if line.startswith("Error")}

    before, after = errors(source), errors(derived)
    inherited_uids = set(re.findall(r'"([0-9.]+)"', " ".join(before)))
    return {e for e in after - before if not any(uid in e for uid in inherited_uids)}


def derivation_description(dataset: pydicom.Dataset) -> str:
    """A derived image's DerivationDescription: on top for single-frame images, in the first
    frame's Derivation Image macro for enhanced multi-frame ones (their IODs have it nowhere
    else)."""
    if "PerFrameFunctionalGroupsSequence" in dataset:
        return dataset.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].DerivationDescription
    return dataset.DerivationDescription


def pydicom_test_file(name: str) -> Path:
    """A file from pydicom's bundled test data (no network)."""
    return Path(pydicom.data.get_testdata_file(name, download=False))


@pytest.fixture
def sync_events(monkeypatch) -> list[tuple[str, str]]:
    """Every ``os.fsync`` (with the synced path) and ``os.replace`` (with its target), in order;
    both still do their work."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("replace", str(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.fixture
def ct_small() -> Path:
    return pydicom_test_file("CT_small.dcm")


@pytest.fixture
def shared_scans() -> Path:
    if not SHARED_SCANS.is_dir():
        pytest.skip("the shared scan collection is not beside this checkout")
    return SHARED_SCANS


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """A small random SRResNet x2 checkpoint (fast on CPU)."""
    return write_tiny_checkpoint(tmp_path / "tiny.pt")


def write_tiny_checkpoint(path: Path) -> Path:
    """A small random SRResNet x2 checkpoint, near the classical upsampler, at ``path``."""
    torch.manual_seed(0)
    config = load_config(None, ["model.features=8", "model.num_res_blocks=2"])
    model = build_model(config)
    torch.nn.init.normal_(model.tail.conv.weight, std=1e-5)  # near the classical upsampler
    save_checkpoint(path, model, config, epoch=1, iteration=1)
    return path


@pytest.fixture(scope="session")
def session_tiny_checkpoint(tmp_path_factory) -> Path:
    """The small random SRResNet x2 checkpoint of :func:`tiny_checkpoint`, made once per run
    for module-scoped fixtures."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt")


def grid_found(cli_output: str) -> str:
    """The grid ``medsr enhance`` reported (``degradation: kspace ...`` on stderr)."""
    import re

    found = re.search(r"degradation: (bicubic|kspace)", cli_output)
    assert found, cli_output
    return found.group(1)


@pytest.fixture(scope="module")
def unsure_model(session_tiny_checkpoint):
    """The tiny SRResNet with a tail loud enough that the eight passes of the self-ensemble
    differ (tests of the ensemble and of the detail map)."""
    model, _ = load_model(session_tiny_checkpoint)
    torch.manual_seed(1)
    torch.nn.init.normal_(model.tail.conv.weight, std=0.05)
    return model.eval()


def degraded_series(source: Path, folder: Path, degradation: str, scale: int = 2) -> Path:
    """A real DICOM series made coarser in-plane by protocol v1, written as a new series: the
    pixels as a scanner (kspace) or a resampling export (bicubic) would have left them, on
    that degradation's grid (pixel spacing x ``scale``; for ``bicubic`` the same physical
    extent, the first pixel's centre moved to the centre of the block of high-res pixels it
    covers; for ``kspace`` the first pixel's centre kept, as a scanner's zero-filled
    reconstruction places it: :func:`medsr.geometry.degraded_affine`)."""
    import numpy as np

    from medsr.geometry import LPS_TO_RAS
    from medsr.reading import read_scan
    from medsr.transforms import degrade_volume

    folder.mkdir()
    scan = read_scan(source)
    low_res, _, low_res_affine = degrade_volume(scan.array, scan.affine, 2, scale, degradation)
    # the in-plane move of every slice's first pixel (the slice axis is untouched), in LPS
    shift = LPS_TO_RAS[:3, :3] @ (low_res_affine[:3, 3] - scan.affine[:3, 3])
    files = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID: path for path in source.glob("*.dcm")}
    series_uid = pydicom.uid.generate_uid()
    for k, header in enumerate(scan.dicom_headers):
        dataset = pydicom.dcmread(files[header.SOPInstanceUID])
        stored = np.uint16 if dataset.PixelRepresentation == 0 else np.int16
        # original units back to stored values (CT: HU through the inverse of the rescale)
        slope, intercept = float(dataset.get("RescaleSlope", 1)), float(dataset.get("RescaleIntercept", 0))
        limits = np.iinfo(stored)
        plane = np.clip(np.rint((low_res[:, :, k].T - intercept) / slope), limits.min, limits.max).astype(stored)
        for tag in [t for t in dataset.keys() if t.group == 0x0000]:
            del dataset[tag]  # the sample carries a stray command set
        row_step, column_step = (float(v) for v in dataset.PixelSpacing)
        as_ds = pydicom.valuerep.format_number_as_ds  # DS holds at most 16 characters
        position = np.asarray(dataset.ImagePositionPatient, float) + shift
        dataset.ImagePositionPatient = [as_ds(float(v)) for v in position]
        dataset.SeriesInstanceUID, dataset.SOPInstanceUID = series_uid, pydicom.uid.generate_uid()
        dataset.PixelSpacing = [as_ds(row_step * scale), as_ds(column_step * scale)]
        dataset.set_pixel_data(plane, dataset.PhotometricInterpretation, int(dataset.BitsStored))
        dataset.save_as(folder / f"{k:03d}.dcm")
    return folder
