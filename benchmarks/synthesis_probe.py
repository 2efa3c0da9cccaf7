"""Analysis by synthesis, measured on every view of the leave-one-source-out table (issue: "the
no-flag path is never worse than interpolation"): where the degradation classifier is unsure,
does the model itself, told each grid and its answer degraded back, name the true grid?

For the same views and degradations as :mod:`grid_fallback` (each view degraded whole and
stored as a file would store it), :func:`medsr.synthesis.probe_features` (the default path's own
code, the shipped model in bf16 autocast where the CPU has it) gives the two differences of log
residual ratios on the slices the default path probes: of the informative slices the classifier
reads, up to four evenly spaced non-constant ones (:func:`medsr.synthesis.probe_slices`).
Recorded per view and degradation (``--out``, one JSON line each; a rerun skips what is there):
those two numbers, and on ``grid_fallback``'s 4 scored slices the protocol's per-slice scores of
each told output after the consistency projection (``kspace projected``, ``bicubic
projected``), so the default path's ``auto`` (which projects scans named k-space truncated) can
be bracketed with ``grid_fallback``'s table.

``--summary`` scores decision rules in dB against ``grid_fallback``'s table: the classifier
(the mean of the ``--decisions`` files, leave-one-source-out), and logistic rules that combine
its probability with the probe, each fitted without the source it decides (test: fitted on every
training and validation source). ``--save-rule CLASSIFIER`` fits the shipped rule on all the
left-out views of the training and validation sources and writes it into that classifier file.

    python benchmarks/synthesis_probe.py --data-root ../shared/scans [--shard 0/2]
    python benchmarks/synthesis_probe.py --summary --decisions SEED0.json SEED1.json SEED2.json \
        [--save-rule medsr/weights/degradation_x2.pt]
    python benchmarks/synthesis_probe.py --time SCAN [--time-slices 32]   # its cost
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from degradation_loso import SOURCES, TEST
from grid_fallback import (
    averaged,
    best_classical,
    calibrated_decisions,
    degraded_views,
    done_in,
    gap_line,
    psnr,
    scores,
)

from medsr.checkpoint import default_weights, load_model
from medsr.consistency import GRIDS, project
from medsr.degradation import CLASSES, SURE, choose_grid, informative_planes, load_classifier, save_classifier
from medsr.reading import plane_of, read_scan
from medsr.synthesis import (
    ModelAnswer,
    SynthesisRule,
    can_probe,
    logistic_probability,
    logistic_weights,
    model_fingerprint,
    probe_features,
    probe_slices,
)
from medsr.transforms import ALL_DEGRADATIONS, GRID_OF, STRESS_DEGRADATIONS, robust_window


def measure(args) -> None:
    model, _ = load_model(default_weights(args.scale))
    model.eval()
    enhance = ModelAnswer(model)  # what the default path runs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    index, count = map(int, args.shard.split("/"))
    volumes = [(source, relative) for source, paths in {**SOURCES, **TEST}.items() for relative in paths][index::count]
    selected = {}
    for source, relative in volumes:
        selected.setdefault(source, []).append(relative)
    for source, name, degradation, axis, picks, low, high, volume_range, low_res in degraded_views(
            args.data_root, selected, args.scale, args.slices, done_in(args.out)):
        started = time.perf_counter()
        low, high = np.moveaxis(low, axis, 0), np.moveaxis(high, axis, 0)
        # the slices the default path probes: of the informative slices the classifier reads
        # (medsr evaluate's window), up to four evenly spaced non-constant ones
        window = robust_window(low_res)
        planes = informative_planes(functools.partial(plane_of, low_res, axis), low_res.shape[axis],
                                    window.low, window.high)
        probed = probe_slices(planes) if can_probe(planes[0].shape, args.scale) else None
        with torch.inference_mode():
            features = None if probed is None else probe_features(enhance, probed, args.scale)
            measured = torch.from_numpy(low.astype(np.float64))
            projected = {f"{g} projected": project(torch.from_numpy(enhance(low, g)), measured, g,
                                                   args.scale).numpy() for g in GRIDS}
        row = {"source": source, "volume": name, "degradation": degradation, "truth": GRID_OF[degradation],
               "slices": picks.tolist(), "features": None if features is None else features.tolist(),
               "data_range": volume_range[1] - volume_range[0],
               "scores": {k: scores(high, v, 0, args.scale, volume_range) for k, v in projected.items()}}
        with args.out.open("a") as file:
            file.write(json.dumps(row) + "\n")
        print(f"{name} {degradation}: {time.perf_counter() - started:.1f} s  features "
              + ("(too small to probe)" if features is None else f"{features[0]:+.2f} {features[1]:+.2f}"), flush=True)


# "... and not named Gaussian" (measured 2026-12-07): left-out protocol 11 -> 12 of 96 below the
# best classical answer, stress 20 -> 19, test protocol 0 -> 1; not shipped
SHIPPED = "classifier and probe, only when unsure"


def psnr_of(row: dict, grid: str, projected: bool) -> float:
    """The view's PSNR told ``grid``; with ``projected``, the k-space answer projected (an upper
    bracket of the default path's ``auto``, which projects only scans *named* k-space truncated)."""
    if projected and grid == "kspace":
        return psnr(row["probe"], "kspace projected")
    return psnr(row, grid)


