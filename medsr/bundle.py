"""``medsr export-bundle``: a shipped model as a MONAI bundle.

Layout (the MONAI bundle specification)::

    configs/metadata.json   every mandatory key, the schema URL, a changelog naming the version
    configs/inference.json  LoadImaged -> EnsureChannelFirstd -> SuperResolved -> SaveImaged
    configs/logging.conf    what ``monai.bundle run`` logs
    models/model.pt         the network's state dict (loaded into ``network_def``)
    models/model.ts         TorchScript (traced, both inputs; checked against PyTorch)
    docs/README.md          how to run it, then the model card with its numbers
    LICENSE

The network definition is not copied into ``scripts/``: ``inference.json`` builds it from the
``medsr`` package (``required_packages_version``, MONAI's current name for
``optional_packages_version``), because the network alone is not the product. The rules around
it (intensity window, degradation found from the pixels, flat background, original units, the
output grid) live in :class:`medsr.transforms.SuperResolved`, and a copy of them in the bundle
would drift from ``medsr enhance``. So the bundle's voxels and affine are ``medsr enhance``'s,
and so is its NIfTI header (``SaveImaged`` with :class:`medsr.monai_writer.EnhancedNiftiWriter`:
the description of what was decided, the input's qform/sform codes and display range, mm).

Run it as zoo bundles run, ``dataset_dir`` (a folder of NIfTI files) and ``output_dir`` given on
the command line::

    python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
        --bundle_root . --dataset_dir scans --output_dir enhanced
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import monai
import nibabel
import numpy as np
import torch

from medsr import __version__
from medsr.errors import OutputError
from medsr.export import ExportCheck, check_inputs, check_model_choice, export_model

# the metadata schema MONAI's model zoo validates against (MONAI-extra-test-data 0.8.1)
SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
              "meta_schema_20240725.json")
CHANGELOG = {__version__: f"first bundle: medsr {__version__} shipped weights, inference through "
                          "medsr.transforms.SuperResolved (the rules of medsr enhance)"}
# the through-plane factor network_def takes when called with the image alone, as MONAI's
# ckpt_export and verify_net_in_out call it (4 mm slices made 1 mm)
DEFAULT_FACTOR = 4
TEST_SIDE = 8  # verify_net_in_out's planes: multiples of this, to the power p, times n


@dataclass(frozen=True)
class WrittenBundle:
    """What :func:`write_bundle` wrote: the bundle folder, the model's name and the TorchScript check."""

    root: Path
    name: str
    check: ExportCheck


def write_bundle(output: str | Path, scale: int | None = None, through_plane: bool = False,
                 overwrite: bool = False) -> WrittenBundle:
    """Write the shipped in-plane model for ``scale`` (default 2), or the through-plane model, as
    a MONAI bundle folder ``output``; it appears only when complete.

    Raises:
        MedsrError: bad options; OutputError: ``output`` exists (without ``overwrite``) or its
            folder is missing; ExportError: the TorchScript file does not reproduce the model.
    """
    from medsr.checkpoint import default_weights, load_model
    from medsr.writing import move_into_place, output_taken, staging_folder, write_errors

    output = Path(output)
    check_model_choice(scale, through_plane)
    if not output.parent.is_dir():
        raise OutputError(f"{output}: folder {output.parent} does not exist; create it first")
    if output_taken(output) and not overwrite:
        raise OutputError(f"{output}: already exists; pass --overwrite to replace it")
    model, config = load_model(default_weights(scale or 2, through_plane))
    name = "medsr_through_plane" if through_plane else f"medsr_srresnet_x{model.scale}"
    # written under a hidden name its run owns (removed on any failure), renamed into place at the end
    with write_errors(output), staging_folder(output) as staging:
        for folder in ("configs", "models", "docs"):
            (staging / folder).mkdir()
        torch.save(model.state_dict(), staging / "models" / "model.pt")
        inputs, source = check_inputs(model, None, config.lower_percentile, config.upper_percentile)
        check = export_model(model, staging / "models" / "model.ts", "torchscript", inputs, source)
        metadata = bundle_metadata(model, through_plane)
        inference = inference_config(model, config, through_plane)
        _write_json(staging / "configs" / "metadata.json", metadata)
        _write_json(staging / "configs" / "inference.json", inference)
        (staging / "docs" / "README.md").write_text(bundle_readme(name, model, through_plane), encoding="utf-8")
        (staging / "configs" / "logging.conf").write_text(LOGGING, encoding="utf-8")
        (staging / "LICENSE").write_text(LICENSE, encoding="utf-8")
        if output.exists() and not output.is_dir():
            output.unlink()
        move_into_place(staging, output)  # a previous bundle is moved aside, removed only once replaced
    return WrittenBundle(output, name, check)


