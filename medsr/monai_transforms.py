"""medsr as MONAI transforms: :class:`SuperResolve` (array) and :class:`SuperResolved` (dictionary).

They put the shipped (or a given) model into a MONAI pipeline::

    Compose([LoadImaged("image"), EnsureChannelFirstd("image"), SuperResolved("image"),
             SaveImaged("image", output_postfix="x2")])

and apply it by the rules of ``medsr enhance``, by calling the code ``medsr enhance`` runs
(:func:`medsr.enhance.plan_in_plane`, :func:`medsr.engine.enhance_scan`,
:func:`medsr.enhance.thin_slices`): the intensity window the model was trained with, the
degradation found from the pixels or told, flat background kept, padding put back, the result
in the input's units. So the voxels equal those ``medsr enhance`` writes for the same file, as
long as no spatial transform (``Orientationd``) reordered them first. The result's meta says
what was decided (``degradation``, and ``descrip`` as ``medsr enhance`` describes it); the header
``SaveImage`` writes is MONAI's (qform/sform code 1, no description) unless it is given
:class:`medsr.monai_writer.EnhancedNiftiWriter`, which writes ``medsr enhance``'s.

The output grid follows :func:`medsr.geometry.enhanced_affine` (in-plane; for the ``kspace`` grid
the first pixel keeps its place) or the thin-slice tiling (through-plane). A network whose output
is larger than its input leaves the input's geometry on a MONAI result; here the result's
affine, and the ``original_affine`` and ``spatial_shape`` keys ``SaveImage`` reads (it resamples
to them when asked to), describe the enhanced grid, so the header ``SaveImage`` writes is right.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

from medsr.consistency import resolved
from medsr.engine import COMPILE_CHOICES, PRECISIONS, check_choice, enhance_scan, pick_device
from medsr.enhance import (
    Enhancer,
    enhancer_for,
    plan_in_plane,
    short_description,
    thin_slices,
    through_plane_description,
)
from medsr.errors import MedsrError
from medsr.geometry import slice_axis_of
from medsr.model import DEGRADATION_CODES, SCALES
from medsr.reading import OpenScan, plane_of

logger = logging.getLogger(__name__)

DEGRADATION_CHOICES = ("auto", *DEGRADATION_CODES)


class SuperResolve(Transform):
    """Enhance a channel-first volume slice by slice, as ``medsr enhance`` does.

    The model (shipped weights unless ``model`` or ``weights`` is given) is loaded once, when the
    transform is made; every argument is checked there too.

    Args:
        scale: in-plane factor, 2 or 4 (default 2; must match ``model`` or ``weights``); with
            ``through_plane``, thin slices per thick slice, 2 to 8 (default: slice spacing /
            in-plane spacing, rounded, as ``medsr enhance --through-plane``).
        model: a trained network: an :class:`~medsr.enhance.Enhancer` or a bare module (see
            :class:`~medsr.enhance.Enhancer` for what it must map).
        weights: a checkpoint from ``medsr train``, instead of ``model``.
        through_plane: make thick slices thin instead of the in-plane voxels smaller.
        slice_axis: spatial axis (0, 1 or 2) of the slices; default: the input's
            ``meta["slice_axis"]`` (a :meth:`medsr.reading.Scan.to_metatensor`), else the odd
            one out of the voxel sizes (:func:`medsr.geometry.slice_axis_of`), as for NIfTI.
        degradation: ``auto`` (found from the pixels), ``bicubic`` or ``kspace`` (in-plane).
        padding: inclusive ``(low, high)`` range of padding values in original units (a DICOM
            PixelPaddingValue MONAI's readers drop), or None.
        device: ``auto`` (CUDA when there is one), ``cpu`` or ``cuda``.
        batch_size: slices (planes, through-plane) per forward pass; default as ``medsr enhance``.
        precision: ``auto`` (bf16 on CUDA and CPUs with native bf16), ``fp32`` or ``bf16``.
        compile_model: ``torch.compile`` (in-plane): ``auto``, ``on`` or ``off``.

    Returns (``__call__``):
        A float32 ``MetaTensor`` ``(1, I', J', K')`` in the input's units on the enhanced grid,
        its ``meta`` the input's with ``affine``, ``original_affine``, ``spatial_shape`` (and
        ``pixdim``, ``dim`` when present) set to that grid, and ``degradation`` (in-plane) or
        ``through_plane_factor``.

    Raises:
        MedsrError: a bad argument (here), or an input it cannot enhance (when called): more than
            one channel, not 3-D, slices too small, a constant volume, non-finite voxels.

    Example:
        >>> from monai.transforms import Compose, EnsureChannelFirst, LoadImage
        >>> load = Compose([LoadImage(image_only=True), EnsureChannelFirst()])
        >>> t1 = load("sample_scans/mr_t1_nifti/MR.nii.gz")  # (1, 160, 232, 160), 1 x 0.9 x 0.9 mm
        >>> SuperResolve(scale=2)(t1).shape  # sagittal slices, in-plane x2
        torch.Size([1, 160, 464, 320])
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, scale: int | None = None, model: torch.nn.Module | Enhancer | None = None,
                 weights: str | Path | None = None, through_plane: bool = False,
                 slice_axis: int | None = None, degradation: str = "auto",
                 padding: Sequence[float] | None = None, device: str = "auto",
                 batch_size: int | None = None, precision: str = "auto", compile_model: str = "auto") -> None:
        from medsr.through_plane import check_factor

        if model is not None and weights is not None:
            raise MedsrError("pass `model` or `weights`, not both")
        if degradation not in DEGRADATION_CHOICES:
            raise MedsrError(f"`degradation` must be one of {', '.join(DEGRADATION_CHOICES)}, not {degradation!r}")
        if through_plane and degradation != "auto":
            raise MedsrError(f"`degradation` is an in-plane choice; through_plane makes thick slices thin, "
                             f"so leave it auto, not {degradation!r}")
        if scale is not None:
            if through_plane:
                check_factor(scale)
            elif scale not in SCALES:
                raise MedsrError(f"`scale` must be one of {', '.join(map(str, SCALES))} in-plane, not {scale!r}")
        if slice_axis is not None and slice_axis not in (0, 1, 2):
            raise MedsrError(f"`slice_axis` must be 0, 1, 2 or None (found from the spacing), not {slice_axis!r}")
        if padding is not None:
            padding = tuple(float(v) for v in padding)
            if len(padding) != 2 or not padding[0] <= padding[1]:
                raise MedsrError(f"`padding` must be a (low, high) range with low <= high, not {padding}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise MedsrError(f"`batch_size` must be a positive integer or None, not {batch_size!r}")
        check_choice("precision", precision, PRECISIONS)
        check_choice("compile", compile_model, COMPILE_CHOICES)
        self.device = pick_device(device)
        self.enhancer = enhancer_for(model, weights, scale, through_plane)
        self.scale, self.through_plane, self.slice_axis = scale, through_plane, slice_axis
        self.degradation, self.padding = degradation, padding
        self.batch_size, self.precision, self.compile_model = batch_size, precision, compile_model

    def __call__(self, img: torch.Tensor | np.ndarray) -> MetaTensor:
        """Enhance ``img``, ``(1, I, J, K)`` in original units (HU, scanner units); a plain
        tensor or array gets MONAI's default (identity) affine."""
        img = img if isinstance(img, MetaTensor) else MetaTensor(torch.as_tensor(np.asarray(img)))
        if img.ndim != 4 or img.shape[0] != 1:
            raise MedsrError(f"SuperResolve takes one channel-first 3-D volume (1, I, J, K), not shape "
                             f"{tuple(img.shape)}; add EnsureChannelFirst, or split channels with SplitDim")
        affine = img.affine.detach().cpu().numpy().astype(np.float64)
        axis = self.slice_axis
        if axis is None and not img.applied_operations:
            # the reader's acquired axis holds only while no spatial transform has moved the axes
            # (Orientation and friends leave the key as it was)
            axis = img.meta.get("slice_axis")
        axis = int(axis) if axis is not None else slice_axis_of(affine)
        volume = img.detach().cpu().numpy()[0].astype(np.float32)
        scan = OpenScan(shape=tuple(volume.shape), affine=affine, slice_axis=axis,
                        path=Path(str(img.meta.get("filename_or_obj", "<MetaTensor>"))), source_format="array",
                        read_plane=functools.partial(plane_of, volume, axis), padding=self.padding)
        if self.through_plane:
            enhanced, factor = thin_slices(scan, self.enhancer, self.scale, self.device, self.batch_size,
                                           self.precision)
            array, new_affine = enhanced.array, enhanced.affine
            facts = {"through_plane_factor": factor, "descrip": through_plane_description(factor)}
        else:
            plan = plan_in_plane(scan, self.enhancer, self.degradation, device=self.device)
            named = None if plan.estimate is None else plan.estimate.likely
            consistency = resolved("auto", plan.degradation, named)
            enhanced = enhance_scan(scan, self.enhancer.model, plan.degradation, self.device, self.batch_size,
                                    self.enhancer.lower_percentile, self.enhancer.upper_percentile,
                                    survey=plan.survey, compile_model=self.compile_model,
                                    precision=self.precision, consistency=consistency)
            # what medsr enhance's NIfTI says of it; EnhancedNiftiWriter writes it as the descrip
            description = short_description(self.enhancer.model.scale, plan.degradation, plan.estimate,
                                            consistency == "on")
            array, facts = enhanced.array, {"degradation": plan.degradation, "descrip": description}
            new_affine = enhanced.affine
        return _on_grid(img, array, new_affine, facts)


class SuperResolved(MapTransform):
    """Dictionary version of :class:`SuperResolve`: enhances ``data[key]`` for each of ``keys``.

    Args:
        keys: the keys of the volumes to enhance (each ``(1, I, J, K)``, channel first).
        allow_missing_keys: skip keys the dictionary lacks instead of raising.
        kwargs: the arguments of :class:`SuperResolve`; one model serves every key.

    Example:
        >>> from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, SaveImaged
        >>> pipeline = Compose([LoadImaged("image"), EnsureChannelFirstd("image"),
        ...                     SuperResolved("image", scale=2),
        ...                     SaveImaged("image", output_dir="enhanced", output_postfix="x2")])
        >>> pipeline({"image": "sample_scans/mr_t1_nifti/MR.nii.gz"})["image"].shape
        torch.Size([1, 160, 464, 320])
    """

    backend = SuperResolve.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = SuperResolve(**kwargs)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


def _on_grid(img: MetaTensor, array: np.ndarray, affine: np.ndarray, facts: dict) -> MetaTensor:
    """``array`` ``(I', J', K')`` as a channel-first MetaTensor carrying ``img``'s meta, its
    geometry keys set to the grid ``affine``."""
    meta = copy.deepcopy(dict(img.meta))
    shape = np.asarray(array.shape)
    meta["original_affine"], meta["spatial_shape"] = _original_grid(meta, img.affine, np.asarray(img.shape[1:]),
                                                                    affine, shape)
    meta.update(facts)
    if "pixdim" in meta and np.size(meta["pixdim"]) >= 4:  # the NIfTI header MONAI keeps beside the affine
        meta["pixdim"] = np.array(meta["pixdim"], copy=True)
        meta["pixdim"][1:4] = np.linalg.norm(affine[:3, :3], axis=0)
    if "dim" in meta and np.size(meta["dim"]) >= 4:
        meta["dim"] = np.array(meta["dim"], copy=True)
        meta["dim"][1:4] = shape
    meta.pop("affine", None)
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None], affine=torch.as_tensor(affine),
                      meta=meta, applied_operations=list(img.applied_operations))


