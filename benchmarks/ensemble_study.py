"""Self-ensemble and detail map, measured on real slices (the model card, "Self-ensemble" and
"Detail map").

For each scan and degradation: protocol v1's degradation of a few slices (every slice of the
sub-volume is degraded alone, so a subset is exact), then

- ``passes``: each of the eight flips/transposes alone (:mod:`medsr.ensemble`), the plain pass
  and the ensemble mean, scored with the protocol's PSNR/SSIM (through ``enhance_volume``, so
  the flat and padding rules run as in ``medsr enhance``); on the ``kspace`` grid every pass
  must score about as well as the plain one, which checks the one-pixel shift;
- ``map``: every candidate detail measure (:data:`medsr.detail_map.MEASURES`) against the real
  absolute error of the output (border of ``scale`` removed): Spearman correlation, and the
  AUROC for flagging the 5% of voxels with the largest error; over all voxels and over the
  foreground (reference above min + 10% of its range).

Usage:
    python benchmarks/ensemble_study.py SCAN [SCAN ...] --degradation kspace --slices 8
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch

from medsr.checkpoint import load_model
from medsr.detail_map import MEASURES, classical_answer, map_quality
from medsr.engine import enhance_volume, survey_scan
from medsr.ensemble import SYMMETRIES, ensemble_passes
from medsr.evaluation import ScanResult, paired_bootstrap, protocol_slice_axis
from medsr.metrics import slice_scores, trim_border
from medsr.model import DEGRADATION_CODES
from medsr.reading import OpenScan, plane_of, read_scan
from medsr.transforms import GRID_OF, degrade_volume


def middle_slices(volume: np.ndarray, axis: int, count: int) -> np.ndarray:
    """``count`` slices around the middle of ``axis``."""
    start = max(0, volume.shape[axis] // 2 - count // 2)
    return np.take(volume, np.arange(start, min(volume.shape[axis], start + count)), axis=axis)


def study(path: str, degradation: str, count: int, model) -> dict:
    scan = read_scan(path)
    axis = protocol_slice_axis(scan)
    scale = model.scale
    volume = middle_slices(scan.array.astype(np.float32), axis, count)
    low_res, high_res, low_affine = degrade_volume(volume, scan.affine, axis, scale, degradation)
    grid = GRID_OF[degradation]
    outputs, timing = {}, {}
    for name, ensemble in (("plain", False), ("ensemble", True)):
        started = time.perf_counter()
        outputs[name] = enhance_volume(low_res, low_affine, axis, model, grid, precision="fp32",
                                       ensemble=ensemble, consistency="off").array
        timing[name] = (time.perf_counter() - started) / low_res.shape[axis]
    # each pass alone, and the candidates, from the same normalised forward passes
    probe = OpenScan(shape=low_res.shape, affine=low_affine, slice_axis=axis, path=Path("<volume>"),
                     source_format="array", read_plane=functools.partial(plane_of, low_res, axis))
    window = survey_scan(probe, keep_bytes=0).counts.window(0.5, 99.5)
    slices = torch.from_numpy(window.forward(np.moveaxis(low_res, axis, 0)))[:, None]
    codes = torch.full((len(slices),), DEGRADATION_CODES[grid])
    with torch.inference_mode():
        passes = ensemble_passes(lambda x, c: model(x, c, grid=grid), slices, codes, scale, grid)[:, :, 0]
        classical = classical_answer(model, slices, grid)[:, 0]
    width = np.float32(window.high - window.low)
    results = {"scan": path, "degradation": degradation, "slice_axis": axis, "slices": int(low_res.shape[axis]),
               "seconds_per_slice_cpu": timing, "passes": {}, "map": {}}
    scores = {}
    for name, estimate in outputs.items():
        scores[name] = slice_scores(high_res, estimate, axis, scale)
        results["passes"][name] = scores[name].scores()
    for index, symmetry in enumerate(SYMMETRIES):
        one = np.moveaxis(window.inverse(passes[index].numpy()), 0, axis)
        results["passes"][f"t{int(symmetry.transpose)}r{int(symmetry.flip_rows)}c{int(symmetry.flip_columns)}"] = \
            slice_scores(high_res, one, axis, scale).scores()
    reference = trim_border(high_res, axis, scale)
    foreground = reference > reference.min() + 0.1 * np.ptp(reference)
    for output in ("plain", "ensemble"):
        error = np.abs(trim_border(outputs[output], axis, scale) - reference)
        for measure, make in MEASURES.items():
            detail = np.moveaxis((make(passes, classical) * width).numpy(), 0, axis)
            detail = trim_border(detail, axis, scale)
            results["map"][f"{output} {measure}"] = {
                "all": map_quality(detail.ravel(), error.ravel()),
                "foreground": map_quality(detail[foreground], error[foreground])}
    return results, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scans", nargs="+")
    parser.add_argument("--degradation", default="kspace")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--weights", default="medsr/weights/srresnet_x2.pt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.weights)[0].eval()
    everything, rows = [], []
    for path in args.scans:
        result, scores = study(path, args.degradation, args.slices, model)
        everything.append(result)
        rows.append(ScanResult(scan=path, degradation=args.degradation,
                               scores={k: v.scores() for k, v in scores.items()}, details=scores))
    summary = {"scans": everything,
               "paired_bootstrap_ensemble_minus_plain": paired_bootstrap(rows, "ensemble", "plain")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
