"""Checkpoints: model weights + the resolved config, written atomically, loaded safely.

A checkpoint is a plain dict of tensors and built-in types, so it loads with
``torch.load(weights_only=True)``: a file carrying pickled code is refused without running it.
Layout::

    {"format": "medsr-checkpoint", "version": 1, "config": {...TrainConfig.to_dict()...},
     "model": state_dict, "epoch": int, "iteration": int,
     # training checkpoints only:
     "optimizer": state_dict, "scheduler": state_dict}
"""

from __future__ import annotations

import dataclasses
import pickle
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from medsr.config import TrainConfig, from_dict
from medsr.errors import CheckpointError, ConfigError
from medsr.model import SRResNet, ThroughPlaneNet
from medsr.writing import save_torch, write_errors

FORMAT = "medsr-checkpoint"
VERSION = 1
DEFAULT_WEIGHTS = {2: "srresnet_x2.pt", 4: "srresnet_x4.pt"}
THROUGH_PLANE_WEIGHTS = "through_plane.pt"


def build_model(config: TrainConfig) -> SRResNet | ThroughPlaneNet:
    """The network a config describes: an SRResNet (in-plane) or a ThroughPlaneNet."""
    if config.task == "through_plane":
        return ThroughPlaneNet(features=config.model.features, num_res_blocks=config.model.num_res_blocks)
    return SRResNet(scale=config.scale, features=config.model.features,
                    num_res_blocks=config.model.num_res_blocks)


def save_checkpoint(path: Path, model: torch.nn.Module, config: TrainConfig, epoch: int,
                    iteration: int, **training_state: Any) -> None:
    """Write a checkpoint to a temporary file in the destination folder, then rename it."""
    payload = {
        "format": FORMAT, "version": VERSION, "config": config.to_dict(),
        "model": model.state_dict(), "epoch": epoch, "iteration": iteration,
        **training_state,
    }
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    save_torch(payload, path)


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, its failures as one clear error.

    Raises:
        CheckpointError: missing file, corrupt file, or content that is not plain data
            (pickled code is refused without running it).
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles; the error below says it
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()
                       if line.strip().startswith("Unsupported")), "not plain data")
        raise CheckpointError(
            f"{path}: refused to load: not a checkpoint of tensors and plain data; it is corrupt "
            f"or carries code, which medsr never runs ({detail})"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    return payload


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint without executing any code it may carry.

    Raises:
        CheckpointError: missing file, not a medsr checkpoint, or unsafe content.
    """
    payload = safe_torch_load(Path(path))
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a medsr checkpoint (no 'format: {FORMAT}' entry)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} is not {VERSION}")
    try:
        payload["config"] = from_dict(TrainConfig, payload["config"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: checkpoint config is invalid ({exc})") from None
    return payload


def load_model(path: str | Path) -> tuple[SRResNet, TrainConfig]:
    """Rebuild the model a checkpoint describes and load its weights (CPU, eval mode)."""
    payload = load_checkpoint(path)
    config = payload["config"]
    model = build_model(config)
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: weights do not fit the SRResNet its config describes "
            f"(scale {config.scale}, {config.model.features} features, "
            f"{config.model.num_res_blocks} blocks): {str(exc).splitlines()[0]}"
        ) from None
    return model.eval(), config


def default_weights(scale: int, through_plane: bool = False) -> Path:
    """Path of the weights shipped inside the package for in-plane ``scale``, or of the
    through-plane model (one model for every factor)."""
    name = THROUGH_PLANE_WEIGHTS if through_plane else DEFAULT_WEIGHTS.get(scale)
    if name is None:
        raise CheckpointError(
            f"no shipped weights for scale {scale} (shipped: {sorted(DEFAULT_WEIGHTS)}); "
            "pass --weights with a checkpoint from medsr train"
        )
    return Path(str(resources.files("medsr") / "weights" / name))


def export_weights(source: str | Path, destination: str | Path) -> Path:
    """A checkpoint fit to publish: the model and its config, without training state and with
    the trainer's own paths (``data_root``, ``cache_dir``) set back to their defaults, so the
    file names nothing of the machine it was trained on.
    """
    payload = load_checkpoint(source)
    model, _ = load_model(source)
    defaults = TrainConfig()
    config = dataclasses.replace(payload["config"], data_root=defaults.data_root,
                                 cache_dir=defaults.cache_dir)
    save_checkpoint(Path(destination), model, config, payload["epoch"], payload["iteration"])
    return Path(destination)
