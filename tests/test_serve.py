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
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification

from medsr.errors import MedsrError
from medsr.serve import STORAGE_CLASSES, Destination, Node, ServeOptions, spool_status

from conftest import NEEDS_DCIODVFY, new_dciodvfy_errors

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


def send(files: list[Path], port: int, calling_aet: str = "SCANNER", called_aet: str = "MEDSR") -> list[int] | None:
    """C-STORE ``files`` to 127.0.0.1:``port``; their statuses, or None when the association
    was refused."""
    ae = AE(ae_title=calling_aet)
    for uid in STORAGE_CLASSES:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", port, ae_title=called_aet)
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
    settings = dict(port=0, bind="127.0.0.1", quiet_seconds=0.3, min_free_mb=0, retry_seconds=0.2,
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
    source_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    with running_node(tmp_path / "spool", destination.address, session_tiny_checkpoint) as node:
        assert send(files, node.port) == [0] * 4
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


def test_acknowledged_images_are_in_the_spool_and_a_new_start_finishes_their_series(
        tmp_path, destination, session_tiny_checkpoint, sync_events):
    from typer.testing import CliRunner

    from medsr.cli import app

    files = sorted(SERIES.glob("*.dcm"))[:2]
    source_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    spool = tmp_path / "spool"
    with running_node(spool, destination.address, session_tiny_checkpoint, quiet_seconds=60) as node:
        assert send(files, node.port) == [0] * 2
        images = spool / "series" / source_uid / "images"
        stored = sorted(images.iterdir())
        assert len(stored) == 2 and not list((spool / "incoming").iterdir())
        for path in stored:  # each file synced under its temporary name, renamed, its folder synced
            renamed = sync_events.index(("replace", str(path)))
            assert any(kind == "fsync" and Path(synced).parent == spool / "incoming" and
                       Path(synced).name.startswith(path.stem) for kind, synced in sync_events[:renamed])
            assert ("fsync", str(images)) in sync_events[renamed:]
        (pending,) = spool_status(spool)["pending"]
        assert pending["state"] == "receiving" and pending["images_in_spool"] == 2
    assert not destination.received  # stopped before the series was quiet
    result = CliRunner().invoke(app, ["serve", "--status", "--spool", str(spool)])
    lines = result.stdout.splitlines()
    assert result.exit_code == 0 and lines[0].startswith(f"pending receiving {source_uid} (2 images")
    assert lines[-1] == "1 pending, 0 done, 0 failed"
    with running_node(spool, destination.address, session_tiny_checkpoint):
        wait_for(lambda: spool_status(spool)["done"], 60, "the series to be sent after the new start")
    assert destination.received == len(destination.stored) == 2


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
    with caplog.at_level("INFO", logger="medsr"), \
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
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(Verification)
        association = ae.associate("127.0.0.1", node.port, ae_title="MEDSR")
        assert association.send_c_echo().Status == 0  # C-ECHO
        association.release()


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


def test_a_node_whose_model_does_not_load_leaves_the_spool_to_the_next(tmp_path, destination,
                                                                      session_tiny_checkpoint):
    hostile = tmp_path / "hostile.pt"
    hostile.write_bytes(b"not a checkpoint")
    with pytest.raises(MedsrError) as refused:
        with running_node(tmp_path / "spool", destination.address, hostile):
            pass
    assert "another medsr serve" not in str(refused.value)
    with running_node(tmp_path / "spool", destination.address, session_tiny_checkpoint) as node:
        assert node.port > 0


def test_the_command_line_says_one_line_for_a_bad_forward(tmp_path):
    from typer.testing import CliRunner

    from medsr.cli import app

    result = CliRunner().invoke(app, ["serve", "--forward", "PACS@host", "--spool", str(tmp_path / "spool")])
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        "error: --forward must be AET@HOST:PORT (an AE title of at most 16 characters, e.g. "
        "ORTHANC@10.0.0.5:4242), not 'PACS@host'"]
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("text", ["PACS", "PACS@host", "@host:4242", "PACS@host:port", "PACS@host:70000",
                                  "A_TITLE_LONGER_THAN_16@host:4242"])
def test_a_bad_forward_address_is_refused(text):
    with pytest.raises(MedsrError, match="--forward must be AET@HOST:PORT"):
        Destination.parse(text)


