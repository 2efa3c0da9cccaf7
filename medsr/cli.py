"""The ``medsr`` command line: parses arguments, calls the pipeline, reports.

Every command, by construction (:class:`_Commands`, the group every command is registered on),
runs under the same rules: a :class:`medsr.errors.MedsrError` (a failure to write an output
among them: a full disk, a quota, a read-only or failing file system) becomes one
``error: ...`` line on stderr and exit code 1; Ctrl-C (SIGINT) and SIGTERM (what ``timeout``,
systemd, container runtimes and batch schedulers send) stop it the same way, through the
cleanup that removes every temporary, with one line and exit code 130 or 143 (128 + the
signal). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from contextlib import contextmanager, nullcontext
from itertools import combinations
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from typer.core import TyperGroup

from medsr.errors import MedsrError

stderr = Console(stderr=True)
logger = logging.getLogger("medsr")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises :class:`KeyboardInterrupt`, so the
    same ``finally`` blocks and context managers remove every temporary."""


@contextmanager
def _terminate_as_interrupt():
    """For the block, SIGTERM raises :class:`Terminated` in the main thread. A second SIGTERM
    while the first one's cleanup runs is ignored, so the cleanup is not cut short (SIGKILL
    still ends the process; the next run sweeps what it left: :mod:`medsr.temporaries`).
    Worker threads (the engine's reader and writer) are daemons whose owners stop and join them
    on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread (an embedding application's)
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _user_errors():
    """Turn medsr's domain errors into one line and exit code 1, an interruption into one line
    and exit code 128 + the signal."""
    try:
        yield
    except MedsrError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        typer.echo(f"error: interrupted ({signum.name}); no partial output was left behind", err=True)
        raise typer.Exit(128 + signum) from None


class _Commands(TyperGroup):
    """The group every ``medsr`` command is registered on: each one (and any added later) runs
    under :func:`_terminate_as_interrupt` and :func:`_user_errors`."""

    def invoke(self, ctx):
        with _terminate_as_interrupt(), _user_errors():
            return super().invoke(ctx)


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  help="Super-resolution for DICOM and NIfTI scans, built on MONAI.")


class _ShortFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (a test runner may have
    swapped, and since closed, the one there was when logging was set up)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _not_ignite_terminating(record: logging.LogRecord) -> bool:
    """Drops ignite's "Engine run is terminating due to exception" line: the exception itself
    follows, reported as every command reports it (one line, or a traceback for a bug)."""
    return not (record.name.startswith("ignite") and record.getMessage().startswith("Engine run is terminating"))


def _setup_logging(verbose: bool) -> None:
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(_ShortFormatter())
    handler.addFilter(_not_ignite_terminating)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("medsr").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ignite").setLevel(logging.WARNING)
    warnings.showwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings (pydicom on odd files, ...) as one ``warning:`` line, no source dump."""
    logger.warning("%s", " ".join(str(message).split()))


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
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config key, e.g. --set data_root=/data/scans --set model.features=64.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Train an SRResNet on the scans a config lists (MONAI SupervisedTrainer)."""
    _setup_logging(verbose=True)
    from medsr.config import load_config
    from medsr.training import train as run_training

    resolved = load_config(config, set_ or [])
    result = run_training(resolved, out, resume=resume, device=device)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        typer.echo(f"trained {result.epochs} epochs ({result.iterations} iterations); "
                   f"best model: {result.out_dir / 'best.pt'}")


@app.command("fit-degradation")
def fit_degradation(
    config: Annotated[Path, typer.Option(
        help="Training config whose split and scale to use, e.g. configs/srresnet_l1_x2.yaml.")],
    out: Annotated[Path, typer.Option(help="Where to write the classifier (.pt).")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config key, e.g. --set data_root=/data/scans.")] = None,
    features: Annotated[str, typer.Option(
        help="What it reads from each slice: spectrum, or spectrum and tails (also how far the intensities "
             "reach past their percentiles: the classifiers shipped with 0.2.0).")] = "spectrum",
    temperature: Annotated[list[float] | None, typer.Option(
        help="Divide the logits by this (calibrated by benchmarks/degradation_loso.py; 1: as fitted); "
             "repeat it to give each member its own, in seed order.")] = None,
    members: Annotated[int, typer.Option(
        help="Fit this many classifiers with seeds seed, seed+1, ... and average their probabilities "
             "(the x2 classifier shipped: 3).")] = 3,
    history: Annotated[bool, typer.Option(
        help="Give each training slice a random history first (resampled, blurred, noisier); "
             "--no-history: as medsr 0.2.0 fitted its classifiers.")] = True,
    storage: Annotated[bool, typer.Option(
        help="Store each degraded training slice as a file may (rounded to 256-4096 levels, clipped), half "
             "the time; --no-storage: as medsr 0.2.0 and the first 2026-12-06 x2 classifier.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Fit the classifier that tells from the pixels how a scan lost its resolution."""
    _setup_logging(verbose=True)
    from medsr.config import load_config
    from medsr.errors import OutputError
    from medsr.training import train_degradation_classifier

    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
    report = train_degradation_classifier(load_config(config, set_ or []), out, feature_set=features,
                                          temperature=temperature or [1.0], history=history, storage=storage,
                                          members=members)
    typer.echo(f"wrote {out} ({report['members']} x {report['train_examples']} training slices, x{report['scale']})")
    for name, result in report["validation"].items():
        typer.echo(f"{name:9s} -> {result['grid']:7s}: {result['volumes_right']}/{result['volumes']} "
                   f"validation volumes right, {result['slice_accuracy']:.3f} of slices")