def _original_grid(meta: dict, current: torch.Tensor, current_shape: np.ndarray, new_affine: np.ndarray,
                   new_shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The enhanced grid as ``SaveImage(resample=True)`` reads it: ``original_affine`` and
    ``spatial_shape`` in the orientation the file was loaded in.

    When the volume was only reoriented since loading (``Orientation``: axes swapped or flipped,
    the voxels otherwise where they were), the enhanced grid is expressed in the original axis order,
    so resampling to it moves no voxel values. Otherwise (no ``original_affine``, or a
    resampled grid) the enhanced grid as it is.
    """
    original = meta.get("original_affine")
    current = np.asarray(current.detach().cpu(), dtype=np.float64)
    if original is None:
        return new_affine, new_shape
    # voxel map original -> current: a signed permutation plus offsets after Orientation
    to_current = np.linalg.solve(current, np.asarray(original, dtype=np.float64))
    permutation = np.round(to_current[:3, :3])
    flipped = permutation.sum(axis=1) < 0
    is_reorientation = (np.allclose(to_current[:3, :3], permutation, atol=1e-4)
                        and np.all(np.abs(permutation).sum(axis=0) == 1)
                        and np.all(np.abs(permutation).sum(axis=1) == 1)
                        and np.allclose(to_current[:3, 3], np.where(flipped, current_shape - 1, 0), atol=1e-3))
    if not is_reorientation:
        logger.info("the volume was resampled since loading; original_affine set to the enhanced grid")
        return new_affine, new_shape
    # original voxel u -> current voxel P u + offset, offset (n' - 1) along the flipped axes
    offsets = np.where(flipped, new_shape - 1, 0)
    to_new = np.eye(4)
    to_new[:3, :3], to_new[:3, 3] = permutation, offsets
    original_shape = np.abs(permutation).T @ new_shape
    return new_affine @ to_new, original_shape.astype(int)
