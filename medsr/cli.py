"""The ``medsr`` command line: parses arguments, calls the pipeline, reports.

Every :class:`medsr.errors.MedsrError` becomes one ``error: ...`` line on stderr and exit
code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from medsr.errors import MedsrError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Super-resolution for DICOM and NIfTI scans, built on MONAI.")
stderr = Console(stderr=True)
logger = logging.getLogger("medsr")


class _ShortFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ShortFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("medsr").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ignite").setLevel(logging.WARNING)
    warnings.showwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings (pydicom on odd files, ...) as one ``warning:`` line, no source dump."""
    logger.warning("%s", " ".join(str(message).split()))


@contextmanager
def _user_errors():
    """Turn medsr's domain errors into one line and exit code 1."""
    try:
        yield
    except MedsrError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("error: interrupted; no partial output was left behind", err=True)
        raise typer.Exit(130) from None


def _progress() -> Progress:
    # drawn only on a terminal, so piped stderr holds nothing but warnings and errors
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=stderr, transient=True, disable=not stderr.is_terminal)


def _slice_axis(value: str) -> int | None:
    if value == "auto":
        return None
    if value in ("0", "1", "2"):
        return int(value)
    raise typer.BadParameter(f"must be auto, 0, 1 or 2, not {value!r}")