def bundle_metadata(model: torch.nn.Module, through_plane: bool) -> dict:
    """``configs/metadata.json``: every key the bundle schema requires, and what the network takes."""
    if through_plane:
        task = "Through-plane super-resolution of MR and CT volumes: thick slices made thin"
        image = _tensor("planes holding the slice axis, B-splined onto the thin grid, normalised by the scan's "
                        "0.5-99.5 percentile window", ["8*n", "8*n"])
        second = {"factor": {**_tensor(f"thin slices per thick slice, 2 to 8 (B,); network_def called without it "
                                       f"takes {DEFAULT_FACTOR} (default_factor)", [], dtype="float32",
                                       value_range=[2, 8]), "num_channels": 0}}
        pred = _tensor("the planes refined, same grid and range", ["8*n", "8*n"])
    else:
        task = f"In-plane x{model.scale} super-resolution of MR and CT volumes, slice by slice"
        image = _tensor("low-res slices normalised by the scan's 0.5-99.5 percentile window", ["8*n", "8*n"])
        second = {"degradation": {**_tensor("how each slice lost its resolution (B,): 0 bicubic (resampled), "
                                            "1 kspace (k-space truncation); default all 0", [], dtype="int64",
                                            value_range=[0, 1]), "num_channels": 0}}
        side = f"{8 * model.scale}*n"
        pred = _tensor(f"the slices x{model.scale} in each direction, same range", [side, side])
    return {
        "schema": SCHEMA_URL,
        "version": __version__,
        "changelog": CHANGELOG,
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        # python -m monai.bundle needs fire, only an extra of MONAI's: the installed version, else the
        # least medsr[bundle] takes (tests/test_bundle.py runs the bundle with these alone)
        "required_packages_version": {"medsr": __version__, "nibabel": nibabel.__version__,
                                      "fire": _installed_version("fire", otherwise="0.6")},
        "supported_apps": {},
        "name": f"medsr {'through-plane' if through_plane else f'SRResNet x{model.scale}'}",
        "task": task,
        "description": ("medsr's shipped network from monai.networks.blocks, applied by "
                        "medsr.transforms.SuperResolved with the rules of `medsr enhance`: the intensity window, "
                        "the degradation found from the pixels, flat background kept, output in the input's "
                        "units on the enhanced grid. docs/README.md holds the model card."),
        "authors": "medsr contributors",
        "copyright": "Copyright (c) medsr contributors",
        "data_source": "real human MR and CT scans of public collections; the model card (docs/README.md) lists them",
        "data_type": "nibabel",
        "image_classes": "single-channel intensity image (MR or CT), normalised to about [0, 1]",
        "pred_classes": "single-channel intensity image on the finer grid, same range",
        "intended_use": "research: finer grids for viewing and analysis; not for diagnosis",
        "references": ["Ledig et al., Photo-Realistic Single Image Super-Resolution Using a Generative "
                       "Adversarial Network (SRResNet), CVPR 2017"],
        "network_data_format": {"inputs": {"image": image, **second}, "outputs": {"pred": pred}},
    }


