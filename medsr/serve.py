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

Three parts, one module each: this one receives (the storage SCP, :class:`Node`, which also
starts and stops the rest); :mod:`medsr.spool` keeps the spool (its layout, the lock that keeps
a second node out, each series' state on disk and in memory); :mod:`medsr.series_worker`
enhances and forwards.

Images of a series that arrive while it is being enhanced or sent put it back to receiving:
it is enhanced again, with the same derived UIDs, once it is quiet. An image arriving after
its series was sent starts a new pass of that series with only the new image (its instances
keep their stable UIDs, so nothing is duplicated at the destination).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from medsr.errors import MedsrError
from medsr.forwarding import Destination
from medsr.series_worker import SeriesWorker, file_digest
from medsr.spool import Spool, spool_status
from medsr.writing import sync_folder

__all__ = ["STORAGE_CLASSES", "Destination", "Node", "ServeOptions", "spool_status"]

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
# DIMSE statuses (PS3.4 Annex B): success, out of resources, cannot understand
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
# a UID as DICOM allows it (PS3.5 9.1): digits and dots, at most 64; used as a folder name
UID = re.compile(r"[0-9][0-9.]{0,63}")


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


class Node:
    """The storage SCP, and the worker it hands quiet series to, sharing one spool.

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
        self.spool = Spool(options.spool, keep=options.keep)
        self._stopping = threading.Event()
        self._server = None
        self._worker: SeriesWorker | None = None
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
        self.spool.take()
        try:
            enhance = self.options.enhance
            enhancer = enhancer_for(None, enhance.get("weights"), enhance.get("scale"),
                                    bool(enhance.get("through_plane")))
            weights = enhance.get("weights") or default_weights(enhance.get("scale") or 2,
                                                                bool(enhance.get("through_plane")))
            worker = SeriesWorker(self.spool, self.options, enhancer, file_digest(Path(weights)))
            self.spool.recover()
        except BaseException:
            self.spool.release()
            raise
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
            self.spool.release()
            raise MedsrError(f"--port {self.options.port}: cannot listen on {self.options.bind}: "
                             f"{exc.strerror or exc}") from None
        self.port = self._server.server_address[1]
        self._worker = worker
        worker.start()
        logger.info("listening as %s on %s:%d; forwarding to %s; spool %s", self.options.aet,
                    self.options.bind, self.port, self.options.forward, self.spool.root)

    def wait(self, timeout: float | None = None) -> None:
        """Block until :meth:`stop` (or ``timeout``); Ctrl-C / SIGTERM interrupt it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopping.is_set() and (deadline is None or time.monotonic() < deadline):
            self._stopping.wait(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop listening, let the worker finish its step (at most ``timeout`` s; anything
        unfinished resumes at the next start), release the spool."""
        self._stopping.set()
        if self._worker is not None:  # before the listener, whose shutdown takes a while
            self._worker.ask_to_stop()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._worker is not None:
            self._worker.stop(timeout)
            self._worker = None
        self.spool.release()

    # --- receiving -------------------------------------------------------------------------

    def _disk_low(self, extra: int = 0) -> float | None:
        """The free MB on the spool's disk when it is below ``min_free_mb`` (after ``extra``
        bytes), else None."""
        free = shutil.disk_usage(self.spool.root).free - extra
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
        temporary = self.spool.root / "incoming" / f"{sop_uid}.{threading.get_ident()}.part"
        try:
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            with self.spool.lock:
                series = self.spool.receiving(series_uid, str(dataset.get("StudyInstanceUID", "")))
                images = self.spool.folder(series_uid) / "images"
                os.replace(temporary, images / f"{sop_uid}.dcm")
                series.generation += 1
                series.last_arrival = time.monotonic()
            sync_folder(images)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            logger.warning("could not store image %s of series %s: %s", sop_uid, series_uid, exc.strerror or exc)
            return OUT_OF_RESOURCES
        return SUCCESS