# --- with a real Orthanc ---------------------------------------------------------------------


class Orthanc:
    """An Orthanc of its own: a temporary configuration with free loopback ports, its own
    storage and index folders, no remote access; started as a subprocess and stopped by its
    process id."""

    def __init__(self, folder: Path, **settings) -> None:
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "medsr-test", "DicomAet": "ORTHANC", "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
            "Plugins": [], "DicomAlwaysAllowStore": True, **settings,
        }))
        self.process: subprocess.Popen | None = None
        self.destination = Destination("ORTHANC", "127.0.0.1", self.dicom_port)

    def start(self) -> None:
        with open(self.folder / "orthanc.log", "ab") as log:
            self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=log)

        def up() -> bool:
            try:
                return bool(self.get("/system"))
            except OSError:
                assert self.process.poll() is None, (self.folder / "orthanc.log").read_text()[-2000:]
                return False

        wait_for(up, 30, "Orthanc to answer GET /system")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.process = None

    def request(self, path: str, body: bytes | None = None):
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body)
        with urllib.request.urlopen(request, timeout=10) as answer:
            data = answer.read()
        return json.loads(data) if answer.headers.get_content_type() == "application/json" else data

    def get(self, path: str):
        return self.request(path)

    def series_of_study(self, study_uid: str) -> list[dict]:
        query = {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
        return self.request("/tools/find", json.dumps(query).encode())


@pytest.fixture
def orthanc(tmp_path):
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed (Debian package orthanc; .ci/run installs it)")
    (tmp_path / "orthanc").mkdir()
    server = Orthanc(tmp_path / "orthanc")
    server.start()
    yield server
    server.stop()


def upload(orthanc: Orthanc, files: list[Path]) -> str:
    """Store the source series in Orthanc (REST); its StudyInstanceUID."""
    for path in files:
        orthanc.request("/instances", path.read_bytes())
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def derived_series(orthanc: Orthanc, study_uid: str, source_uid: str) -> dict:
    """The one series of the study that is not the source, once it has every instance."""
    series = orthanc.series_of_study(study_uid)
    assert {s["MainDicomTags"]["SeriesInstanceUID"] for s in series} >= {source_uid}
    assert len(series) == 2, f"the study holds {len(series)} series, not the source and the derived one"
    (derived,) = [s for s in series if s["MainDicomTags"]["SeriesInstanceUID"] != source_uid]
    return derived


@NEEDS_ORTHANC
@NEEDS_DCIODVFY
def test_orthanc_holds_the_derived_series_in_the_original_study(tmp_path, orthanc, session_tiny_checkpoint):
    files = sorted(SERIES.glob("*.dcm"))
    study_uid = upload(orthanc, files)
    source_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    spool = tmp_path / "spool"
    with running_node(spool, orthanc.destination, session_tiny_checkpoint) as node:
        assert send(files, node.port) == [0] * len(files)
        wait_for(lambda: spool_status(spool)["done"], 60, "the derived series to be sent")
    derived = derived_series(orthanc, study_uid, source_uid)
    assert len(derived["Instances"]) == len(files) == 20
    instance = derived["Instances"][0]
    spacing = orthanc.get(f"/instances/{instance}/content/0028-0030").decode().strip("\0 ").split("\\")
    source_spacing = pydicom.dcmread(files[0], stop_before_pixels=True).PixelSpacing
    assert [float(v) for v in spacing] == pytest.approx([float(v) / 2 for v in source_spacing])
    downloaded = tmp_path / "derived.dcm"
    downloaded.write_bytes(orthanc.get(f"/instances/{instance}/file"))
    assert new_dciodvfy_errors(files[0], downloaded) == set()


@pytest.mark.slow
@NEEDS_ORTHANC
def test_orthanc_stopped_while_the_node_forwards_then_started_gets_the_series_once(
        tmp_path, orthanc, session_tiny_checkpoint, monkeypatch):
    import medsr.series_worker

    files = sorted(SERIES.glob("*.dcm"))[:5]
    study_uid = upload(orthanc, files)
    source_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    send_series, first = medsr.series_worker.send_series, []

    def stopped_midway(derived, *args):  # on the first try, two instances reach Orthanc, then it stops
        if not first:
            first.append(derived)
            send_series(derived[:2], *args)
            orthanc.stop()
        send_series(derived, *args)

    monkeypatch.setattr(medsr.series_worker, "send_series", stopped_midway)
    spool = tmp_path / "spool"
    with running_node(spool, orthanc.destination, session_tiny_checkpoint) as node:
        assert send(files, node.port) == [0] * len(files)
        pending = wait_for(lambda: [s for s in spool_status(spool)["pending"] if s["attempts"] >= 2], 60,
                           "two failed tries while Orthanc is down")
        assert pending[0]["state"] == "enhanced" and "not sent to ORTHANC@" in pending[0]["last_error"]
        orthanc.start()
        assert len(derived_series(orthanc, study_uid, source_uid)["Instances"]) == 2
        wait_for(lambda: spool_status(spool)["done"], 60, "the series to be sent once Orthanc is back")
    # sent again whole, with the same UIDs: the two instances that got through are not doubled
    assert len(derived_series(orthanc, study_uid, source_uid)["Instances"]) == len(files)


@pytest.mark.slow
@NEEDS_ORTHANC
def test_the_readme_orthanc_configuration_round_trip(tmp_path, session_tiny_checkpoint):
    """docs/orthanc/forward.lua: a series stored in Orthanc goes to medsr and comes back
    enhanced into its study, and the enhanced series is not sent to medsr again."""
    files = sorted(SERIES.glob("*.dcm"))[:5]
    node_port = free_port()
    (tmp_path / "orthanc").mkdir()
    orthanc = Orthanc(tmp_path / "orthanc", StableAge=1, DicomModalities={"medsr": ["MEDSR", "127.0.0.1", node_port]},
                      LuaScripts=[str(Path(__file__).parent.parent / "docs" / "orthanc" / "forward.lua")])
    orthanc.start()
    spool = tmp_path / "spool"
    try:
        with running_node(spool, orthanc.destination, session_tiny_checkpoint, port=node_port, allow=("ORTHANC",)):
            assert send(files, orthanc.dicom_port, called_aet="ORTHANC") == [0] * len(files)
            study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            source_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            wait_for(lambda: len(orthanc.series_of_study(study_uid)) == 2 and spool_status(spool)["done"], 60,
                     "the enhanced series to come back")
            time.sleep(3)  # the enhanced series becomes stable in Orthanc: it must not come back to medsr
            status = spool_status(spool)
            assert [s["series"] for s in status["done"]] == [source_uid] and not status["pending"]
        assert len(derived_series(orthanc, study_uid, source_uid)["Instances"]) == len(files)
    finally:
        orthanc.stop()


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@pytest.mark.slow
@NEEDS_ORTHANC
@pytest.mark.skipif(not DICOMWEB_PLUGIN.exists(), reason="Orthanc's DICOMweb plugin is not installed (Debian "
                                                         "package orthanc-dicomweb; .ci/run installs it)")
def test_forward_dicomweb_stores_the_series_by_stow_rs(tmp_path, destination, session_tiny_checkpoint):
    files = sorted(SERIES.glob("*.dcm"))[:3]
    (tmp_path / "orthanc").mkdir()
    orthanc = Orthanc(tmp_path / "orthanc", Plugins=[str(DICOMWEB_PLUGIN)])
    orthanc.start()
    spool = tmp_path / "spool"
    try:
        with running_node(spool, destination.address, session_tiny_checkpoint,
                          forward_dicomweb=f"http://127.0.0.1:{orthanc.http_port}/dicom-web") as node:
            assert send(files, node.port) == [0] * len(files)
            wait_for(lambda: spool_status(spool)["done"], 60, "the series to be stored by STOW-RS")
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        (stored,) = orthanc.series_of_study(study_uid)  # only the derived series went there
        assert len(stored["Instances"]) == len(files) and set(destination.stored) == {
            orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in stored["Instances"]}
    finally:
        orthanc.stop()


def test_forward_dicomweb_must_be_a_url(tmp_path, destination):
    with pytest.raises(MedsrError, match="--forward-dicomweb must be an http:// or https:// URL, not 'pacs:8042'"):
        ServeOptions(tmp_path, destination.address, forward_dicomweb="pacs:8042")


def start_node_process(spool: Path, orthanc: Orthanc, weights: Path, quiet: float, log: Path):
    """``medsr serve`` as a subprocess (its stderr in ``log``) and its port, once it listens."""
    port = free_port()
    command = [sys.executable, "-m", "medsr.cli", "serve", "--forward", str(orthanc.destination),
               "--port", str(port), "--bind", "127.0.0.1", "--spool", str(spool), "--quiet-seconds", str(quiet),
               "--weights", str(weights), "--device", "cpu", "--min-free-mb", "0", "--retry-seconds", "0.2"]
    root = str(Path(__file__).parent.parent)
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    with open(log, "ab") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=environment)
    try:
        wait_for(lambda: "listening as" in log.read_text() or process.poll() is not None, 60, "medsr serve to listen")
        assert process.poll() is None, log.read_text()
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process, port


