"""What each answer to "which grid?" costs, scan by scan: the per-view table that lets any
decision rule be scored against the best classical answer (issue: "the no-flag path is never
worse than interpolation").

For every view of :mod:`degradation_loso` (each volume of the collection's training, validation
and test sources, in its acquired plane and, for volumes with about equal voxels, the other two),
each degraded by protocol v1 and the stress degradations and stored as a file would store it,
a few evenly spaced scored slices are enhanced by the shipped model told each grid
(``medsr.engine.enhance_volume``, the no-flag path's code after the decision) and scored as
protocol v1 does (data range and foreground from the whole reference volume, border trimmed):

- ``kspace`` and ``bicubic``: the model told that grid;
- ``mix 0.25/0.5/0.75``: the pixelwise blend ``w * kspace + (1 - w) * bicubic``;
- ``cubic`` and ``zero_fill``: the protocol's baselines.

One JSON line per view and degradation (sums of squared errors per slice, SSIM per slice) in
``--out``; a rerun skips what is there. ``--summary`` reads the table and the decisions of
``degradation_loso.py`` and prints what each rule gives.

    python benchmarks/grid_fallback.py --data-root ../shared/scans [--scale 2] [--slices 4]
    python benchmarks/grid_fallback.py --summary [--decisions .cache/loso/decisions_x2.json]
    python benchmarks/grid_fallback.py --summary --average --decisions SEED0.json SEED1.json SEED2.json \
        [--figure docs/decision/reliability_x2.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from degradation_loso import SOURCES, TEST, reliability_figure, stored, views

from medsr.checkpoint import default_weights, load_model
from medsr.degradation import choose_grid
from medsr.engine import enhance_volume
from medsr.evaluation import upscale_bicubic, upscale_zero_fill
from medsr.metrics import SliceScores, scored_slices, slice_scores
from medsr.transforms import ALL_DEGRADATIONS, GRID_OF, STRESS_DEGRADATIONS, degrade_volume

MIXES = (0.25, 0.5, 0.75)


def chosen_slices(high_res: np.ndarray, axis: int, count: int) -> np.ndarray:
    """``count`` evenly spaced slices among those the protocol's SSIM scores."""
    volume_min = float(high_res.min())
    scored = scored_slices(high_res, axis, volume_min, float(high_res.max()) - volume_min)
    if not scored:
        scored = list(range(high_res.shape[axis]))
    picks = np.linspace(0, len(scored) - 1, min(count, len(scored))).round().astype(int)
    return np.asarray(scored)[np.unique(picks)]


def scores(high_res: np.ndarray, estimate: np.ndarray, axis: int, scale: int,
           volume_range: tuple[float, float]) -> dict[str, list]:
    """The protocol's per-slice scores (:func:`medsr.metrics.slice_scores`) as JSON."""
    scored = slice_scores(high_res, estimate, axis, scale, volume_range)
    return {"sse": scored.squared_error.tolist(), "voxels": scored.voxels.tolist(),
            "ssim": [None if np.isnan(v) else float(v) for v in scored.ssim]}


def degraded_views(data_root: Path, groups: dict[str, list[str]], scale: int, slice_count: int, done: set):
    """Every view of every volume in ``groups``, degraded whole by each degradation and stored
    as its file would store it, with ``slice_count`` evenly spaced scored slices: yields
    ``(source, name, degradation, axis, picks, low, high, volume_range, low_res)``, ``low`` and
    ``high`` the picked slices in the volume's layout (slices along ``axis``), ``low_res`` the
    whole stored low-res volume. ``(name, degradation)`` pairs in ``done`` are skipped.
    ``source`` keeps the ``test: `` of :data:`TEST`'s keys."""
    for source, paths in groups.items():
        for relative in paths:
            for plane, volume, axis, _ in views(data_root / relative):
                name = f"{relative} [{plane}]"
                for degradation in ALL_DEGRADATIONS:
                    if (name, degradation) in done:
                        continue
                    low_res, high_res, _ = degrade_volume(volume, np.eye(4), axis, scale, degradation)
                    low_res = stored(low_res, volume)
                    volume_range = (float(high_res.min()), float(high_res.max()))
                    picks = chosen_slices(high_res, axis, slice_count)
                    yield (source, name, degradation, axis, picks, np.take(low_res, picks, axis=axis),
                           np.take(high_res, picks, axis=axis), volume_range, low_res)


