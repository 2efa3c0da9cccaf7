"""Train an SRResNet with MONAI's ``SupervisedTrainer`` and ``SupervisedEvaluator``.

One run writes into its own folder::

    out/config.yaml     the resolved config it ran with
    out/last.pt         model + optimizer + scheduler after the last complete epoch (resume)
    out/best.pt         model with the best validation SSIM so far (or the last, with no val)
    out/history.csv     per-epoch train/validation loss, validation PSNR/SSIM, learning rate
    out/curves.png      the same as plots, redrawn after every epoch
    out/tensorboard/    the same for TensorBoard (``tensorboard --logdir out/tensorboard``)

Training pairs are degraded where ``degrade_on`` says: one patch at a time with NumPy in the
data loader (``cpu``), or, the patches cropped on the CPU, the whole batch where the model runs
(``device``, :mod:`medsr.batch_degradation`; the default on CUDA, where the CPU route kept an
H100 waiting for data 67% of the time). For one seed both routes make the same pairs.

Validation uses whole held-out slices (never slices of a training volume), degraded with both
protocol degradations and scored with MONAI's PSNR and SSIM metric handlers as the evaluation
protocol scores them (volume data range, border trimmed; see :func:`to_protocol_range`).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.data import DistributedSampler
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import (
    EarlyStopHandler,
    IgniteMetricHandler,
    LrScheduleHandler,
    PeakSignalToNoiseRatio,
    StatsHandler,
    TensorBoardStatsHandler,
    ValidationHandler,
    from_engine,
)
from monai.inferers import Inferer
from monai.metrics import SSIMMetric
from monai.transforms import Lambda
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from medsr.batch_degradation import RandomBatchDegradation
from medsr.checkpoint import build_model, load_checkpoint, save_checkpoint
from medsr.config import TrainConfig, save_config
from medsr.data import (
    CachedScan,
    EpochItems,
    HighResPatches,
    PatchPairDataset,
    ThroughPlanePatches,
    discover_scans,
    load_cached_scan,
)
from medsr.degradation import DEFAULT_FEATURE_SET, DegradationClassifier
from medsr.engine import native_bf16
from medsr.errors import MedsrError
from medsr.model import DEGRADATION_CODES
from medsr.reports import plot_training_curves
from medsr.transforms import (
    DEGRADATIONS,
    DEGRADE_SLICE,
    SLICE_PROFILES,
    RandomDegradePair,
    RandomThickSlices,
    bspline_upsample,
    crop_to_multiple,
    thick_slices,
)
from medsr.writing import write_errors

logger = logging.getLogger(__name__)

LOSSES = {"l1": torch.nn.L1Loss, "mse": torch.nn.MSELoss}
VAL_SLICES_PER_SCAN = 6
# DataLoader worker processes cropping patches while the GPU trains, when degrading on CUDA
# (at most the CPUs this process may use, less one for the training loop itself)
DEVICE_ROUTE_WORKERS = 4


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    epochs: int
    iterations: int
    best_ssim: float | None


class BorderCroppedLoss(torch.nn.Module):
    """``loss(pred, target)`` over the centre only: ``border`` pixels on each side are context
    the network sees but is not scored on (their neighbours were cut off by the patch)."""

    def __init__(self, loss: torch.nn.Module, border: int) -> None:
        super().__init__()
        self.loss, self.border = loss, border

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b = self.border
        if b == 0:
            return self.loss(prediction, target)
        return self.loss(prediction[..., b:-b, b:-b], target[..., b:-b, b:-b])


def prepare_batch(batch: dict, device=None, non_blocking: bool = False, **kwargs):
    """MONAI engine hook: (inputs, targets, args, kwargs) so the network is told what it
    needs besides the image: the ``degradation`` (in-plane) or the ``factor`` (through-plane).

    Images go channels-last: oneDNN (CPU) and cuDNN (GPU) both run these convolutions faster
    in that layout."""
    move = {"device": device, "non_blocking": non_blocking}
    image = batch["image"].to(**move).contiguous(memory_format=torch.channels_last)
    told = {key: batch[key].to(**move) for key in ("degradation", "factor") if key in batch}
    return image, batch["label"].to(**move), (), told


def degrades_on_device(config: TrainConfig, device: torch.device) -> bool:
    """Whether training pairs are degraded on the training device (``degrade_on``: ``auto``
    is the device on CUDA and the CPU elsewhere; through-plane pairs always on the CPU)."""
    if config.task != "in_plane":
        return False
    if config.degrade_on == "auto":
        return device.type == "cuda"
    return config.degrade_on == "device"


class DeviceDegradation:
    """MONAI engine ``prepare_batch`` for degrading on the device: a batch of
    :class:`medsr.data.HighResPatches` goes to ``device``, is degraded there as each item's
    draw says, and loses its margin; returns what :func:`prepare_batch` returns for the same
    patches made by :class:`medsr.data.PatchPairDataset` (to float rounding).

    Args:
        patches: the dataset the batches come from (its degradation and margin).
    """

    def __init__(self, patches: HighResPatches) -> None:
        self.patches = patches

    def __call__(self, batch: dict, device=None, non_blocking: bool = False, **kwargs):
        move = {"device": device, "non_blocking": non_blocking}
        crops = batch["label"].to(**move)
        low_res, codes = self.patches.degrade(crops, batch["family"], batch["blur_sigma"], batch["fwhm"],
                                              batch["noise"].to(**move))
        low_res, high_res = self.patches.crop_margin(low_res, crops)
        return (low_res.contiguous(memory_format=torch.channels_last), high_res.contiguous(), (),
                {"degradation": codes})


def use_bf16(precision: str, device: torch.device) -> bool:
    """``auto``: bfloat16 autocast on CUDA and on CPUs with native bf16 (AVX-512 BF16/AMX),
    where it trains about 3x faster than float32 (``benchmarks/train_throughput.py``)."""
    if precision == "auto":
        return native_bf16(device)
    return precision == "bf16"


class AutocastInferer(Inferer):
    """Runs the network under bfloat16 autocast (any device; MONAI's own ``amp`` flag is
    CUDA-only and float16) and hands back float32 predictions. Weights, optimizer state and
    the loss stay float32; bf16 needs no loss scaling."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        super().__init__()
        self.device_type, self.enabled = device.type, enabled

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.enabled):
            return network(inputs, *args, **kwargs).float()