def run_until_sent(spool: Path, orthanc: Orthanc, weights: Path, log: Path) -> None:
    """``medsr serve`` started on a spool an earlier, killed run left: until it sends, then stopped."""
    process, _ = start_node_process(spool, orthanc, weights, 0.5, log)
    try:
        wait_for(lambda: "sent series" in log.read_text(), 60, "the restarted node to send the series")
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(30)


@pytest.mark.slow  # two medsr processes
@NEEDS_ORTHANC
def test_the_node_killed_between_receiving_and_sending_sends_the_series_once_after_a_restart(
        tmp_path, orthanc, session_tiny_checkpoint):
    from typer.testing import CliRunner

    from medsr.cli import app

    files = sorted(SERIES.glob("*.dcm"))[:5]
    study_uid = upload(orthanc, files)
    source_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    spool, first_log, second_log = tmp_path / "spool", tmp_path / "first.log", tmp_path / "second.log"
    process, port = start_node_process(spool, orthanc, session_tiny_checkpoint, 60, first_log)
    try:
        assert send(files, port) == [0] * len(files)
    finally:
        os.kill(process.pid, signal.SIGKILL)  # acknowledged, not yet quiet: nothing sent
        process.wait()
    assert len(orthanc.series_of_study(study_uid)) == 1
    status = CliRunner().invoke(app, ["serve", "--status", "--spool", str(spool)])
    assert status.exit_code == 0 and f"pending receiving {source_uid} ({len(files)} images" in status.stdout
    run_until_sent(spool, orthanc, session_tiny_checkpoint, second_log)
    logs = first_log.read_text() + second_log.read_text()
    assert logs.count("sent series") == 1 and logs.count("received series") == 1, logs
    assert len(derived_series(orthanc, study_uid, source_uid)["Instances"]) == len(files)
    status = CliRunner().invoke(app, ["serve", "--status", "--spool", str(spool)])
    assert status.stdout.splitlines()[-1] == "0 pending, 1 done, 0 failed"


