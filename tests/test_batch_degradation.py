"""Batch degradations on the training device (medsr.batch_degradation) against the NumPy ones,
on real slices; the device route of training against the CPU route, item for item."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.ndimage import gaussian_filter
from torch.utils.data import default_collate
from typer.testing import CliRunner

from medsr import batch_degradation as bd
from medsr.cli import app
from medsr.config import load_config
from medsr.data import HighResPatches, PatchPairDataset, discover_scans, load_cached_scan
from medsr.model import DEGRADATION_CODES
from medsr.reading import read_scan
from medsr.training import DeviceDegradation, Processes, degrades_on_device, prepare_batch, training_loader
from medsr.transforms import (
    GRID_OF,
    RandomDegradePair,
    crop_to_multiple,
    degrade_area,
    degrade_bicubic,
    degrade_gaussian,
    degrade_kspace,
    degrade_lanczos,
    robust_window,
)

from conftest import CT_SERIES, MR_NIFTI, MR_SERIES, SAMPLES

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]
EVERY_FAMILY = {name: 1 / len(bd.FAMILIES) for name in bd.FAMILIES}


@pytest.fixture(scope="module")
def real_slices() -> list[np.ndarray]:
    """A normalised middle slice of the MR series (256 x 256), the chest CT (512 x 512, its
    centre 320 x 384 kept for speed) and the T1 NIfTI (232 x 160: not square)."""
    slices = []
    for path in (MR_SERIES, CT_SERIES, MR_NIFTI):
        scan = read_scan(path)
        volume = np.moveaxis(robust_window(scan.array).forward(scan.array), scan.slice_axis, 0)
        slices.append(volume[len(volume) // 2].astype(np.float32))
    slices[1] = slices[1][96:416, 64:448]
    return slices


def _batch(image: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(image)[None, None].to(device)


# the torch operation and its NumPy counterpart (protocol or stress degradation), per slice
OPERATIONS = [
    ("bicubic", lambda x, s: bd.bicubic_downsample(x, s), degrade_bicubic),
    ("kspace", lambda x, s: bd.kspace_truncate(x, s), degrade_kspace),
    ("area", lambda x, s: bd.area_average(x, s), degrade_area),
    ("lanczos", lambda x, s: bd.lanczos_downsample(x, s), degrade_lanczos),
    ("gaussian", lambda x, s: bd.gaussian_decimate(x, s, np.array([1.17 * s])),
     lambda x, s: degrade_gaussian(x, s, 1.17 * s)),
    ("blur", lambda x, s: bd.gaussian_blur(x, np.array([0.77])),
     lambda x, s: gaussian_filter(x.astype(np.float64), 0.77, mode="reflect")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("name, ours, reference", OPERATIONS, ids=[o[0] for o in OPERATIONS])
def test_each_degradation_equals_its_numpy_counterpart_on_real_slices(real_slices, name, ours, reference,
                                                                      scale, device):
    """Borders included: the matrices carry each library's own border rule."""
    for image in real_slices:
        image = crop_to_multiple(image, scale)
        result = ours(_batch(image, device), scale)
        assert result.dtype == torch.float64 and result.device.type == device
        np.testing.assert_allclose(result[0, 0].cpu().numpy(), reference(image, scale), rtol=0, atol=1e-5,
                                   err_msg=f"{name} x{scale} on {image.shape}")


def test_torch_antialiased_bicubic_is_another_kernel(real_slices):
    """What the module docstring states: ``F.interpolate(mode="bicubic", antialias=True)`` is
    some 40-46 dB from scikit-image's anti-aliased cubic spline on the MR slice (a Gaussian
    pre-blur plus plain bicubic 53-60 dB), while the matrices agree to float rounding."""
    image = crop_to_multiple(real_slices[0], 2)
    reference = degrade_bicubic(image, 2)

    def psnr(estimate: torch.Tensor) -> float:
        error = np.mean((estimate[0, 0].numpy() - reference) ** 2)
        return float(10 * np.log10(np.ptp(image) ** 2 / error))

    batch = _batch(image, "cpu").double()
    antialiased = psnr(F.interpolate(batch, scale_factor=0.5, mode="bicubic", antialias=True))
    blurred = bd.gaussian_blur(batch, np.array([0.5]))  # sigma (s - 1) / 2, SciPy's reflect borders
    preblurred = psnr(F.interpolate(blurred, scale_factor=0.5, mode="bicubic", antialias=False))
    assert 38 < antialiased < 48 and 50 < preblurred < 62
    assert psnr(bd.bicubic_downsample(batch, 2)) > 120