class ValidationSlices(Dataset):
    """Whole held-out slices degraded with each protocol degradation (normalised range).

    Items are ``{"image": (1, H/s, W/s), "label": (1, H, W), "degradation": (),
    "volume_range": (2,)}``; slices differ in size, so load them with batch size 1.
    ``volume_range`` is the whole volume's normalised (min, max), from which
    :func:`to_protocol_range` puts prediction and target on the protocol's footing.
    """

    def __init__(self, scans: list[CachedScan], scale: int, per_scan: int = VAL_SLICES_PER_SCAN) -> None:
        self.items = []
        for scan in scans:
            count = min(per_scan, len(scan.slices))
            for index in np.linspace(0, len(scan.slices) - 1, count).round().astype(int):
                high_res = crop_to_multiple(scan.slices[index].astype(np.float32), scale)
                for name in DEGRADATIONS:  # the protocol's two, which choose the checkpoint
                    self.items.append((DEGRADE_SLICE[name](high_res, scale), high_res,
                                       DEGRADATION_CODES[name], scan.volume_range))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        low_res, high_res, code, volume_range = self.items[index]
        return {"image": torch.from_numpy(low_res)[None], "label": torch.from_numpy(high_res)[None],
                "degradation": torch.tensor(code), "volume_range": torch.tensor(volume_range)}


class ValidationThickSlices(Dataset):
    """Whole held-out slices thickened along their second axis with each protocol v1-z profile
    at ``factor`` and B-splined back (normalised range), for the through-plane model.

    For the ~1 mm volumes validation uses, any axis can stand for the slice axis, so in-plane
    slices serve. Items are ``{"image", "label": (1, H, W'), "factor": (), "volume_range": (2,)}``
    with ``W'`` the width cut to a multiple of ``factor``; load them with batch size 1.
    """

    def __init__(self, scans: list[CachedScan], factor: int, per_scan: int = VAL_SLICES_PER_SCAN) -> None:
        self.items = []
        for scan in scans:
            count = min(per_scan, len(scan.slices))
            for index in np.linspace(0, len(scan.slices) - 1, count).round().astype(int):
                high_res = scan.slices[index].astype(np.float32)
                high_res = high_res[:, :high_res.shape[1] - high_res.shape[1] % factor]
                for profile in SLICE_PROFILES:
                    upsampled = bspline_upsample(thick_slices(high_res, 1, factor, profile), 1, factor)
                    self.items.append((upsampled, high_res, float(factor), scan.volume_range))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        upsampled, high_res, factor, volume_range = self.items[index]
        return {"image": torch.from_numpy(upsampled)[None], "label": torch.from_numpy(high_res)[None],
                "factor": torch.tensor(factor), "volume_range": torch.tensor(volume_range)}


