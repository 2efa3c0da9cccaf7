"""Temporary names beside an output, owned by the run that made them, so that what a killed run
left behind is removed by the next run writing into the same folder, and nothing else ever is.

A run stopped by Ctrl-C, SIGTERM or an error removes its own temporaries (the writers'
``finally`` blocks). SIGKILL, the OOM killer or a power cut give it no chance: a NIfTI written
across its slices leaves a full-size raw scratch file, a DICOM series a staging folder. So:

- every process writing into a folder holds an exclusive ``flock`` on its own lock file there,
  ``.medsr-<pid>-<random>.lock`` (content: ``<host> <pid> <boot id>``), while it has
  temporaries there;
- every temporary's name carries that owner tag:
  ``.scan_x2.nii.gz.medsr-<pid>-<random>.<random>.tmp.nii.gz``;
- whenever a process takes its lock in a folder (its first temporary there), it sweeps the
  folder first: an owner's files are removed only
  when its lock can be taken (the kernel releases a lock when its process dies, however it
  dies) *and* the lock file says this host and a pid that is not running, or a boot before this
  one (after a power cut, its pid may be another process's now). A lock held, another
  host (a network folder: that host's next run sweeps), a pid alive (reused or not), a lock file
  that cannot be opened or locked (another user's, a file system without locks) keeps the files;
  a name without an owner tag (a user's file, an older medsr's temporary) is never touched.

The lock file is created, then locked, then checked to still be linked: a sweeper that removed
it in between (it was not locked yet, so it looked dead) had no temporaries of it to remove,
and the owner starts again under a new tag. Temporaries are created only under a held lock, and
whatever still carries the tag when the lock is let go (an interruption between naming a
temporary and guarding it) is removed before it is unlocked.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from medsr.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock, so nothing is ever provably dead and nothing is swept
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = re.compile(r"\.medsr-(?P<tag>(?P<pid>[0-9]+)-[0-9a-f]{8})\.lock")


@dataclass
class _Owner:
    tag: str
    descriptor: int
    lock_path: Path
    users: int = 0


_HELD: dict[str, _Owner] = {}  # absolute folder -> the lock this process holds there
_HELD_LOCK = threading.Lock()
# a forked child (a DataLoader worker) keeps its parent's locks alive but owns none of them
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_HELD.clear)


@contextmanager
def owned(folder: Path) -> Iterator[str]:
    """Hold this process's lock in ``folder`` for the block; yield the owner tag every
    temporary name there must carry (:func:`new_name`). The first holder in a folder sweeps
    the leftovers of dead runs (:func:`sweep`) and creates the lock file; the last removes it.
    """
    key = os.path.abspath(folder)
    with _HELD_LOCK:
        owner = _HELD.get(key)
        if owner is None:
            sweep(Path(key))
            owner = _HELD[key] = _take_lock(Path(key))
        owner.users += 1
    try:
        yield owner.tag
    finally:
        with _HELD_LOCK:
            owner.users -= 1
            if owner.users == 0:
                del _HELD[key]
                with suppress(OSError):  # an interruption between naming a temporary and guarding it
                    _remove_tagged(Path(key), os.listdir(key), owner.tag)
                # unlinked before it is unlocked: no sweeper ever sees it free while it exists
                with suppress(OSError):
                    owner.lock_path.unlink()
                os.close(owner.descriptor)


def new_name(destination: Path, suffix: str, tag: str, create: Callable[[Path], None]) -> Path:
    """``create`` a hidden name beside ``destination`` carrying the owner ``tag`` (from
    :func:`owned`, held for as long as the name exists) that did not exist, retrying on a clash."""
    for _ in range(100):
        candidate = destination.parent / f".{destination.name}.medsr-{tag}.{secrets.token_hex(4)}{suffix}"
        try:
            create(candidate)
            return candidate
        except FileExistsError:
            continue
    raise OutputError(f"{destination}: no free temporary name beside it after 100 tries")


def _take_lock(folder: Path) -> _Owner:
    for _ in range(100):
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        path = folder / f".medsr-{tag}.lock"
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            _lock(descriptor, blocking=True)  # a sweeper may hold it for a moment
            if os.fstat(descriptor).st_nlink == 0:  # swept before we locked it: start again
                os.close(descriptor)
                continue
            os.write(descriptor, f"{socket.gethostname()} {os.getpid()} {_boot_id()}\n".encode())
        except BaseException:
            with suppress(OSError):
                path.unlink()
            os.close(descriptor)
            raise
        return _Owner(tag, descriptor, path)
    raise OutputError(f"{folder}: no free lock file name in it after 100 tries")


def _lock(descriptor: int, blocking: bool) -> bool:
    """flock ``descriptor`` exclusively; False if another holds it (non-blocking). A file
    system without locks counts as locked: nothing can be proven there."""
    if fcntl is None:
        return blocking
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF):
            # the owner goes on unlocked, as every run there; a sweeper can prove nothing
            return blocking
        raise


def sweep(folder: Path) -> None:
    """Remove the temporaries (and lock files) of dead medsr runs from ``folder``: only those
    whose owner is provably dead (see the module docstring); logs one line per dead run."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        found = LOCK_NAME.fullmatch(name)
        if found is not None:
            _sweep_owner(folder, names, found["tag"], int(found["pid"]))


def _sweep_owner(folder: Path, names: list[str], tag: str, pid: int) -> None:
    lock_path = folder / f".medsr-{tag}.lock"
    try:
        descriptor = os.open(lock_path, os.O_RDWR)
    except OSError:
        return  # gone already, or not ours to open
    try:
        if not _lock(descriptor, blocking=False):
            return  # held: a live run
        try:
            if os.stat(lock_path).st_ino != os.fstat(descriptor).st_ino:
                return  # swept and made again in between
        except FileNotFoundError:
            return
        host, written_pid, boot = (os.pread(descriptor, 300, 0).decode(errors="replace").split() + ["", "", ""])[:3]
        if host and host != socket.gethostname():
            return  # another host's run: its lock may not reach us, so only its host sweeps
        earlier_boot = bool(boot) and bool(_boot_id()) and boot != _boot_id()
        if not earlier_boot and _running(int(written_pid) if written_pid.isdigit() else pid):
            return
        leftovers = _remove_tagged(folder, names, tag)
        lock_path.unlink(missing_ok=True)
        if leftovers:
            logger.warning("%s: removed %d temporary file(s) left by an interrupted medsr run (pid %d): %s",
                           folder, len(leftovers), pid, ", ".join(sorted(leftovers)))
    except OSError as exc:
        logger.debug("%s: leftovers of pid %d not swept: %s", folder, pid, exc)
    finally:
        os.close(descriptor)


def _boot_id() -> str:
    """This boot's random id (Linux), or "" where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    if pid <= 0:
        return True  # nothing provable
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _remove_tagged(folder: Path, names: list[str], tag: str) -> list[str]:
    """Remove the temporaries among ``names`` in ``folder`` that carry owner ``tag`` (not its
    lock file); returns their names."""
    mark, lock_name = f".medsr-{tag}.", f".medsr-{tag}.lock"
    tagged = [name for name in names if name.startswith(".") and mark in name and name != lock_name]
    for name in tagged:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return tagged
