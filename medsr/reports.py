"""Figures for people: training curves and side-by-side comparisons with error maps.

Matplotlib runs headless (Agg); every figure is written atomically as PNG.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from medsr.reading import plane_of
from medsr.writing import atomic_output, write_errors

CURVES = (("train_loss", "val_loss", "loss"), ("val_psnr", None, "validation PSNR (dB)"),
          ("val_ssim", None, "validation SSIM"), ("learning_rate", None, "learning rate"))


def plot_training_curves(history_csv: Path, output_png: Path) -> Path:
    """Train/validation loss, validation PSNR and SSIM, and learning rate per epoch."""
    with Path(history_csv).open() as handle:
        rows = list(csv.DictReader(handle))
    epochs = [int(r["epoch"]) for r in rows]
    figure, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for axis, (first, second, title) in zip(axes, CURVES, strict=True):
        for key in (first, second):
            if key and rows and key in rows[0]:
                axis.plot(epochs, [float(r[key]) for r in rows], marker=".", label=key.replace("_", " "))
        axis.set_title(title)
        axis.set_xlabel("epoch")
        if second:
            axis.legend()
    axes[-1].set_yscale("log")
    figure.tight_layout()
    return _save(figure, output_png)


def _zoom_box(reference: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the ``size`` square with the most structure (largest gradient)."""
    gradient = np.hypot(*np.gradient(reference.astype(np.float64)))
    best, corner = -1.0, (0, 0)
    step = max(1, size // 2)
    for top in range(0, max(1, reference.shape[0] - size + 1), step):
        for left in range(0, max(1, reference.shape[1] - size + 1), step):
            value = gradient[top:top + size, left:left + size].sum()
            if value > best:
                best, corner = value, (top, left)
    return corner


def comparison_figure(images: dict[str, np.ndarray], slice_axis: int, slice_index: int,
                      title: str, output_png: Path, scores: dict[str, dict[str, float]] | None = None) -> Path:
    """low-res | each method | ground truth, with a zoomed inset row and an error-map row.

    Args:
        images: ``low_res``, ``high_res`` and one volume per method, all in original units;
            methods share the ``high_res`` shape.
        slice_axis: axis of the slices.
        slice_index: slice to show.
        title: figure title (scan and degradation).
        output_png: where to write.
        scores: optional ``{method: {"psnr", "ssim"}}`` shown under each panel.
    """
    reference = plane_of(images["high_res"], slice_axis, slice_index).T
    methods = [m for m in images if m not in ("low_res", "high_res")]
    panels = ["low_res", *methods, "high_res"]
    low, high = np.percentile(reference, [0.5, 99.5])
    size = max(16, min(reference.shape) // 4)
    top, left = _zoom_box(reference, size)
    error_limit = 0.1 * (high - low)
    figure, axes = plt.subplots(3, len(panels), figsize=(2.6 * len(panels), 8.2), squeeze=False)
    for column, name in enumerate(panels):
        image = plane_of(images[name], slice_axis, slice_index).T
        if name == "low_res":  # show on the high-res grid, nearest neighbour, to keep pixels honest
            factor = reference.shape[0] // image.shape[0]
            image = np.kron(image, np.ones((factor, factor)))[:reference.shape[0], :reference.shape[1]]
        axes[0, column].imshow(image, cmap="gray", vmin=low, vmax=high)
        label = "ground truth" if name == "high_res" else name.replace("_", " ")
        if scores and name in scores:
            label += f"\n{scores[name]['psnr']:.2f} dB / {scores[name]['ssim']:.4f}"
        axes[0, column].set_title(label, fontsize=9)
        axes[0, column].add_patch(plt.Rectangle((left, top), size, size, fill=False, color="yellow", lw=1))
        axes[1, column].imshow(image[top:top + size, left:left + size], cmap="gray", vmin=low,
                               vmax=high, interpolation="nearest")
        if name in ("low_res", "high_res"):
            axes[2, column].axis("off")
        else:
            axes[2, column].imshow(np.abs(image - reference), cmap="inferno", vmin=0, vmax=error_limit)
            axes[2, column].set_title("|error|", fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, output_png)


def thick_slices_figure(volumes: dict[str, np.ndarray], slice_axis: int, spacing: np.ndarray, title: str,
                        output_png: Path) -> Path:
    """Coronal and sagittal planes (the two planes that contain the slice axis, through the
    middle of the volume) of each volume side by side, drawn to scale, the slice axis upwards.

    Args:
        volumes: name -> volume on the thin grid (the thick input repeated, nearest neighbour,
            to show it honestly), same shape.
        slice_axis: the axis that was thick.
        spacing: voxel size in mm of the thin grid, per axis.
        title: figure title.
        output_png: where to write.
    """
    names = list(volumes)
    first = volumes[names[0]]
    low, high = np.percentile(first, [0.5, 99.5])
    in_plane = [a for a in range(3) if a != slice_axis]
    figure, axes = plt.subplots(2, len(names), figsize=(3.4 * len(names), 7.0), squeeze=False)
    for row, across in enumerate(reversed(in_plane)):  # planes at a fixed row, then at a fixed column
        along = next(a for a in in_plane if a != across)
        for column, name in enumerate(names):
            plane = plane_of(volumes[name], across, volumes[name].shape[across] // 2)
            # plane axes are (along, slice axis) in order; draw the slice axis vertically, upwards
            image = plane.T if along < slice_axis else plane
            axes[row, column].imshow(image, cmap="gray", vmin=low, vmax=high, origin="lower",
                                     aspect=spacing[slice_axis] / spacing[along], interpolation="nearest")
            axes[row, column].set_title(f"{name} ({'coronal' if row == 0 else 'sagittal'})", fontsize=9)
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, output_png)


def _save(figure, output_png: Path) -> Path:
    output_png = Path(output_png)
    with atomic_output(output_png, suffix=".tmp.png") as temporary:
        figure.savefig(temporary, dpi=110)
    plt.close(figure)
    return output_png


def write_comparison(folder: Path, result, slice_axis: int) -> Path:
    """The comparison figure of one evaluated scan on its middle scored slice; frees the images.

    ``result`` is an :class:`medsr.evaluation.ScanResult` evaluated with ``keep_images=True``.
    """
    from medsr.metrics import scored_slices

    folder = Path(folder)
    with write_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    reference = result.images["high_res"]
    candidates = scored_slices(reference, slice_axis, float(reference.min()), float(np.ptp(reference)))
    index = candidates[len(candidates) // 2] if candidates else reference.shape[slice_axis] // 2
    name = Path(result.scan).name.split(".")[0]
    title = f"{Path(result.scan).name}: {result.degradation} degradation, slice {index}"
    stem = f"{name}_{result.degradation.replace(' ', '_')}"
    path = comparison_figure(result.images, slice_axis, index, title, folder / f"{stem}.png", result.scores)
    for model, detail in result.maps.items():
        safe = model.replace("/", "_")
        detail_map_figure(result.images["low_res"], result.images[f"{model} ensemble"], result.images["high_res"],
                          detail, slice_axis, index, f"{title}; {model} ensemble",
                          folder / f"{stem}_{safe}_detail_map.png", result.map_quality.get(model))
    result.images, result.maps = {}, {}
    return path


def detail_map_figure(low_res: np.ndarray, output: np.ndarray, reference: np.ndarray, detail: np.ndarray,
                      slice_axis: int, slice_index: int, title: str, output_png: Path,
                      quality: dict[str, float] | None = None) -> Path:
    """input | output | |error| | detail map of one slice, side by side (the input shown on
    the output grid, nearest neighbour). The error is drawn from 0 to a tenth of the
    reference's 0.5-99.5 percentile range; the map, which ranks the error rather than
    measuring it, on its own scale (0 to its 99.5th percentile on the slice), labelled so.

    Args:
        low_res, output, reference, detail: volumes in original units (``low_res`` coarser
            in-plane; the others on the output grid).
        slice_axis, slice_index: the slice to show.
        title: figure title.
        output_png: where to write.
        quality: optional ``{"spearman", "auroc", "auroc_anatomy"}`` of the map (the figure
            shows the first two).
    """
    truth = plane_of(reference, slice_axis, slice_index).T
    shown = plane_of(output, slice_axis, slice_index).T
    coarse = plane_of(low_res, slice_axis, slice_index).T
    factor = truth.shape[0] // coarse.shape[0]
    coarse = np.kron(coarse, np.ones((factor, factor)))[:truth.shape[0], :truth.shape[1]]
    low, high = np.percentile(truth, [0.5, 99.5])
    limit = 0.1 * (high - low)
    detail_plane = plane_of(detail, slice_axis, slice_index).T
    map_limit = float(np.percentile(detail_plane, 99.5)) or 1.0
    panels = [("input (low-res)", coarse, "gray", (low, high)), ("output", shown, "gray", (low, high)),
              (f"|output - truth| (0 to {limit:.3g})", np.abs(shown - truth), "inferno", (0, limit)),
              (f"detail map (0 to {map_limit:.3g})", detail_plane, "inferno", (0, map_limit))]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.4), squeeze=False)
    for axis, (label, image, colours, (vmin, vmax)) in zip(axes[0], panels, strict=True):
        axis.imshow(image, cmap=colours, vmin=vmin, vmax=vmax)
        axis.set_title(label, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    if quality:
        axes[0, -1].set_xlabel(f"Spearman {quality['spearman']:.2f}, AUROC (top 5%) {quality['auroc']:.2f}",
                               fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, output_png)


def write_metrics(folder: Path, results, summary, protocol: str = "v1", intervals: dict | None = None) -> None:
    """``metrics.json`` (per scan and mean, the auto runs' decisions, each model's relative
    consistency error without and with the projection, bootstrap intervals) and
    ``metrics.csv`` (one row per scan and method)."""
    folder = Path(folder)
    with write_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    payload = {"protocol": f"medsr evaluation protocol {protocol}",
               "scans": [{"scan": r.scan, "degradation": r.degradation, "scores": r.scores,
                          "decisions": {m: {"grid": d.grid, "confidence": d.confidence, "likely": d.likely,
                                            "second_look_slices": d.probed}
                                        for m, d in r.decisions.items()},
                          "consistency_error": {m: {"plain": plain, "projected": projected}
                                                for m, (plain, projected) in r.consistency.items()},
                          "detail_map": r.map_quality}
                         for r in results],
               "mean": summary, "paired_bootstrap": intervals or {}}
    _write_text(folder / "metrics.json", json.dumps(_strict(payload), indent=2, allow_nan=False))
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["scan", "degradation", "method", "psnr", "ssim"])
    for r in results:
        for method, values in r.scores.items():
            writer.writerow([r.scan, r.degradation, method, f"{values['psnr']:.4f}", f"{values['ssim']:.5f}"])
    _write_text(folder / "metrics.csv", table.getvalue())


def _strict(value):
    """``value`` with every non-finite number as None: a map's AUROC without both classes (a
    constant reference), or PSNR of a perfect match, is no number, and strict JSON readers
    refuse a bare ``NaN`` or ``Infinity``."""
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as temporary:
        temporary.write_text(text)