def summary(args) -> None:
    fallback = {(r["volume"], r["degradation"]): r for r in map(json.loads, args.fallback.read_text().splitlines())}
    measured = {}
    for path in sorted(args.out.parent.glob(f"x{args.scale}*.jsonl")):
        measured.update({(r["volume"], r["degradation"]): r for r in map(json.loads, path.read_text().splitlines())})
    runs = [calibrated_decisions(path) for path in args.decisions]
    decisions = averaged(runs)
    keys = [k for k in measured if k in fallback and k in decisions]
    rows = [{**fallback[k], "probe": measured[k]} for k in keys]
    print(f"{len(rows)} views in both tables and the decisions")
    p_kspace = np.array([d["confidence"] if d["grid"] == "kspace" else 1 - d["confidence"]
                         for d in (decisions[k] for k in keys)])
    truth = np.array([r["truth"] == "kspace" for r in rows], dtype=float)
    probed = np.array([r["probe"]["features"] is not None for r in rows])
    differences = np.array([r["probe"]["features"] or [0.0, 0.0] for r in rows])
    sources = np.array([r["source"] for r in rows])
    is_test = np.array([s in TEST for s in sources])
    unsure = (np.maximum(p_kspace, 1 - p_kspace) < SURE) & probed  # what the default path looks at again
    # the degradation the averaged classifier names (decision files written since 2026-12-07 hold
    # the class probabilities); None where a file lacks them
    named = np.array([CLASSES[int(np.argmax(np.mean([run[k]["classes"] for run in runs], axis=0)))]
                      if all("classes" in run[k] for run in runs) else None for k in keys])
    model = model_fingerprint(load_model(default_weights(args.scale))[0])  # the model the probe ran

    def left_out(uses_classifier: bool) -> np.ndarray:
        """The rule's kspace probability of each view, fitted without its source (test views: on
        every training and validation source)."""
        prior = p_kspace if uses_classifier else np.full(len(rows), 0.5)
        out = np.empty(len(rows))
        for source in np.unique(sources):
            mine, train = sources == source, (sources != source) & ~is_test & probed
            rule = SynthesisRule.fit(prior[train], differences[train], truth[train], model, l2=args.l2)
            out[mine] = [rule.probability(p, d) for p, d in zip(prior[mine], differences[mine], strict=True)]
        return np.where(probed, out, p_kspace)  # a view too small to probe keeps the classifier's

    def as_grids(probability: np.ndarray) -> np.ndarray:
        return np.array([choose_grid(float(p)) for p in probability])

    grids = {"classifier (shipped before)": as_grids(p_kspace)}
    grids["probe alone, quadratic rule"] = as_grids(left_out(False))
    combined = left_out(True)
    grids["classifier and probe, all views"] = as_grids(combined)
    grids["classifier and probe, only when unsure"] = np.where(
        unsure, grids["classifier and probe, all views"], grids["classifier (shipped before)"])
    if all(n is not None for n in named):
        # the probe cannot place Gaussian blur (on the k-space grid) well; the classifier names it
        grids["classifier and probe, only when unsure and not named Gaussian"] = np.where(
            unsure & (named != "gaussian"), grids["classifier and probe, all views"],
            grids["classifier (shipped before)"])
        # a candidate for the next rule: the classifier's Gaussian probability as one more term
        gaussian = np.mean([[run[k]["classes"][CLASSES.index("gaussian")] for k in keys] for run in runs], axis=0)
        terms = np.column_stack([SynthesisRule.terms(p_kspace, differences),
                                 SynthesisRule.terms(gaussian, differences)[:, 0]])  # its logit
        with_gaussian = np.empty(len(rows))
        for source in np.unique(sources):
            mine, train = sources == source, (sources != source) & ~is_test & probed
            with_gaussian[mine] = logistic_probability(logistic_weights(terms[train], truth[train], args.l2),
                                                       terms[mine])
        grids["classifier and probe + Gaussian logit, only when unsure"] = np.where(
            unsure, as_grids(with_gaussian), grids["classifier (shipped before)"])
    print(f"unsure (classifier under {SURE}): {int(unsure.sum())} of {len(rows)}")
    print("right grid, by degradation:", "  ".join(
        f"{d} " + "/".join(str(int((grids[k] == np.where(truth > 0, 'kspace', 'bicubic'))[
            np.array([r['degradation'] == d for r in rows])].sum())) for k in grids)
        for d in ALL_DEGRADATIONS), f"(of {len(rows) // len(ALL_DEGRADATIONS)} each; rules in the order below)")
    for rule, chosen in grids.items():
        print(f"\n{rule}")
        for projected in (False, True):
            for split in ("leave-one-source-out", "test"):
                for kind, names in (("protocol", ("bicubic", "kspace")), ("stress", STRESS_DEGRADATIONS)):
                    mask = (is_test == (split == "test")) & np.array([r["degradation"] in names for r in rows])
                    table = [(rows[i], chosen[i]) for i in np.flatnonzero(mask)]
                    label = f"{'kspace projected' if projected else 'no projection':16s} {split:20s} {kind:8s}"
                    print(gap_line(label, [r for r, _ in table], [psnr_of(r, g, projected) for r, g in table],
                                   [psnr_of(r, r["truth"], projected) for r, _ in table],
                                   sum(g != r["truth"] for r, g in table)))
    print(f"\nbelow, the decision shipped: {SHIPPED}")
    shipped, before = grids[SHIPPED], grids["classifier (shipped before)"]
    stated = np.where(unsure, combined, p_kspace)
    stated = np.where(shipped == "kspace", stated, 1 - stated)
    right = shipped == np.array([r["truth"] for r in rows])
    print("\nthe shipped decision's stated confidence against the share right (left out and test):")
    edges = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0001]
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (stated >= low) & (stated < high)
        if inside.any():
            wrong = [f"{rows[i]['volume']} {rows[i]['degradation']}" for i in np.flatnonzero(inside & ~right)]
            print(f"  {low:.2f}-{min(high, 1):.2f}: {int(inside.sum()):3d} views, stated {stated[inside].mean():.3f}, "
                  f"right {right[inside].mean():.3f}" + (f"; wrong: {', '.join(wrong)}" if low >= 0.95 else ""))
    print("\nviews whose grid the second look changes (PSNR minus the best classical answer, before -> after):")
    for i in np.flatnonzero(shipped != before):
        r = rows[i]
        gaps = [psnr(r, grid) - best_classical(r)[0] for grid in (before[i], shipped[i])]
        print(f"  {'test ' if is_test[i] else ''}{r['volume']} {r['degradation']}: {before[i]} -> {shipped[i]} "
              f"({'right' if shipped[i] == r['truth'] else 'wrong'} now), classifier p(kspace) {p_kspace[i]:.2f}, "
              f"{gaps[0]:+.2f} -> {gaps[1]:+.2f} dB")
    print("\nprotocol views below the best classical answer with the shipped decision:")
    for i in np.flatnonzero(np.array([r["degradation"] in ("bicubic", "kspace") for r in rows])):
        r, gap = rows[i], psnr(rows[i], shipped[i]) - best_classical(rows[i])[0]
        if gap < 0:
            print(f"  {'test ' if is_test[i] else ''}{r['volume']} {r['degradation']}: told {shipped[i]} "
                  f"(p(kspace) {stated[i] if shipped[i] == 'kspace' else 1 - stated[i]:.2f}), {gap:+.2f} dB"
                  + (f", projected {psnr_of(r, 'kspace', True) - best_classical(r)[0]:+.2f} dB"
                     if shipped[i] == "kspace" else ""))
    if args.save_rule:
        train = ~is_test & probed
        rule = SynthesisRule.fit(p_kspace[train], differences[train], truth[train], model, l2=args.l2)
        classifier = load_classifier(args.save_rule, args.scale)
        classifier.synthesis = rule
        payload = torch.load(args.save_rule, weights_only=True)
        save_classifier(args.save_rule, classifier, args.scale, payload.get("report", {}))
        print(f"\n{args.save_rule}: synthesis rule fitted on {int(train.sum())} views: {rule.weights}")


