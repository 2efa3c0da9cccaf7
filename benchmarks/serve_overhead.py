"""What ``medsr serve`` costs over ``medsr enhance``: a long series received, enhanced and
forwarded by the node, against the same files enhanced to a DICOM series by ``enhance_file``
(what ``medsr enhance SERIES -o FOLDER`` runs), with the same model object and options.

The node runs in this process on loopback; a pynetdicom storage SCP that accepts and discards
stands in for the PACS. The node's time runs from the first image sent to the last instance
accepted by the destination, less the quiet period it waits on purpose (``--quiet-seconds``,
printed apart): receiving (each image synced to disk before its answer), enhancing from the
spool, and forwarding. Passes alternate (enhance, node, enhance, node, ...), since machines
drift.

    python benchmarks/serve_overhead.py --slices 384 --repeats 2
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import pydicom
import torch
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

from medsr.enhance import enhance_file, enhancer_for
from medsr.serve import STORAGE_CLASSES, Destination, Node, ServeOptions, spool_status

from long_series import repeat_series

SOURCE = Path(__file__).parent.parent / "sample_scans" / "mr_pd_oblique_dicom"
QUIET_SECONDS = 1.0


class Sink:
    """A storage SCP that accepts every instance and keeps nothing but the time of the last."""

    def __init__(self) -> None:
        self.count, self.first, self.last = 0, 0.0, 0.0
        ae = AE(ae_title="SINK")
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.address = Destination("SINK", "127.0.0.1", self.server.server_address[1])

    def _store(self, event) -> int:
        event.encoded_dataset()
        self.last = time.perf_counter()
        self.first = self.first if self.count else self.last
        self.count += 1
        return 0x0000


def send(files: list[Path], port: int) -> None:
    ae = AE(ae_title="SCANNER")
    for uid in STORAGE_CLASSES:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", port, ae_title="MEDSR")
    for path in files:
        status = association.send_c_store(path)
        assert status.Status == 0, f"{path}: 0x{status.Status:04X}"
    association.release()


def enhance_pass(series: Path, output: Path, enhancer, options: dict) -> float:
    started = time.perf_counter()
    enhance_file(series, output, model=enhancer, output_format="dicom", **options)
    return time.perf_counter() - started


def node_pass(files: list[Path], spool: Path, sink: Sink, weights, options: dict) -> dict[str, float]:
    node = Node(ServeOptions(spool, sink.address, port=0, bind="127.0.0.1", quiet_seconds=QUIET_SECONDS,
                             min_free_mb=0, enhance=dict(weights=weights, **options)))
    node.start()
    try:
        sink.count = 0
        started = time.perf_counter()
        sender = threading.Thread(target=send, args=(files, node.port))
        sender.start()
        sender.join()
        received = time.perf_counter()
        while sink.count < len(files) or not spool_status(spool)["done"]:
            time.sleep(0.05)
        return {"total": sink.last - started - QUIET_SECONDS, "receive": received - started,
                "forward": sink.last - sink.first}
    finally:
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--weights", type=Path, default=None, help="default: the shipped x2 model")
    parser.add_argument("--compile", default="off", help="both sides alike (off: no one-off compile cost)")
    args = parser.parse_args()
    options = dict(device="cpu", compile_model=args.compile)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        series = repeat_series(SOURCE, args.slices, scratch / "series")
        files = sorted(series.iterdir())
        enhancer = enhancer_for(None, args.weights, None, False)
        sink = Sink()
        rows = []
        for repeat in range(args.repeats):
            plain = enhance_pass(series, scratch / f"enhanced{repeat}", enhancer, options)
            node = node_pass(files, scratch / f"spool{repeat}", sink, args.weights, options)
            rows.append((plain, node))
            print(f"pass {repeat + 1}: medsr enhance {plain:.1f} s; medsr serve {node['total']:.1f} s "
                  f"(receiving {node['receive']:.1f} s and forwarding {node['forward']:.1f} s of it; "
                  f"quiet period {QUIET_SECONDS:g} s not counted); "
                  f"overhead {node['total'] / plain - 1:+.1%}", flush=True)
        plain = min(r[0] for r in rows)
        served = min(r[1]["total"] for r in rows)
        print(f"{args.slices} slices of {pydicom.dcmread(files[0], stop_before_pixels=True).Rows}x"
              f"{pydicom.dcmread(files[0], stop_before_pixels=True).Columns}, {torch.get_num_threads()} threads: "
              f"best medsr enhance {plain:.1f} s, best medsr serve {served:.1f} s, overhead {served / plain - 1:+.1%}")


if __name__ == "__main__":
    main()
