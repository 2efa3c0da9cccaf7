"""Plain, consistency, ensemble and both, on the same slices (issue #22; model card, "Self-ensemble
and detail map").

``medsr evaluate --consistency on --ensemble`` scores the projected output, the same pass without
the projection (``plain``) and the projected ensemble (both), but not the ensemble without the
projection, and its bootstrap compares the ensemble with the projected output, not with plain.
This script scores all four from two engine runs per volume and degradation (the ``plain_sink``
of each run gives its output without the projection):

- one pass, ``--consistency on``: ``consistency``, and ``plain`` from its plain sink;
- the eight passes, ``--consistency on --ensemble``: ``both``, and ``ensemble`` from its plain sink.

It prints, per degradation, the mean PSNR/SSIM over the scans of the best classical baseline and
of the four, and the paired bootstrap (:func:`medsr.evaluation.paired_bootstrap`, scans then
slices) of ``consistency``, ``ensemble`` and ``both`` against ``plain``.

``--time`` instead times :func:`medsr.engine.enhance_volume` on each scan's degraded slices with
each of the four options (after a warm-up; ``--repeat N`` interleaved runs of each, the median),
in seconds per slice and as ratios to plain.

Usage (the model card's table: every 4th slice of the five whole test volumes; ``--every 1``
scores every slice):
    python benchmarks/consistency_ensemble_table.py <the 5 test volumes> --every 4 --scale 2 \
        --degradation bicubic,kspace,area,gaussian,lanczos,rician --bootstrap 2000 --json OUT
Earlier, on cut-outs (8 middle slices of 2 test volumes, cut out with their affine):
    python benchmarks/consistency_ensemble_table.py CUT1.nii.gz CUT2.nii.gz --scale 4 \
        --degradation bicubic,kspace,area,gaussian,lanczos,rician --bootstrap 2000 [--json OUT]
    python benchmarks/consistency_ensemble_table.py CUT1.nii.gz CUT2.nii.gz --scale 4 --time --repeat 3
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from medsr.checkpoint import default_weights, load_model
from medsr.engine import enhance_volume
from medsr.evaluation import BASELINES, ScanResult, best_baseline, paired_bootstrap, protocol_slice_axis
from medsr.metrics import slice_scores
from medsr.reading import read_scan
from medsr.transforms import GRID_OF, degrade_volume

METHODS = ("plain", "consistency", "ensemble", "both")


def run(volume: np.ndarray, affine: np.ndarray, axis: int, model, grid: str, ensemble: bool,
        precision: str, device: str) -> tuple[np.ndarray, np.ndarray]:
    """The projected output and the same passes without the projection."""
    plain = []
    projected = enhance_volume(volume, affine, axis, model, grid, device=device, precision=precision,
                               consistency="on", ensemble=ensemble, plain_sink=plain.append).array
    return projected, np.moveaxis(np.concatenate(plain), 0, axis)


def every_nth(count: int, every: int) -> np.ndarray:
    """Slice indices ``every`` apart, centred in the volume (all of them for 1)."""
    return np.arange((count - 1) % every // 2, count, every)


def score(path: str, degradation: str, model, precision: str, device: str, every: int = 1) -> ScanResult:
    scan = read_scan(path)
    axis = protocol_slice_axis(scan)
    scale = model.scale
    low_res, high_res, low_affine = degrade_volume(scan.array, scan.affine, axis, scale, degradation)
    # Degraded whole (the Rician level comes from the whole volume), then thinned: every slice is
    # enhanced and scored on its own, and the data range and foreground stay the whole volume's.
    volume_range = (float(high_res.min()), float(high_res.max()))
    keep = every_nth(high_res.shape[axis], every)
    low_res, high_res = np.take(low_res, keep, axis=axis), np.take(high_res, keep, axis=axis)
    grid = GRID_OF[degradation]
    estimates = {name: baseline(low_res, axis, scale) for name, baseline in BASELINES.items()}
    estimates["consistency"], estimates["plain"] = run(low_res, low_affine, axis, model, grid, False,
                                                       precision, device)
    estimates["both"], estimates["ensemble"] = run(low_res, low_affine, axis, model, grid, True,
                                                   precision, device)
    result = ScanResult(scan=str(path), degradation=degradation)
    for name, estimate in estimates.items():
        result.details[name] = slice_scores(high_res, estimate, axis, scale, volume_range)
        result.scores[name] = result.details[name].scores()
    return result


def table(results: list[ScanResult], replicates: int) -> dict:
    out = {}
    for degradation in dict.fromkeys(r.degradation for r in results):
        rows = [r for r in results if r.degradation == degradation]
        means = {m: {k: float(np.mean([r.scores[m][k] for r in rows])) for k in ("psnr", "ssim")}
                 for m in rows[0].scores}
        entry = {"means": means, "best_baseline": best_baseline(means, degradation),
                 "per_scan": {r.scan: r.scores for r in rows}, "bootstrap": {}}
        for method in METHODS[1:]:
            entry["bootstrap"][method] = paired_bootstrap(rows, method, "plain", replicates)
        out[degradation] = entry
        cells = [f"{entry['best_baseline']['psnr']:.2f} / {entry['best_baseline']['ssim']:.4f}"]
        cells += [f"{means[m]['psnr']:.2f} / {means[m]['ssim']:.4f}" for m in METHODS]
        print(f"| {degradation} | " + " | ".join(cells) + " |", flush=True)
        for method, found in entry["bootstrap"].items():
            p, s = found["psnr"], found["ssim"]
            print(f"    {degradation}: {method} - plain {p['difference']:+.3f} dB [{p['low']:+.3f}, {p['high']:+.3f}], "
                  f"SSIM {s['difference']:+.4f} [{s['low']:+.4f}, {s['high']:+.4f}]", flush=True)
    return out


def timing(paths: list[str], model, degradation: str, precision: str, device: str, repeats: int) -> dict:
    out = {}
    grid = GRID_OF[degradation]
    for path in paths:
        scan = read_scan(path)
        axis = protocol_slice_axis(scan)
        low_res, _, low_affine = degrade_volume(scan.array, scan.affine, axis, model.scale, degradation)
        count = low_res.shape[axis]
        enhance_volume(np.take(low_res, [0], axis=axis), low_affine, axis, model, grid, device=device,
                       precision=precision, consistency="off")  # warm-up
        runs = {name: [] for name in METHODS}
        for _ in range(repeats):  # interleaved, so a slow spell of the machine hits all four
            for name, ensemble, consistency in (("plain", False, "off"), ("consistency", False, "on"),
                                                ("ensemble", True, "off"), ("both", True, "on")):
                started = time.perf_counter()
                enhance_volume(low_res, low_affine, axis, model, grid, device=device, precision=precision,
                               consistency=consistency, ensemble=ensemble)
                runs[name].append((time.perf_counter() - started) / count)
        seconds = {name: float(np.median(times)) for name, times in runs.items()}
        out[path] = {"slices": count, "low_res_slice": [low_res.shape[a] for a in range(3) if a != axis],
                     "seconds_per_slice": seconds, "runs": runs,
                     "ratio_to_plain": {k: v / seconds["plain"] for k, v in seconds.items()}}
        print(f"{path} ({count} slices of {out[path]['low_res_slice']} in): "
              + ", ".join(f"{k} {v:.3f} s ({v / seconds['plain']:.2f}x)" for k, v in seconds.items()), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scans", nargs="+")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--degradation", default="bicubic,kspace")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--every", type=int, default=1,
                        help="score every Nth slice of each whole volume (1: all; the slices are enhanced one by one)")
    parser.add_argument("--time", action="store_true", help="time the four options instead (first degradation)")
    parser.add_argument("--repeat", type=int, default=1, help="--time: runs of each option (median)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    model, _ = load_model(default_weights(args.scale))
    degradations = args.degradation.split(",")
    if args.time:
        found = timing(args.scans, model, degradations[0], args.precision, args.device, args.repeat)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(found, handle, indent=1)
    else:
        found = {}
        for degradation in degradations:
            results = []
            for path in args.scans:
                started = time.perf_counter()
                results.append(score(path, degradation, model, args.precision, args.device, args.every))
                print(f"scored {path} {degradation} in {time.perf_counter() - started:.0f} s", flush=True)
            found.update(table(results, args.bootstrap))
            if args.json:  # after each degradation, so a run cut short keeps what it found
                with open(args.json, "w") as handle:
                    json.dump(found, handle, indent=1)


if __name__ == "__main__":
    main()