def to_protocol_range(item: dict, scale: int) -> dict:
    """Evaluator post-processing: what the evaluation protocol scores, per slice.

    Prediction and target are mapped so the whole volume's range is [0, 1] (PSNR and SSIM with
    ``data_range = max - min`` of the volume are invariant to that map, so data range 1 is
    exact) and a border of ``scale`` pixels is removed. Left as in the protocol's definition
    apart from one thing: PSNR is averaged per slice here, not computed over the whole volume.
    """
    low, high = (float(v) for v in item["volume_range"])
    for key in ("pred", "label"):
        item[key] = ((item[key] - low) / (high - low))[..., scale:-scale, scale:-scale]
    return item


def _cached(config: TrainConfig, which: str) -> list[CachedScan]:
    scans = []
    for root in config.scan_paths(which):
        for source in discover_scans(root):
            try:
                scans.append(load_cached_scan(source, Path(config.cache_dir),
                                              config.lower_percentile, config.upper_percentile))
            except MedsrError as exc:
                logger.warning("skipping %s: %s", source, exc)
    logger.info("%s: %d scans, %d informative slices", which, len(scans),
                sum(len(s.slices) for s in scans))
    return scans


def check_patient_split(config: TrainConfig) -> None:
    """Validation must hold whole volumes the training never sees: no validation path may
    equal, contain or sit inside a training path.

    Raises:
        MedsrError: the two lists overlap.
    """
    train_paths = [p.resolve() for p in config.scan_paths("train_scans")]
    for val_path in (p.resolve() for p in config.scan_paths("val_scans")):
        for train_path in train_paths:
            if val_path == train_path or train_path in val_path.parents or val_path in train_path.parents:
                raise MedsrError(
                    f"validation scans {val_path} overlap training scans {train_path}; "
                    "split by whole patients (separate folders or files)"
                )


