"""Training configuration: YAML in ``configs/`` -> frozen dataclasses that reject unknown keys.

The resolved config is saved next to every run and inside every checkpoint, so ``enhance``
needs only the checkpoint to rebuild the model.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medsr.errors import ConfigError

LOSS_NAMES = ("l1", "mse")
TASKS = ("in_plane", "through_plane")
PRECISIONS = ("auto", "fp32", "bf16")
# where training pairs are degraded: cpu (NumPy, one patch at a time in the data loader), device
# (medsr.batch_degradation, the whole batch where the model runs), auto (device on CUDA)
DEGRADE_ON = ("auto", "cpu", "device")


@dataclass(frozen=True)
class ModelConfig:
    """Network size (SRResNet in-plane, ThroughPlaneNet through-plane). ``scale`` lives on
    :class:`TrainConfig` because data depends on it too."""

    features: int = 32
    num_res_blocks: int = 8

    def __post_init__(self) -> None:
        _require(self.features >= 1, "model.features", "must be >= 1", self.features)
        _require(self.num_res_blocks >= 1, "model.num_res_blocks", "must be >= 1", self.num_res_blocks)


@dataclass(frozen=True)
class DegradationConfig:
    """How training pairs are made (:class:`medsr.transforms.RandomDegradePair`): the
    probability of each degradation (summing to 1) and the ranges of the random ones."""

    bicubic: float = 0.45
    kspace: float = 0.45
    blur_noise: float = 0.10
    area: float = 0.0
    lanczos: float = 0.0
    gaussian: float = 0.0
    rician: float = 0.0
    blur_sigma_min: float = 0.3
    blur_sigma_max: float = 1.0
    noise_std_max: float = 0.02

    def __post_init__(self) -> None:
        weights = self.probabilities
        _require(min(weights.values()) >= 0, "degradation", "probabilities must be >= 0", weights)
        _require(abs(sum(weights.values()) - 1.0) < 1e-6, "degradation",
                 "probabilities must sum to 1", sum(weights.values()))
        _require(0 < self.blur_sigma_min <= self.blur_sigma_max, "degradation.blur_sigma_min",
                 "must be positive and <= blur_sigma_max", self.blur_sigma_min)
        _require(self.noise_std_max >= 0, "degradation.noise_std_max", "must be >= 0", self.noise_std_max)

    @property
    def probabilities(self) -> dict[str, float]:
        return {"bicubic": self.bicubic, "kspace": self.kspace, "blur_noise": self.blur_noise,
                "area": self.area, "lanczos": self.lanczos, "gaussian": self.gaussian,
                "rician": self.rician}


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``medsr train`` needs. Paths in ``train_scans``/``val_scans`` are relative to
    ``data_root`` (itself relative to the working directory) unless absolute.

    ``task`` is ``in_plane`` (SRResNet, ``scale`` 2 or 4 in-plane) or ``through_plane``
    (ThroughPlaneNet: trained on every factor in ``through_plane_factors``; ``scale`` is the
    factor validation uses, 4 in protocol v1-z).

    ``degrade_on`` (in-plane only): ``cpu`` degrades each patch with NumPy in the data loader
    (:class:`medsr.data.PatchPairDataset`); ``device`` crops patches on the CPU and degrades
    the whole batch where the model runs (:mod:`medsr.batch_degradation`: the same
    degradations, parameters and noise for the same seed); ``auto`` is ``device`` on CUDA and
    ``cpu`` elsewhere.
    """

    task: str = "in_plane"
    scale: int = 2
    through_plane_factors: tuple[int, ...] = (2, 3, 4, 5, 6)
    loss: str = "l1"
    learning_rate: float = 5e-4
    min_learning_rate: float = 1e-5
    warmup_iterations: int = 200
    batch_size: int = 16
    patch_size: int = 80
    epochs: int = 30
    iterations_per_epoch: int = 100
    seed: int = 0
    data_root: str = "scans"
    train_scans: tuple[str, ...] = ()
    val_scans: tuple[str, ...] = ()
    cache_dir: str = ".cache/medsr"
    ct_sampling_weight: float = 3.0
    early_stop_patience: int = 10
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    precision: str = "auto"  # training autocast: auto (bf16 where the hardware has it), fp32, bf16
    degrade_on: str = "auto"  # DEGRADE_ON: where in-plane training pairs are degraded
    model: ModelConfig = field(default_factory=ModelConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)

    def __post_init__(self) -> None:
        _require(self.task in TASKS, "task", f"must be one of {', '.join(TASKS)}", self.task)
        if self.task == "in_plane":
            _require(self.scale in (2, 4), "scale", "must be 2 or 4", self.scale)
        else:
            _require(2 <= self.scale <= 8, "scale", "must be 2 to 8 for through_plane", self.scale)
            _require(bool(self.through_plane_factors)
                     and all(2 <= int(f) <= 8 for f in self.through_plane_factors),
                     "through_plane_factors", "must list factors from 2 to 8", self.through_plane_factors)
        _require(self.loss in LOSS_NAMES, "loss", f"must be one of {', '.join(LOSS_NAMES)}", self.loss)
        _require(self.learning_rate > 0, "learning_rate", "must be positive", self.learning_rate)
        _require(0 <= self.min_learning_rate <= self.learning_rate, "min_learning_rate",
                 "must be between 0 and learning_rate", self.min_learning_rate)
        _require(self.warmup_iterations >= 0, "warmup_iterations", "must be >= 0",
                 self.warmup_iterations)
        _require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _require(self.patch_size >= 4 * self.scale and self.patch_size % self.scale == 0,
                 "patch_size", f"must be a multiple of scale ({self.scale}) and >= {4 * self.scale}",
                 self.patch_size)
        _require(self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        _require(self.iterations_per_epoch >= 1, "iterations_per_epoch", "must be >= 1",
                 self.iterations_per_epoch)
        _require(self.early_stop_patience >= 1, "early_stop_patience", "must be >= 1",
                 self.early_stop_patience)
        _require(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}",
                 self.precision)
        _require(self.degrade_on in DEGRADE_ON, "degrade_on", f"must be one of {', '.join(DEGRADE_ON)}",
                 self.degrade_on)
        _require(self.task == "in_plane" or self.degrade_on != "device", "degrade_on",
                 "can be 'device' only for task in_plane (through-plane pairs are made on the cpu)",
                 self.degrade_on)
        _require(self.ct_sampling_weight > 0, "ct_sampling_weight", "must be positive",
                 self.ct_sampling_weight)

    def scan_paths(self, which: str) -> list[Path]:
        """Resolved paths of ``train_scans`` or ``val_scans``."""
        root = Path(self.data_root)
        return [Path(p) if Path(p).is_absolute() else root / p for p in getattr(self, which)]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of built-in types (safe for YAML and ``torch.load(weights_only=True)``)."""
        return _plain(dataclasses.asdict(self))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _require(condition: bool, key: str, rule: str, value) -> None:
    if not condition:
        raise ConfigError(f"config key {key!r} {rule}, not {value!r}")


def from_dict(cls, data: dict[str, Any], where: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys are errors with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where or 'top level'!r} must be a mapping, not {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            prefix = f"{where}." if where else ""
            hint = (f"; did you mean {prefix + close[0]!r}?" if close
                    else f"; known keys: {', '.join(prefix + f for f in fields)}")
            raise ConfigError(f"unknown config key {name!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, name)
    return cls(**kwargs)


def _coerce(hint, value, name: str):
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, name)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {name!r} must be a list, not {value!r}")
        item = typing.get_args(hint)[0]
        if item is str:
            return tuple(str(v) for v in value)
        return tuple(_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value))
    if hint is bool or hint is int or hint is float or hint is str:
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if hint is float and isinstance(value, str):
            try:
                return float(value)  # YAML reads "5e-4" as a string
            except ValueError:
                pass
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"config key {name!r} must be {hint.__name__}, not {value!r}")
        return value
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.features=64"`` -> (["model", "features"], 64), value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, not {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set expects key=value, not {text!r}")
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    for override in overrides:
        keys, value = parse_override(override)
        section = data
        for key in keys[:-1]:
            section = section.setdefault(key, {})
            if not isinstance(section, dict):
                raise ConfigError(f"--set {override}: {key!r} is not a section")
        section[keys[-1]] = value
    return from_dict(TrainConfig, data)


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from medsr.writing import atomic_output

    with atomic_output(Path(path)) as temporary:
        temporary.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
