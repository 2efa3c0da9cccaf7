"""Detail map (medsr.detail_map, ``--detail-map``): a second volume on the output's grid and in
its format (NIfTI; a DICOM series of the same study with its own UID and description), zero
where the flat-background rule keeps the input, refused where it cannot be honest."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from typer.testing import CliRunner

from medsr.cli import app
from medsr.detail_map import MEASURE, MEASURES, detail_map, map_quality, noise_floor
from medsr.engine import enhance_volume
from medsr.enhance import enhance_file
from medsr.errors import MedsrError
from medsr.metrics import trim_border
from medsr.reading import read_scan

from conftest import CT_SERIES, MR_NIFTI, MR_SERIES, degraded_series

runner = CliRunner()


def test_every_measure_is_non_negative_and_shaped_like_the_output():
    torch.manual_seed(0)
    passes, classical = torch.rand(8, 2, 6, 4), torch.rand(2, 6, 4)
    for measure in MEASURES:
        values = detail_map(passes, classical, measure)
        assert values.shape == (2, 6, 4) and bool((values >= 0).all())
    # eight equal passes: nothing to be unsure about, so only the noise floor of the signal is left
    equal = passes[:1].expand(8, -1, -1, -1)
    assert float(detail_map(equal, classical, "spread and structure").max()) == 0
    torch.testing.assert_close(detail_map(equal, classical), noise_floor(passes[0]))
    with pytest.raises(ValueError, match="measure must be one of .*, not 'loud'"):
        detail_map(passes, classical, "loud")
    assert MEASURE in MEASURES


def test_shipped_map_is_in_the_output_units_and_quiet_without_structure():
    torch.manual_seed(0)
    passes = torch.rand(8, 2, 12, 10)
    # both factors are intensity differences: the map scales with the output's units
    torch.testing.assert_close(detail_map(3 * passes, 3 * passes[0]), 3 * detail_map(passes, passes[0]))
    # the passes disagree everywhere, but on a flat image by a constant: no structure to get wrong
    flat = torch.ones(1, 2, 12, 10) + torch.linspace(-0.1, 0.1, 8)[:, None, None, None]
    assert float(detail_map(flat, flat[0]).max()) < 1e-3  # float rounding of the mean only
    # on the same disagreement, an edge is flagged (about 0.15) and the flat side is not
    edge = flat.clone()
    edge[..., 5:] += 1
    values = detail_map(edge, edge[0])
    assert float(values[..., 4:6].min()) > 0.1 and float(values[..., :2].max()) < 1e-3


def test_noise_floor_is_the_median_high_pass_of_the_signal_and_zero_off_it():
    rng = np.random.default_rng(0)
    image = np.zeros((1, 40, 40), dtype=np.float32)
    image[0, 10:30, 10:30] = 0.5 + rng.normal(0, 0.02, (20, 20))  # a noisy square on an empty background
    floor = noise_floor(torch.from_numpy(image))[0].numpy()
    assert floor[0, 0] == 0 and floor[20, 20] > 0  # off the signal nothing, on it the floor
    assert np.unique(floor[floor > 0]).size == 1  # one value per slice
    assert 0.005 < floor[20, 20] < 0.03  # of the order of the noise (0.02), not of the square's edge (0.5)
    # no signal at all: no floor
    assert float(noise_floor(torch.zeros(2, 8, 8)).max()) == 0


def test_map_flags_the_largest_errors_on_a_real_validation_slice(monkeypatch):
    """The shipped weights on a middle slice of the validation PD series (sample_scans), made
    coarser by protocol v1's k-space truncation: the map ranks the 5% largest errors of the
    ensemble output above the rest (AUROC 0.92 measured here, 0.89-0.92 on three slices and
    both degradations) and follows the error (Spearman 0.63) much better than the 3x3-mean
    spread shipped before it (0.38)."""
    import medsr.engine
    from medsr.checkpoint import default_weights, load_model
    from medsr.transforms import degrade_volume

    scan = read_scan(MR_SERIES)
    low_res, high_res, low_affine = degrade_volume(scan.array[:, :, 10:11].astype(np.float32), scan.affine, 2, 2,
                                                   "kspace")
    previous = []

    def both_maps(passes, classical):  # the shipped map goes on; the previous one is kept aside
        previous.append(detail_map(passes, classical, "smoothed spread"))
        return detail_map(passes, classical)

    monkeypatch.setattr(medsr.engine, "detail_map", both_maps)
    maps = []
    output = enhance_volume(low_res, low_affine, 2, load_model(default_weights(2))[0].eval(), "kspace",
                            precision="fp32", ensemble=True, consistency="off", detail_sink=maps.append).array
    error = np.abs(trim_border(output, 2, 2) - trim_border(high_res, 2, 2))
    shipped_map = np.concatenate(maps)
    shipped = map_quality(trim_border(np.moveaxis(shipped_map, 0, 2), 2, 2), error, trim_border(high_res, 2, 2))
    assert shipped["auroc"] > 0.85 and shipped["spearman"] > 0.5
    # within the anatomy it still finds the worst voxels, if less well (0.89 measured here)
    assert 0.7 < shipped["auroc_anatomy"] < shipped["auroc"]
    # the previous map as the engine would have written it: 0 where the background is kept
    previous_map = np.where(shipped_map == 0, 0, torch.cat(previous).numpy())
    before = map_quality(trim_border(np.moveaxis(previous_map, 0, 2), 2, 2), error)
    assert shipped["spearman"] > before["spearman"] + 0.1


def test_a_map_that_only_finds_the_anatomy_scores_chance_within_it():
    """A map that is 1 on the anatomy and 0 on the background flags the largest errors well over
    the whole image (they all lie on the anatomy) but no better than chance within it: what
    ``auroc_anatomy`` is there to show."""
    rng = np.random.default_rng(0)
    reference = np.zeros((64, 64))
    reference[16:48, 16:48] = 100.0
    error = np.where(reference > 0, rng.random(reference.shape), 0.0)
    quality = map_quality((reference > 0).astype(float), error, reference)
    assert quality["auroc"] > 0.8
    assert quality["auroc_anatomy"] == pytest.approx(0.5)
    # a map that knows where the error is, within the anatomy too
    assert map_quality(error, error, reference)["auroc_anatomy"] == pytest.approx(1.0)
    assert "auroc_anatomy" not in map_quality(error, error)


def test_engine_map_is_zero_where_the_background_is_kept(unsure_model):
    model = unsure_model
    rng = np.random.default_rng(0)
    volume = (rng.random((2, 24, 24)) * 100 + 20).astype(np.float32)
    volume[:, :, 12:] = 0  # a flat half, as a skull-stripped background
    maps = []
    enhanced = enhance_volume(volume, np.eye(4), 0, model.eval(), "bicubic", precision="fp32", consistency="off",
                              detail_sink=maps.append)
    detail = np.concatenate(maps)
    assert detail.shape == enhanced.array.shape == (2, 48, 48)
    # low-res columns 16.. hold 0 within 3 pixels on every side (image edge left out)
    assert np.all(detail[:, :, 32:] == 0) and np.all(enhanced.array[:, :, 32:] == 0)
    assert detail[:, 4:-4, 4:20].min() > 0


@pytest.fixture(scope="module")
def small_series(tmp_path_factory) -> dict[str, object]:
    """The sample CT (3 slices, PixelPaddingValue) and MR (20 slices, oblique) series made 4
    times coarser in-plane (128 x 128 and 64 x 64), so eight passes each stay fast."""
    folder = tmp_path_factory.mktemp("small_series")
    return {"ct": degraded_series(CT_SERIES, folder / "ct", "bicubic", 4),
            "mr": degraded_series(MR_SERIES, folder / "mr", "kspace", 4)}


@pytest.fixture(scope="module")
def nifti_outputs(tmp_path_factory, unsure_model, small_series):
    folder = tmp_path_factory.mktemp("nifti_map")
    result = enhance_file(small_series["ct"], folder / "ct.nii.gz", model=unsure_model,
                          degradation="bicubic", ensemble=True, detail_map=folder / "ct_map.nii.gz", device="cpu")
    return result, folder


def test_nifti_map_is_on_the_output_grid(nifti_outputs):
    result, folder = nifti_outputs
    output, detail = nib.load(folder / "ct.nii.gz"), nib.load(folder / "ct_map.nii.gz")
    assert result.ensemble and result.detail_map == folder / "ct_map.nii.gz"
    assert detail.shape == output.shape == result.volume.shape
    np.testing.assert_allclose(detail.affine, output.affine)
    assert detail.header.get_xyzt_units() == output.header.get_xyzt_units()
    values, enhanced = np.asarray(detail.dataobj), np.asarray(output.dataobj)
    padded = values < 0  # padding, where the output has it too (as the flat and padding rules say)
    assert np.all(values[padded] == enhanced[padded])
    image = values[~padded]
    assert np.isfinite(values).all() and image.min() >= 0 and image.max() > 0
    assert b"detail map" in detail.header["descrip"].tobytes()


@pytest.mark.parametrize("name", ["mr", "ct"])
def test_dicom_map_is_a_second_series_on_the_output_grid(tmp_path, unsure_model, small_series, name):
    grid = {"ct": "bicubic", "mr": "kspace"}[name]
    enhance_file(small_series[name], tmp_path / "sr", model=unsure_model, degradation=grid,
                 detail_map=tmp_path / "map", device="cpu")
    outputs = sorted((tmp_path / "sr").glob("*.dcm"))
    maps = sorted((tmp_path / "map").glob("*.dcm"))
    assert len(outputs) == len(maps) > 0
    for output_path, map_path in zip(outputs, maps, strict=True):
        output, detail = pydicom.dcmread(output_path), pydicom.dcmread(map_path)
        for keyword in ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient",
                        "StudyInstanceUID", "FrameOfReferenceUID", "PhotometricInterpretation",
                        "BitsAllocated", "PixelRepresentation"):
            assert detail.get(keyword) == output.get(keyword), keyword
        assert detail.SeriesInstanceUID != output.SeriesInstanceUID
        assert detail.SeriesDescription.endswith("medsr detail map x2")
        assert detail.SeriesNumber == output.SeriesNumber + 1
        assert detail.DerivationDescription.startswith("medsr detail map")
        assert list(detail.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    enhanced, detail = read_scan(tmp_path / "sr"), read_scan(tmp_path / "map")
    assert detail.array.shape == enhanced.array.shape
    np.testing.assert_allclose(detail.affine, enhanced.affine, atol=1e-4)
    padded = detail.array < 0
    np.testing.assert_allclose(detail.array[padded], enhanced.array[padded])
    assert np.isfinite(detail.array).all() and detail.array[~padded].max() > 0


def test_map_options_are_checked_before_the_work(tmp_path, unsure_model, session_tiny_checkpoint):
    with pytest.raises(MedsrError, match="the map is written in the output's format"):
        enhance_file(CT_SERIES, tmp_path / "ct.nii.gz", model=unsure_model,
                     detail_map=tmp_path / "map")
    with pytest.raises(MedsrError, match="is the output itself"):
        enhance_file(CT_SERIES, tmp_path / "ct.nii.gz", model=unsure_model,
                     detail_map=tmp_path / "ct.nii.gz")
    with pytest.raises(MedsrError, match="--detail-map is an in-plane choice"):
        enhance_file(CT_SERIES, tmp_path / "ct.nii.gz", through_plane=True, detail_map=tmp_path / "map.nii.gz",
                     weights=session_tiny_checkpoint)
    assert not list(tmp_path.iterdir())


def test_cli_writes_the_map(tmp_path, session_tiny_checkpoint, small_series):
    result = runner.invoke(app, ["enhance", str(small_series["mr"]), "-o", str(tmp_path / "ct.nii.gz"), "--ensemble",
                                 "--detail-map", str(tmp_path / "ct_map.nii.gz"), "--degradation", "kspace",
                                 "--weights", str(session_tiny_checkpoint), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "detail map" in result.output
    assert nib.load(tmp_path / "ct_map.nii.gz").shape == nib.load(tmp_path / "ct.nii.gz").shape


def test_evaluate_scores_the_ensemble_and_its_map(tmp_path, session_tiny_checkpoint):
    """``medsr evaluate --ensemble``: the ensemble is scored beside the plain run, the paired
    bootstrap compares them, the map's Spearman and AUROC are printed and kept in
    metrics.json, and the report has the input | output | error | map figure."""
    import json

    scan = read_scan(MR_NIFTI)
    middle = np.array(scan.array.shape) // 2
    crop = scan.array[middle[0] - 32:middle[0] + 32, middle[1] - 32:middle[1] + 32, middle[2] - 1:middle[2] + 2]
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(crop.astype(np.float32), np.diag([1.0, 1.0, 3.0, 1.0])), small)
    result = runner.invoke(app, ["evaluate", str(small), "--weights", str(session_tiny_checkpoint),
                                 "--degradation", "kspace", "--ensemble", "--bootstrap", "50",
                                 "--report", str(tmp_path / "report"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "tiny ensemble - tiny PSNR" in result.output
    assert "detail map small.nii.gz kspace: tiny Spearman with |error|" in result.output
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    quality = metrics["scans"][0]["detail_map"]["tiny"]
    assert -1 <= quality["spearman"] <= 1 and 0 <= quality["auroc"] <= 1 and 0 <= quality["auroc_anatomy"] <= 1
    assert "within the anatomy" in result.output
    assert "tiny ensemble" in metrics["scans"][0]["scores"]
    assert (tmp_path / "report" / "small_kspace_tiny_detail_map.png").stat().st_size > 0


def test_dicom_map_keeps_monochrome1_padding_and_the_stored_type(tmp_path, unsure_model):
    """The map series follows the enhanced one: MONOCHROME1 stays (values never inverted),
    padded pixels are stored as the source's PixelPaddingValue, the stored type and bits are
    the source's, and the display window is the map's own (0 to a tenth of the window)."""
    from test_viewer_semantics import monochrome1_ct, padded_ct

    for name, make in (("m1", monochrome1_ct), ("padded", padded_ct)):
        source, _ = make(tmp_path / f"{name}.dcm")
        enhance_file(source, tmp_path / f"{name}_sr", model=unsure_model, degradation="bicubic",
                     detail_map=tmp_path / f"{name}_map", device="cpu")
        (output,) = [pydicom.dcmread(p) for p in (tmp_path / f"{name}_sr").glob("*.dcm")]
        (detail,) = [pydicom.dcmread(p) for p in (tmp_path / f"{name}_map").glob("*.dcm")]
        for keyword in ("PhotometricInterpretation", "BitsAllocated", "BitsStored", "PixelRepresentation",
                        "PixelPaddingValue"):
            assert detail.get(keyword) == output.get(keyword), (name, keyword)
        assert float(detail.WindowCenter) == pytest.approx(float(detail.WindowWidth) / 2)
        if name == "padded":
            padding = output.PixelPaddingValue
            np.testing.assert_array_equal(detail.pixel_array == padding, output.pixel_array == padding)
            assert (detail.pixel_array == padding).any()
