"""The DICOM node's spool: what ``medsr serve`` received, where each series is, and the truth
on disk that a restarted node resumes from.

The receiving side (:mod:`medsr.serve`) and the worker that enhances and forwards
(:mod:`medsr.series_worker`) share one :class:`Spool`: its folders, its lock file (one node per
spool), and the in-memory record of every pending series, guarded by :attr:`Spool.lock`.

Layout::

    SPOOL/incoming/                      images being written (temporary names)
    SPOOL/series/<SeriesUID>/state.json  its step, counts, attempts, last error
    SPOOL/series/<SeriesUID>/images/     the received images, <SOPInstanceUID>.dcm
    SPOOL/series/<SeriesUID>/derived/    the enhanced series, once written
    SPOOL/done/<SeriesUID>.json          what was sent (with keep: the whole folder)
    SPOOL/failed/<SeriesUID>/            series that could not be enhanced

Each step of a series replaces its ``state.json`` atomically (written, synced, renamed, the
folder synced), so a node killed at any moment finds every series at a step it completed.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from medsr.errors import MedsrError, OutputError
from medsr.writing import sync_file, sync_folder

logger = logging.getLogger(__name__)

# the steps of a series, in the order it takes them (state.json "state")
RECEIVING, ENHANCED, DONE, FAILED = "receiving", "enhanced", "done", "failed"
LOCK_FILE = ".medsr-serve.lock"


@dataclass
class SeriesRecord:
    """What the node holds in memory about one series of the spool (state.json is the truth
    on disk). ``generation`` counts received images: a step that started before the last image
    came does not complete."""

    uid: str
    state: str
    study: str = ""
    last_arrival: float = 0.0
    first_arrival: float = 0.0
    generation: int = 0
    attempts: int = 0
    next_try: float = 0.0
    derived: str | None = None
    images: int = 0
    last_error: str | None = None

    def state_file(self) -> dict:
        """What ``state.json`` says of it."""
        return {"state": self.state, "series": self.uid, "study": self.study,
                "derived_series": self.derived, "images": self.images, "attempts": self.attempts,
                "last_error": self.last_error}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_state(folder: Path, state: dict) -> None:
    """Replace ``folder/state.json`` atomically and durably (synced before and after the rename)."""
    target = folder / "state.json"
    temporary = folder / "state.json.tmp"
    temporary.write_text(json.dumps({**state, "updated": _now()}, indent=1) + "\n")
    sync_file(temporary)
    os.replace(temporary, target)
    sync_folder(folder)


def read_state(folder: Path) -> dict | None:
    """The state of the series in ``folder``, or None when it has none (yet) or it is unreadable."""
    return _read_json(folder / "state.json")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Spool:
    """The spool's folders and the records of its pending series.

    Every method that reads or changes :attr:`series` is called with :attr:`lock` held, except
    :meth:`take`, :meth:`release` and :meth:`recover` (before the receiver and the worker run).
    """

    def __init__(self, root: Path, keep: bool = False) -> None:
        self.root = root
        self.keep = keep
        self.lock = threading.Lock()
        self.series: dict[str, SeriesRecord] = {}
        self._lock_file: int | None = None

    def folder(self, uid: str) -> Path:
        return self.root / "series" / uid

    # --- one node per spool ------------------------------------------------------------------

    def take(self) -> None:
        """Make the folders and take the lock file.

        Raises:
            OutputError: the folders cannot be made.
            MedsrError: another running node holds the spool.
        """
        import fcntl

        try:
            for name in ("incoming", "series", "done", "failed"):
                (self.root / name).mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OutputError(f"{self.root}: cannot use it as the spool: {exc.strerror or exc}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            raise MedsrError(f"{self.root}: another medsr serve uses this spool; give each node its own "
                             "--spool") from None
        self._lock_file = descriptor

    def release(self) -> None:
        if self._lock_file is not None:
            os.close(self._lock_file)  # the kernel lets the flock go with the descriptor
            self._lock_file = None

    def recover(self) -> None:
        """Resume what an earlier run left: receiving series wait one more quiet period (their
        quiet clock restarts now), enhanced ones are sent, done ones are cleared away."""
        for leftover in (self.root / "incoming").iterdir():
            leftover.unlink(missing_ok=True)  # never acknowledged
        now = time.monotonic()
        for folder in sorted((self.root / "series").iterdir()):
            state = read_state(folder)
            if state is None:  # made, but no image was ever renamed into it
                shutil.rmtree(folder, ignore_errors=True)
                continue
            series = SeriesRecord(folder.name, state["state"], state.get("study", ""), now, now,
                                  attempts=state.get("attempts", 0), derived=state.get("derived_series"),
                                  images=state.get("images", 0), last_error=state.get("last_error"))
            if series.state == DONE:  # sent; killed before its spool was cleared
                self.clear_done(series)
                continue
            if series.state == FAILED:  # set aside; killed before it was moved
                os.replace(folder, self.root / "failed" / folder.name)
                continue
            self.series[series.uid] = series
            logger.info("resuming series %s (%s, %d images in the spool)", series.uid, series.state,
                        len(list((folder / "images").glob("*.dcm"))))

    # --- the steps of a series ---------------------------------------------------------------

    def receiving(self, uid: str, study: str) -> SeriesRecord:
        """The series ``uid`` in the receiving step, its folder ready (under the lock)."""
        folder = self.folder(uid)
        series = self.series.get(uid)
        if series is None:
            now = time.monotonic()
            series = self.series[uid] = SeriesRecord(uid, RECEIVING, study, now, now)
        if series.state != RECEIVING or not (folder / "state.json").exists():
            (folder / "images").mkdir(parents=True, exist_ok=True)
            sync_folder(folder.parent)
            sync_folder(folder)
            if series.state != RECEIVING:
                logger.info("series %s: more images came after it was %s; it is enhanced again once quiet",
                            uid, series.state)
            series.state, series.attempts, series.first_arrival = RECEIVING, 0, time.monotonic()
            self.save(series)
        return series

    def save(self, series: SeriesRecord) -> None:
        """Its ``state.json``, replaced atomically (under the lock)."""
        write_state(self.folder(series.uid), series.state_file())

    def set_aside(self, series: SeriesRecord, reason: str) -> Path:
        """A series that cannot be enhanced: moved under ``failed/`` with its reason (under the
        lock). Returns where it now lies."""
        folder = self.folder(series.uid)
        series.state, series.last_error = FAILED, reason
        target = self.root / "failed" / series.uid
        if target.exists():
            shutil.rmtree(target)
        self.save(series)
        os.replace(folder, target)
        sync_folder(target.parent)
        sync_folder(folder.parent)
        del self.series[series.uid]
        return target

    def mark_done(self, series: SeriesRecord) -> None:
        """Sent and accepted: the step recorded and the record dropped (under the lock); then
        :meth:`clear_done`."""
        series.state = DONE
        self.save(series)
        del self.series[series.uid]

    def clear_done(self, series: SeriesRecord) -> None:
        """A sent series: its record under ``done/``; its spool removed (``keep``: moved there)."""
        folder = self.folder(series.uid)
        done = self.root / "done"
        if self.keep:
            target = done / series.uid
            if target.exists():
                shutil.rmtree(target)
            os.replace(folder, target)
        else:
            record = done / f"{series.uid}.json"
            record.write_text(json.dumps({**series.state_file(), "state": DONE, "updated": _now()}) + "\n")
            sync_file(record)
            shutil.rmtree(folder)
        sync_folder(done)
        sync_folder(folder.parent)


def spool_status(spool: Path) -> dict[str, list[dict]]:
    """What a spool holds: ``{"pending": [...], "done": [...], "failed": [...]}``, each a list of
    series states (``state.json``), pending in the order they arrived."""
    if not (spool / "series").is_dir():
        raise MedsrError(f"--spool {spool}: not a medsr serve spool (no series/ folder)")
    found: dict[str, list[dict]] = {"pending": [], "done": [], "failed": []}
    for folder in sorted((spool / "series").iterdir()):
        state = read_state(folder)
        if state is not None:
            state["images_in_spool"] = len(list((folder / "images").glob("*.dcm")))
            found["done" if state["state"] == DONE else "pending"].append(state)
    for entry in sorted((spool / "done").iterdir()):
        state = read_state(entry) if entry.is_dir() else _read_json(entry)
        if state is not None:
            found["done"].append(state)
    for folder in sorted((spool / "failed").iterdir()):
        state = read_state(folder)
        if state is not None:
            found["failed"].append(state)
    return found
