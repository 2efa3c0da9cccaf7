"""A DICOM node on the hospital network: receive images, enhance each series, send it on.

``medsr serve`` is a storage SCP (pynetdicom) for the image storage classes medsr reads (MR and
CT, single- and multi-frame) and C-ECHO. What it promises, and how:

- **An acknowledged image is never lost.** A received image is written to a temporary file in
  the spool, synced to disk, renamed into its series folder and the folder synced, all before
  the success status goes back. An image that does not fit (the spool's disk below
  ``min_free_mb``) gets ``0xA700`` (out of resources) and is not written at all; while the disk
  is low, whole associations are refused (A-ASSOCIATE-RJ, transient, local limit exceeded).
- **A series is complete when it has been quiet.** No image of it for ``quiet_seconds``: then
  it is enhanced by the default path (:func:`medsr.enhance.enhance_file`) into a derived series
  in the same study, and sent to the destination by C-STORE (and, with ``forward_dicomweb``, by
  STOW-RS).
- **Sent means accepted.** Only when the destination has accepted every instance is the series
  marked done and its spool removed (``keep`` moves it under ``done/`` instead). A destination
  that is down or refuses is tried again with a doubling backoff; the series stays in the spool
  with its state, attempts and last error in its ``state.json`` (``medsr serve --status``).
- **Killed at any moment, started again: every pending series finishes, each sent once.** The
  state file of a series is replaced atomically at each step (receiving -> enhanced -> done);
  on start, every series in the spool resumes from its step. The derived series and instance
  UIDs are a hash of the source's UIDs, the weights and the options
  (:func:`medsr.dicom_writing.DicomSeriesWriter`'s ``uid_seed``), so enhancing again after a
  crash gives the same UIDs and a resend replaces at the destination rather than duplicates.
- **Bad input is set aside.** A series medsr cannot enhance is logged in one line with its
  UIDs (never a patient's name), moved under ``failed/`` and the node keeps serving.

Spool layout (one node per spool: a lock file keeps a second one out)::

    SPOOL/incoming/                      images being written (temporary names)
    SPOOL/series/<SeriesUID>/state.json  its step, counts, attempts, last error
    SPOOL/series/<SeriesUID>/images/     the received images, <SOPInstanceUID>.dcm
    SPOOL/series/<SeriesUID>/derived/    the enhanced series, once written
    SPOOL/done/<SeriesUID>.json          what was sent (with keep: the whole folder)
    SPOOL/failed/<SeriesUID>/            series that could not be enhanced

Images of a series that arrive while it is being enhanced or sent put it back to receiving:
it is enhanced again, with the same derived UIDs, once it is quiet. An image arriving after
its series was sent starts a new pass of that series with only the new image (its instances
keep their stable UIDs, so nothing is duplicated at the destination).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from medsr.errors import MedsrError, OutputError
from medsr.forwarding import Destination, ForwardError, send_series, store_dicomweb
from medsr.writing import sync_file, sync_folder

logger = logging.getLogger(__name__)

# the image storage classes medsr reads (medsr.dicom_reading): MR and CT, single- and multi-frame
STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
# the steps of a series, in the order it takes them (state.json "state")
RECEIVING, ENHANCED, DONE, FAILED = "receiving", "enhanced", "done", "failed"
# DIMSE statuses (PS3.4 Annex B): success, out of resources, cannot understand
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
# how often the worker looks for series that became quiet or are due for another try (s)
TICK = 0.2
# a UID as DICOM allows it (PS3.5 9.1): digits and dots, at most 64; used as a folder name
UID = re.compile(r"[0-9][0-9.]{0,63}")
LOCK_FILE = ".medsr-serve.lock"


@dataclass(frozen=True)
class ServeOptions:
    """What ``medsr serve`` is told.

    Attributes:
        spool: the folder received images, state and derived series are kept in.
        forward: where derived series are sent (C-STORE).
        forward_dicomweb: a DICOMweb service's base URL (``http://pacs:8042/dicom-web``) that
            derived series are also sent to (STOW-RS, ``dicomweb-client``); a series is done
            only when both accepted it.
        aet, port, bind: this node's AE title, port and listening address.
        allow: calling AE titles accepted; empty accepts any.
        quiet_seconds: a series is complete when no image of it came for this long.
        keep: keep a sent series' spool (under ``done/``) instead of removing it.
        min_free_mb: below this much free space on the spool's disk, images and associations
            are refused.
        retry_seconds, retry_max_seconds: the first wait after a failed send, doubled at each
            failure up to the second.
        enhance: options for :func:`medsr.enhance.enhance_file` (``scale``, ``weights``,
            ``degradation``, ``device``, ...); they are part of the derived UIDs' hash.
    """

    spool: Path
    forward: Destination
    aet: str = "MEDSR"
    port: int = 11112
    bind: str = "0.0.0.0"
    allow: tuple[str, ...] = ()
    quiet_seconds: float = 10.0
    keep: bool = False
    min_free_mb: float = 1024.0
    retry_seconds: float = 5.0
    retry_max_seconds: float = 300.0
    enhance: dict = field(default_factory=dict)
    forward_dicomweb: str | None = None

    def __post_init__(self) -> None:
        if not self.aet.strip() or len(self.aet) > 16:
            raise MedsrError(f"--aet must be 1 to 16 characters, not {self.aet!r}")
        if not 0 <= self.port < 65536:
            raise MedsrError(f"--port must be 0 to 65535, not {self.port}")
        if self.forward_dicomweb is not None and not self.forward_dicomweb.startswith(("http://", "https://")):
            raise MedsrError(f"--forward-dicomweb must be an http:// or https:// URL, not {self.forward_dicomweb!r}")
        for name in ("quiet_seconds", "retry_seconds", "retry_max_seconds", "min_free_mb"):
            if getattr(self, name) < 0:
                raise MedsrError(f"--{name.replace('_', '-')} must be 0 or more, not {getattr(self, name)}")


@dataclass
class _Series:
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
    try:
        return json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return None


def uid_seed(source_series: str, weights_digest: str, enhance: dict) -> str:
    """The text the derived UIDs of ``source_series`` are hashed from: the source series, the
    weights' SHA-256 and every enhance option, so the same input with the same weights and
    options always gets the same derived UIDs, and anything else new ones."""
    options = json.dumps({k: str(v) for k, v in sorted(enhance.items()) if k != "weights"}, sort_keys=True)
    return f"{source_series}|{weights_digest}|{options}"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Node:
    """The storage SCP, the worker that enhances and forwards, and the spool they share.

    Example:
        >>> node = Node(ServeOptions(Path("spool"), Destination.parse("ORTHANC@pacs:4242")))
        >>> node.start()          # listening; pending series of an earlier run resume
        >>> node.wait()           # until Ctrl-C / SIGTERM (KeyboardInterrupt)
        >>> node.stop()

    Raises:
        MedsrError: the spool is used by another running node, or cannot be created; bad
            enhance options or weights (checked before listening).
    """

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.spool = options.spool
        self._lock = threading.Lock()
        self._series: dict[str, _Series] = {}
        self._stopping = threading.Event()
        self._server = None
        self._worker: threading.Thread | None = None
        self._spool_lock = None
        self.enhancer = None  # loaded by start(), with the SHA-256 of its weights
        self.weights_digest = ""
        self.port = options.port

    # --- starting and stopping -------------------------------------------------------------

    def start(self) -> None:
        """Take the spool, load the model, resume pending series, start listening and working."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import Verification

        from medsr.checkpoint import default_weights
        from medsr.enhance import enhancer_for

        if self.options.forward_dicomweb is not None:
            try:
                import dicomweb_client  # noqa: F401
            except ImportError:
                raise MedsrError("--forward-dicomweb needs dicomweb-client: pip install 'medsr[dicomweb]'") from None
        self._take_spool()
        enhance = self.options.enhance
        self.enhancer = enhancer_for(None, enhance.get("weights"), enhance.get("scale"),
                                     bool(enhance.get("through_plane")))
        weights = enhance.get("weights") or default_weights(enhance.get("scale") or 2,
                                                            bool(enhance.get("through_plane")))
        self.weights_digest = file_digest(Path(weights))
        self._recover()
        ae = AE(ae_title=self.options.aet)
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(self.options.allow)
        ae.maximum_associations = 16
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                    (evt.EVT_REQUESTED, self._on_requested), (evt.EVT_REJECTED, self._on_rejected)]
        try:
            self._server = ae.start_server((self.options.bind, self.options.port), block=False,
                                           evt_handlers=handlers)
        except OSError as exc:
            self._release_spool()
            raise MedsrError(f"--port {self.options.port}: cannot listen on {self.options.bind}: "
                             f"{exc.strerror or exc}") from None
        self.port = self._server.server_address[1]
        self._worker = threading.Thread(target=self._work, name="medsr-serve-worker", daemon=True)
        self._worker.start()
        logger.info("listening as %s on %s:%d; forwarding to %s; spool %s", self.options.aet,
                    self.options.bind, self.port, self.options.forward, self.spool)

    def wait(self, timeout: float | None = None) -> None:
        """Block until :meth:`stop` (or ``timeout``); Ctrl-C / SIGTERM interrupt it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopping.is_set() and (deadline is None or time.monotonic() < deadline):
            self._stopping.wait(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop listening, let the worker finish its step (at most ``timeout`` s; anything
        unfinished resumes at the next start), release the spool."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._worker is not None:
            self._worker.join(timeout)
            self._worker = None
        self._release_spool()

    def _take_spool(self) -> None:
        import fcntl

        try:
            for name in ("incoming", "series", "done", "failed"):
                (self.spool / name).mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.spool / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OutputError(f"{self.spool}: cannot use it as the spool: {exc.strerror or exc}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            raise MedsrError(f"{self.spool}: another medsr serve uses this spool; give each node its own "
                             "--spool") from None
        self._spool_lock = descriptor

    def _release_spool(self) -> None:
        if self._spool_lock is not None:
            os.close(self._spool_lock)  # the kernel lets the flock go with the descriptor
            self._spool_lock = None

    def _recover(self) -> None:
        """Resume what an earlier run left: receiving series wait one more quiet period (their
        quiet clock restarts now), enhanced ones are sent, done ones are cleared away."""
        for leftover in (self.spool / "incoming").iterdir():
            leftover.unlink(missing_ok=True)  # never acknowledged
        now = time.monotonic()
        for folder in sorted((self.spool / "series").iterdir()):
            state = read_state(folder)
            if state is None:  # made, but no image was ever renamed into it
                shutil.rmtree(folder, ignore_errors=True)
                continue
            series = _Series(folder.name, state["state"], state.get("study", ""), now, now,
                             attempts=state.get("attempts", 0), derived=state.get("derived_series"),
                             images=state.get("images", 0), last_error=state.get("last_error"))
            if series.state == DONE:  # sent; killed before its spool was cleared
                self._clear_done(series, folder)
                continue
            if series.state == FAILED:  # set aside; killed before it was moved
                os.replace(folder, self.spool / "failed" / folder.name)
                continue
            self._series[series.uid] = series
            logger.info("resuming series %s (%s, %d images in the spool)", series.uid, series.state,
                        len(list((folder / "images").glob("*.dcm"))))

    # --- receiving -------------------------------------------------------------------------

    def _disk_low(self, extra: int = 0) -> float | None:
        """The free MB on the spool's disk when it is below ``min_free_mb`` (after ``extra``
        bytes), else None."""
        free = shutil.disk_usage(self.spool).free - extra
        return free / 2**20 if free < self.options.min_free_mb * 2**20 else None

    def _on_requested(self, event) -> None:
        free = self._disk_low()
        if free is not None:
            logger.warning("refused an association from %s: the spool's disk has %.0f MB free, below "
                           "--min-free-mb %g", event.assoc.requestor.ae_title, free, self.options.min_free_mb)
            # transient, presentation related: local limit exceeded
            event.assoc.acse.send_reject(0x02, 0x03, 0x02)

    def _on_rejected(self, event) -> None:
        if self.options.allow and event.assoc.requestor.ae_title not in self.options.allow:
            logger.warning("refused an association from %s (%s): not in --allow",
                           event.assoc.requestor.ae_title, event.assoc.requestor.address)

    def _on_store(self, event):
        """Write the image durably, then answer. Returns the DIMSE status."""
        data = event.encoded_dataset()
        dataset = event.dataset
        series_uid = str(dataset.get("SeriesInstanceUID", ""))
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        if not UID.fullmatch(series_uid) or not UID.fullmatch(sop_uid):
            logger.warning("rejected an image from %s: SeriesInstanceUID %r / SOPInstanceUID %r is not a UID",
                           event.assoc.requestor.ae_title, series_uid[:70], sop_uid[:70])
            return CANNOT_UNDERSTAND
        free = self._disk_low(len(data))
        if free is not None:
            logger.warning("refused image %s of series %s: the spool's disk would have %.0f MB free, "
                           "below --min-free-mb %g", sop_uid, series_uid, free, self.options.min_free_mb)
            return OUT_OF_RESOURCES
        temporary = self.spool / "incoming" / f"{sop_uid}.{threading.get_ident()}.part"
        try:
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            with self._lock:
                series = self._receiving(series_uid, str(dataset.get("StudyInstanceUID", "")))
                images = self.spool / "series" / series_uid / "images"
                os.replace(temporary, images / f"{sop_uid}.dcm")
                series.generation += 1
                series.last_arrival = time.monotonic()
            sync_folder(images)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            logger.warning("could not store image %s of series %s: %s", sop_uid, series_uid, exc.strerror or exc)
            return OUT_OF_RESOURCES
        return SUCCESS

    def _receiving(self, uid: str, study: str) -> _Series:
        """The series ``uid`` in the receiving step, its folder ready (call under the lock)."""
        folder = self.spool / "series" / uid
        series = self._series.get(uid)
        if series is None:
            now = time.monotonic()
            series = self._series[uid] = _Series(uid, RECEIVING, study, now, now)
        if series.state != RECEIVING or not (folder / "state.json").exists():
            (folder / "images").mkdir(parents=True, exist_ok=True)
            sync_folder(folder.parent)
            sync_folder(folder)
            if series.state != RECEIVING:
                logger.info("series %s: more images came after it was %s; it is enhanced again once quiet",
                            uid, series.state)
            series.state, series.attempts, series.first_arrival = RECEIVING, 0, time.monotonic()
            write_state(folder, self._state(series))
        return series

    @staticmethod
    def _state(series: _Series) -> dict:
        return {"state": series.state, "series": series.uid, "study": series.study,
                "derived_series": series.derived, "images": series.images, "attempts": series.attempts,
                "last_error": series.last_error}

    # --- enhancing and forwarding ----------------------------------------------------------

    def _work(self) -> None:
        while not self._stopping.wait(TICK):
            for uid in self._due():
                if self._stopping.is_set():
                    return
                try:
                    self._advance(uid)
                except Exception:  # a bug in one series' step must not stop the node
                    logger.exception("series %s: unexpected error; it stays in the spool", uid)
                    with self._lock:
                        series = self._series.get(uid)
                        if series is not None:
                            series.next_try = time.monotonic() + self.options.retry_max_seconds

    def _due(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            quiet = [s for s in self._series.values()
                     if s.state == ENHANCED or now - s.last_arrival >= self.options.quiet_seconds]
            return [s.uid for s in sorted(quiet, key=lambda s: s.last_arrival) if now >= s.next_try]

    def _advance(self, uid: str) -> None:
        with self._lock:
            series = self._series[uid]
            state, generation = series.state, series.generation
        folder = self.spool / "series" / uid
        if state == RECEIVING and not self._enhance(series, folder, generation):
            return
        self._forward(series, folder, generation)

    def _enhance(self, series: _Series, folder: Path, generation: int) -> bool:
        """Enhance the received images into ``derived/``; True when the series moved on to
        the enhanced step."""
        from medsr.enhance import enhance_file

        images = sorted((folder / "images").glob("*.dcm"))
        logger.info("received series %s (study %s): %d images over %.1f s", series.uid, series.study,
                    len(images), series.last_arrival - series.first_arrival)
        started = time.monotonic()
        options = {k: v for k, v in self.options.enhance.items() if k not in ("weights", "scale", "through_plane")}
        try:
            result = enhance_file(folder / "images", folder / "derived", model=self.enhancer,
                                  scale=self.options.enhance.get("scale"), through_plane=self.enhancer.through_plane,
                                  overwrite=True, output_format="dicom",
                                  uid_seed=uid_seed(series.uid, self.weights_digest, self.options.enhance),
                                  **options)
        except OutputError as exc:  # the spool's disk, not the input: try again later
            self._retry(series, folder, generation, f"cannot write the enhanced series: {exc}")
            return False
        except Exception as exc:
            self._set_aside(series, folder, generation, exc)
            return False
        derived = sorted((folder / "derived").glob("*.dcm"))
        import pydicom

        derived_uid = str(pydicom.dcmread(derived[0], stop_before_pixels=True).SeriesInstanceUID)
        with self._lock:
            if series.generation != generation:
                return False  # more images came: enhanced again once quiet
            series.state, series.derived, series.images = ENHANCED, derived_uid, len(images)
            series.attempts, series.last_error, series.next_try = 0, None, 0.0
            write_state(folder, self._state(series))
        detail = "" if result.estimate is None else f", degradation {result.estimate.grid}"
        logger.info("enhanced series %s -> %s: %d images in %.1f s%s", series.uid, derived_uid, len(derived),
                    time.monotonic() - started, detail)
        return True

    def _set_aside(self, series: _Series, folder: Path, generation: int, error: Exception) -> None:
        reason = str(error) if isinstance(error, MedsrError) else f"internal error ({type(error).__name__}: {error})"
        reason = " ".join(reason.replace(str(folder), "<series>").split())[:300]
        with self._lock:
            if series.generation != generation:
                return
            series.state, series.last_error = FAILED, reason
            target = self.spool / "failed" / series.uid
            if target.exists():
                shutil.rmtree(target)
            write_state(folder, self._state(series))
            os.replace(folder, target)
            sync_folder(target.parent)
            sync_folder(folder.parent)
            del self._series[series.uid]
        logger.error("series %s (study %s) could not be enhanced and was set aside in %s: %s", series.uid,
                     series.study, target, reason)

    def _retry(self, series: _Series, folder: Path, generation: int, reason: str) -> None:
        with self._lock:
            series.attempts += 1
            series.last_error = " ".join(reason.split())[:300]
            wait = min(self.options.retry_max_seconds, self.options.retry_seconds * 2 ** (series.attempts - 1))
            series.next_try = time.monotonic() + wait
            if series.generation == generation:
                write_state(folder, self._state(series))
        logger.warning("series %s: %s (attempt %d); next try in %.3g s", series.uid, series.last_error,
                       series.attempts, wait)

    def _forward(self, series: _Series, folder: Path, generation: int) -> None:
        destination = self.options.forward
        files = sorted((folder / "derived").glob("*.dcm"))
        started = time.monotonic()
        try:
            send_series(files, self.options.aet, destination)
        except ForwardError as exc:
            self._retry(series, folder, generation, f"not sent to {destination}: {exc}")
            return
        if self.options.forward_dicomweb is not None:
            try:
                store_dicomweb(files, self.options.forward_dicomweb)
            except ForwardError as exc:
                self._retry(series, folder, generation, f"not stored at {self.options.forward_dicomweb}: {exc}")
                return
        with self._lock:
            if series.generation != generation:
                return  # more images came while sending: enhanced again, sent again (same UIDs)
            series.state = DONE
            write_state(folder, self._state(series))
            del self._series[series.uid]
        also = "" if self.options.forward_dicomweb is None else f" and {self.options.forward_dicomweb} (STOW-RS)"
        logger.info("sent series %s (from %s) to %s%s: %d instances in %.1f s", series.derived, series.uid,
                    destination, also, len(files), time.monotonic() - started)
        self._clear_done(series, folder)

    def _clear_done(self, series: _Series, folder: Path) -> None:
        """A sent series: its record under ``done/``; its spool removed (``keep``: moved there)."""
        done = self.spool / "done"
        if self.options.keep:
            target = done / series.uid
            if target.exists():
                shutil.rmtree(target)
            os.replace(folder, target)
        else:
            record = done / f"{series.uid}.json"
            record.write_text(json.dumps({**self._state(series), "state": DONE, "updated": _now()}) + "\n")
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


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