@app.command()
def train(
    config: Annotated[Path, typer.Option(help="YAML config, e.g. configs/srresnet_l1_x2.yaml.")],
    out: Annotated[Path, typer.Option(help="Run folder for checkpoints, config and history.")],
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a config key, e.g. --set data_root=/data/scans --set model.features=64.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Train an SRResNet on the scans a config lists (MONAI SupervisedTrainer)."""
    _setup_logging(verbose=True)
    with _user_errors():
        from medsr.config import load_config
        from medsr.training import train as run_training

        resolved = load_config(config, set_ or [])
        result = run_training(resolved, out, resume=resume, device=device)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        typer.echo(f"trained {result.epochs} epochs ({result.iterations} iterations); "
                   f"best model: {result.out_dir / 'best.pt'}")


@app.command()
def enhance(
    inputs: Annotated[list[Path], typer.Argument(
        metavar="INPUT...", help="DICOM series folder, DICOM file or NIfTI file; several, or a folder of series, for a batch.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .nii/.nii.gz, or a new folder for a DICOM series; for a batch, the folder for all outputs.")],
    scale: Annotated[int, typer.Option(help="In-plane factor (must match --weights).")] = 2,
    slice_axis: Annotated[str, typer.Option(help="auto, 0, 1 or 2.")] = "auto",
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint from medsr train; default: shipped weights.")] = None,
    degradation: Annotated[str, typer.Option(
        help="How the scan lost resolution: kspace (MR acquisition), bicubic (resampled, CT) or auto (by modality).")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option(help="Slices per forward pass.")] = None,
    series: Annotated[Optional[str], typer.Option(help="SeriesInstanceUID when a folder holds several.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    output_format: Annotated[str, typer.Option("--format", help="auto (by the output name), nifti or dicom.")] = "auto",
    compile_model: Annotated[str, typer.Option(
        "--compile", help="torch.compile the model: auto (series of 256 slices or more), on or off.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 on the CPU), fp32 or bf16.")] = "auto",
) -> None:
    """Upscale every slice of a scan in-plane and write the enhanced volume."""
    _setup_logging(verbose=False)
    axis = _slice_axis(slice_axis)
    with _user_errors():
        from medsr.enhance import enhance_file, is_single_scan

        if len(inputs) > 1 or not is_single_scan(inputs[0]):
            _enhance_batch(inputs, output, scale, axis, weights, degradation, device, batch_size,
                           overwrite, output_format, compile_model, precision)
            return
        input_path = inputs[0]
        with _progress() as progress:
            task = progress.add_task("reading slices", total=None)

            def stage(name: str):
                return lambda done, total: progress.update(task, completed=done, total=total,
                                                           description=f"{name} slices")

            result = enhance_file(
                input_path, output, scale=scale, slice_axis=axis, weights=weights,
                degradation=degradation, device=device,
                batch_size=batch_size, series_uid=series, overwrite=overwrite, output_format=output_format,
                compile_model=compile_model, precision=precision,
                reading=stage("reading"), progress=stage("enhancing"),
            )
    shape = "x".join(str(n) for n in result.shape)
    spacing = "x".join(f"{v:.3g}" for v in result.spacing)
    typer.echo(f"wrote {output} ({shape} voxels of {spacing} mm)")


def _enhance_batch(inputs, out_dir, scale, axis, weights, degradation, device, batch_size,
                   overwrite, output_format, compile_model, precision) -> None:
    from medsr.enhance import enhance_many

    with _progress() as progress:
        task = progress.add_task("enhancing", total=None)
        outcomes = enhance_many(
            inputs, out_dir, scale=scale, weights=weights, output_format=output_format,
            overwrite=overwrite, slice_axis=axis, degradation=degradation, device=device,
            batch_size=batch_size, compile_model=compile_model, precision=precision,
            on_scan=lambda name: progress.update(task, description=name),
        )
    for outcome in outcomes:
        where = f" -> {outcome.output}" if outcome.output and outcome.status == "done" else ""
        detail = f": {outcome.detail}" if outcome.detail else ""
        typer.echo(f"{outcome.status:8s}{outcome.source}{where}{detail}")
    counts = {status: sum(o.status == status for o in outcomes) for status in ("done", "skipped", "failed")}
    typer.echo(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed")
    if counts["failed"]:
        typer.echo(f"error: {counts['failed']} of {len(outcomes)} scans failed (listed above)", err=True)
        raise typer.Exit(1)


@app.command()
def evaluate(
    scans: Annotated[list[Path], typer.Argument(help="Held-out scans: DICOM series folders, DICOM or NIfTI files.")],
    weights: Annotated[Optional[list[Path]], typer.Option(help="Checkpoint(s) to compare; default: shipped weights.")] = None,
    degradation: Annotated[str, typer.Option(help="bicubic, kspace or both.")] = "both",
    scale: Annotated[int, typer.Option(help="Degradation factor (must match the weights).")] = 2,
    slice_axis: Annotated[str, typer.Option(help="auto, 0, 1 or 2 (NIfTI).")] = "auto",
    report: Annotated[Optional[Path], typer.Option(help="Folder for metrics.json and metrics.csv.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Score models against bicubic and zero-filled k-space baselines (protocol v1)."""
    _setup_logging(verbose=False)
    axis = _slice_axis(slice_axis)
    if degradation not in ("bicubic", "kspace", "both"):
        raise typer.BadParameter(f"--degradation must be bicubic, kspace or both, not {degradation!r}")
    degradations = ["bicubic", "kspace"] if degradation == "both" else [degradation]
    with _user_errors():
        from medsr.checkpoint import default_weights, load_model
        from medsr.enhance import pick_device
        from medsr.evaluation import evaluate_scan, summarise
        from medsr.reading import read_scan
        from medsr.reports import write_comparison, write_metrics

        torch_device = pick_device(device)
        paths = weights or [default_weights(scale)]
        models = {}
        for path in paths:
            model, _ = load_model(path)
            # runs/l1_x2/best.pt and runs/mse_x2/best.pt are told apart by their run folder
            stems = [p.stem for p in paths]
            name = path.stem if stems.count(path.stem) == 1 else f"{path.parent.name}/{path.stem}"
            if name in models:
                raise typer.BadParameter(f"--weights {path} is given twice")
            models[name] = model
        results = []
        with _progress() as progress:
            task = progress.add_task("evaluating", total=len(scans) * len(degradations))
            for scan_path in scans:
                scan = read_scan(scan_path)
                for name in degradations:
                    result = evaluate_scan(scan, models, name, scale, axis, torch_device,
                                           keep_images=report is not None)
                    if report is not None:
                        write_comparison(report, result, scan.slice_axis if axis is None else axis)
                    results.append(result)
                    progress.advance(task)
        summary = summarise(results)
        _print_table(results, summary, list(models))
        if report is not None:
            write_metrics(report, results, summary)
            typer.echo(f"wrote {report / 'metrics.json'}, {report / 'metrics.csv'} and comparison figures")


def _print_table(results, summary, model_names: list[str]) -> None:
    from medsr.evaluation import BASELINES, best_baseline

    methods = list(BASELINES) + model_names
    header = ["scan", "degradation"] + [f"{m} PSNR/SSIM" for m in methods]
    rows = [[Path(r.scan).name, r.degradation] +
            [f"{r.scores[m]['psnr']:.2f}/{r.scores[m]['ssim']:.4f}" for m in methods] for r in results]
    for name, means in summary.items():
        rows.append(["MEAN", name] + [f"{means[m]['psnr']:.2f}/{means[m]['ssim']:.4f}" for m in methods])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))
    for name, means in summary.items():
        best = best_baseline(means, name)
        for model in model_names:
            wins = [m for m in ("psnr", "ssim") if means[model][m] > best[m]]
            verdict = "beats" if len(wins) == 2 else "does not beat"
            typer.echo(f"{name}: {model} {verdict} the best baseline "
                       f"(PSNR {means[model]['psnr'] - best['psnr']:+.2f} dB, "
                       f"SSIM {means[model]['ssim'] - best['ssim']:+.4f})")
        if len(model_names) > 1:
            for metric, unit in (("psnr", " dB"), ("ssim", "")):
                ranked = sorted(model_names, key=lambda m: means[m][metric], reverse=True)
                margin = means[ranked[0]][metric] - means[ranked[1]][metric]
                typer.echo(f"{name}: {ranked[0]} wins {metric.upper()} "
                           f"(by {margin:.4f}{unit} over {ranked[1]})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
