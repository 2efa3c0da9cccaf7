"""Issue #14's two cheap questions about the shipped x2 model, answered by fine-tuning it:

1. Does it pay to train longer? Fine-tune the shipped weights for more iterations (a new
   warm-up and cosine schedule) with the shipped recipe's degradations.
2. Do the neighbouring slices help (a 2.5-D input)? The same fine-tune, with the low-res slice
   before and after as two more input planes whose head weights start at zero, so both runs
   start from the same network and see the same crops and degradations in the same order; the
   only difference is what the extra planes carry.

Three steps, each a subcommand (one CPU core per training run; run two side by side):

    python benchmarks/finetune_study.py cache --scans <scans> --out study/cache
    python benchmarks/finetune_study.py train --cache study/cache --out study/flat --iterations 4000
    python benchmarks/finetune_study.py train --cache study/cache --out study/neighbours --neighbours
    python benchmarks/finetune_study.py score --cache study/cache shipped=- flat=study/flat/model.pt \
        neighbours=study/neighbours/model.pt:neighbours

``score`` runs protocol v1 x2 (both degradations) on the cached validation volumes, in the
normalised units of the cache (PSNR and SSIM do not change under the window's linear map),
without the product's flat-background and padding rules; the shipped model scored here matches
its model card within 0.02 dB. The model card ("Training longer, and neighbouring slices") has the
figures. This is a study, not the training pipeline: ``medsr train`` makes shipped weights.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from skimage.metrics import structural_similarity

from medsr.batch_degradation import RandomBatchDegradation
from medsr.checkpoint import default_weights, safe_torch_load
from medsr.data import discover_scans, informative_mask, is_ct
from medsr.evaluation import BASELINES, slice_scores
from medsr.metrics import FOREGROUND_FRACTION, FOREGROUND_LEVEL, SSIM_SIGMA, scored_slices, trim_border
from medsr.model import DEGRADATION_CODES, SRResNet
from medsr.reading import read_scan
from medsr.transforms import DEGRADE_SLICE, crop_to_multiple, robust_window

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "srresnet_l1_x2.yaml"
SCALE, BATCH, PATCH, CONTEXT, MARGIN = 2, 16, 80, 8, 16  # the shipped recipe's patch geometry
REGION = PATCH + 2 * (CONTEXT + MARGIN)  # high-res side of each crop, degraded whole


def cache(scans: Path, out: Path) -> None:
    """Every training and validation scan of the shipped config, normalised as training does,
    slice axis first, with its informative slices marked."""
    config = yaml.safe_load(CONFIG.read_text())
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train_scans", "val_scans"):
        for entry in config[split]:
            for number, source in enumerate(discover_scans(scans / entry)):
                scan = read_scan(source.path, source.series_uid)
                normalised = robust_window(scan.array).forward(scan.array)
                volume = np.moveaxis(normalised, scan.slice_axis, 0)
                name = f"{split.split('_')[0]}_{entry.replace('/', '_')}_{number}"
                np.savez_compressed(out / f"{name}.npz", volume=volume.astype(np.float16),
                                    informative=informative_mask(normalised, scan.slice_axis),
                                    is_ct=is_ct(scan.array, scan.modality))
                print(name, volume.shape, flush=True)


def shipped_model(neighbours: bool) -> SRResNet:
    """The shipped x2 network; with ``neighbours`` its head takes two more planes (the slices
    before and after), their weights zero, so it computes exactly what the shipped one does."""
    model = SRResNet(SCALE, features=48, num_res_blocks=8)
    model.load_state_dict(safe_torch_load(default_weights(SCALE))["model"])
    if neighbours:
        head = model.head.conv
        wider = torch.nn.Conv2d(head.in_channels + 2, head.out_channels, head.kernel_size, padding=head.padding)
        with torch.no_grad():
            wider.weight.zero_()
            wider.weight[:, :head.in_channels] = head.weight
            wider.bias.copy_(head.bias)
        model.head.conv = wider
    return model


def run(model: SRResNet, stacks: torch.Tensor, codes: torch.Tensor, neighbours: bool) -> torch.Tensor:
    """``stacks`` ``(B, 3, h, w)``: the slice before, the slice, the slice after (low-res)."""
    centre = stacks[:, 1:2]
    batch, _, height, width = stacks.shape
    is_kspace = (codes == DEGRADATION_CODES["kspace"]).view(batch, 1, 1, 1)
    planes = [centre, is_kspace.to(stacks.dtype).expand(batch, 1, height, width)]
    if neighbours:
        planes += [stacks[:, :1], stacks[:, 2:]]
    features = model.head(torch.cat(planes, 1))
    features = features + model.body_out(model.body(features))
    return model.classical_upsample(centre, is_kspace) + model.tail(model.upsample(features))


def _volumes(folder: Path, split: str):
    for path in sorted(folder.glob(f"{split}_*.npz")):
        with np.load(path) as stored:
            yield path.stem, stored["volume"], np.flatnonzero(stored["informative"]), bool(stored["is_ct"])


def train(folder: Path, out: Path, iterations: int, neighbours: bool, learning_rate: float, retries: int,
          snapshot_every: int = 0) -> None:
    """Fine-tune on one core with bf16 autocast: L1 over the loss region, Adam, 50 warm-up
    iterations, cosine decay to 1e-5; crops, flips, turns and degradations drawn from
    ``[0, iteration]``, so runs with and without neighbours see the same batches. With
    ``snapshot_every`` the weights are also kept every that many iterations (``model_<n>.pt``),
    to be scored like a checkpoint chosen on validation."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(CONFIG.read_text())
    probabilities = dict(config["degradation"])
    noise_max = probabilities.pop("noise_std_max")
    degrade = RandomBatchDegradation(SCALE, probabilities, noise_std_range=(0.0, noise_max))
    volumes = [(volume, slices, ct) for _, volume, slices, ct in _volumes(folder, "train")]
    items = [(k, i) for k, (_, slices, _) in enumerate(volumes) for i in slices]
    weights = np.array([config.get("ct_sampling_weight", 3.0) if volumes[k][2] else 1.0 for k, _ in items])
    weights /= weights.sum()

    def crop(rng: np.random.Generator) -> np.ndarray:
        for _ in range(retries):  # redraw mostly empty crops, as training does
            k, i = items[rng.choice(len(items), p=weights)]
            volume = volumes[k][0]
            stack = volume[[max(i - 1, 0), i, min(i + 1, len(volume) - 1)]]
            pad = [(0, 0)] + [(0, max(0, REGION - n)) for n in stack.shape[1:]]
            stack = np.pad(stack, pad, mode="reflect") if any(after for _, after in pad) else stack
            top, left = (int(rng.integers(n - REGION + 1)) for n in stack.shape[1:])
            region = stack[:, top:top + REGION, left:left + REGION].astype(np.float32)
            if (region[1, MARGIN:-MARGIN, MARGIN:-MARGIN] > FOREGROUND_LEVEL).mean() >= FOREGROUND_FRACTION:
                break
        region = region[:, :, ::-1] if rng.random() < 0.5 else region
        region = region[:, ::-1] if rng.random() < 0.5 else region
        return np.ascontiguousarray(np.rot90(region, k=int(rng.integers(4)), axes=(1, 2)))

    model = shipped_model(neighbours).to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    floor = 1e-5 / learning_rate
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda it: min(1.0, (it + 1) / 50) * (
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(it, iterations) / iterations))))
    low_side, seen = REGION // SCALE, PATCH + 2 * CONTEXT
    start, running = time.time(), 0.0
    with open(out / "log.csv", "w") as log:
        print("iteration,train_loss,seconds", file=log)
        for iteration in range(iterations):
            rng = np.random.default_rng([0, iteration])
            crops, draws = [], []
            for _ in range(BATCH):
                crops.append(crop(rng))
                draw = degrade.draw(int(rng.integers(2**31)), (REGION, REGION))
                std = float(draw["noise"][0].std())
                for plane in range(3):  # one degradation per stack, the noise each slice's own
                    own = dict(draw)
                    if plane != 1 and std > 0:
                        own["noise"] = torch.from_numpy(rng.normal(0, std, draw["noise"].shape).astype(np.float32))
                    draws.append(own)
            high_res = torch.from_numpy(np.stack(crops)).reshape(3 * BATCH, 1, REGION, REGION)
            low_res, codes = degrade(high_res, **torch.utils.data.default_collate(draws))
            m = MARGIN // SCALE
            low_res = low_res.reshape(BATCH, 3, low_side, low_side)[..., m:m + seen // SCALE, m:m + seen // SCALE]
            target = high_res.reshape(BATCH, 3, REGION, REGION)[:, 1:2, MARGIN:MARGIN + seen, MARGIN:MARGIN + seen]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                estimate = run(model, low_res.contiguous(memory_format=torch.channels_last),
                               codes.reshape(BATCH, 3)[:, 1], neighbours)
            loss = (estimate.float() - target)[..., CONTEXT:-CONTEXT, CONTEXT:-CONTEXT].abs().mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            running += loss.item()
            if (iteration + 1) % 50 == 0:
                print(f"{iteration + 1},{running / 50:.6f},{time.time() - start:.0f}", file=log, flush=True)
                running = 0.0
            if snapshot_every and (iteration + 1) % snapshot_every == 0 and iteration + 1 < iterations:
                torch.save({"model": model.state_dict(), "neighbours": neighbours}, out / f"model_{iteration + 1}.pt")
    torch.save({"model": model.state_dict(), "neighbours": neighbours}, out / "model.pt")


def region_ssims(reference: np.ndarray, test: np.ndarray, data_range: float, minimum: float) -> tuple[float, float]:
    """Mean of the SSIM map over the foreground (above the protocol's 10% level) and over the
    rest, on the slices the protocol scores (slice axis first): where a difference in SSIM sits."""
    foreground, background = [], []
    for i in scored_slices(reference, 0, minimum, data_range):
        _, similarity = structural_similarity(reference[i].astype(np.float64), test[i].astype(np.float64),
                                              data_range=data_range, gaussian_weights=True, sigma=SSIM_SIGMA,
                                              use_sample_covariance=False, full=True)
        inside = reference[i] > minimum + FOREGROUND_LEVEL * data_range
        foreground.append(similarity[inside])
        background.append(similarity[~inside])
    return float(np.concatenate(foreground).mean()), float(np.concatenate(background).mean())


def score(folder: Path, specs: list[str], threads: int = 2) -> None:
    """Protocol v1 x2 on the cached validation volumes for each ``name=weights[:neighbours]``
    (``-``: the shipped file as it is), beside cubic interpolation and zero-filled k-space;
    each line gives PSNR / SSIM, then the SSIM map's mean over foreground and background."""
    torch.set_num_threads(threads)
    models = []
    for spec in specs:
        name, _, weights = spec.partition("=")
        path, _, flag = weights.partition(":")
        model = shipped_model(flag == "neighbours")
        if path != "-":
            model.load_state_dict(safe_torch_load(Path(path))["model"])
        models.append((name, model.eval(), flag == "neighbours"))
    totals: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    for volume_name, volume, _, _ in _volumes(folder, "val"):
        high_res = crop_to_multiple(volume.astype(np.float32), SCALE)
        data_range, minimum = float(high_res.max() - high_res.min()), float(high_res.min())
        reference = trim_border(high_res, 0, SCALE)
        for degradation in ("bicubic", "kspace"):
            low_res = np.stack([DEGRADE_SLICE[degradation](s, SCALE) for s in high_res]).astype(np.float32)
            estimates = {name: upscale(low_res, 0, SCALE) for name, upscale in BASELINES.items()}
            low_res, n = torch.from_numpy(low_res), len(low_res)
            for name, model, neighbours in models:
                parts = []
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                    for first in range(0, n, 4):
                        indices = range(first, min(first + 4, n))
                        stacks = torch.stack([low_res[[max(i - 1, 0), i, min(i + 1, n - 1)]] for i in indices])
                        codes = torch.full((len(indices),), DEGRADATION_CODES[degradation])
                        parts.append(run(model, stacks, codes, neighbours)[:, 0].float())
                estimates[name] = torch.cat(parts).numpy()
            for name, estimate in estimates.items():
                protocol = slice_scores(high_res, estimate, 0, SCALE).scores()
                result = (protocol["psnr"], protocol["ssim"],
                          *region_ssims(reference, trim_border(estimate, 0, SCALE), data_range, minimum))
                totals.setdefault((degradation, name), []).append(result)
                print(f"{volume_name} {degradation} {name}: {result[0]:.3f} / {result[1]:.4f} "
                      f"(foreground {result[2]:.4f}, background {result[3]:.4f})", flush=True)
    for (degradation, name), results in totals.items():
        mean = np.mean(results, axis=0)
        print(f"mean {degradation} {name}: {mean[0]:.3f} / {mean[1]:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    step = steps.add_parser("cache")
    step.add_argument("--scans", type=Path, required=True)
    step.add_argument("--out", type=Path, required=True)
    step = steps.add_parser("train")
    step.add_argument("--cache", type=Path, required=True)
    step.add_argument("--out", type=Path, required=True)
    step.add_argument("--iterations", type=int, default=4000)
    step.add_argument("--neighbours", action="store_true")
    step.add_argument("--learning-rate", type=float, default=2e-4)
    step.add_argument("--retries", type=int, default=5, choices=range(1, 101), metavar="1-100",
                      help="draws of a crop until one is not mostly empty (1: uniform crops)")
    step.add_argument("--snapshot-every", type=int, default=0, help="also keep the weights every N iterations")
    step = steps.add_parser("score")
    step.add_argument("--cache", type=Path, required=True)
    step.add_argument("models", nargs="+", help="name=weights[:neighbours], weights '-' for the shipped file")
    step.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    if arguments.step == "cache":
        cache(arguments.scans, arguments.out)
    elif arguments.step == "train":
        train(arguments.cache, arguments.out, arguments.iterations, arguments.neighbours,
              arguments.learning_rate, arguments.retries, arguments.snapshot_every)
    else:
        score(arguments.cache, arguments.models, arguments.threads)


if __name__ == "__main__":
    main()
