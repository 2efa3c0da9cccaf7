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
The decision files must hold each decision's class probabilities (``degradation_loso.py`` has
written them since 2026-12-07; rerun it on older ones, from its feature cache).
``--per-slice N`` records each view's residuals slice by slice on ``N`` slices (nested with the
shipped four when ``N - 1`` is a multiple of 3); with those tables beside it, ``--summary`` also
scores the same rule on other ways to sum the slices up.

    python benchmarks/synthesis_probe.py --data-root ../shared/scans [--shard 0/2] [--per-slice 10]
    python benchmarks/synthesis_probe.py --summary --decisions SEED0.json SEED1.json SEED2.json \
        [--save-rule medsr/weights/degradation_x2.pt]
    python benchmarks/synthesis_probe.py --time SCAN [--time-slices 32]   # its cost
"""

from __future__ import annotations

import argparse
import dataclasses
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
from medsr.consistency import GRIDS, degrade, project
from medsr.degradation import CLASSES, SURE, choose_grid, informative_planes, load_classifier, save_classifier
from medsr.reading import plane_of, read_scan
from medsr.synthesis import (
    PROBE_SLICES,
    ModelAnswer,
    SynthesisRule,
    as_stored,
    can_probe,
    differences_of,
    logistic_probability,
    logistic_weights,
    model_fingerprint,
    probe_features,
    probe_slices,
    residual_table,
)
from medsr.transforms import ALL_DEGRADATIONS, GRID_OF, STRESS_DEGRADATIONS, robust_window


def measure(args) -> None:
    model, _ = load_model(default_weights(args.scale))
    model.eval()
    for view, _, probed in probed_views(args, args.out):
        source, name, degradation, axis, picks, low, high, volume_range, low_res = view
        enhance = ModelAnswer(model, window=robust_window(low_res))  # what the default path runs
        started = time.perf_counter()
        low, high = np.moveaxis(low, axis, 0), np.moveaxis(high, axis, 0)
        with torch.inference_mode():
            # the slices the default path probes: up to four evenly spaced ones of ``probed``
            features = None if probed is None else probe_features(enhance, probe_slices(probed), args.scale)
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


def probed_views(args, out: Path):
    """Every view of this shard not yet in ``out``, degraded and stored as :func:`degraded_views`
    makes it: yields ``(view, varied, probed)``, ``view`` what :func:`degraded_views` yields,
    ``varied`` the view's non-constant informative slices, the ones the default path reads
    (``medsr evaluate``'s window), and ``probed`` the same, or None when they are too small to
    probe."""
    out.parent.mkdir(parents=True, exist_ok=True)
    index, count = map(int, args.shard.split("/"))
    volumes = [(source, relative) for source, paths in {**SOURCES, **TEST}.items() for relative in paths][index::count]
    selected = {}
    for source, relative in volumes:
        selected.setdefault(source, []).append(relative)
    for view in degraded_views(args.data_root, selected, args.scale, args.slices, done_in(out)):
        axis, low_res = view[3], view[-1]
        window = robust_window(low_res)
        planes = informative_planes(functools.partial(plane_of, low_res, axis), low_res.shape[axis],
                                    window.low, window.high)
        varied = [plane for plane in planes if np.ptp(plane) > 0]
        yield view, varied, (varied if varied and can_probe(planes[0].shape, args.scale) else None)


def record_views(args, kind: str, measure) -> None:
    """One JSON line per probed view of this shard in ``x{scale}.{kind}.{shard}.jsonl`` (a
    rerun skips what is there): the view's keys and ``measure(enhance, varied)``, which takes
    the default path's model answer and the view's non-constant informative slices (None when
    too small to probe)."""
    model, _ = load_model(default_weights(args.scale))
    model.eval()
    enhance = ModelAnswer(model)
    out = args.out.with_name(f"x{args.scale}.{kind}.{args.shard.replace('/', 'of')}.jsonl")
    for view, varied, probed in probed_views(args, out):
        source, name, degradation = view[:3]
        row = {"source": source, "volume": name, "degradation": degradation, "truth": GRID_OF[degradation],
               "informative": len(varied)}
        started = time.perf_counter()
        with torch.inference_mode():
            measured = measure(enhance, probed)
        with out.open("a") as file:
            file.write(json.dumps({**row, **measured}) + "\n")
        print(f"{row['volume']} {row['degradation']}: {time.perf_counter() - started:.1f} s", flush=True)


def measure_slices(args) -> None:
    """``--per-slice N``: the :func:`medsr.synthesis.residual_table` of ``N`` evenly spaced
    non-constant informative slices of every view (nested with the shipped four when ``N - 1``
    is a multiple of 3), so aggregates other than the shipped one can be scored offline."""
    def table(enhance, varied):
        if varied is None:
            return {"table": None}
        picks = np.unique(np.linspace(0, len(varied) - 1, min(args.per_slice, len(varied))).round().astype(int))
        return {"table": residual_table(enhance, np.stack([varied[i] for i in picks]), args.scale).tolist()}

    record_views(args, f"slices{args.per_slice}", table)


def measure_counterfactuals(args) -> None:
    """``--counterfactual``: the probe of the shipped four slices, and of the same slices made
    again both ways from the model's own answer (told ``bicubic``) and stored like the input:
    the two versions one slice would have had, at the input's own scale. Every slice tells its
    two versions apart (the truncated one's ``d1`` is the higher on 568 of 585 slices), so where
    the input lies between its own two might name its grid better than a threshold does. Left
    out, it did not (model card, "Remade versions of the input itself")."""
    def tables(enhance, varied):
        if varied is None:
            return {"tables": None}
        slices = np.asarray(probe_slices(varied), dtype=np.float64)
        answer = torch.from_numpy(np.asarray(enhance(slices, "bicubic"), dtype=np.float64))
        versions = {"input": slices, **{grid: as_stored(degrade(answer, grid, args.scale).numpy(), slices)
                                        for grid in GRIDS}}
        return {"tables": {name: residual_table(enhance, version, args.scale).tolist()
                           for name, version in versions.items()}}

    record_views(args, "counterfactual", tables)


# "... and not named Gaussian" (measured 2026-12-07): left-out protocol 11 -> 12 of 96 below the
# best classical answer, stress 20 -> 19, test protocol 0 -> 1; not shipped
# "... + Gaussian logit" (the classifier's Gaussian-blur logit as an eighth term; measured in the
# second 2026-12-07 session): left out, protocol 11 -> 10 below, stress 20 -> 19, within what a
# rerun of the same probe moves (the per-slice run's "shipped four": 11, and one more wrong
# grid); not shipped
SHIPPED = "classifier and probe, only when unsure"
GAUSSIAN_TERM = "classifier and probe + Gaussian logit, only when unsure"


def screen_rows(folder: Path, pattern: str):
    """Every row of the JSON-lines tables in ``folder`` whose names match ``pattern``."""
    for path in sorted(folder.glob(pattern)):
        yield from map(json.loads, path.read_text().splitlines())


def per_slice_tables(folder: Path, scale: int) -> dict:
    """``(volume, degradation) -> (table, informative)`` from the ``--per-slice`` runs."""
    return {(r["volume"], r["degradation"]): (None if r["table"] is None else np.array(r["table"]), r["informative"])
            for r in screen_rows(folder, f"x{scale}.slices*.jsonl")}


def shipped_picks(table: np.ndarray, informative: int) -> np.ndarray:
    """Rows of a ``--per-slice`` table that :func:`medsr.synthesis.probe_slices` would probe
    (the table's slices are nested with them when its size less one is a multiple of 3)."""
    taken = np.unique(np.linspace(0, informative - 1, min(len(table), informative)).round().astype(int))
    shipped = np.unique(np.linspace(0, informative - 1, min(PROBE_SLICES, informative)).round().astype(int))
    return np.flatnonzero(np.isin(taken, shipped))


def per_slice_differences(table: np.ndarray) -> np.ndarray:
    """``(N, 2)``: each slice's own two differences."""
    return np.array([differences_of(row[None]) for row in table])


def per_slice_medians(table: np.ndarray) -> np.ndarray:
    """The median over slices of each slice's own two differences."""
    return np.median(per_slice_differences(table), axis=0)


def counterfactual_tables(folder: Path, scale: int) -> dict:
    """``(volume, degradation) -> {"input", "bicubic", "kspace": residual table}`` (or None) from
    the ``--counterfactual`` runs."""
    return {(r["volume"], r["degradation"]): r["tables"]
            for r in screen_rows(folder, f"x{scale}.counterfactual.*.jsonl")}


def counterfactual_terms(tables: dict | None) -> np.ndarray:
    """The input's two differences less each remade version's: ``[d1 - d1_b, d1 - d1_k, d2 - d2_b,
    d2 - d2_k]`` (zeros where the view was too small to probe)."""
    if tables is None:
        return np.zeros(4)
    own, remade_b, remade_k = (differences_of(np.array(tables[name])) for name in ("input", "bicubic", "kspace"))
    return np.array([own[0] - remade_b[0], own[0] - remade_k[0], own[1] - remade_b[1], own[1] - remade_k[1]])


def print_slice_spread(tables: dict) -> None:
    """Per view, the first difference ``d1`` slice by slice of its resampled and its truncated
    version (the same slices): their ranges, and on how many slices the truncated one is higher."""
    print("\nd1 per slice, protocol views (resampled range | truncated range | truncated higher on):")
    higher = total = 0
    for volume in sorted({v for v, _ in tables}):
        pair = [tables.get((volume, d), (None, 0))[0] for d in ("bicubic", "kspace")]
        if any(t is None for t in pair) or len(pair[0]) != len(pair[1]):
            continue
        d1 = [per_slice_differences(t)[:, 0] for t in pair]
        above = int(np.sum(d1[1] > d1[0]))
        higher, total = higher + above, total + len(d1[0])
        print(f"  {volume}: {d1[0].min():+.2f} to {d1[0].max():+.2f} | {d1[1].min():+.2f} to {d1[1].max():+.2f} | "
              f"{above}/{len(d1[0])}")
    print(f"  all views: truncated higher on {higher} of {total} slices")


AGGREGATES = {
    "the shipped four, summed, from the per-slice run": lambda t, n: differences_of(t[shipped_picks(t, n)]),
    "all the per-slice run's slices, summed": lambda t, n: differences_of(t),
    "median over them of each slice's own differences": lambda t, n: per_slice_medians(t),
    "the same median, without the first and last slice": lambda t, n: per_slice_medians(t[1:-1] if len(t) > 4 else t),
}


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
        if ".slices" in path.name or ".counterfactual" in path.name:  # the screens' own tables
            continue
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
    # the averaged classifier's class probabilities (decision files written since 2026-12-07 hold them)
    if not all("classes" in run[k] for run in runs for k in keys):
        raise SystemExit("error: the decision files hold no class probabilities (rerun degradation_loso.py)")
    classes = np.mean([[run[k]["classes"] for k in keys] for run in runs], axis=0)
    named = np.array([CLASSES[int(np.argmax(c))] for c in classes])
    p_gaussian = classes[:, CLASSES.index("gaussian")]
    model = model_fingerprint(load_model(default_weights(args.scale))[0])  # the model the probe ran

    def left_out(terms: np.ndarray) -> np.ndarray:
        """The kspace probability of each view by a logistic rule on ``terms``, fitted without
        its source (test views: on every training and validation source)."""
        out = np.empty(len(rows))
        for source in np.unique(sources):
            mine, train = sources == source, (sources != source) & ~is_test & probed
            out[mine] = logistic_probability(logistic_weights(terms[train], truth[train], args.l2), terms[mine])
        return np.where(probed, out, p_kspace)  # a view too small to probe keeps the classifier's

    def as_grids(probability: np.ndarray) -> np.ndarray:
        return np.array([choose_grid(float(p)) for p in probability])

    def when_unsure(probability: np.ndarray) -> np.ndarray:
        return np.where(unsure, as_grids(probability), grids["classifier (shipped before)"])

    # the shipped rule's terms (SynthesisRule.terms), then a candidate's: the Gaussian-blur logit
    terms = SynthesisRule.terms(p_kspace, differences)
    with_gaussian = np.column_stack([terms, SynthesisRule.terms(p_gaussian, differences)[:, 0]])
    grids = {"classifier (shipped before)": as_grids(p_kspace)}
    grids["probe alone, quadratic rule"] = as_grids(left_out(terms[:, 1:]))
    combined = left_out(terms)
    grids["classifier and probe, all views"] = as_grids(combined)
    grids[SHIPPED] = when_unsure(combined)
    # the probe cannot place Gaussian blur (on the k-space grid) well; the classifier names it
    grids["classifier and probe, only when unsure and not named Gaussian"] = np.where(
        unsure & (named != "gaussian"), grids["classifier and probe, all views"], grids["classifier (shipped before)"])
    grids[GAUSSIAN_TERM] = when_unsure(left_out(with_gaussian))
    tables = per_slice_tables(args.out.parent, args.scale)
    if tables and all(k in tables for k in keys):
        # other ways to sum up the probe (``--per-slice``): the same rule, fitted the same way
        for label, aggregate in AGGREGATES.items():
            other = np.array([aggregate(*tables[k]) if tables[k][0] is not None else [0.0, 0.0] for k in keys])
            grids[f"classifier and probe ({label}), only when unsure"] = when_unsure(
                left_out(SynthesisRule.terms(p_kspace, other)))
        print_slice_spread(tables)
    elif tables:
        print(f"(per-slice tables hold {sum(k in tables for k in keys)} of {len(keys)} views: not scored)")
    remade = counterfactual_tables(args.out.parent, args.scale)
    if remade and all(k in remade for k in keys):
        # where the input lies between its own two remade versions (``--counterfactual``)
        placed = np.array([counterfactual_terms(remade[k]) for k in keys])
        grids["counterfactual alone"] = as_grids(left_out(placed))
        grids["classifier and counterfactual, only when unsure"] = when_unsure(
            left_out(np.column_stack([terms[:, :1], placed])))
        grids["classifier, probe and counterfactual, only when unsure"] = when_unsure(
            left_out(np.column_stack([terms, placed])))
    elif remade:
        print(f"(counterfactual tables hold {sum(k in remade for k in keys)} of {len(keys)} views: not scored)")
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
    for what, earlier, later in (("the second look", before, shipped),
                                 ("the Gaussian term (candidate, against the shipped rule)", shipped,
                                  grids[GAUSSIAN_TERM])):
        print(f"\nviews whose grid {what} changes (PSNR minus the best classical answer, before -> after):")
        for i in np.flatnonzero(later != earlier):
            r = rows[i]
            gaps = [psnr(r, grid) - best_classical(r)[0] for grid in (earlier[i], later[i])]
            print(f"  {'test ' if is_test[i] else ''}{r['volume']} {r['degradation']}: {earlier[i]} -> {later[i]} "
                  f"({'right' if later[i] == r['truth'] else 'wrong'} now), classifier p(kspace) {p_kspace[i]:.2f}"
                  f", p(gaussian) {p_gaussian[i]:.2f}, {gaps[0]:+.2f} -> {gaps[1]:+.2f} dB")
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
    slices, as a share of a 384-slice series. The probe runs as the default path runs it (float32,
    the scan's window), the model as ``medsr enhance`` runs it (``--precision auto``)."""
    model, _ = load_model(default_weights(args.scale))
    model.eval()
    scan = read_scan(args.time)
    slices = np.moveaxis(scan.array, scan.slice_axis, 0).astype(np.float32)
    enhance = ModelAnswer(model, window=robust_window(slices))
    output = dataclasses.replace(enhance, precision="auto")
    middle = len(slices) // 2
    probe_slices = slices[middle - 2:middle + 2]
    run = np.resize(slices, (args.time_slices, *slices.shape[1:]))  # repeated if the scan is shorter
    with torch.inference_mode():
        enhance(probe_slices, "bicubic")  # warm-up
        started = time.perf_counter()
        probe_features(enhance, probe_slices, args.scale)
        probe_seconds = time.perf_counter() - started
        started = time.perf_counter()  # what --counterfactual adds: one answer, two more probes
        answer = torch.from_numpy(np.asarray(enhance(probe_slices, "bicubic"), dtype=np.float64))
        for grid in GRIDS:
            probe_features(enhance, as_stored(degrade(answer, grid, args.scale).numpy(), probe_slices), args.scale)
        remade_seconds = time.perf_counter() - started
        output(probe_slices, "bicubic")  # warm-up
        started = time.perf_counter()
        output(run, "bicubic")
        per_slice = (time.perf_counter() - started) / len(run)
    series = 384 * per_slice
    print(f"{args.time}: slices {slices.shape[1]}x{slices.shape[2]}, {torch.get_num_threads()} thread(s); "
          f"second look {probe_seconds:.2f} s; the model {per_slice * 1000:.0f} ms per slice "
          f"({len(run)} slices); a 384-slice series {series:.0f} s, so the second look adds "
          f"{100 * probe_seconds / series:.1f}% (with the two remade versions of --counterfactual, "
          f"{100 * (probe_seconds + remade_seconds) / series:.1f}%)")


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
    parser.add_argument("--per-slice", type=int, help="record the residual table of this many slices per view")
    parser.add_argument("--counterfactual", action="store_true",
                        help="record the probe of each view and of its two remade versions (a screen)")
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
    elif args.per_slice:
        measure_slices(args)
    elif args.counterfactual:
        measure_counterfactuals(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
