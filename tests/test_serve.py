"""medsr serve: a DICOM node that receives, enhances and forwards.

The node runs in this process against a pynetdicom storage SCP standing in for the destination
(fast; always run), and against a real Orthanc (the Debian package ``orthanc``), started from a
temporary configuration on free loopback ports, for the happy path and the faults: the
destination down while the node forwards, and the node killed with SIGKILL between receiving
and sending.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from conftest import NEEDS_DCIODVFY, new_dciodvfy_errors
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

from medsr.errors import MedsrError
from medsr.serve import STORAGE_CLASSES, Destination, Node, ServeOptions, spool_status

SERIES = Path(__file__).parent.parent / "sample_scans" / "mr_pd_oblique_dicom"
MULTIFRAME = Path(__file__).parent.parent / "sample_scans" / "mr_pd_oblique_multiframe"
ORTHANC = shutil.which("Orthanc")
NEEDS_ORTHANC = pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (Debian package orthanc; "
                                                           ".ci/run installs it)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout: float, what: str, step: float = 0.1):
    """Poll ``condition`` until it returns something true, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def send(files: list[Path], port: int, calling_aet: str = "SCANNER") -> list[int] | None:
    """C-STORE ``files`` to 127.0.0.1:``port``; their statuses, or None when the association
    was refused."""
    ae = AE(ae_title=calling_aet)
    for uid in STORAGE_CLASSES:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", port, ae_title="MEDSR")
    if not association.is_established:
        return None
    try:
        return [association.send_c_store(pydicom.dcmread(path)).Status for path in files]
    finally:
        association.release()


class Destination_SCP:
    """A storage SCP standing in for a PACS: what it stored, by SOPInstanceUID; ``refuse``
    answers every image with 0xA700."""

    def __init__(self) -> None:
        self.stored: dict[str, pydicom.Dataset] = {}
        self.received = 0
        self.refuse = False
        ae = AE(ae_title="PACS")
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.address = Destination("PACS", "127.0.0.1", self.server.server_address[1])

    def _store(self, event) -> int:
        self.received += 1
        if self.refuse:
            return 0xA700
        dataset = event.dataset
        self.stored[str(dataset.SOPInstanceUID)] = dataset
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def destination():
    scp = Destination_SCP()
    yield scp
    scp.close()


@contextmanager
def running_node(spool: Path, forward: Destination, weights: Path, **options):
    settings = dict(port=0, bind="127.0.0.1", quiet_seconds=0.5, min_free_mb=0, retry_seconds=0.2,
                    retry_max_seconds=1.0)
    settings.update(options)
    node = Node(ServeOptions(spool, forward, enhance=dict(weights=weights, device="cpu"), **settings))
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_a_series_received_is_enhanced_and_sent_once_with_stable_uids(tmp_path, destination, session_tiny_checkpoint):
    files = sorted(SERIES.glob("*.dcm"))[:4]
    with running_node(tmp_path / "spool", destination.address, session_tiny_checkpoint, quiet_seconds=2) as node:
        assert send(files, node.port) == [0] * 4
        # acknowledged means on disk: every image is in the spool before any enhancing
        source_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        assert len(list((tmp_path / "spool" / "series" / source_uid / "images").glob("*.dcm"))) == 4
        wait_for(lambda: not spool_status(tmp_path / "spool")["pending"], 60, "the series to be sent")
    assert len(destination.stored) == destination.received == 4
    derived = list(destination.stored.values())
    assert len({d.SeriesInstanceUID for d in derived}) == 1 and derived[0].SeriesInstanceUID != source_uid
    assert {d.StudyInstanceUID for d in derived} == {pydicom.dcmread(files[0]).StudyInstanceUID}
    assert (derived[0].Rows, derived[0].Columns) == (512, 512)
    status = spool_status(tmp_path / "spool")
    assert [s["series"] for s in status["done"]] == [source_uid] and not status["failed"]
    assert not (tmp_path / "spool" / "series" / source_uid).exists()  # sent: spool removed
    first = set(destination.stored)
    # the same series again (another spool, another run): the same derived UIDs, so a resend
    # replaces what the destination holds
    with running_node(tmp_path / "again", destination.address, session_tiny_checkpoint) as node:
        assert send(files, node.port) == [0] * 4
        wait_for(lambda: destination.received == 8, 60, "the series to be sent again")
    assert set(destination.stored) == first


def test_the_multiframe_object_is_enhanced_and_sent(tmp_path, destination, session_tiny_checkpoint):
    files = sorted(MULTIFRAME.glob("*.dcm"))
    with running_node(tmp_path / "spool", destination.address, session_tiny_checkpoint) as node:
        assert send(files, node.port) == [0] * len(files)
        wait_for(lambda: destination.received, 60, "the multi-frame object to be sent")
    (derived,) = destination.stored.values()
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert derived.NumberOfFrames == source.NumberOfFrames and derived.Rows == 2 * source.Rows


