"""The DICOM node's worker: enhance each quiet series of the spool and send it on.

A series is due when no image of it came for ``quiet_seconds`` (or it is already enhanced and
waits to be sent) and its next try has come. The worker enhances it by the default path
(:func:`medsr.enhance.enhance_file`) into ``derived/``, sends that by C-STORE (and STOW-RS), and
only then marks it done. A destination that is down or refuses is tried again with a doubling
backoff; a series medsr cannot enhance is set aside under ``failed/``. An image that arrives
during a step bumps the series' generation, and the step does not complete: the series is
enhanced again, with the same derived UIDs, once it is quiet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from medsr.errors import MedsrError, OutputError
from medsr.forwarding import ForwardError, send_series, store_dicomweb
from medsr.spool import ENHANCED, RECEIVING, SeriesRecord, Spool

if TYPE_CHECKING:
    from medsr.serve import ServeOptions

logger = logging.getLogger(__name__)

# how often the worker looks for series that became quiet or are due for another try (s)
TICK = 0.2


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


class SeriesWorker:
    """One thread that takes the spool's quiet series through enhanced -> sent -> done.

    Args:
        spool: the spool the receiver fills (its records are read and changed under its lock).
        options: the node's options (forward destinations, retry waits, enhance options).
        enhancer: the loaded model (:func:`medsr.enhance.enhancer_for`).
        weights_digest: the SHA-256 of its weights, part of the derived UIDs' hash.
    """

    def __init__(self, spool: Spool, options: ServeOptions, enhancer, weights_digest: str) -> None:
        self.spool, self.options = spool, options
        self.enhancer, self.weights_digest = enhancer, weights_digest
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="medsr-serve-worker", daemon=True)
        self._thread.start()

    def ask_to_stop(self) -> None:
        """No new step starts from now; the one under way finishes."""
        self._stopping.set()

    def stop(self, timeout: float) -> None:
        """Let the step under way finish (at most ``timeout`` s); the rest resumes at the next start."""
        self.ask_to_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _work(self) -> None:
        while not self._stopping.wait(TICK):
            for uid in self._due():
                if self._stopping.is_set():
                    return
                try:
                    self._advance(uid)
                except Exception:  # a bug in one series' step must not stop the node
                    logger.exception("series %s: unexpected error; it stays in the spool", uid)
                    with self.spool.lock:
                        series = self.spool.series.get(uid)
                        if series is not None:
                            series.next_try = time.monotonic() + self.options.retry_max_seconds

    def _due(self) -> list[str]:
        now = time.monotonic()
        with self.spool.lock:
            quiet = [s for s in self.spool.series.values()
                     if s.state == ENHANCED or now - s.last_arrival >= self.options.quiet_seconds]
            return [s.uid for s in sorted(quiet, key=lambda s: s.last_arrival) if now >= s.next_try]

    def _advance(self, uid: str) -> None:
        with self.spool.lock:
            series = self.spool.series[uid]
            state, generation = series.state, series.generation
        if state == RECEIVING and not self._enhance(series, generation):
            return
        self._forward(series, generation)

    def _enhance(self, series: SeriesRecord, generation: int) -> bool:
        """Enhance the received images into ``derived/``; True when the series moved on to
        the enhanced step."""
        import pydicom

        from medsr.enhance import enhance_file

        folder = self.spool.folder(series.uid)
        images = sorted((folder / "images").glob("*.dcm"))
        logger.info("received series %s (study %s): %d images over %.1f s", series.uid, series.study,
                    len(images), series.last_arrival - series.first_arrival)
        started = time.monotonic()
        enhance = self.options.enhance
        options = {k: v for k, v in enhance.items() if k not in ("weights", "scale", "through_plane")}
        try:
            result = enhance_file(folder / "images", folder / "derived", model=self.enhancer,
                                  scale=enhance.get("scale"), through_plane=self.enhancer.through_plane,
                                  overwrite=True, output_format="dicom",
                                  uid_seed=uid_seed(series.uid, self.weights_digest, enhance), **options)
        except OutputError as exc:  # the spool's disk, not the input: try again later
            self._retry(series, generation, f"cannot write the enhanced series: {exc}")
            return False
        except Exception as exc:
            self._set_aside(series, generation, exc)
            return False
        derived = sorted((folder / "derived").glob("*.dcm"))
        derived_uid = str(pydicom.dcmread(derived[0], stop_before_pixels=True).SeriesInstanceUID)
        with self.spool.lock:
            if series.generation != generation:
                return False  # more images came: enhanced again once quiet
            series.state, series.derived, series.images = ENHANCED, derived_uid, len(images)
            series.attempts, series.last_error, series.next_try = 0, None, 0.0
            self.spool.save(series)
        detail = "" if result.estimate is None else f", degradation {result.estimate.grid}"
        logger.info("enhanced series %s -> %s: %d images in %.1f s%s", series.uid, derived_uid, len(derived),
                    time.monotonic() - started, detail)
        return True

    def _set_aside(self, series: SeriesRecord, generation: int, error: Exception) -> None:
        reason = str(error) if isinstance(error, MedsrError) else f"internal error ({type(error).__name__}: {error})"
        reason = " ".join(reason.replace(str(self.spool.folder(series.uid)), "<series>").split())[:300]
        with self.spool.lock:
            if series.generation != generation:
                return
            target = self.spool.set_aside(series, reason)
        logger.error("series %s (study %s) could not be enhanced and was set aside in %s: %s", series.uid,
                     series.study, target, reason)

    def _retry(self, series: SeriesRecord, generation: int, reason: str) -> None:
        with self.spool.lock:
            series.attempts += 1
            series.last_error = " ".join(reason.split())[:300]
            wait = min(self.options.retry_max_seconds, self.options.retry_seconds * 2 ** (series.attempts - 1))
            series.next_try = time.monotonic() + wait
            if series.generation == generation:
                self.spool.save(series)
        logger.warning("series %s: %s (attempt %d); next try in %.3g s", series.uid, series.last_error,
                       series.attempts, wait)

    def _forward(self, series: SeriesRecord, generation: int) -> None:
        destination, dicomweb = self.options.forward, self.options.forward_dicomweb
        files = sorted((self.spool.folder(series.uid) / "derived").glob("*.dcm"))
        started = time.monotonic()
        try:
            send_series(files, self.options.aet, destination)
        except ForwardError as exc:
            self._retry(series, generation, f"not sent to {destination}: {exc}")
            return
        if dicomweb is not None:
            try:
                store_dicomweb(files, dicomweb)
            except ForwardError as exc:
                self._retry(series, generation, f"not stored at {dicomweb}: {exc}")
                return
        with self.spool.lock:
            if series.generation != generation:
                return  # more images came while sending: enhanced again, sent again (same UIDs)
            self.spool.mark_done(series)
        also = "" if dicomweb is None else f" and {dicomweb} (STOW-RS)"
        logger.info("sent series %s (from %s) to %s%s: %d instances in %.1f s", series.derived, series.uid,
                    destination, also, len(files), time.monotonic() - started)
        self.spool.clear_done(series)