def _installed_version(name: str, otherwise: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return otherwise


def _tensor(description: str, spatial_shape: list, dtype: str = "float32", value_range=(0, 1)) -> dict:
    return {"type": "image" if spatial_shape else "tensor", "format": "magnitude" if spatial_shape else "labels",
            "description": description, "modality": "MR or CT", "num_channels": 1,
            "spatial_shape": spatial_shape, "dtype": dtype, "value_range": list(value_range),
            "is_patch_data": False, "channel_def": {"0": "image"} if spatial_shape else {}}


def inference_config(model: torch.nn.Module, config, through_plane: bool) -> dict:
    """``configs/inference.json``: MONAI's loaders and savers around :class:`SuperResolved`."""
    if through_plane:
        # one input suffices, as MONAI's ckpt_export traces it; SuperResolved passes each scan's factor
        network = {"_target_": "medsr.model.DefaultFactorThroughPlaneNet", "default_factor": DEFAULT_FACTOR,
                   "features": config.model.features, "num_res_blocks": config.model.num_res_blocks}
        postfix = "thin"
    else:
        network = {"_target_": "medsr.model.SRResNet", "scale": model.scale, "features": config.model.features,
                   "num_res_blocks": config.model.num_res_blocks}
        postfix = f"x{model.scale}"
    return {
        "imports": ["$import glob", "$import collections", "$import torch", "$import medsr"],
        "bundle_root": ".",
        "dataset_dir": "/workspace/data",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "auto",  # auto, cpu or cuda: the device SuperResolved runs on
        "datalist": "$sorted(glob.glob(@dataset_dir + '/*.nii.gz') + glob.glob(@dataset_dir + '/*.nii'))",
        "network_def": network,
        "checkpoint": "$torch.load(@bundle_root + '/models/model.pt', map_location='cpu', weights_only=True)",
        "network": "$@network_def.eval()",
        "enhancer": {"_target_": "medsr.enhance.Enhancer", "model": "@network",
                     "lower_percentile": config.lower_percentile, "upper_percentile": config.upper_percentile},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': path} for path in @datalist]",
                    "transform": "@preprocessing"},
        "inferer": {"_target_": "medsr.monai_transforms.SuperResolved", "keys": "image", "model": "@enhancer",
                    "through_plane": through_plane, "device": "@device"},
        "postprocessing": {"_target_": "SaveImaged", "keys": "image", "output_dir": "@output_dir",
                           "output_postfix": postfix, "separate_folder": False, "output_dtype": "$torch.float32",
                           "resample": False, "print_log": False,
                           "writer": "medsr.monai_writer.EnhancedNiftiWriter"},
        "initialize": ["$@network_def.load_state_dict(@checkpoint)"],
        # one volume at a time through the three stages; nothing kept
        "run": ["$collections.deque(map(@postprocessing, map(@inferer, @dataset)), maxlen=0)"],
    }


def bundle_readme(name: str, model: torch.nn.Module, through_plane: bool) -> str:
    """``docs/README.md``: how to run the bundle, then the model card."""
    card = (resources.files("medsr") / "weights" / "MODEL_CARD.md").read_text(encoding="utf-8")
    what = "makes thick slices thin" if through_plane else f"enhances every slice x{model.scale} in-plane"
    alone = f"factor {DEFAULT_FACTOR} (`default_factor`)" if through_plane else "degradation code 0 (bicubic)"
    return f"""# {name}

A MONAI bundle of medsr {__version__}: it {what}, by the rules of `medsr enhance`
(`medsr.transforms.SuperResolved`), so it writes the voxels `medsr enhance` writes.

    pip install "<medsr {__version__} or later>[bundle]"   # the package this bundle builds its network from
    python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
        --bundle_root . --dataset_dir <folder of .nii.gz> --output_dir <folder>

`models/model.pt` is the network's state dict (`network_def` in `configs/inference.json`);
`models/model.ts` the same network as TorchScript, float32, taking the image and its
{"factor" if through_plane else "degradation code"} (`configs/metadata.json`, `network_data_format`).
Called with the image alone, `network_def` takes {alone}, so `python -m monai.bundle ckpt_export`
writes TorchScript with that fixed.
The network alone expects slices normalised by the scan's intensity window; the transform does that.

The model card follows.

---

{card}"""


LICENSE = """Copyright (c) medsr contributors

Licensed under the Apache License, Version 2.0 (the "License"); you may not use the files of
this bundle except in compliance with the License. You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed under the
License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND,
either express or implied. See the License for the specific language governing permissions and
limitations under the License.

The weights were trained on public scan collections under their own licenses; docs/README.md
(the model card) names them.
"""


# what MONAI's bundle runner reads from configs/logging.conf: INFO lines on stdout
LOGGING = """[loggers]
keys=root

[handlers]
keys=console

[formatters]
keys=plain

[logger_root]
level=INFO
handlers=console

[handler_console]
class=StreamHandler
level=INFO
formatter=plain
args=(sys.stdout,)

[formatter_plain]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")