def test_fold_indices_extend_like_numpy_pad():
    signal = np.arange(5)
    positions = np.arange(-12, 17)
    for mode, numpy_mode in (("symmetric", "symmetric"), ("mirror", "reflect")):
        padded = np.pad(signal, (12, 12), mode=numpy_mode)
        np.testing.assert_array_equal(signal[bd.fold_indices(positions, 5, mode)], padded)


def test_every_family_has_its_grid():
    assert set(bd.FAMILIES) == set(RandomDegradePair.NAMES) == set(bd.GRID_OF_FAMILY)
    assert {name: grid for name, grid in bd.GRID_OF_FAMILY.items() if name in GRID_OF} == GRID_OF
    assert bd.GRID_OF_FAMILY["blur_noise"] == "bicubic"  # a resampling, as RandomDegradePair says


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [2, 4])
def test_a_seed_gives_what_random_degrade_pair_gives(real_slices, scale, device):
    """Degradation, parameters, noise and grid: every family, item for item."""
    crops = [crop_to_multiple(real_slices[0][s:s + 96, s:s + 112], scale) for s in range(0, 140, 5)]
    pair = RandomDegradePair(scale, EVERY_FAMILY, noise_std_range=(0.0, 0.03))
    degrade = bd.RandomBatchDegradation(scale, EVERY_FAMILY, noise_std_range=(0.0, 0.03))
    seeds = [1000 + 7 * i for i in range(len(crops))]
    draws = default_collate([degrade.draw(seed, crop.shape) for seed, crop in zip(seeds, crops, strict=True)])
    high_res = torch.from_numpy(np.stack(crops))[:, None].to(device)
    low_res, codes = degrade(high_res, **draws)
    assert set(draws["family"].tolist()) == set(range(len(bd.FAMILIES)))  # all seven were drawn
    for item, (seed, crop) in enumerate(zip(seeds, crops, strict=True)):
        pair.set_random_state(seed=seed)
        expected, _, grid = pair(crop)
        np.testing.assert_allclose(low_res[item, 0].cpu().numpy(), expected, rtol=0, atol=1e-5,
                                   err_msg=bd.FAMILIES[int(draws["family"][item])])
        assert int(codes[item]) == DEGRADATION_CODES[grid]
    assert low_res.dtype == torch.float32 and low_res.device.type == codes.device.type == device


def test_an_item_depends_on_its_seed_alone(real_slices):
    degrade = bd.RandomBatchDegradation(2, EVERY_FAMILY, noise_std_range=(0.0, 0.03))
    crops = torch.from_numpy(np.stack([real_slices[0][s:s + 64, s:s + 64] for s in range(0, 160, 10)]))[:, None]
    draws = [degrade.draw(seed, (64, 64)) for seed in range(len(crops))]
    low_res, codes = degrade(crops, **default_collate(draws))
    permutation = torch.randperm(len(crops), generator=torch.Generator().manual_seed(0))
    shuffled, shuffled_codes = degrade(crops[permutation], **default_collate([draws[i] for i in permutation]))
    torch.testing.assert_close(shuffled, low_res[permutation], rtol=0, atol=1e-6)
    assert torch.equal(shuffled_codes, codes[permutation])
    alone, _ = degrade(crops[5:6], **default_collate(draws[5:6]))
    torch.testing.assert_close(alone, low_res[5:6], rtol=0, atol=1e-6)