@pytest.mark.slow  # two medsr processes
@NEEDS_ORTHANC
def test_the_node_killed_while_its_destination_is_down_sends_the_enhanced_series_once_after_a_restart(
        tmp_path, orthanc, session_tiny_checkpoint):
    files = sorted(SERIES.glob("*.dcm"))[:5]
    study_uid = upload(orthanc, files)
    source_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    orthanc.stop()
    spool, first_log, second_log = tmp_path / "spool", tmp_path / "first.log", tmp_path / "second.log"
    process, port = start_node_process(spool, orthanc, session_tiny_checkpoint, 0.5, first_log)
    try:
        assert send(files, port) == [0] * len(files)
        (pending,) = wait_for(lambda: [s for s in spool_status(spool)["pending"] if s["attempts"] >= 1], 60,
                              "a failed try while Orthanc is down")
    finally:
        os.kill(process.pid, signal.SIGKILL)  # enhanced, not sent
        process.wait()
    assert pending["state"] == "enhanced" and pending["derived_series"]
    orthanc.start()
    run_until_sent(spool, orthanc, session_tiny_checkpoint, second_log)
    logs = first_log.read_text() + second_log.read_text()
    # resumed at its step: enhanced once, before the kill; sent once, after it
    assert logs.count("enhanced series") == 1 and logs.count("sent series") == 1, logs
    derived = derived_series(orthanc, study_uid, source_uid)
    assert derived["MainDicomTags"]["SeriesInstanceUID"] == pending["derived_series"]
    assert len(derived["Instances"]) == len(files)
    status = spool_status(spool)
    assert not status["pending"] and not status["failed"]
    assert [s["series"] for s in status["done"]] == [source_uid]
