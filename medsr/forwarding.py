"""Send a derived series on: C-STORE to a DICOM node, STOW-RS to a DICOMweb service.

Both either deliver every instance or raise :class:`ForwardError`; the caller (``medsr
serve``, :mod:`medsr.series_worker`) decides when to try again. Sending is idempotent at the
destination as long as the instances keep their UIDs (a resend replaces, or is recognised).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medsr.errors import MedsrError

# C-STORE responses that mean stored: success and the warnings B000 (coercion), B006
# (elements discarded), B007 (data set does not match SOP class)
STORED = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class Destination:
    """Where derived series go: a DICOM node's AE title, host and port (``AET@HOST:PORT``)."""

    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``ORTHANC@10.0.0.5:4242`` -> ``Destination("ORTHANC", "10.0.0.5", 4242)``.

        Raises:
            MedsrError: not of the form AET@HOST:PORT.
        """
        aet, at, address = text.partition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and aet.strip() and host and port.isdigit() and 0 < int(port) < 65536
                and len(aet) <= 16):
            raise MedsrError(f"--forward must be AET@HOST:PORT (an AE title of at most 16 characters, "
                             f"e.g. ORTHANC@10.0.0.5:4242), not {text!r}")
        return cls(aet.strip(), host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


class ForwardError(Exception):
    """The destination did not accept every instance (down, refusing, or failing some)."""


def send_series(files: list[Path], calling_aet: str, destination: Destination, timeout: float = 30.0) -> None:
    """C-STORE every file to ``destination`` in one association.

    Raises:
        ForwardError: no association (down, refused), or an instance not stored.
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    classes = {str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)
               for path in files}
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for uid in classes:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    association = ae.associate(destination.host, destination.port, ae_title=destination.aet)
    if not association.is_established:
        what = "rejected the association" if association.is_rejected else "did not answer"
        raise ForwardError(what)
    try:
        for path in files:
            status = association.send_c_store(path)
            code = getattr(status, "Status", None)
            if code not in STORED:
                answer = "no answer" if code is None else f"status 0x{code:04X}"
                raise ForwardError(f"instance {path.stem}: {answer}")
    finally:
        if association.is_established:
            association.release()


def store_dicomweb(files: list[Path], url: str, timeout: float = 60.0) -> None:
    """STOW-RS every file to the DICOMweb service at ``url`` (``dicomweb-client``), in batches
    of 64 instances.

    Raises:
        ForwardError: the service is unreachable or did not store every instance.
    """
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url, timeout=timeout)
    client.set_http_retry_params(retry=False)  # the node retries, with its own backoff
    try:
        for start in range(0, len(files), 64):
            batch = [pydicom.dcmread(path) for path in files[start:start + 64]]
            answer = client.store_instances(batch)
            failed = answer.get("FailedSOPSequence") if answer is not None else None
            if failed:
                raise ForwardError(f"{len(failed)} of {len(batch)} instances refused")
    except (requests.RequestException, OSError) as exc:
        raise ForwardError(" ".join(str(exc).split())[:200]) from None