def test_draws_are_reproducible_and_follow_the_probabilities():
    config = load_config(SAMPLES.parent / "configs" / "srresnet_l1_x2.yaml")
    degrade = bd.RandomBatchDegradation(2, config.degradation.probabilities, noise_std_range=(0.0, 0.03))
    first, again = degrade.draw(11, (32, 32)), degrade.draw(11, (32, 32))
    assert all(torch.equal(first[key], again[key]) for key in first)
    families = np.array([int(degrade.draw(seed, (8, 8))["family"]) for seed in range(4000)])
    frequencies = np.bincount(families, minlength=len(bd.FAMILIES)) / len(families)
    expected = [config.degradation.probabilities[name] for name in bd.FAMILIES]
    np.testing.assert_allclose(frequencies, expected, atol=0.025)
    gaussian = degrade.draw(int(np.flatnonzero(families == bd.FAMILIES.index("gaussian"))[0]), (8, 8))
    assert 0.7 * 2 <= float(gaussian["fwhm"]) <= 1.3 * 2 and not gaussian["noise"].any()


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": 2.5, "probabilities": {"bicubic": 1.0}}, "scale must be an integer >= 2, not 2.5"),
    ({"scale": 2, "probabilities": {"bicubc": 1.0}}, "unknown degradations"),
    ({"scale": 2, "probabilities": {"bicubic": 0.5}}, "must be >= 0 and sum to 1"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bd.RandomBatchDegradation(**kwargs)


@pytest.mark.parametrize("shape, message", [
    ((4, 64, 64), r"must be \(B, 1, H, W\), not \(4, 64, 64\)"),
    ((2, 1, 64, 63), "multiples of scale"),
])
def test_bad_batches_are_refused(shape, message):
    degrade = bd.RandomBatchDegradation(2, {"bicubic": 1.0})
    draws = default_collate([degrade.draw(seed, (64, 64)) for seed in range(shape[0])])
    with pytest.raises(ValueError, match=message):
        degrade(torch.zeros(shape), **draws)


# ---------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def sample_cached_scans(tmp_path_factory) -> list:
    cache = tmp_path_factory.mktemp("cache")
    return [load_cached_scan(source, cache, 0.5, 99.5)
            for root in ("ct_chest_3slice_dicom", "mr_pd_oblique_dicom")
            for source in discover_scans(SAMPLES / root)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale, patch_size", [(2, 32), (4, 32)])
def test_device_route_batches_equal_the_cpu_route(sample_cached_scans, scale, patch_size, device):
    """Same crops, same degradations and noise, same margin cut: prepare_batch's outputs."""
    cpu_route = PatchPairDataset(sample_cached_scans, patch_size, scale, 24,
                                 RandomDegradePair(scale, EVERY_FAMILY), ct_weight=3.0, seed=4)
    device_route = HighResPatches(sample_cached_scans, patch_size, scale, 24,
                                  bd.RandomBatchDegradation(scale, EVERY_FAMILY), ct_weight=3.0, seed=4)
    cpu_route.set_epoch(2)
    device_route.set_epoch(2)
    expected = prepare_batch(default_collate([cpu_route[i] for i in range(24)]), torch.device("cpu"))
    ours = DeviceDegradation(device_route)(default_collate([device_route[i] for i in range(24)]),
                                           torch.device(device))
    torch.testing.assert_close(ours[0].cpu(), expected[0], rtol=0, atol=1e-5)
    assert torch.equal(ours[1].cpu(), expected[1])
    assert torch.equal(ours[3]["degradation"].cpu(), expected[3]["degradation"])
    assert ours[0].is_contiguous(memory_format=torch.channels_last)


def test_loader_workers_see_each_epoch(sample_cached_scans):
    """Persistent worker processes hold copies of the dataset; the epoch reaches them with the
    index, so their batches equal the training process's own."""
    patches = HighResPatches(sample_cached_scans, 16, 2, 8, bd.RandomBatchDegradation(2, EVERY_FAMILY), seed=1)
    batches = {}
    for workers in (0, 2):
        loader = training_loader(patches, 4, Processes(), torch.device("cpu"), workers=workers)
        batches[workers] = []
        for epoch in (1, 2):
            patches.set_epoch(epoch)
            batches[workers] += [batch["label"] for batch in loader]
    assert len(batches[2]) == 4 and not torch.equal(batches[0][0], batches[0][2])  # epochs differ
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2], strict=True))


def test_degrade_on_resolves_auto_to_the_device_on_cuda():
    auto, cpu = load_config(None), load_config(None, ["degrade_on=cpu"])
    assert degrades_on_device(auto, torch.device("cuda")) and not degrades_on_device(auto, torch.device("cpu"))
    assert not degrades_on_device(cpu, torch.device("cuda"))
    assert degrades_on_device(load_config(None, ["degrade_on=device"]), torch.device("cpu"))
    assert not degrades_on_device(load_config(None, ["task=through_plane"]), torch.device("cuda"))


def test_two_iteration_training_degrading_on_the_device(tmp_path, monkeypatch):
    monkeypatch.chdir(SAMPLES.parent)
    out = tmp_path / "run"
    arguments = ["train", "--config", "configs/srresnet_l1_x2.yaml", "--out", str(out),
                 "--set", f"data_root={SAMPLES}", "--set", f"cache_dir={tmp_path / 'cache'}",
                 "--set", "train_scans=[ct_chest_3slice_dicom, mr_t1_nifti]",
                 "--set", "val_scans=[mr_pd_oblique_dicom]", "--set", "model.features=8",
                 "--set", "model.num_res_blocks=1", "--set", "batch_size=4", "--set", "patch_size=32",
                 "--set", "iterations_per_epoch=2", "--set", "epochs=1", "--set", "warmup_iterations=1",
                 "--set", "degrade_on=device"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["degrade_on"] == "device"
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert len(rows) == 1 and np.isfinite(float(rows[0]["train_loss"])) and float(rows[0]["val_psnr"]) > 20