def done_in(path: Path) -> set:
    """The ``(volume, degradation)`` pairs a JSON-lines table already holds."""
    if not path.exists():
        return set()
    return {(r["volume"], r["degradation"]) for r in map(json.loads, path.read_text().splitlines())}


def measure(args) -> None:
    model, _ = load_model(default_weights(args.scale))
    model.eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    groups = {**TEST, **SOURCES} if args.test_first else {**SOURCES, **TEST}
    for source, name, degradation, axis, picks, low, high, volume_range, _ in degraded_views(
            args.data_root, groups, args.scale, args.slices, done_in(args.out)):
        started = time.perf_counter()
        with torch.inference_mode():
            # the network's own answer on each grid (no consistency projection)
            told = {grid: enhance_volume(low, np.eye(4), axis, model, grid, consistency="off").array
                    for grid in ("kspace", "bicubic")}
        estimates = {**told, "cubic": upscale_bicubic(low, axis, args.scale),
                     "zero_fill": upscale_zero_fill(low, axis, args.scale)}
        for w in MIXES:
            estimates[f"mix {w}"] = w * told["kspace"] + (1 - w) * told["bicubic"]
        row = {"source": source, "volume": name, "degradation": degradation,
               "truth": GRID_OF[degradation], "slices": picks.tolist(),
               "data_range": volume_range[1] - volume_range[0],
               "scores": {k: scores(high, v, axis, args.scale, volume_range)
                          for k, v in estimates.items()}}
        with args.out.open("a") as file:
            file.write(json.dumps(row) + "\n")
        print(f"{name} {degradation}: {time.perf_counter() - started:.1f} s "
              + " ".join(f"{k} {psnr(row, k):.2f}" for k in estimates), flush=True)


def _scored(row: dict, method: str) -> SliceScores:
    kept = row["scores"][method]
    ssim_values = np.array([np.nan if v is None else v for v in kept["ssim"]], dtype=np.float64)
    return SliceScores(np.asarray(kept["sse"]), np.asarray(kept["voxels"]), ssim_values, row["data_range"])


def psnr(row: dict, method: str) -> float:
    return _scored(row, method).scores()["psnr"]


def ssim(row: dict, method: str) -> float:
    return _scored(row, method).scores()["ssim"]


def best_classical(row: dict) -> tuple[float, float]:
    """The protocol's best baseline for the view's degradation: cubic, and for a degradation on
    the k-space grid also zero-filled k-space (best PSNR and best SSIM, each on its own)."""
    counted = ["cubic"] + (["zero_fill"] if row["truth"] == "kspace" else [])
    return max(psnr(row, m) for m in counted), max(ssim(row, m) for m in counted)


def gap_line(label: str, rows: list[dict], values, told, wrong: int) -> str:
    """One summary line for a decision rule on ``rows``: each view's PSNR under the rule
    (``values``) against the best classical answer and against the model told the truth
    (``told``), how many views are below the former, the mean against the latter, the worst."""
    gaps = np.asarray(values) - [best_classical(r)[0] for r in rows]
    against_told = np.asarray(values) - np.asarray(told)
    worst = int(np.argmin(gaps))
    return (f"  {label} views {len(rows):3d}  wrong grid {wrong:3d}  below classical {int((gaps < 0).sum()):3d}  "
            f"mean vs told {against_told.mean():+.2f}  worst {gaps[worst]:+.2f} "
            f"({rows[worst]['volume']} {rows[worst]['degradation']})")


def calibrated_decisions(path: Path) -> dict:
    """``(volume, degradation)`` -> the calibrated decision of one ``degradation_loso.py`` file."""
    if not path.exists():
        raise SystemExit(f"error: {path}: no such decisions file (benchmarks/degradation_loso.py writes it)")
    variants = json.loads(path.read_text())
    if "native" not in variants:
        raise SystemExit(f"error: {path}: holds no 'native' variant (run degradation_loso.py with it)")
    return {(d["volume"], d["degradation"]): d for d in variants["native"]["calibrated"]}