@dataclass(frozen=True)
class Processes:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_process_group(device_type: str) -> Processes:
    """Join the process group ``torchrun`` describes in the environment (NCCL on CUDA, gloo on
    the CPU); a plain run is a group of one and initialises nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Processes(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def train(config: TrainConfig, out_dir: str | Path, resume: bool = False,
          device: str = "auto") -> TrainResult:
    """Run (or resume) training as ``config`` says, writing into ``out_dir``.

    Under ``torchrun --nproc_per_node N`` every process trains on its own share of the patches
    (DistributedDataParallel, global batch ``N * batch_size``) and validates its share of the
    slices (MONAI's metric handlers gather them); only rank 0 writes checkpoints, logs and curves.

    Raises:
        MedsrError: no training data, or ``out_dir`` already holds a run and ``resume`` is off.
    """
    out_dir = Path(out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if not resume and last_path.exists():
        raise MedsrError(f"{out_dir}: already holds a run; pass --resume to continue it or pick another --out")
    if resume and not last_path.exists():
        raise MedsrError(f"{out_dir}: nothing to resume (no last.pt)")
    if not config.train_scans:
        raise MedsrError("the config lists no train_scans")
    check_patient_split(config)
    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                else ("cpu" if device == "auto" else device))
    processes = join_process_group(torch_device.type)
    if torch_device.type == "cuda":
        torch_device = torch.device("cuda", processes.local_rank)
        torch.cuda.set_device(torch_device)
    if processes.is_main:
        with write_errors(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
    set_determinism(seed=config.seed + processes.rank)

    train_scans = _cached(config, "train_scans")
    on_device = degrades_on_device(config, torch_device)
    patches = training_patches(config, train_scans, processes.world_size, on_device)
    loader = training_loader(patches, config.batch_size, processes, torch_device)
    logger.info("training pairs degraded on %s", torch_device.type if on_device else "the cpu, per patch")

    model = build_model(config).to(torch_device, memory_format=torch.channels_last)
    inferer = AutocastInferer(torch_device, use_bf16(config.precision, torch_device))
    network = model if processes.world_size == 1 else DistributedDataParallel(
        model, device_ids=[torch_device.index] if torch_device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = learning_rate_schedule(optimizer, config)

    main_only_handlers = [
        StatsHandler(name=__name__, tag_name="train_loss",
                     iteration_log=lambda engine, _: engine.state.iteration % 50 == 0,
                     output_transform=from_engine(["loss"], first=True)),
        TensorBoardStatsHandler(log_dir=str(out_dir / "tensorboard"), tag_name="train_loss",
                                output_transform=from_engine(["loss"], first=True)),
    ] if processes.is_main else []
    trainer = SupervisedTrainer(
        device=torch_device, max_epochs=config.epochs, train_data_loader=loader, network=network,
        optimizer=optimizer, loss_function=BorderCroppedLoss(LOSSES[config.loss](), patches.context),
        prepare_batch=DeviceDegradation(patches) if on_device else prepare_batch, inferer=inferer,
        non_blocking=on_device and torch_device.type == "cuda",  # batches come pinned
        epoch_length=config.iterations_per_epoch,
        train_handlers=[LrScheduleHandler(scheduler, print_lr=False, epoch_level=False), *main_only_handlers],
    )
    for handler in main_only_handlers:
        if isinstance(handler, StatsHandler):
            # it logs every exception with its traceback, an interruption or a full disk too; the
            # CLI reports them (one line for those, the traceback for a bug). Replaced, not just
            # removed: with an empty list of handlers ignite would swallow the exception
            trainer.remove_event_handler(handler.exception_raised, Events.EXCEPTION_RAISED)
            trainer.add_event_handler(Events.EXCEPTION_RAISED, _raise)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: patches.set_epoch(engine.state.epoch))
    epoch_losses: list[float] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: epoch_losses.clear())
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda engine: epoch_losses.append(float(engine.state.output[0]["loss"])))

    evaluator = _validator(config, network, torch_device, trainer, out_dir, processes, inferer)
    history_path = out_dir / "history.csv"
    best = {"ssim": -np.inf}
    if resume:
        state = load_checkpoint(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        best["ssim"] = float(state.get("best_ssim", -np.inf))
        trainer.state.epoch = int(state["epoch"])
        trainer.state.iteration = int(state["iteration"])
        logger.info("resuming %s after epoch %d", out_dir, trainer.state.epoch)
    if processes.is_main:
        save_config(config, out_dir / "config.yaml")

    @trainer.on(Events.EPOCH_COMPLETED)
    def _end_of_epoch(engine) -> None:
        if not processes.is_main:
            return
        epoch, iteration = engine.state.epoch, engine.state.iteration
        metrics = evaluator.state.metrics if evaluator is not None else {}
        ssim = metrics.get("val_ssim")
        if ssim is None or ssim > best["ssim"]:
            best["ssim"] = ssim if ssim is not None else best["ssim"]
            save_checkpoint(best_path, model, config, epoch, iteration)
        save_checkpoint(last_path, model, config, epoch, iteration,
                        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        best_ssim=float(best["ssim"]))
        _append_history(history_path, {
            "epoch": epoch, "iteration": iteration,
            "train_loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan"),
            "val_loss": metrics.get("val_loss", float("nan")),
            "val_psnr": metrics.get("val_psnr", float("nan")),
            "val_ssim": metrics.get("val_ssim", float("nan")),
            "learning_rate": optimizer.param_groups[0]["lr"],
        })
        plot_training_curves(history_path, out_dir / "curves.png")
        logger.info("epoch %d/%d done: train loss %.5f, val PSNR %s, val SSIM %s", epoch,
                    config.epochs, np.mean(epoch_losses) if epoch_losses else float("nan"),
                    f"{metrics['val_psnr']:.3f}" if "val_psnr" in metrics else "-",
                    f"{metrics['val_ssim']:.4f}" if "val_ssim" in metrics else "-")

    trainer.run()
    if processes.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(out_dir, trainer.state.epoch, trainer.state.iteration,
                       None if not np.isfinite(best["ssim"]) else float(best["ssim"]))


def training_patches(config: TrainConfig, scans: list[CachedScan], world_size: int, on_device: bool = False):
    """The random patch pairs of one epoch, for the config's task: degraded in the loader, or
    (``on_device``) cropped only, with each item's degradation drawn (:class:`HighResPatches`)."""
    length = config.batch_size * config.iterations_per_epoch * world_size
    if config.task == "through_plane":
        return ThroughPlanePatches(scans, config.patch_size, length,
                                   RandomThickSlices(config.through_plane_factors),
                                   ct_weight=config.ct_sampling_weight, seed=config.seed)
    ranges = {"blur_sigma_range": (config.degradation.blur_sigma_min, config.degradation.blur_sigma_max),
              "noise_std_range": (0.0, config.degradation.noise_std_max)}
    if on_device:
        return HighResPatches(scans, config.patch_size, config.scale, length,
                              RandomBatchDegradation(config.scale, config.degradation.probabilities, **ranges),
                              ct_weight=config.ct_sampling_weight, seed=config.seed)
    degrade = RandomDegradePair(config.scale, config.degradation.probabilities, **ranges)
    return PatchPairDataset(scans, config.patch_size, config.scale, length, degrade,
                            ct_weight=config.ct_sampling_weight, seed=config.seed)


def training_loader(patches, batch_size: int, processes: Processes, device: torch.device,
                    workers: int | None = None) -> DataLoader:
    """Batches of ``patches`` in order (``patches.set_epoch`` picks the epoch), this process's
    share under ``torchrun``.

    Patches degraded in the loader are made in the training process, as they always were.
    :class:`HighResPatches` on CUDA are cropped by ``workers`` persistent worker processes
    (default :data:`DEVICE_ROUTE_WORKERS`, fewer on a smaller machine) while the GPU trains;
    the sampler hands them ``(epoch, index)``, since ``set_epoch`` cannot reach their copies
    of the dataset.
    """
    sampler = (DistributedSampler(patches, shuffle=False, num_replicas=processes.world_size,
                                  rank=processes.rank) if processes.world_size > 1 else None)
    cuda = device.type == "cuda"
    if not isinstance(patches, HighResPatches):
        return DataLoader(patches, batch_size=batch_size, shuffle=False, sampler=sampler,
                          num_workers=0, pin_memory=cuda)
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(DEVICE_ROUTE_WORKERS, cpus - 1) if cuda else 0
    items = EpochItems(patches, sampler if sampler is not None else range(len(patches)))
    return DataLoader(patches, batch_size=batch_size, sampler=items, num_workers=max(workers, 0),
                      persistent_workers=workers > 0, pin_memory=cuda)


def learning_rate_schedule(optimizer, config: TrainConfig):
    """Linear warm-up, then cosine decay to ``min_learning_rate``, stepped every iteration.

    The warm-up matters here: the output convolution starts at zero so the untrained network
    equals the classical upsampler, and full-size first Adam steps would throw that away.
    """
    total = config.epochs * config.iterations_per_epoch
    warmup = min(config.warmup_iterations, total - 1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, total - warmup), eta_min=config.min_learning_rate)
    if warmup == 0:
        return cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def _validator(config: TrainConfig, model, device, trainer, out_dir: Path,
               processes: Processes, inferer: Inferer) -> SupervisedEvaluator | None:
    """A ``SupervisedEvaluator`` run after every epoch, stopping training when SSIM stalls."""
    if not config.val_scans:
        return None
    val_scans = _cached(config, "val_scans")
    if not val_scans:
        return None
    slices = (ValidationThickSlices(val_scans, config.scale) if config.task == "through_plane"
              else ValidationSlices(val_scans, config.scale))
    sampler = (DistributedSampler(slices, shuffle=False, even_divisible=False, num_replicas=processes.world_size,
                                  rank=processes.rank) if processes.world_size > 1 else None)
    loader = DataLoader(slices, batch_size=1, sampler=sampler)
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=loader, network=model, prepare_batch=prepare_batch,
        inferer=inferer,
        key_val_metric={"val_ssim": IgniteMetricHandler(
            metric_fn=SSIMMetric(spatial_dims=2, data_range=1.0),  # Gaussian 11x11, sigma 1.5
            output_transform=from_engine(["pred", "label"]))},
        additional_metrics={
            "val_psnr": PeakSignalToNoiseRatio(max_val=1.0, output_transform=from_engine(["pred", "label"])),
            "val_loss": IgniteMetricHandler(loss_fn=LOSSES[config.loss](),
                                            output_transform=from_engine(["pred", "label"])),
        },
        postprocessing=Lambda(lambda item: to_protocol_range(item, config.scale)),
        val_handlers=[TensorBoardStatsHandler(
            log_dir=str(Path(out_dir) / "tensorboard"), output_transform=lambda _: None,
            global_epoch_transform=lambda _: trainer.state.epoch)] if processes.is_main else None,
    )
    ValidationHandler(interval=1, validator=evaluator, epoch_level=True).attach(trainer)
    EarlyStopHandler(patience=config.early_stop_patience, trainer=trainer,
                     score_function=lambda engine: engine.state.metrics["val_ssim"]).attach(evaluator)
    return evaluator