def test_a_refusing_destination_is_retried_and_the_series_kept_visible(tmp_path, destination,
                                                                       session_tiny_checkpoint):
    destination.refuse = True
    files = sorted(SERIES.glob("*.dcm"))[:3]
    spool = tmp_path / "spool"
    with running_node(spool, destination.address, session_tiny_checkpoint, keep=True) as node:
        assert send(files, node.port) == [0] * 3
        pending = wait_for(lambda: [s for s in spool_status(spool)["pending"] if s["attempts"] >= 2], 60,
                           "two failed tries")
        assert pending[0]["state"] == "enhanced" and "0xA700" in pending[0]["last_error"]
        destination.refuse = False
        wait_for(lambda: spool_status(spool)["done"], 60, "the series to be sent once the destination accepts")
    assert len(destination.stored) == 3
    (kept,) = (spool / "done").iterdir()  # --keep: the whole series folder
    assert len(list((kept / "images").glob("*.dcm"))) == 3 and len(list((kept / "derived").glob("*.dcm"))) == 3


def test_a_series_that_cannot_be_enhanced_is_set_aside_and_the_node_keeps_serving(
        tmp_path, destination, session_tiny_checkpoint, caplog):
    files = sorted(SERIES.glob("*.dcm"))[:3]
    broken = tmp_path / "broken"
    broken.mkdir()
    for index, path in enumerate(files[:2]):  # two images of one series, of different sizes
        dataset = pydicom.dcmread(path)
        for tag in [t for t in dataset.keys() if t.group == 0]:  # the sample files carry a command set
            del dataset[tag]
        dataset.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        dataset.PatientName = "Doe^Jane"
        if index:
            dataset.PixelData = dataset.pixel_array[:128].tobytes()
            dataset.Rows = 128
        dataset.save_as(broken / path.name)
    spool = tmp_path / "spool"
    with caplog.at_level("INFO", logger="medsr.serve"), \
            running_node(spool, destination.address, session_tiny_checkpoint) as node:
        assert send(sorted(broken.iterdir()), node.port) == [0, 0]
        wait_for(lambda: spool_status(spool)["failed"], 60, "the broken series to be set aside")
        assert send(files, node.port) == [0] * 3  # the node still serves
        wait_for(lambda: spool_status(spool)["done"], 60, "the good series to be sent")
    (failed,) = spool_status(spool)["failed"]
    assert failed["series"] == "1.2.826.0.1.3680043.8.498.1" and failed["last_error"]
    lines = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert len(lines) == 1 and "1.2.826.0.1.3680043.8.498.1" in lines[0]
    assert not any("Doe" in r.getMessage() for r in caplog.records)  # UIDs, never names
    assert len(destination.stored) == 3


def test_callers_not_allowed_are_rejected(tmp_path, destination, session_tiny_checkpoint):
    files = sorted(SERIES.glob("*.dcm"))[:1]
    with running_node(tmp_path / "spool", destination.address, session_tiny_checkpoint,
                      allow=("SCANNER",), quiet_seconds=60) as node:
        assert send(files, node.port, calling_aet="INTRUDER") is None
        assert send(files, node.port, calling_aet="SCANNER") == [0]


def test_a_low_disk_refuses_associations_and_writes_nothing(tmp_path, destination, session_tiny_checkpoint):
    files = sorted(SERIES.glob("*.dcm"))[:1]
    spool = tmp_path / "spool"
    free_mb = shutil.disk_usage(tmp_path).free / 2**20
    with running_node(spool, destination.address, session_tiny_checkpoint, min_free_mb=free_mb + 10**6) as node:
        assert send(files, node.port) is None
    assert not list((spool / "series").iterdir()) and not list((spool / "incoming").iterdir())


def test_one_spool_takes_one_node(tmp_path, destination, session_tiny_checkpoint):
    with running_node(tmp_path / "spool", destination.address, session_tiny_checkpoint):
        with pytest.raises(MedsrError, match="another medsr serve uses this spool"):
            with running_node(tmp_path / "spool", destination.address, session_tiny_checkpoint):
                pass


@pytest.mark.parametrize("text", ["PACS", "PACS@host", "@host:4242", "PACS@host:port", "PACS@host:70000",
                                  "A_TITLE_LONGER_THAN_16@host:4242"])
def test_a_bad_forward_address_is_refused(text):
    with pytest.raises(MedsrError, match="--forward must be AET@HOST:PORT"):
        Destination.parse(text)
