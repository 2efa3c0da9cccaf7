"""Property-based tests: mutated real files never escape as anything but a medsr error, and the
geometry rules hold for any orientation and spacing.

The example counts are small for CI; ``MEDSR_FUZZ_EXAMPLES=5000`` runs the long fuzz campaign
described in ``tests/fuzz/README.md``.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from medsr.errors import MedsrError
from medsr.geometry import LPS_TO_RAS, rescaled_affine, voxel_sizes
from medsr.reading import read_scan

from conftest import MR_NIFTI, pydicom_test_file

EXAMPLES = int(os.environ.get("MEDSR_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

DICOM_SEEDS = [pydicom_test_file(n).read_bytes() for n in ("CT_small.dcm", "MR_small.dcm")]
# a small real NIfTI: the first few slices of the shipped MR, as bytes
_image = nib.load(MR_NIFTI)
NIFTI_SEED = nib.Nifti1Image(np.asarray(_image.dataobj[:16, :16, :4]), _image.affine).to_bytes()


@st.composite
def mutated(draw, seeds):
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[position] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            del data[position:position + draw(st.integers(1, 64))]
    return bytes(data)


def _read_or_medsr_error(path):
    try:
        scan = read_scan(path)
    except MedsrError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert scan.array.ndim == 3 and scan.array.dtype == np.float32
    assert np.isfinite(scan.array).all()
    assert scan.affine.shape == (4, 4) and np.isfinite(scan.affine).all()
    assert abs(np.linalg.det(scan.affine[:3, :3])) > 0


@FUZZ
@given(data=mutated(DICOM_SEEDS))
def test_mutated_dicom_gives_a_volume_or_a_medsr_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("dicom") / "slice.dcm"
    path.write_bytes(data)
    _read_or_medsr_error(path)


@FUZZ
@given(data=mutated([NIFTI_SEED]))
def test_mutated_nifti_gives_a_volume_or_a_medsr_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("nifti") / "volume.nii"
    path.write_bytes(data)
    _read_or_medsr_error(path)


rotations = st.builds(lambda q: Rotation.from_quat(q).as_matrix(),
                      st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(
                          lambda q: np.linalg.norm(q) > 0.1))
spacings = st.lists(st.floats(0.1, 10.0), min_size=3, max_size=3)
origins = st.lists(st.floats(-500, 500), min_size=3, max_size=3)


@FUZZ
@given(rotation=rotations, spacing=spacings, origin=origins, scale=st.sampled_from([2, 3, 4]),
       slice_axis=st.integers(0, 2))
def test_rescaled_grid_round_trips_and_keeps_the_extent(rotation, spacing, origin, scale, slice_axis):
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing)
    affine[:3, 3] = origin
    factors = [scale] * 3
    factors[slice_axis] = 1
    up = rescaled_affine(affine, factors)
    np.testing.assert_allclose(rescaled_affine(up, [1 / f for f in factors]), affine, atol=1e-6)
    np.testing.assert_allclose(voxel_sizes(up) * factors, voxel_sizes(affine), rtol=1e-9)
    # the corner of voxel 0 (centre minus half a voxel on every axis) does not move
    corner = lambda a: a[:3, 3] - a[:3, :3].sum(axis=1) / 2  # noqa: E731
    np.testing.assert_allclose(corner(up), corner(affine), atol=1e-6)


@FUZZ
@given(rotation=rotations, row_spacing=st.floats(0.2, 3), col_spacing=st.floats(0.2, 3),
       gap=st.floats(0.5, 8), origin=origins)
def test_dicom_positions_survive_any_orientation(tmp_path_factory, rotation, row_spacing, col_spacing, gap, origin):
    folder = tmp_path_factory.mktemp("series")
    template = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    row_dir, col_dir = rotation[:, 0], rotation[:, 1]
    normal = np.cross(row_dir, col_dir)
    positions = [np.asarray(origin) + k * gap * normal for k in range(3)]
    for k in (2, 0, 1):  # written out of order
        template.ImageOrientationPatient = [f"{v:.8f}" for v in [*row_dir, *col_dir]]
        template.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        template.PixelSpacing = [f"{row_spacing:.6f}", f"{col_spacing:.6f}"]
        template.SOPInstanceUID = pydicom.uid.generate_uid()
        template.save_as(folder / f"{k}.dcm")
    scan = read_scan(folder)
    for k, position in enumerate(positions):
        for i, j in ((0, 0), (3, 5)):
            world = (LPS_TO_RAS @ scan.affine @ [i, j, k, 1])[:3]
            expected = position + i * col_spacing * row_dir + j * row_spacing * col_dir
            np.testing.assert_allclose(world, expected, atol=1e-3)