def timing(args) -> None:
    """The second look's cost against the model's, in one run on the same slices: the probe on
    :data:`~medsr.synthesis.PROBE_SLICES` slices, and the plain engine on ``--time-slices``
    slices, as a share of a 384-slice series."""
    model, _ = load_model(default_weights(args.scale))
    model.eval()
    enhance = ModelAnswer(model)
    scan = read_scan(args.time)
    slices = np.moveaxis(scan.array, scan.slice_axis, 0).astype(np.float32)
    middle = len(slices) // 2
    probe_slices = slices[middle - 2:middle + 2]
    run = np.resize(slices, (args.time_slices, *slices.shape[1:]))  # repeated if the scan is shorter
    with torch.inference_mode():
        enhance(probe_slices, "bicubic")  # warm-up
        started = time.perf_counter()
        probe_features(enhance, probe_slices, args.scale)
        probe_seconds = time.perf_counter() - started
        started = time.perf_counter()
        enhance(run, "bicubic")
        per_slice = (time.perf_counter() - started) / len(run)
    print(f"{args.time}: slices {slices.shape[1]}x{slices.shape[2]}, {torch.get_num_threads()} thread(s); "
          f"second look {probe_seconds:.2f} s; the model {per_slice * 1000:.0f} ms per slice "
          f"({len(run)} slices); a 384-slice series {384 * per_slice:.0f} s, so the second look adds "
          f"{100 * probe_seconds / (384 * per_slice):.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--shard", default="0/1", help="INDEX/COUNT: measure every COUNT-th volume from INDEX")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--decisions", type=Path, nargs="+",
                        help="decisions_x{scale}.json files of degradation_loso.py, averaged")
    parser.add_argument("--fallback", type=Path,
                        help="grid_fallback.py's table (default .cache/fallback/x{scale}.jsonl)")
    parser.add_argument("--l2", type=float, default=1.0, help="the rule's L2 penalty")
    parser.add_argument("--save-rule", type=Path, help="with --summary: write the rule into this classifier file")
    parser.add_argument("--time", type=Path, help="a scan: time the second look against the model on its slices")
    parser.add_argument("--time-slices", type=int, default=32)
    args = parser.parse_args()
    index, count = args.shard.split("/")
    args.out = args.out or Path(f".cache/synthesis/x{args.scale}" + (f".{index}" if count != "1" else "") + ".jsonl")
    args.fallback = args.fallback or Path(f".cache/fallback/x{args.scale}.jsonl")
    torch.set_num_threads(1)
    if args.time:
        timing(args)
    elif args.summary:
        if not args.decisions:
            parser.error("--summary needs --decisions")
        summary(args)
    elif args.data_root is None:
        parser.error("--data-root is needed to measure (or pass --summary)")
    else:
        measure(args)


if __name__ == "__main__":
    main()
