"""Owned temporary names: a dead run's leftovers are swept, nothing else ever is."""

from __future__ import annotations

import logging
import os
import socket
import subprocess

import pytest

from medsr.temporaries import _boot_id, owned, sweep
from medsr.writing import atomic_output


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def leave_run(folder, tag: str, content: str) -> list[str]:
    """What a killed run leaves: its unlocked lock file, a temporary file and a staging folder."""
    (folder / f".medsr-{tag}.lock").write_text(content)
    (folder / f".out.nii.gz.medsr-{tag}.0a1b2c3d.tmp.nii.gz").write_bytes(b"\0" * 10)
    (folder / f".out.nii.gz.medsr-{tag}.4e5f6a7b.scratch.nii").write_bytes(b"\0" * 10)
    (folder / f".series.medsr-{tag}.8c9d0e1f.tmp").mkdir()
    (folder / f".series.medsr-{tag}.8c9d0e1f.tmp" / "IM0001.dcm").write_bytes(b"\0")
    return sorted(p.name for p in folder.iterdir())


def test_a_dead_runs_leftovers_are_swept_and_nothing_else(tmp_path, caplog):
    pid = dead_pid()
    tag = f"{pid}-00c0ffee"
    users = [".notes", "scan.nii.gz", f".out.nii.gz.{tag}.tmp", ".out.nii.gz.1a2b3c4d.tmp.nii.gz",
             f".out.medsr-{pid}-11111111.0a1b2c3d.tmp"]  # another owner, with no lock file
    for name in users:
        (tmp_path / name).write_text("mine")
    leave_run(tmp_path, tag, f"{socket.gethostname()} {pid}\n")
    with caplog.at_level(logging.WARNING, logger="medsr"):
        sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(users)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: removed 3 temporary file(s) left by an interrupted medsr run (pid {pid}): "
        f".out.nii.gz.medsr-{tag}.0a1b2c3d.tmp.nii.gz, .out.nii.gz.medsr-{tag}.4e5f6a7b.scratch.nii, "
        f".series.medsr-{tag}.8c9d0e1f.tmp"]


def test_a_run_from_before_a_reboot_is_dead_even_if_its_pid_now_runs(tmp_path):
    leave_run(tmp_path, f"{os.getpid()}-00c0ffee", f"{socket.gethostname()} {os.getpid()} an-earlier-boot\n")
    sweep(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("why, content", [
    ("its pid is running (this process), this boot", f"{socket.gethostname()} {os.getpid()} {_boot_id()}\n"),
    ("it ran on another host", "some-other-host {pid}\n"),
])
def test_leftovers_whose_owner_may_live_are_kept(tmp_path, why, content):
    pid = dead_pid()
    before = leave_run(tmp_path, f"{pid}-00c0ffee", content.format(pid=pid))
    sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, why


def test_a_live_runs_temporaries_are_kept_while_it_holds_its_lock(tmp_path):
    """Another run (here: another lock holder in this process; flock locks belong to the open
    file, so it is the same to the kernel) sweeping the folder keeps them, pid aside."""
    with owned(tmp_path) as tag, atomic_output(tmp_path / "out.nii.gz", ".tmp.nii.gz") as temporary:
        assert tag in temporary.name and temporary.name.startswith(".out.nii.gz.medsr-")
        lock = tmp_path / f".medsr-{tag}.lock"
        lock.write_text(f"{socket.gethostname()} {dead_pid()}\n")  # a dead pid: only the lock protects
        sweep(tmp_path)
        assert temporary.exists() and lock.exists()
        temporary.write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]  # the lock goes with the last use


def test_what_an_interruption_left_unguarded_goes_with_the_last_use_of_the_lock(tmp_path):
    """A temporary named under the lock whose cleanup never ran (an interruption right after
    it was made) is removed when the process lets the lock go."""
    with owned(tmp_path) as tag:
        (tmp_path / f".out.nii.gz.medsr-{tag}.0a1b2c3d.tmp.nii.gz").write_bytes(b"\0")
        (tmp_path / "kept.nii.gz").write_bytes(b"\0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.nii.gz"]