def _select(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    keyword, equals, wanted = value.partition("=")
    if not equals or not keyword.strip() or not wanted.strip():
        raise typer.BadParameter(f"must be KEYWORD=VALUE (e.g. EchoTime=13.8), not {value!r}")
    return keyword.strip(), wanted.strip()


@app.command()
def enhance(
    inputs: Annotated[list[Path], typer.Argument(
        metavar="INPUT...",
        help="DICOM series folder, DICOM file or NIfTI file; several, or a folder of series, for a batch.")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Output .nii/.nii.gz, or a new (or empty) folder for a DICOM series "
                               "(for a NIfTI input, the folder for <name>_x2.nii.gz); for a batch, "
                               "the folder for all outputs.")],
    scale: Annotated[int | None, typer.Option(
        help="In-plane factor, 2 (default) or 4; with --through-plane, thin slices per thick slice "
             "(default: slice spacing / in-plane spacing, rounded).")] = None,
    through_plane: Annotated[bool, typer.Option(
        "--through-plane",
        help="Make the slices thinner (along the slice axis) instead of the in-plane voxels smaller.")] = False,
    slice_axis: Annotated[str, typer.Option(help="auto, 0, 1 or 2.")] = "auto",
    weights: Annotated[Path | None, typer.Option(help="Checkpoint from medsr train; default: shipped weights.")] = None,
    degradation: Annotated[str, typer.Option(
        help="How the scan lost resolution: auto (found from the pixels, the default), kspace (fewer "
             "k-space lines; the output keeps the first pixel's position) or bicubic (resampled; the "
             "output pixels tile the input's).")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int | None, typer.Option(help="Slices per forward pass.")] = None,
    series: Annotated[str | None, typer.Option(help="SeriesInstanceUID when a folder holds several.")] = None,
    select: Annotated[str | None, typer.Option(
        help="KEYWORD=VALUE: one echo or phase of a series that holds several, e.g. EchoTime=13.8.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    output_format: Annotated[str, typer.Option("--format", help="auto (by the output name), nifti or dicom.")] = "auto",
    compile_model: Annotated[str, typer.Option(
        "--compile", help="torch.compile the model: auto, on or off.")] = "auto",
    precision: Annotated[str, typer.Option(
        help="auto (bf16 autocast on CUDA and on CPUs with native bf16, else fp32), fp32 or bf16.")] = "auto",
    consistency: Annotated[str, typer.Option(
        help="on: project each enhanced slice onto the images that, degraded as the scan was (the "
             "degradation found or told), give its low-res slice back exactly; off: the network's output; "
             "auto: on for scans found or told k-space truncated (the exact operator), where validation found "
             "it never worse; off for the rest (see the model card).")] = "auto",
    ensemble: Annotated[bool, typer.Option(
        "--ensemble", help="Write the mean of the model's answers to the 8 flips/transposes of each slice "
                           "(about 8x the compute; +0.08-0.15 dB on validation and test). With --through-plane: "
                           "the 4 flips of each plane.")] = False,
    detail_map: Annotated[Path | None, typer.Option(
        help="Also write a map of how unsure the network is at each voxel (the spread of the 8 "
             "flipped/transposed passes times the output's gradient, as a geometric mean, with the noise "
             "floor of the signal, in the output's units), on the output's grid and in its format: "
             ".nii/.nii.gz, or a folder for a second DICOM series of the same study. One scan only.")] = None,
) -> None:
    """Enhance every slice of a scan and write the enhanced volume."""
    _setup_logging(verbose=False)
    axis = _slice_axis(slice_axis)
    picked = _select(select)
    options = dict(slice_axis=axis, degradation=degradation, device=device, batch_size=batch_size,
                   compile_model=compile_model, precision=precision, select=picked, consistency=consistency,
                   ensemble=ensemble)
    from medsr.enhance import enhance_file, folders_for, is_single_scan

    if len(inputs) > 1 or not is_single_scan(inputs[0]):
        if detail_map is not None:
            raise MedsrError("--detail-map names the map of one scan; a batch has no map yet")
        _enhance_batch(inputs, output, scale, through_plane, weights, overwrite, output_format, options)
        return
    target = _nifti_into_folder(inputs[0], output, output_format, scale, through_plane)
    # only the folder of a NIfTI input's -o is made here (and removed if the run fails); any
    # other output's folder must exist, as enhance_file checks
    folders = folders_for(target) if target != output else nullcontext()
    output = target
    with _progress() as progress:
        task = progress.add_task("reading slices", total=None)

        def stage(name: str):
            return lambda done, total: progress.update(task, completed=done, total=total,
                                                       description=f"{name} slices")

        with folders:
            result = enhance_file(inputs[0], output, scale=scale, weights=weights, through_plane=through_plane,
                                  series_uid=series, overwrite=overwrite, output_format=output_format,
                                  detail_map=detail_map, reading=stage("reading"), progress=stage("enhancing"),
                                  **options)
    if result.estimate is not None:
        typer.echo(f"degradation: {result.estimate.describe()}", err=True)
    shape = "x".join(str(n) for n in result.volume.shape)
    spacing = "x".join(f"{v:.3g}" for v in result.volume.spacing)
    typer.echo(f"wrote {output} ({shape} voxels of {spacing} mm)")
    if result.detail_map is not None:
        typer.echo(f"wrote {result.detail_map} (detail map, same grid)")


def _nifti_into_folder(source: Path, output: Path, output_format: str, scale: int | None,
                       through_plane: bool) -> Path:
    """Where a single scan's output goes. A NIfTI input with ``-o`` that names no NIfTI file
    (``medsr enhance scan.nii.gz -o out``) keeps its format, so ``out`` is a folder and the file
    in it is named as in a batch (``out/scan_x2.nii.gz``), rather than a DICOM series a NIfTI
    input cannot make; any other output is ``output`` itself."""
    from medsr.enhance import output_tag, scan_name
    from medsr.reading import NIFTI_SUFFIXES

    if output_format != "auto" or not source.name.lower().endswith(NIFTI_SUFFIXES):
        return output  # a format asked for is checked against the name where it is resolved
    if output.name.lower().endswith(NIFTI_SUFFIXES):
        return output
    if output.exists() and not output.is_dir():
        raise MedsrError(f"{output}: a NIfTI input with an output that is not .nii/.nii.gz writes into a "
                         "folder of that name, but this is a file; name a .nii.gz or a folder")
    if not output.parent.is_dir():
        raise MedsrError(f"{output}: folder {output.parent} does not exist; create it first")
    return output / f"{scan_name(source)}_{output_tag(through_plane, scale)}.nii.gz"


def _enhance_batch(inputs, out_dir, scale, through_plane, weights, overwrite, output_format, options) -> None:
    from medsr.enhance import enhance_many

    with _progress() as progress:
        task = progress.add_task("enhancing", total=None)
        outcomes = enhance_many(
            inputs, out_dir, scale=scale, weights=weights, through_plane=through_plane,
            output_format=output_format, overwrite=overwrite,
            on_scan=lambda name: progress.update(task, description=name), **options,
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
def serve(
    forward: Annotated[str | None, typer.Option(
        help="Where enhanced series go, AET@HOST:PORT, e.g. ORTHANC@10.0.0.5:4242.")] = None,
    forward_dicomweb: Annotated[str | None, typer.Option(
        help="Also send enhanced series to this DICOMweb service by STOW-RS, e.g. "
             "http://10.0.0.5:8042/dicom-web.")] = None,
    spool: Annotated[Path, typer.Option(
        help="Folder for received images, series state and enhanced series (one node per spool).")] = Path(
            "medsr-spool"),
    aet: Annotated[str, typer.Option(help="This node's AE title.")] = "MEDSR",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 11112,
    bind: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "0.0.0.0",
    allow: Annotated[list[str] | None, typer.Option(
        help="A calling AE title to accept (repeat for several); default: any.")] = None,
    quiet_seconds: Annotated[float, typer.Option(
        help="A series is complete when no image of it has come for this long.")] = 10.0,
    keep: Annotated[bool, typer.Option(help="Keep a sent series' spool (under done/) instead of removing it.")] = False,
    min_free_mb: Annotated[float, typer.Option(
        help="Refuse images and associations while the spool's disk has less free space than this.")] = 1024.0,
    retry_seconds: Annotated[float, typer.Option(
        help="First wait after a failed send; doubled at each failure, up to --retry-max-seconds.")] = 5.0,
    retry_max_seconds: Annotated[float, typer.Option(help="Longest wait between tries.")] = 300.0,
    status: Annotated[bool, typer.Option(
        "--status", help="Print what the --spool holds (pending, done, failed) and exit.")] = False,
    scale: Annotated[int | None, typer.Option(help="As medsr enhance --scale.")] = None,
    through_plane: Annotated[bool, typer.Option("--through-plane", help="As medsr enhance --through-plane.")] = False,
    weights: Annotated[Path | None, typer.Option(help="Checkpoint from medsr train; default: shipped weights.")] = None,
    degradation: Annotated[str, typer.Option(help="As medsr enhance --degradation.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int | None, typer.Option(help="Slices per forward pass.")] = None,
    compile_model: Annotated[str, typer.Option("--compile", help="As medsr enhance --compile.")] = "auto",
    precision: Annotated[str, typer.Option(help="As medsr enhance --precision.")] = "auto",
    consistency: Annotated[str, typer.Option(help="As medsr enhance --consistency.")] = "auto",
) -> None:
    """A DICOM node: receive MR and CT images (C-STORE), enhance each series once it is quiet,
    send the enhanced series on (C-STORE), durably and exactly once."""
    _setup_logging(verbose=True)
    # pynetdicom logs a refused connection as an error of its own; the node's line says it
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    from medsr.serve import Destination, Node, ServeOptions, spool_status

    if status:
        _print_spool(spool_status(spool))
        return
    if forward is None:
        raise typer.BadParameter("--forward AET@HOST:PORT is required (or --status)")
    enhance_options = dict(scale=scale, through_plane=through_plane, weights=weights, degradation=degradation,
                           device=device, batch_size=batch_size, compile_model=compile_model,
                           precision=precision, consistency=consistency)
    options = ServeOptions(spool, Destination.parse(forward), aet, port, bind, tuple(allow or ()), quiet_seconds,
                           keep, min_free_mb, retry_seconds, retry_max_seconds, enhance_options, forward_dicomweb)
    node = Node(options)
    node.start()
    try:
        node.wait()
    finally:
        node.stop()


def _print_spool(found: dict[str, list[dict]]) -> None:
    for kind in ("pending", "done", "failed"):
        for state in found[kind]:
            detail = ""
            if state.get("derived_series"):
                detail += f" -> {state['derived_series']}"
            if state.get("attempts"):
                detail += f", {state['attempts']} failed tries"
            if state.get("last_error"):
                detail += f"; last error: {state['last_error']}"
            images = state.get("images_in_spool", state.get("images", 0))
            typer.echo(f"{kind:8s}{state['state']:10s}{state['series']} ({images} images, {state.get('updated', '')})"
                       f"{detail}")
    typer.echo(", ".join(f"{len(found[kind])} {kind}" for kind in ("pending", "done", "failed")))


@app.command("export")
def export(
    out: Annotated[Path, typer.Argument(help="The file to write, e.g. srresnet_x2.onnx or srresnet_x2.ts.")],
    format_: Annotated[str, typer.Option(
        "--format", help="auto (from the name: .ts or .onnx), torchscript or onnx.")] = "auto",
    scale: Annotated[int | None, typer.Option(help="In-plane model: 2 (default) or 4.")] = None,
    through_plane: Annotated[bool, typer.Option(
        "--through-plane", help="Export the through-plane model (one for every factor).")] = False,
    weights: Annotated[Path | None, typer.Option(help="Checkpoint from medsr train; default: shipped weights.")] = None,
    check_on: Annotated[Path | None, typer.Option(
        help="A scan whose slices the exported model is checked on (default: a phantom).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Export a network (float32) to TorchScript or ONNX, checked against PyTorch."""
    _setup_logging(verbose=False)
    from medsr.export import export_file, format_for

    format_ = format_for(out, format_)
    check = export_file(out, format_, scale, through_plane, weights, check_on, overwrite)
    model = "through-plane model" if through_plane else f"in-plane x{scale or 2} model"
    typer.echo(f"wrote {out} ({format_}, {model}); it matches PyTorch on {check.slices} slices of "
               f"{check.source} ({check.shape[0]}x{check.shape[1]}): max difference {check.max_difference:.2g}, "
               f"tolerance {check.tolerance:g} (normalised units)")


@app.command("export-bundle")
def export_bundle(
    out: Annotated[Path, typer.Argument(help="The bundle folder to write, e.g. medsr_srresnet_x2.")],
    scale: Annotated[int | None, typer.Option(help="In-plane model: 2 (default) or 4.")] = None,
    through_plane: Annotated[bool, typer.Option(
        "--through-plane", help="Bundle the through-plane model (one for every factor).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle folder.")] = False,
) -> None:
    """Write a shipped model as a MONAI bundle (configs, model.pt, model.ts, docs, LICENSE)."""
    _setup_logging(verbose=False)
    from medsr.bundle import write_bundle

    written = write_bundle(out, scale, through_plane, overwrite)
    typer.echo(f"wrote MONAI bundle {written.root} ({written.name}; models/model.ts matches PyTorch within "
               f"{written.check.max_difference:.2g}); run it with: python -m monai.bundle run --config_file "
               f"{out}/configs/inference.json --meta_file {out}/configs/metadata.json --bundle_root {out} "
               f"--dataset_dir <NIfTI folder> --output_dir <folder>")


def _degradations(value: str) -> tuple[list[str], bool]:
    """``--degradation`` of evaluate: names, groups and ``auto`` -> (degradations, auto runs)."""
    from medsr.transforms import ALL_DEGRADATIONS, DEGRADATIONS, STRESS_DEGRADATIONS

    groups = {"both": list(DEGRADATIONS), "stress": list(STRESS_DEGRADATIONS), "all": list(ALL_DEGRADATIONS)}
    chosen, auto = [], False
    for token in (t.strip() for t in value.split(",")):
        if token == "auto":
            auto = True
        elif token in groups or token in ALL_DEGRADATIONS:
            chosen += [d for d in groups.get(token, [token]) if d not in chosen]
        else:
            raise typer.BadParameter(
                f"--degradation takes {', '.join(ALL_DEGRADATIONS)}, both, stress, all or auto "
                f"(comma-separated), not {token!r}")
    chosen = chosen or list(DEGRADATIONS)
    # the stress degradations have no flag a user would give: what matters is the default path
    return chosen, auto or any(d in STRESS_DEGRADATIONS for d in chosen)


@app.command()
def evaluate(
    scans: Annotated[list[Path], typer.Argument(help="Held-out scans: DICOM series folders, DICOM or NIfTI files.")],
    weights: Annotated[list[Path] | None, typer.Option(
        help="Checkpoint(s) to compare; default: shipped weights.")] = None,
    degradation: Annotated[str, typer.Option(
        help="bicubic, kspace, both (default), the stress degradations area, gaussian, lanczos, rician "
             "(or stress, all), comma-separated; auto adds each model as the default path runs it "
             "(degradation found from the pixels).")] = "both",
    scale: Annotated[int | None, typer.Option(
        help="Degradation factor (must match the weights; default 2, through-plane 4).")] = None,
    through_plane: Annotated[bool, typer.Option(
        "--through-plane",
        help="Protocol v1-z: thick slices simulated from ~1 mm volumes, B-spline baseline.")] = False,
    profile: Annotated[str, typer.Option(help="Through-plane slice profile: gaussian, box or both.")] = "both",
    slice_axis: Annotated[str, typer.Option(help="auto, 0, 1 or 2 (NIfTI).")] = "auto",
    report: Annotated[Path | None, typer.Option(help="Folder for metrics.json, metrics.csv and figures.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    bootstrap: Annotated[int, typer.Option(
        help="With two or more --weights: a paired bootstrap of this many draws (scans, then "
             "slices) gives a 95% interval for each difference between them.")] = 0,
    precision: Annotated[str, typer.Option(
        help="auto (as medsr enhance: bf16 on CUDA and on CPUs with native bf16), fp32 or bf16.")] = "auto",
    consistency: Annotated[str, typer.Option(
        help="As medsr enhance --consistency: auto, on or off. Unless off, the relative consistency error "
             "||D(x) - y|| / ||y|| of each model's output is printed per volume, with and without the "
             "projection; where it projects, the model is also scored without it ('<model> plain').")] = "auto",
    ensemble: Annotated[bool, typer.Option(
        "--ensemble", help="Also score each model as medsr enhance --ensemble runs it ('<model> ensemble'), "
                           "and its --detail-map against the real error (Spearman, AUROC for the 5% largest "
                           "errors); with --bootstrap, ensemble against plain; with --report, a figure "
                           "of input, output, error and map.")] = False,
) -> None:
    """Score models against classical baselines (protocol v1 in-plane, v1-z through-plane)."""
    _setup_logging(verbose=False)
    axis = _slice_axis(slice_axis)
    if through_plane:
        if profile not in ("gaussian", "box", "both"):
            raise typer.BadParameter(f"--profile must be gaussian, box or both, not {profile!r}")
        if degradation != "both" or bootstrap:
            raise typer.BadParameter("--degradation and --bootstrap are in-plane options; "
                                     "--through-plane takes --profile")
        runs, auto = (["gaussian", "box"] if profile == "both" else [profile]), False
    else:
        runs, auto = _degradations(degradation)
    from medsr.checkpoint import default_weights, load_model
    from medsr.consistency import check_consistency
    from medsr.degradation import load_classifier
    from medsr.engine import PRECISIONS, check_choice, pick_device
    from medsr.enhance import folders_for
    from medsr.evaluation import evaluate_scan, evaluate_through_plane_scan, protocol_slice_axis, summarise
    from medsr.model import ThroughPlaneNet
    from medsr.reading import read_scan
    from medsr.reports import write_comparison, write_metrics

    scale = scale or (4 if through_plane else 2)
    torch_device = pick_device(device)
    check_choice("precision", precision, PRECISIONS)
    check_consistency(consistency, through_plane)
    paths = weights or [default_weights(scale, through_plane)]
    models = {}
    for path in paths:
        model, _ = load_model(path)
        if isinstance(model, ThroughPlaneNet) != through_plane:
            kind = "through" if isinstance(model, ThroughPlaneNet) else "in"
            raise typer.BadParameter(f"--weights {path} are {kind}-plane weights"
                                     + ("" if through_plane else "; add --through-plane"))
        # runs/l1_x2/best.pt and runs/mse_x2/best.pt are told apart by their run folder
        stems = [p.stem for p in paths]
        name = path.stem if stems.count(path.stem) == 1 else f"{path.parent.name}/{path.stem}"
        if name in models:
            raise typer.BadParameter(f"--weights {path} is given twice")
        models[name] = model
    classifier = load_classifier(None, scale) if auto else None
    # a report folder made here is removed again if the run fails before anything is in it
    with folders_for(report / "metrics.json") if report is not None else nullcontext():
        results = []
        with _progress() as progress:
            task = progress.add_task("evaluating", total=len(scans) * len(runs))
            for scan_path in scans:
                scan = read_scan(scan_path)
                for name in runs:
                    if through_plane:
                        z = 2 if axis is None else axis
                        result = evaluate_through_plane_scan(scan, models, name, scale, z, torch_device,
                                                             keep_images=report is not None, precision=precision,
                                                             ensemble=ensemble)
                        z = next(a for a in range(3) if a != z)  # figures show planes across the slices
                    else:
                        z = protocol_slice_axis(scan) if axis is None else axis
                        result = evaluate_scan(scan, models, name, scale, z, torch_device,
                                               keep_images=report is not None, classifier=classifier,
                                               precision=precision, consistency=consistency,
                                               ensemble=ensemble)
                    if report is not None:
                        write_comparison(report, result, z)
                    results.append(result)
                    progress.advance(task)
        summary = summarise(results)
        names = list(models) + ([m + " auto" for m in models] if auto else [])
        if any(m + " plain" in r.scores for r in results for m in models):
            names += [m + " plain" for m in models]
        if ensemble:
            names += [m + " ensemble" for m in models]
        _print_table(results, summary, names)
        _print_consistency(results)
        _print_map_quality(results)
        pairs = list(combinations(models, 2)) + ([(m + " ensemble", m) for m in models] if ensemble else [])
        intervals = _print_bootstrap(results, pairs, bootstrap) if bootstrap and pairs else {}
        if report is not None:
            write_metrics(report, results, summary, "v1-z" if through_plane else "v1", intervals)
            typer.echo(f"wrote {report / 'metrics.json'}, {report / 'metrics.csv'} and comparison figures")


def _print_map_quality(results) -> None:
    """Per volume, how well each model's detail map predicts the ensemble output's error."""
    for r in results:
        for model, quality in r.map_quality.items():
            typer.echo(f"detail map {Path(r.scan).name} {r.degradation}: {model} Spearman with |error| "
                       f"{quality['spearman']:.3f}, AUROC for the 5% largest errors {quality['auroc']:.3f} "
                       f"({quality['auroc_anatomy']:.3f} within the anatomy)")


def _print_bootstrap(results, pairs: list[tuple[str, str]], replicates: int) -> dict:
    """Each pair of methods (``(first, second)``: two models, or a model's ensemble and its
    plain run), per degradation: the mean difference and its 95% interval."""
    from medsr.evaluation import paired_bootstrap

    intervals = {}
    for name in sorted({r.degradation for r in results}):
        rows = [r for r in results if r.degradation == name]
        for first, second in pairs:
            found = paired_bootstrap(rows, first, second, replicates)
            intervals[f"{name}: {first} - {second}"] = found
            for metric, unit, digits in (("psnr", " dB", 3), ("ssim", "", 4)):
                value = found[metric]
                verdict = "not significant" if value["low"] <= 0 <= value["high"] else "significant"
                typer.echo(f"{name}: {first} - {second} {metric.upper()} {value['difference']:+.{digits}f}{unit}, "
                           f"95% interval [{value['low']:+.{digits}f}, {value['high']:+.{digits}f}] "
                           f"({verdict}; {replicates} paired draws of {len(rows)} scans and their slices)")
    return intervals


def _print_table(results, summary, model_names: list[str]) -> None:
    from medsr.evaluation import best_baseline

    baselines = [m for m in results[0].scores if m not in model_names]
    methods = baselines + model_names
    header = ["scan", "degradation"] + [f"{m} PSNR/SSIM" for m in methods]
    rows = []
    for r in results:
        cells = [f"{r.scores[m]['psnr']:.2f}/{r.scores[m]['ssim']:.4f}" for m in methods]
        found = {d.grid for d in r.decisions.values()}
        label = r.degradation + (f" (auto: {'/'.join(sorted(found))})" if found else "")
        rows.append([Path(r.scan).name, label] + cells)
    for name, means in summary.items():
        rows.append(["MEAN", name] + [f"{means[m]['psnr']:.2f}/{means[m]['ssim']:.4f}" for m in methods])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))
    for name, means in summary.items():
        best = best_baseline(means, name)
        for model in model_names:
            wins = [m for m in ("psnr", "ssim") if means[model][m] > best[m]]
            verdict = "beats" if len(wins) == 2 else "does not beat"
            typer.echo(f"{name}: {model} {verdict} the best baseline "
                       f"(PSNR {means[model]['psnr'] - best['psnr']:+.2f} dB, "
                       f"SSIM {means[model]['ssim'] - best['ssim']:+.4f})")
        told = [m for m in model_names if not m.endswith((" auto", " plain"))]
        if len(told) > 1:
            for metric, unit in (("psnr", " dB"), ("ssim", "")):
                ranked = sorted(told, key=lambda m: means[m][metric], reverse=True)
                margin = means[ranked[0]][metric] - means[ranked[1]][metric]
                typer.echo(f"{name}: {ranked[0]} wins {metric.upper()} "
                           f"(by {margin:.4f}{unit} over {ranked[1]})")
    decided = [(r, d) for r in results for d in list(r.decisions.values())[:1]]
    if decided:
        from medsr.transforms import GRID_OF

        for name in summary:
            mine = [d for r, d in decided if r.degradation == name]
            right = sum(d.grid == GRID_OF[name] for d in mine)
            looked = sum(bool(d.probed) for d in mine)
            typer.echo(f"{name}: auto found the {GRID_OF[name]} grid on {right} of {len(mine)} scans"
                       + (f" (a second look by synthesis on {looked})" if looked else ""))


def _print_consistency(results) -> None:
    """Per volume, each model's relative consistency error without and with the projection, and
    per degradation what the projection changed in the scores."""
    import numpy as np

    from medsr.transforms import GRID_OF

    for r in results:
        for model, (plain, projected) in r.consistency.items():
            typer.echo(f"consistency {Path(r.scan).name} {r.degradation}: {model} ||D(x) - y|| / ||y|| "
                       f"({GRID_OF[r.degradation]} operator) {plain:.2e} plain, {projected:.2e} as output")
    for name in sorted({r.degradation for r in results if any(m.endswith(" plain") for m in r.scores)}):
        rows = [r for r in results if r.degradation == name]
        for model in rows[0].consistency:
            gains = np.array([[r.scores[model][m] - r.scores[model + " plain"][m] for m in ("psnr", "ssim")]
                              for r in rows])
            typer.echo(f"{name}: {model} minus {model} plain, mean PSNR {gains[:, 0].mean():+.3f} dB "
                       f"(worst volume {gains[:, 0].min():+.3f}), SSIM {gains[:, 1].mean():+.4f} "
                       f"(worst {gains[:, 1].min():+.4f})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
