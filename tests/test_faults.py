"""Faults a user meets on a real system, tried on the command as a user would: a full disk, a
failing disk, SIGTERM (``timeout``, systemd, container runtimes, batch schedulers), SIGKILL.
Each is one line on stderr, and nothing is left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from medsr.cli import app

from conftest import MR_SERIES, ROOT, SAMPLES

runner = CliRunner()
FAST = ["--degradation", "bicubic", "--device", "cpu", "--compile", "off", "--precision", "fp32"]
INTERRUPTED = "error: interrupted (SIGTERM); no partial output was left behind"
# runs `medsr ARGS...` with a NIfTI writer that prints "writing" after each slab, then sleeps
# DELAY seconds: a run caught in the middle of writing, every time
SLOW_WRITER = """
import sys, time
import medsr.writing
write = medsr.writing.NiftiSliceWriter.write
def slow_write(self, slab):
    write(self, slab)
    print("writing", flush=True)
    time.sleep(float(sys.argv[1]))
medsr.writing.NiftiSliceWriter.write = slow_write
sys.argv[:2] = ["medsr"]
from medsr.cli import main
main()
"""


def small_volume(folder: Path, shape=(64, 64, 40)) -> Path:
    """A NIfTI of random values with 1 x 1 x 3 mm voxels (``shape`` of 64 x 64 x 40: its x2
    output is 2.6 MB raw)."""
    values = np.random.default_rng(0).uniform(0, 1000, shape).astype(np.float32)
    path = folder / "small.nii.gz"
    nib.save(nib.Nifti1Image(values, np.diag([1.0, 1.0, 3.0, 1.0])), path)
    return path


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def start_slow_run(delay: float, arguments: list[str]) -> subprocess.Popen:
    """``medsr ARGS`` in a subprocess, returned once its first slab is written."""
    process = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(delay), *arguments], env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if line != "writing\n":
        process.kill()
        pytest.fail(f"the run ended before writing: {line}{process.communicate()}")
    return process


def temporary_kind(name: str) -> str:
    for kind, suffix in (("lock", ".lock"), ("scratch", ".scratch.nii"), ("output", ".tmp.nii.gz")):
        if name.startswith(".") and "medsr-" in name and name.endswith(suffix):
            return kind
    return name


# ------------------------------------------------------------------ full and failing disks

def full_disk_cases(folder: str, source: str, weights: str, mechanism: str) -> None:
    """Run in a subprocess whose ``folder`` is a 512 KB file system (``tmpfs``: mounted by the
    caller in its own mount namespace) or, for ``fsize``, whose files may not grow past 512 KB
    (RLIMIT_FSIZE, SIGXFSZ ignored: a write past it fails with EFBIG). Prints, for each output
    that does not fit, what the command did: exit code, stderr, what was left in the folder."""
    import resource

    if mechanism == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))
    cases = [
        ([source, "--slice-axis", "2"], "streamed.nii.gz"),  # compressed as it streams
        ([source, "--slice-axis", "2"], "streamed.nii"),
        ([source, "--slice-axis", "0"], "across.nii.gz"),  # a mapped scratch, compressed at the end
        ([str(MR_SERIES)], "series"),  # a DICOM series: its first 512x512 image does not fit
    ]
    found = []
    for arguments, name in cases:
        output = Path(folder) / name
        result = runner.invoke(app, ["enhance", *arguments, "-o", str(output), "--weights", weights, *FAST])
        found.append({"output": str(output), "exit_code": result.exit_code, "stderr": result.stderr,
                      "bug": None if isinstance(result.exception, SystemExit) else repr(result.exception),
                      "left": sorted(os.listdir(folder))})
    print(json.dumps(found))


def small_file_system(folder: Path) -> list[str]:
    """The command prefix that runs a command with a 512 KB tmpfs on ``folder`` (a private
    mount namespace: needs root and ``unshare``), or [] where it cannot be made."""
    prefix = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs -o size=512k medsr-test "$0" && exec "$@"',
              str(folder)]
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return []
    tried = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if tried.returncode == 0 else []


def test_a_full_disk_is_one_error_line_naming_the_output_and_leaves_nothing(tmp_path, tiny_checkpoint):
    """A real small file system where the platform allows one (tmpfs), else files limited in
    size (RLIMIT_FSIZE): each output format fails with one line naming its path and the
    reason, no traceback, and nothing in the folder: not the output, no temporary, no lock."""
    source = small_volume(tmp_path)
    full = tmp_path / "full"
    full.mkdir()
    prefix = small_file_system(full)
    mechanism, reason = ("tmpfs", "No space left on device") if prefix else ("fsize", "File too large")
    driver = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); from test_faults import full_disk_cases; "
              f"full_disk_cases({str(full)!r}, {str(source)!r}, {str(tiny_checkpoint)!r}, {mechanism!r})")
    finished = subprocess.run([*prefix, sys.executable, "-c", driver], env=environment(), capture_output=True,
                              text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    for case in json.loads(finished.stdout.splitlines()[-1]):
        assert case["bug"] is None, case
        assert case["exit_code"] == 1, case
        errors = [line for line in case["stderr"].splitlines() if not line.startswith("warning: ")]
        assert errors == [f"error: {case['output']}: cannot write it: {reason}"], case
        assert case["left"] == [], case


def test_a_failing_disk_is_one_error_line_and_leaves_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    """EIO when the finished file is synced (the disk or network file system failing)."""
    source = small_volume(tmp_path, (32, 32, 4))
    out = tmp_path / "out"
    out.mkdir()

    def failing(descriptor):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    result = runner.invoke(app, ["enhance", str(source), "-o", str(out / "x.nii.gz"),
                                 "--weights", str(tiny_checkpoint), *FAST])
    assert result.exit_code == 1
    assert result.stderr == f"error: {out / 'x.nii.gz'}: cannot write it: Input/output error\n"
    assert list(out.iterdir()) == []


def tiny_training(out: Path, cache: Path) -> list[str]:
    """``medsr train`` arguments for two iterations of a tiny model on one sample series (run
    from the repository root)."""
    return ["train", "--config", "configs/srresnet_l1_x2.yaml", "--out", str(out), "--set", f"data_root={SAMPLES}",
            "--set", f"cache_dir={cache}", "--set", "train_scans=[ct_chest_3slice_dicom]",
            "--set", "val_scans=[]", "--set", "model.features=4", "--set", "model.num_res_blocks=1",
            "--set", "batch_size=2", "--set", "patch_size=16", "--set", "iterations_per_epoch=2", "--set", "epochs=1"]


def test_a_quota_reached_by_a_checkpoint_is_one_error_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    """EDQUOT when a checkpoint is renamed into place, inside MONAI's engine."""
    import errno

    replace = os.replace

    def over_quota(source, target):
        if str(target).endswith(".pt"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        replace(source, target)

    monkeypatch.setattr(os, "replace", over_quota)
    monkeypatch.chdir(SAMPLES.parent)
    out = tmp_path / "run"
    result = runner.invoke(app, tiny_training(out, tmp_path / "cache"))
    assert result.exit_code == 1, result.output
    assert [line for line in result.stderr.splitlines() if not line.startswith("info: ")] == [
        f"error: {out / 'best.pt'}: cannot write it: Disk quota exceeded"]
    assert not [p.name for p in out.rglob("*.pt*")]


# ------------------------------------------------------------------ SIGTERM and SIGKILL

def test_sigterm_mid_write_stops_like_ctrl_c_and_leaves_nothing(tmp_path, tiny_checkpoint):
    """SIGTERM while the scratch and the temporary file are being written: exit 143, one
    line, no temporaries, the input unchanged."""
    source = small_volume(tmp_path)
    before = source.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    process = start_slow_run(0.5, ["enhance", str(source), "-o", str(out / "x.nii.gz"), "--slice-axis", "0",
                                   "--batch-size", "4", "--weights", str(tiny_checkpoint), *FAST])
    writing = sorted(p.name for p in out.iterdir())
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert sorted(map(temporary_kind, writing)) == ["lock", "output", "scratch"]  # caught mid-write
    assert process.returncode == 143, stderr
    assert stderr.splitlines() == [INTERRUPTED]
    assert list(out.iterdir()) == []
    assert source.read_bytes() == before


def test_after_sigkill_the_next_run_succeeds_and_sweeps_the_leftovers(tmp_path, tiny_checkpoint):
    """kill -9 mid-write leaves the full-size raw scratch, the temporary output and the lock
    file; the next run into the folder writes the output and removes them, saying so."""
    source = small_volume(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    arguments = ["enhance", str(source), "-o", str(out / "x.nii.gz"), "--slice-axis", "0",
                 "--weights", str(tiny_checkpoint), *FAST]
    process = start_slow_run(60, arguments)
    process.kill()
    process.communicate(timeout=60)
    leftovers = sorted(p.name for p in out.iterdir())
    assert sorted(map(temporary_kind, leftovers)) == ["lock", "output", "scratch"]
    assert all(f"medsr-{process.pid}-" in name for name in leftovers)
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["x.nii.gz"]
    assert f"removed 2 temporary file(s) left by an interrupted medsr run (pid {process.pid})" in result.stderr


# every command, and any added later, stops on SIGTERM as on Ctrl-C: arguments that reach its body
COMMAND_ARGUMENTS = {
    "enhance": ["in.nii.gz", "-o", "out.nii.gz"],
    "evaluate": ["in.nii.gz"],
    "train": ["--config", "c.yaml", "--out", "run"],
    "fit-degradation": ["--config", "c.yaml", "--out", "c.pt"],
    "export": ["model.ts"],
    "export-bundle": ["bundle"],
    "serve": ["--forward", "PACS@127.0.0.1:4242"],
}


def test_every_command_is_listed_for_the_sigterm_test():
    assert set(typer.main.get_command(app).commands) == set(COMMAND_ARGUMENTS)


@pytest.mark.parametrize("command", sorted(COMMAND_ARGUMENTS))
def test_sigterm_stops_every_command_like_ctrl_c(command, monkeypatch):
    def terminated(verbose):  # the first thing every command does
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        raise AssertionError("SIGTERM was not turned into an interruption")

    monkeypatch.setattr("medsr.cli._setup_logging", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    result = runner.invoke(app, [command, *COMMAND_ARGUMENTS[command]])
    assert result.exit_code == 143 and result.stderr.splitlines() == [INTERRUPTED]
    assert signal.getsignal(signal.SIGTERM) == handler  # restored for whoever called


def test_sigterm_while_evaluate_writes_its_report_leaves_no_temporary(tmp_path, tiny_checkpoint, monkeypatch):
    from matplotlib.figure import Figure

    source = small_volume(tmp_path, (64, 64, 6))
    save = Figure.savefig

    def terminated(self, path, *args, **kwargs):  # mid-way through the first figure's file
        save(self, path, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

    monkeypatch.setattr(Figure, "savefig", terminated)
    report = tmp_path / "report"
    result = runner.invoke(app, ["evaluate", str(source), "--weights", str(tiny_checkpoint), "--degradation",
                                 "bicubic", "--device", "cpu", "--report", str(report)])
    assert result.exit_code == 143 and result.stderr.splitlines() == [INTERRUPTED], result.output
    assert not report.exists()  # no temporary figure, and the folder it made is gone again


def test_sigterm_while_train_writes_a_checkpoint_stops_it_and_leaves_no_temporary(tmp_path, monkeypatch):
    """Inside MONAI's engine too (whose StatsHandler would log the traceback, and which would
    swallow the interruption if its exception handler were merely removed)."""
    import medsr.writing

    commit = medsr.writing.commit

    def terminated(temporary, path):  # the first checkpoint, complete under its temporary name
        if path.suffix != ".pt":
            return commit(temporary, path)  # the slice cache, the config
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

    monkeypatch.setattr("medsr.writing.commit", terminated)
    monkeypatch.chdir(SAMPLES.parent)
    out = tmp_path / "run"
    result = runner.invoke(app, tiny_training(out, tmp_path / "cache"))
    assert result.exit_code == 143, result.output
    assert [line for line in result.stderr.splitlines() if not line.startswith("info: ")] == [INTERRUPTED]
    assert not [p.name for p in out.rglob(".*")]
