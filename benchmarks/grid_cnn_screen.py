"""A screen, not a product: does a small CNN on low-res patches name the grid better than the
shipped spectrum classifier, on sources it never saw (issue #21)?

Why it might: the classifier reads each slice's power spectrum, which keeps how much energy
sits near the low-res Nyquist frequency but drops the phase. The two grids also differ in phase-
coherent, local ways: anti-aliased resampling still folds the band above the low-res Nyquist
back in (skimage's Gaussian pre-filter passes about 0.3-0.7 of it), so oblique edges step;
k-space truncation folds nothing and rings instead. A convolutional network sees edges; a
power spectrum does not.

The same folds, views, histories and storage as :mod:`degradation_loso` (its ``build`` with
this script's patch extractor in place of the spectrum features): each training slice, made
with a random source history, degraded six ways and stored as a file may store it, gives its
:data:`PATCHES` patches of :data:`SIDE` x :data:`SIDE` low-res pixels with the most gradient
energy (each slice scaled by its own 0.5-99.5 percentile range). For every source, the network
is fitted on the others' patches (six classes, random flips and transposes) and decides every
view of the held-out source by the mean class probability over the patches of its informative
slices (at most 64), the grid by :func:`medsr.degradation.choose_grid` as the classifier does.
The test split is decided by a network fitted on all eleven sources.

Printed: grid right per fold and, left out and test, for the protocol's two degradations and
the stress four, beside the shipped classifier's leave-one-source-out decisions when
``--decisions`` files (``degradation_loso.py``) are given (their mean, as the shipped
three-member classifier decides). Per-view probabilities go to ``--out`` (JSON) so the two can
be combined later.

    python benchmarks/grid_cnn_screen.py --data-root ../shared/scans [--epochs 6] \
        [--decisions SEED0.json SEED1.json SEED2.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from degradation_loso import SOURCES, TEST, TRAIN_SLICES_PER_VIEW, build
from grid_fallback import averaged, calibrated_decisions

from medsr.degradation import CLASSES, choose_grid
from medsr.transforms import GRID_OF, STRESS_DEGRADATIONS

SIDE = 20  # low-res pixels per patch side
PATCHES = 4  # patches per slice, where the gradient energy is largest
ON_KSPACE = np.array([GRID_OF[name] == "kspace" for name in CLASSES])


def patches(low_res: np.ndarray) -> np.ndarray:
    """``(PATCHES, SIDE, SIDE)`` float16: the non-overlapping patches of one slice with the most
    gradient energy, the slice scaled by its own 0.5-99.5 percentile range (so units and window
    do not matter)."""
    image = np.asarray(low_res, dtype=np.float32)
    low, high = np.percentile(image, [0.5, 99.5])
    image = (image - low) / max(float(high - low), 1e-6)
    pad = [(0, max(0, SIDE - n)) for n in image.shape]
    image = np.pad(image, pad, mode="reflect" if min(image.shape) > 1 else "edge")
    gy, gx = np.gradient(image)
    energy = np.pad(np.cumsum(np.cumsum(gy ** 2 + gx ** 2, 0), 1), ((1, 0), (1, 0)))
    step = SIDE // 4
    rows = np.arange(0, image.shape[0] - SIDE + 1, step)
    cols = np.arange(0, image.shape[1] - SIDE + 1, step)
    r, c = np.meshgrid(rows, cols, indexing="ij")
    sums = energy[r + SIDE, c + SIDE] - energy[r, c + SIDE] - energy[r + SIDE, c] + energy[r, c]
    order = np.argsort(sums, axis=None)[::-1]
    taken: list[tuple[int, int]] = []
    for flat in order:
        y, x = int(r.flat[flat]), int(c.flat[flat])
        if all(abs(y - ty) >= SIDE or abs(x - tx) >= SIDE for ty, tx in taken):
            taken.append((y, x))
            if len(taken) == PATCHES:
                break
    while len(taken) < PATCHES:  # a small slice: repeat what there is
        taken.append(taken[len(taken) % max(1, len(taken))])
    return np.stack([image[y:y + SIDE, x:x + SIDE] for y, x in taken]).astype(np.float16)


class GridNet(nn.Module):
    """Six classes from one patch: five 3x3 convolutions (two of them stride 2), global mean
    and max pooling, one hidden layer."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8 * w, 64), nn.ReLU(), nn.Linear(64, len(CLASSES)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(dim=(-2, -1), keepdim=True)  # the patch's level says nothing about the kernel
        f = self.features(x)
        return self.head(torch.cat([f.mean(dim=(-2, -1)), f.amax(dim=(-2, -1))], 1))


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the eight flips/transposes of ``(N, 1, H, W)`` (both grids are kept by each)."""
    if k & 4:
        x = x.transpose(-2, -1)
    if k & 2:
        x = x.flip(-1)
    if k & 1:
        x = x.flip(-2)
    return x


def fit(x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> GridNet:
    torch.manual_seed(seed)
    model = GridNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 2e-3, total_steps=epochs * (len(x) // 256 + 1))
    data, labels = torch.from_numpy(x.astype(np.float32))[:, None], torch.from_numpy(y).long()
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(x), 256):
            index = order[start:start + 256]
            batch = dihedral(data[index], int(rng.integers(8)))
            loss = nn.functional.cross_entropy(model(batch), labels[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return model.eval()


def decide(model: GridNet, case_patches: np.ndarray) -> tuple[float, np.ndarray]:
    """The ``kspace`` grid probability and the six class probabilities of one view: the mean
    over its slices' patches."""
    with torch.no_grad():
        x = torch.from_numpy(case_patches.reshape(-1, SIDE, SIDE).astype(np.float32))[:, None]
        probabilities = torch.softmax(model(x), 1).mean(0).double().numpy()
    return float(probabilities[ON_KSPACE].sum()), probabilities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(".cache/grid_cnn"))
    parser.add_argument("--out", type=Path, default=Path(".cache/grid_cnn/decisions.json"))
    parser.add_argument("--decisions", type=Path, nargs="*", default=[],
                        help="degradation_loso.py decision files, to print the classifier beside it")
    parser.add_argument("--folds", nargs="*", help="only these held-out sources (a quick look)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps([str(args.data_root.resolve()), SOURCES, TEST, args.seed, SIDE, PATCHES,
                                     TRAIN_SLICES_PER_VIEW]).encode()).hexdigest()[:12]
    cache = args.cache / f"patches_x{args.scale}_{key}.npz"
    if cache.exists():
        data = np.load(cache, allow_pickle=True)["data"].item()
    else:
        data = build(args.data_root, {**SOURCES, **TEST}, args.scale, args.seed, patches)
        np.savez_compressed(cache, data=np.array(data, dtype=object))
    train, cases = data["train"], data["cases"]
    classifier = averaged(calibrated_decisions(p) for p in args.decisions) if args.decisions else {}
    out = []
    for held_out in (args.folds or [*SOURCES, "test"]):
        chosen = [v for v in train.values() if v[0] in SOURCES and v[0] != held_out and v[1]]
        x = np.concatenate([v[2].reshape(-1, SIDE, SIDE) for v in chosen])
        y = np.concatenate([np.repeat(v[3], PATCHES) for v in chosen])
        started = time.perf_counter()
        model = fit(x, y, args.epochs, args.seed)
        with torch.no_grad():  # how well one patch names the grid where the network was fitted
            sample = np.random.default_rng(1).choice(len(x), min(8000, len(x)), replace=False)
            fitted = torch.softmax(model(torch.from_numpy(x[sample].astype(np.float32))[:, None]), 1).numpy()
        in_sample = float(np.mean((fitted[:, ON_KSPACE].sum(1) > 0.5) == ON_KSPACE[y[sample]]))
        targets = [c for c in cases if c["source"] == held_out or (held_out == "test" and c["source"] in TEST)]
        right = 0
        for case in targets:
            p_kspace, probabilities = decide(model, case["features"])
            grid = choose_grid(p_kspace)
            right += grid == GRID_OF[case["degradation"]]
            out.append({"source": case["source"], "volume": case["volume"], "degradation": case["degradation"],
                        "p_kspace": p_kspace, "classes": probabilities.tolist(), "grid": grid})
        print(f"fold {held_out}: {right}/{len(targets)} right ({len(x)} patches, "
              f"{time.perf_counter() - started:.0f} s; one training patch names the grid {in_sample:.3f})", flush=True)
        args.out.write_text(json.dumps(out))
    print("\ngrid right          CNN             classifier (mean of the --decisions files)")
    for split in ("left out", "test"):
        for kind, names in (("protocol", ("bicubic", "kspace")), ("stress", STRESS_DEGRADATIONS)):
            mine = [d for d in out if (d["source"] in TEST) == (split == "test") and d["degradation"] in names]
            if not mine:
                continue
            cnn = sum(d["grid"] == GRID_OF[d["degradation"]] for d in mine)
            known = [classifier.get((d["volume"], d["degradation"])) for d in mine]
            shipped = (f"{sum(k['grid'] == GRID_OF[d['degradation']] for k, d in zip(known, mine, strict=True))}"
                       f"/{len(mine)}" if all(known) and known else "-")
            print(f"  {split:8s} {kind:8s}  {cnn:3d}/{len(mine):<3d}         {shipped}")


if __name__ == "__main__":
    main()