def decisions_as_fitted(path: Path) -> dict:
    """``(volume, degradation)`` -> the uncalibrated decision of one ``degradation_loso.py`` file."""
    calibrated_decisions(path)  # the same checks
    return {(d["volume"], d["degradation"]): d for d in json.loads(path.read_text())["native"]["decisions"]}


def averaged(runs) -> dict:
    """One decision from several classifiers (e.g. fitted with other seeds): the mean of their
    calibrated probabilities of the ``kspace`` grid, then the grid a single classifier would take
    (:func:`medsr.degradation.choose_grid`)."""
    runs = list(runs)
    out = {}
    for key, first in runs[0].items():
        kspace = np.mean([d["confidence"] if d["grid"] == "kspace" else 1 - d["confidence"]
                          for d in (run[key] for run in runs)])
        grid = choose_grid(float(kspace))
        out[key] = {**first, "grid": grid, "confidence": float(kspace if grid == "kspace" else 1 - kspace)}
    return out


def summary(args) -> None:
    rows = [json.loads(line) for line in args.out.read_text().splitlines()]
    methods = ["kspace", "bicubic", *(f"mix {w}" for w in MIXES)]
    print(f"{len(rows)} views; PSNR minus the best classical answer (dB), by true grid")
    for truth in ("bicubic", "kspace"):
        mine = [r for r in rows if r["truth"] == truth]
        print(f"  truth {truth} ({len(mine)} views)")
        for m in methods:
            gap = np.array([psnr(r, m) - best_classical(r)[0] for r in mine])
            print(f"    {m:10s} mean {gap.mean():+6.2f}  worst {gap.min():+6.2f}  below 0: {int((gap < 0).sum())}")
    named = [(str(path), calibrated_decisions(path)) for path in args.decisions]
    if args.average:
        named = [(f"the average of {len(named)} files", averaged(d for _, d in named))]
        if args.figure:
            as_fitted = averaged(decisions_as_fitted(path) for path in args.decisions)
            reliability_figure({f"{len(args.decisions)} classifiers averaged": {
                "temperature": "each member's temperature", "decisions": list(as_fitted.values()),
                "calibrated": list(named[0][1].values())}}, args.figure)
    for label, decisions in named:
        print(f"\n{label}: the calibrated decision (leave-one-source-out; test: fitted on every source)")
        rules = {"hard": lambda d: d["grid"],
                 "hard if >= 0.8, else mix 0.5": lambda d: d["grid"] if d["confidence"] >= 0.8 else "mix 0.5"}
        for name, rule in rules.items():
            for split in ("leave-one-source-out", "test"):
                for kind, names in (("protocol", ("bicubic", "kspace")), ("stress", STRESS_DEGRADATIONS)):
                    table = [(r, decisions[(r["volume"], r["degradation"])]) for r in rows
                             if (r["volume"], r["degradation"]) in decisions and r["degradation"] in names
                             and (r["source"] in TEST) == (split == "test")]
                    if not table:
                        continue
                    print(gap_line(f"{name:29s} {split:20s} {kind:8s}", [r for r, _ in table],
                                   [psnr(r, rule(d)) for r, d in table], [psnr(r, r["truth"]) for r, _ in table],
                                   sum(d["grid"] != r["truth"] for r, d in table)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--test-first", action="store_true")
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--decisions", type=Path, nargs="+",
                        help="decisions_x{scale}.json files of degradation_loso.py to score")
    parser.add_argument("--average", action="store_true",
                        help="score one decision: the mean kspace probability of all --decisions files "
                             "(classifiers fitted with other seeds)")
    parser.add_argument("--figure", type=Path,
                        help="with --average: the averaged decision's reliability diagram (PNG)")
    args = parser.parse_args()
    args.out = args.out or Path(f".cache/fallback/x{args.scale}.jsonl")
    args.decisions = args.decisions or [Path(f".cache/loso/decisions_x{args.scale}.json")]
    torch.set_num_threads(1)
    if args.summary:
        summary(args)
    elif args.data_root is None:
        parser.error("--data-root is needed to measure (or pass --summary)")
    else:
        measure(args)


if __name__ == "__main__":
    main()
