"""SuperResolve / SuperResolved: medsr enhance's rules inside a MONAI pipeline."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, SaveImaged
from typer.testing import CliRunner

from medsr.cli import app
from medsr.enhance import enhance_file
from medsr.errors import MedsrError
from medsr.geometry import enhanced_affine, rescaled_affine, through_plane_factors
from medsr.model import ThroughPlaneNet
from medsr.monai_transforms import SuperResolve, SuperResolved
from medsr.transforms import degrade_volume

from conftest import MR_NIFTI

runner = CliRunner()


@pytest.fixture(scope="module")
def t1_slab(tmp_path_factory):
    """16 sagittal slices (1 mm apart, 0.9 mm in-plane) of the sample T1, cropped to 96x96."""
    path = tmp_path_factory.mktemp("slab") / "t1_slab.nii.gz"
    nib.save(nib.load(MR_NIFTI).slicer[72:88, 68:164, 32:128], path)
    return path


def _pipeline(output_dir, postfix="x2", **kwargs):
    return Compose([LoadImaged("image"), EnsureChannelFirstd("image"), SuperResolved("image", **kwargs),
                    SaveImaged("image", output_dir=output_dir, output_postfix=postfix, separate_folder=False,
                               print_log=False)])


@pytest.mark.parametrize("grid", ["bicubic", "kspace"])
def test_pipeline_writes_what_medsr_enhance_writes(tmp_path, t1_slab, grid):
    """LoadImaged -> EnsureChannelFirstd -> SuperResolved -> SaveImaged on a real NIfTI: the same
    voxels, bit for bit, and the same affine as the file ``medsr enhance`` writes (shipped x2
    model, told each grid: the output grid is enhanced_affine's on both sides)."""
    result = runner.invoke(app, ["enhance", str(t1_slab), "-o", str(tmp_path / "cli.nii.gz"),
                                 "--degradation", grid])
    assert result.exit_code == 0, result.output
    enhanced = _pipeline(tmp_path, degradation=grid)({"image": str(t1_slab)})["image"]
    assert enhanced.meta["degradation"] == grid
    cli, monai = nib.load(tmp_path / "cli.nii.gz"), nib.load(tmp_path / "t1_slab_x2.nii.gz")
    assert monai.shape == cli.shape == (16, 192, 192)
    assert monai.get_data_dtype() == cli.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(monai.dataobj), np.asarray(cli.dataobj))
    np.testing.assert_allclose(monai.affine, cli.affine, atol=1e-6)
    # the MetaTensor itself carries the grid SaveImage reads, also when asked to resample
    expected = enhanced_affine(nib.load(t1_slab).affine, 0, 2, grid)
    np.testing.assert_allclose(enhanced.affine.numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(enhanced.meta["original_affine"], expected, atol=1e-9)
    assert tuple(enhanced.meta["spatial_shape"]) == (16, 192, 192)
    np.testing.assert_allclose(enhanced.meta["pixdim"][1:4], [1.0, 0.898437 / 2, 0.898437 / 2], rtol=1e-5)


def test_enhanced_nifti_writer_writes_the_header_medsr_enhance_writes(tmp_path, t1_slab):
    """With no flags (the degradation found, projected where found k-space truncated) the
    description says what was decided as medsr enhance says it, and the input's qform/sform codes
    (0 and 2 in the sample T1, not the scanner code 1 MONAI's own writer puts) and units are kept."""
    source = nib.load(t1_slab)
    assert (int(source.header["qform_code"]), int(source.header["sform_code"])) == (0, 2)
    result = runner.invoke(app, ["enhance", str(t1_slab), "-o", str(tmp_path / "cli.nii.gz")])
    assert result.exit_code == 0, result.output
    Compose([LoadImaged("image"), EnsureChannelFirstd("image"), SuperResolved("image"),
             SaveImaged("image", output_dir=tmp_path, output_postfix="x2", separate_folder=False, print_log=False,
                        writer="medsr.monai_writer.EnhancedNiftiWriter")])({"image": str(t1_slab)})
    cli, monai = nib.load(tmp_path / "cli.nii.gz"), nib.load(tmp_path / "t1_slab_x2.nii.gz")
    for field in ("descrip", "qform_code", "sform_code", "xyzt_units", "cal_min", "cal_max", "dim", "pixdim"):
        np.testing.assert_array_equal(monai.header[field], cli.header[field], err_msg=field)
    assert monai.header["descrip"].item().startswith(b"medsr x2 ") and b" auto p=" in monai.header["descrip"].item()
    np.testing.assert_array_equal(np.asarray(monai.dataobj), np.asarray(cli.dataobj))
    np.testing.assert_allclose(monai.affine, cli.affine, atol=1e-6)


def test_enhanced_nifti_writer_keeps_a_display_range_and_defaults_to_scanner_codes(tmp_path):
    """A display range the input set is kept; meta without a NIfTI's geometry (as MONAI's DICOM
    readers give, or codes alone) is marked as scanner coordinates, as MONAI's own writer marks it."""
    from medsr.monai_writer import EnhancedNiftiWriter

    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    affine = np.diag([0.5, 0.6, 2.0, 1.0])
    for meta, codes, display in [({"cal_min": 10.0, "cal_max": 90.0, "qform_code": 1, "sform_code": 4,
                                   "descrip": np.array(b"medsr x2 kspace")}, (1, 1), (10.0, 90.0)),
                                 ({}, (1, 1), (0.0, 0.0))]:
        writer = EnhancedNiftiWriter()
        writer.set_data_array(torch.from_numpy(volume)[None], channel_dim=0)
        writer.set_metadata({"affine": affine, **meta}, resample=False)
        writer.write(tmp_path / "out.nii.gz")
        written = nib.load(tmp_path / "out.nii.gz")
        assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == codes
        assert (float(written.header["cal_min"]), float(written.header["cal_max"])) == display
        assert written.header.get_xyzt_units()[0] == "mm"
        assert written.header["descrip"].item() == (b"medsr x2 kspace" if meta else b"")
        np.testing.assert_array_equal(np.asarray(written.dataobj), volume)
        np.testing.assert_allclose(written.affine, affine)



def _saved_by_the_writer(path, folder, *transforms):
    Compose([LoadImaged("image"), EnsureChannelFirstd("image"), *transforms,
             SaveImaged("image", output_dir=folder, output_postfix="out", separate_folder=False, resample=False,
                        print_log=False, writer="medsr.monai_writer.EnhancedNiftiWriter")])({"image": str(path)})
    return nib.load(folder / path.name.replace(".nii.gz", "_out.nii.gz"))


def test_enhanced_nifti_writer_codes_follow_medsr_enhance_and_the_affine_is_always_used(tmp_path, t1_slab):
    """A qform in another space than the sform drops to 0, as medsr enhance drops it; a file
    whose codes are both 0 gets a scanner sform, so the affine written after Orientationd is
    the one a reader uses (with code 0 it would show the volume flipped left/right)."""
    from medsr.reading import open_scan

    slab = nib.load(t1_slab)
    data = np.asarray(slab.dataobj, dtype=np.float32)
    elsewhere = slab.affine.copy()
    elsewhere[:3, 3] += [30.0, -12.0, 7.0]
    two_spaces = nib.Nifti1Image(data, slab.affine)
    two_spaces.header.set_sform(slab.affine, code=2)
    two_spaces.header.set_qform(elsewhere, code=1)
    nib.save(two_spaces, tmp_path / "two_spaces.nii.gz")
    written = _saved_by_the_writer(tmp_path / "two_spaces.nii.gz", tmp_path)
    codes = (int(written.header["qform_code"]), int(written.header["sform_code"]))
    assert codes == open_scan(tmp_path / "two_spaces.nii.gz").xform_codes == (0, 2)

    header = slab.header.copy()
    header.set_qform(None, code=0)
    header.set_sform(None, code=0)
    nib.save(nib.Nifti1Image(data, None, header=header), tmp_path / "no_space.nii.gz")
    loaded = nib.load(tmp_path / "no_space.nii.gz")
    written = _saved_by_the_writer(tmp_path / "no_space.nii.gz", tmp_path, Orientationd("image", axcodes="RAS"))
    assert int(written.header["sform_code"]) == 1
    canonical_in, canonical_out = nib.as_closest_canonical(loaded), nib.as_closest_canonical(written)
    np.testing.assert_allclose(canonical_out.affine, canonical_in.affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(canonical_out.dataobj), np.asarray(canonical_in.dataobj), rtol=1e-6)


def test_enhanced_nifti_writer_writes_a_single_slice(tmp_path):
    from medsr.monai_writer import EnhancedNiftiWriter

    writer = EnhancedNiftiWriter()
    writer.data_obj, writer.affine = np.ones((6, 7), dtype=np.float32), np.diag([0.5, 0.7, 1.0, 1.0])
    writer.write(tmp_path / "slice.nii.gz")
    written = nib.load(tmp_path / "slice.nii.gz")
    assert written.shape == (6, 7) and written.header.get_zooms()[:2] == (0.5, 0.7)

def test_grid_found_from_the_pixels_and_the_kspace_affine(tmp_path, t1_slab, tiny_checkpoint):
    """Degradation auto: the transform finds the grid medsr enhance finds (kspace on this crop,
    k-space truncated), its voxels are medsr enhance's, and its affine is
    geometry.enhanced_affine's (first pixel kept), the one rule for the output grid."""
    slab = nib.load(t1_slab)
    low_res, _, low_res_affine = degrade_volume(np.asarray(slab.dataobj, np.float32), slab.affine, 0, 2, "kspace")
    truncated = tmp_path / "t1_slab_kspace.nii.gz"
    nib.save(nib.Nifti1Image(low_res, low_res_affine), truncated)
    transform = SuperResolve(weights=tiny_checkpoint)
    loaded = Compose([LoadImaged("image"), EnsureChannelFirstd("image")])({"image": str(truncated)})["image"]
    enhanced = transform(loaded)
    written = enhance_file(truncated, tmp_path / "cli.nii.gz", weights=tiny_checkpoint)
    assert written.degradation == enhanced.meta["degradation"] == "kspace"
    np.testing.assert_array_equal(enhanced[0].numpy(), np.asarray(nib.load(written.output).dataobj))
    expected = enhanced_affine(low_res_affine, 0, 2, "kspace")
    np.testing.assert_allclose(enhanced.affine.numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(enhanced.affine.numpy()[:3, 3], low_res_affine[:3, 3])


def test_reoriented_input_is_written_on_the_enhanced_grid(tmp_path, t1_slab, tiny_checkpoint):
    """After Orientationd the ``original_affine`` SaveImage(resample=True) resamples to is the
    enhanced grid in the file's own axis order, so the header is the enhanced grid's."""
    pipeline = Compose([LoadImaged("image"), EnsureChannelFirstd("image"),
                        Orientationd("image", axcodes="LPI", labels=None),
                        SuperResolved("image", weights=tiny_checkpoint, degradation="bicubic"),
                        SaveImaged("image", output_dir=tmp_path, output_postfix="x2", separate_folder=False,
                                   resample=True, print_log=False)])
    enhanced = pipeline({"image": str(t1_slab)})["image"]
    assert tuple(enhanced.shape[1:]) == (16, 192, 192)
    written = nib.load(tmp_path / "t1_slab_x2.nii.gz")
    assert written.shape == (16, 192, 192)
    np.testing.assert_allclose(written.affine, rescaled_affine(nib.load(t1_slab).affine, (1, 2, 2)), atol=1e-4)


def _volume(shape, spacing):
    """A smooth synthetic volume with a flat background, ``(1, *shape)``, on a grid of ``spacing`` mm."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    values = np.clip(1.0 - sum(g**2 for g in grids), 0, None) * 800.0 + 100.0 * grids[0]
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    return MetaTensor(torch.as_tensor(values[None], dtype=torch.float32), affine=affine)


THROUGH_PLANE = ThroughPlaneNet(features=4, num_res_blocks=1).eval()

CASES = [
    # (kwargs, input shape, spacing mm, expected output shape)
    ({}, (12, 10, 6), (1, 1, 3), (24, 20, 6)),  # slice axis: the odd voxel size, the last here
    ({}, (5, 12, 10), (3, 1, 1), (5, 24, 20)),
    ({"slice_axis": 1}, (12, 5, 10), (1, 1, 1), (24, 5, 20)),
    ({"degradation": "kspace", "batch_size": 1}, (12, 10, 6), (1, 1, 3), (24, 20, 6)),
    ({"precision": "fp32", "compile_model": "off"}, (12, 10, 6), (1, 1, 3), (24, 20, 6)),
    ({"model": THROUGH_PLANE, "through_plane": True}, (12, 10, 6), (1, 1, 3), (12, 10, 18)),
    ({"model": THROUGH_PLANE, "through_plane": True, "scale": 2}, (12, 10, 6), (1, 1, 3), (12, 10, 12)),
]


@pytest.mark.parametrize(("kwargs", "shape", "spacing", "expected"), CASES)
def test_output_shape_grid_and_units(kwargs, shape, spacing, expected, tiny_checkpoint):
    kwargs = {"weights": tiny_checkpoint, **kwargs} if "model" not in kwargs else kwargs
    volume = _volume(shape, spacing)
    enhanced = SuperResolve(**kwargs)(volume)
    assert isinstance(enhanced, MetaTensor) and enhanced.dtype == torch.float32
    assert tuple(enhanced.shape) == (1, *expected)
    factors = np.asarray(expected) / np.asarray(shape)
    np.testing.assert_allclose(np.linalg.norm(enhanced.affine.numpy()[:3, :3], axis=0), np.asarray(spacing) / factors)
    assert tuple(enhanced.meta["spatial_shape"]) == expected
    # original units: the near-classical tiny model keeps the range of the input
    assert abs(float(enhanced.max()) - float(volume.max())) < 0.1 * float(volume.max() - volume.min())
    if kwargs.get("through_plane"):
        axis = 2
        factor = enhanced.meta["through_plane_factor"]
        expected_affine = rescaled_affine(volume.affine.numpy(), through_plane_factors(axis, factor))
        np.testing.assert_allclose(enhanced.affine.numpy(), expected_affine)


def test_padding_comes_back_exactly(tiny_checkpoint):
    volume = _volume((12, 10, 6), (1, 1, 3))
    volume[0, :3] = -2000.0
    enhanced = SuperResolve(weights=tiny_checkpoint, padding=(-2000, -2000), degradation="bicubic")(volume)
    assert (enhanced[0, :6] == -2000.0).all()
    assert float(enhanced[0, 6:].min()) > -1000.0


def test_dictionary_version_enhances_each_key_and_skips_missing_ones(tiny_checkpoint):
    transform = SuperResolved(["t1", "t2"], allow_missing_keys=True, weights=tiny_checkpoint)
    out = transform({"t1": _volume((12, 10, 6), (1, 1, 3)), "label": "kept"})
    assert tuple(out["t1"].shape) == (1, 24, 20, 6) and out["label"] == "kept" and "t2" not in out


def test_medsr_transforms_re_exports_the_transforms():
    import medsr.transforms

    assert medsr.transforms.SuperResolve is SuperResolve
    assert medsr.transforms.SuperResolved is SuperResolved


BAD_ARGUMENTS = [
    ({"scale": 3}, r"`scale` must be one of 2, 4 in-plane, not 3"),
    ({"through_plane": True, "scale": 12}, r"--scale for --through-plane must be 2 to 8, not 12"),
    ({"degradation": "nearest"}, r"`degradation` must be one of auto, bicubic, kspace, not 'nearest'"),
    ({"through_plane": True, "degradation": "kspace"}, r"`degradation` is an in-plane choice"),
    ({"slice_axis": 3}, r"`slice_axis` must be 0, 1, 2 or None .*not 3"),
    ({"padding": (5, 1)}, r"`padding` must be a \(low, high\) range with low <= high, not \(5.0, 1.0\)"),
    ({"batch_size": 0}, r"`batch_size` must be a positive integer or None, not 0"),
    ({"precision": "fp16"}, r"--precision must be one of auto, fp32, bf16, not 'fp16'"),
    ({"compile_model": "yes"}, r"--compile must be one of auto, on, off, not 'yes'"),
    ({"device": "tpu"}, r"--device must be auto, cpu or cuda, not 'tpu'"),
    ({"model": torch.nn.Identity(), "weights": "x.pt"}, r"pass `model` or `weights`, not both"),
    ({"model": torch.nn.Identity()}, r"the model given has no integer scale attribute"),
    ({"model": THROUGH_PLANE}, r"the model given is a through-plane model"),
    ({"scale": 4, "weights": "tiny"}, r"--scale 4 does not match the weights, which upscale by 2"),
    ({"weights": "missing.pt"}, r"missing.pt: weights file not found"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_bad_arguments_are_refused_when_made(kwargs, message, tiny_checkpoint):
    if kwargs.get("weights") == "tiny":
        kwargs = {**kwargs, "weights": tiny_checkpoint}
    with pytest.raises(MedsrError, match=message):
        SuperResolve(**kwargs)


BAD_INPUTS = [
    (np.zeros((2, 12, 10, 6), np.float32), r"one channel-first 3-D volume \(1, I, J, K\), not shape \(2, 12, 10, 6\)"),
    (np.zeros((12, 10, 6), np.float32), r"not shape \(12, 10, 6\); add EnsureChannelFirst"),
    (np.random.default_rng(0).random((1, 3, 3, 6), np.float32), r"slices of 3x3 voxels are too small"),
    (np.full((1, 12, 10, 6), 7.0, np.float32), r"constant"),
]


@pytest.mark.parametrize(("image", "message"), BAD_INPUTS)
def test_bad_inputs_are_refused_when_called(image, message, tiny_checkpoint):
    with pytest.raises(MedsrError, match=message):
        SuperResolve(weights=tiny_checkpoint)(image)


def test_through_plane_matches_medsr_enhance(tmp_path):
    """Through-plane, the transform writes what medsr enhance --through-plane writes: voxels and affine."""
    volume = _volume((20, 18, 6), (0.9, 0.9, 3.0))
    nib.save(nib.Nifti1Image(volume[0].numpy(), volume.affine.numpy()), tmp_path / "thick.nii.gz")
    written = enhance_file(tmp_path / "thick.nii.gz", tmp_path / "thin.nii.gz", model=THROUGH_PLANE, through_plane=True)
    pipeline = _pipeline(tmp_path, postfix="z3", model=THROUGH_PLANE, through_plane=True)
    enhanced = pipeline({"image": str(tmp_path / "thick.nii.gz")})["image"]
    assert written.factor == enhanced.meta["through_plane_factor"] == 3
    cli, monai = nib.load(tmp_path / "thin.nii.gz"), nib.load(tmp_path / "thick_z3.nii.gz")
    assert monai.shape == cli.shape == (20, 18, 18)
    np.testing.assert_array_equal(np.asarray(monai.dataobj), np.asarray(cli.dataobj))
    np.testing.assert_allclose(monai.affine, cli.affine, atol=1e-6)


def test_a_reoriented_volume_is_enhanced_across_its_thick_slices_not_the_stale_meta_axis(tiny_checkpoint):
    """The reader's ``slice_axis`` in the meta dictionary is stale once Orientation has moved the
    axes: the 3 mm axis, now first, stays the slice axis; the two 1 mm axes are upscaled."""
    from monai.transforms import Orientation

    volume = MetaTensor(torch.rand(1, 12, 10, 6) * 100, affine=torch.diag(torch.tensor([-1.0, 1.0, 3.0, 1.0])),
                        meta={"slice_axis": 2})
    reoriented = Orientation("SRA")(volume)  # the 3 mm axis first
    assert tuple(reoriented.shape) == (1, 6, 12, 10) and reoriented.meta["slice_axis"] == 2
    enhanced = SuperResolve(weights=tiny_checkpoint, degradation="bicubic")(reoriented)
    assert tuple(enhanced.shape) == (1, 6, 24, 20)
    np.testing.assert_allclose(np.linalg.norm(enhanced.affine.numpy()[:3, :3], axis=0), [3.0, 0.5, 0.5])