def _raise(engine, error: BaseException) -> None:
    raise error


def _append_history(path: Path, row: dict) -> None:
    new = not path.exists()
    with write_errors(path), path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


# ------------------------------------------------------------------ the degradation classifier


class _FeatureExamples(Dataset):
    """``{"image": (n,) features, "label": class index}`` items for the classifier."""

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.features = torch.as_tensor(features, dtype=torch.float32)
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.features[index], "label": self.labels[index]}


def _below_root(name: str, data_root: str | Path) -> str:
    """A scan's name below the config's data root: a published report names no local folder."""
    try:
        return Path(name).relative_to(data_root).as_posix()
    except ValueError:
        return Path(name).name


def fit_classifier(features: np.ndarray, labels: np.ndarray, epochs: int = 300,
                   feature_set: str = DEFAULT_FEATURE_SET) -> DegradationClassifier:
    """Fit a :class:`~medsr.degradation.DegradationClassifier` to ``(N, n)`` slice features of
    ``feature_set`` and their class indices with MONAI's ``SupervisedTrainer`` (AdamW,
    cross-entropy, a little noise on the standardised features so no single bin is trusted too
    much); returned in eval mode.
    Seed first (``monai.utils.set_determinism``) for a reproducible fit."""

    mean = torch.as_tensor(features.mean(axis=0), dtype=torch.float32)
    std = torch.as_tensor(features.std(axis=0) + 1e-6, dtype=torch.float32)
    classifier = DegradationClassifier(mean, std, feature_set=feature_set)
    loader = DataLoader(_FeatureExamples(features, labels), batch_size=256, shuffle=True)

    def noisy_batch(batch: dict, device=None, non_blocking: bool = False, **kwargs):
        image = batch["image"] + 0.05 * std * torch.randn_like(batch["image"])
        return image, batch["label"]

    SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=epochs, train_data_loader=loader, network=classifier,
        optimizer=torch.optim.AdamW(classifier.parameters(), lr=3e-3, weight_decay=1e-3),
        loss_function=torch.nn.CrossEntropyLoss(), prepare_batch=noisy_batch,
    ).run()
    return classifier.eval()


def member_temperatures(temperature: float | list[float], members: int) -> list[float]:
    """One temperature per member: ``temperature`` for all, or its values one by one.

    Raises:
        MedsrError: a member count out of range, a list of another length, or a value that is
            not finite and positive.
    """
    from medsr.degradation import MAX_MEMBERS, usable_temperature

    if not 1 <= members <= MAX_MEMBERS:
        raise MedsrError(f"members must be 1 to {MAX_MEMBERS}, not {members}")
    values = [float(temperature)] if np.isscalar(temperature) else [float(t) for t in temperature]
    if len(values) == 1:
        values = values * members
    if len(values) != members:
        raise MedsrError(f"give one temperature, or one per member ({members}), not {len(values)}")
    for value in values:
        if not usable_temperature(value):
            raise MedsrError(f"temperature must be finite and positive, not {value}")
    return values


def train_degradation_classifier(config: TrainConfig, out_path: str | Path, slices_per_scan: int = 60,
                                 epochs: int = 300, feature_set: str = DEFAULT_FEATURE_SET,
                                 temperature: float | list[float] = 1.0, history: bool = True, storage: bool = True,
                                 members: int = 1) -> dict:
    """Fit the degradation classifier (:mod:`medsr.degradation`) on the config's training scans
    with MONAI's ``SupervisedTrainer``, score it on the validation scans, save it to
    ``out_path`` with that report inside, and return the report.

    ``feature_set`` names what it reads from each slice (:data:`medsr.degradation.FEATURE_SETS`);
    ``temperature`` divides its logits (1: as fitted; the calibrated value comes from the
    leave-one-source-out decisions of ``benchmarks/degradation_loso.py``); ``members`` > 1 fits
    that many classifiers, member ``i`` with seed ``config.seed + i``, and saves them as one
    :class:`~medsr.degradation.ClassifierEnsemble` (``temperature``: one value for all, or one
    per member, each calibrated at the same seed); ``history`` gives
    each training slice a random :func:`medsr.data.source_history` first (medsr 0.2.0: none);
    ``storage`` stores each degraded slice as a file may (:func:`medsr.data.stored_as_file`:
    rounded, clipped; medsr 0.2.0 and the first 2026-12-06 x2 classifier: never).

    The validation report gives, per degradation, how many volumes got the right grid (the
    decision :func:`medsr.degradation.estimate_degradation` makes, from up to 64 slices) and
    the per-slice accuracy.

    Raises:
        MedsrError: no training scans.
    """
    from medsr.data import degradation_examples
    from medsr.degradation import (
        CLASSES,
        FEATURE_SETS,
        MAX_SLICES,
        ClassifierEnsemble,
        choose_grid,
        save_classifier,
    )
    from medsr.transforms import GRID_OF

    if not config.train_scans:
        raise MedsrError("the config lists no train_scans")
    if feature_set not in FEATURE_SETS:
        raise MedsrError(f"features must be one of {', '.join(FEATURE_SETS)}, not {feature_set!r}")
    temperatures = member_temperatures(temperature, members)
    check_patient_split(config)
    features_of = FEATURE_SETS[feature_set]
    fitted = []
    for member, member_temperature in enumerate(temperatures):  # member 0: what a single fit gives
        seed = config.seed + member
        set_determinism(seed=seed)
        features, labels, _ = degradation_examples(_cached(config, "train_scans"), config.scale,
                                                   slices_per_scan, seed, features_of=features_of,
                                                   history=history, storage=storage)
        fitted.append(fit_classifier(features, labels, epochs, feature_set))
        fitted[-1].temperature.fill_(member_temperature)
    classifier = fitted[0] if members == 1 else ClassifierEnsemble(fitted).eval()
    report = {"train_examples": int(len(labels)), "scale": config.scale, "features": feature_set,
              "history": history, "storage": storage, "members": members,
              "calibration": {"temperature": temperatures[0] if members == 1 else temperatures}, "validation": {}}
    val_scans = _cached(config, "val_scans") if config.val_scans else []
    if val_scans:
        features, labels, owners = degradation_examples(val_scans, config.scale, MAX_SLICES,
                                                        config.seed, randomise=False, features_of=features_of)
        probabilities = classifier.probabilities(features)
        on_kspace = np.array([GRID_OF[name] == "kspace" for name in CLASSES])
        for label, name in enumerate(CLASSES):
            truth = GRID_OF[name]
            slice_right = (probabilities[labels == label][:, on_kspace].sum(axis=1) > 0.5) == (truth == "kspace")
            decisions = []
            for owner in np.unique(owners[labels == label]):
                mine = probabilities[(labels == label) & (owners == owner)].mean(axis=0)
                decisions.append(choose_grid(float(mine[on_kspace].sum())))
            report["validation"][name] = {
                "grid": truth, "volumes": len(decisions),
                "volumes_right": int(sum(d == truth for d in decisions)),
                "slice_accuracy": float(slice_right.mean()),
                "volume_names": [_below_root(val_scans[o].name, config.data_root)
                                 for o in np.unique(owners[labels == label])],
                "decisions": decisions,
            }
    save_classifier(Path(out_path), classifier, config.scale, report)
    return report
