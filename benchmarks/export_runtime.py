"""ONNX Runtime against PyTorch on the CPU: the shipped x2 model on the same real slices, one run.

Is an ``enhance --runtime onnx`` choice worth offering? This times the exported ONNX model
(``medsr export --format onnx``, float32; ONNX Runtime's CPU provider, all graph optimisations)
against the PyTorch model as ``medsr enhance`` runs it on the CPU: eager float32, eager bf16
autocast (what ``--precision auto`` picks on CPUs with native bf16), and, with ``--compile``,
``torch.compile``d float32 and bf16. Same slices for every runtime (informative slices of the
sample T1, normalised as ``enhance`` does, batches of 4 as ``enhance`` uses on the CPU, the
``bicubic`` grid), same thread count, best of ``--repeats`` after a warm-up call; the largest
difference from eager float32 is printed beside each rate.

    python benchmarks/export_runtime.py [--threads 2] [--slices 8] [--repeats 2] [--compile]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from medsr.checkpoint import default_weights, load_model
from medsr.engine import native_bf16
from medsr.export import check_inputs, export_model, onnx_session

SAMPLE = Path(__file__).resolve().parent.parent / "sample_scans" / "mr_t1_nifti" / "MR.nii.gz"
BATCH = 4


def rate(run, batches: list[torch.Tensor], repeats: int) -> tuple[float, float, torch.Tensor]:
    """``(first call s, best slices/s, outputs)`` of ``run(batch)`` over every batch."""
    start = time.perf_counter()
    run(batches[0])
    first, best = time.perf_counter() - start, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = [run(batch) for batch in batches]
        best = max(best, sum(len(b) for b in batches) / (time.perf_counter() - start))
    return first, best, torch.cat(outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (about 20 s each)")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    warnings.simplefilter("ignore")  # exporter and inductor notes
    model, _ = load_model(default_weights(2))
    model.eval()
    (images, codes), source = check_inputs(model, SAMPLE, count=arguments.slices)
    codes = torch.zeros_like(codes)  # the bicubic grid, for every runtime
    batches = list(images.split(BATCH))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x2.onnx"
        export_model(model, path, "onnx", (images[:2], codes[:2]), source)
        session = onnx_session(path, threads=arguments.threads)

        def onnx_run(batch):
            feeds = {"low_res": batch.numpy(), "degradation": np.zeros(len(batch), np.int64)}
            return torch.from_numpy(session.run(None, feeds)[0])

        def eager(forward, bf16: bool):
            def run(batch):
                with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    return forward(batch, torch.zeros(len(batch), dtype=torch.long), grid="bicubic").float()
            return run

        runs = {"PyTorch fp32 eager": eager(model, False), "PyTorch bf16 eager": eager(model, True),
                "ONNX Runtime fp32": onnx_run}
        if arguments.compile:
            runs["PyTorch fp32 compiled"] = eager(torch.compile(model, dynamic=False), False)
            runs["PyTorch bf16 compiled"] = eager(torch.compile(model, dynamic=False), True)
        print(f"shipped x2 model, {len(images)} slices {images.shape[-2]}x{images.shape[-1]} of {SAMPLE.name} "
              f"in batches of {BATCH}, {arguments.threads} threads, native bf16: {native_bf16(torch.device('cpu'))}, "
              f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}")
        results = {name: rate(run, batches, arguments.repeats) for name, run in runs.items()}
    reference_rate, reference = results["PyTorch fp32 eager"][1], results["PyTorch fp32 eager"][2]
    print(f"{'runtime':>22s}  {'first s':>7s}  {'slices/s':>8s}  {'x fp32 eager':>12s}  {'max |diff|':>10s}")
    for name, (first, best, outputs) in results.items():
        difference = float((outputs - reference).abs().max())
        print(f"{name:>22s}  {first:7.2f}  {best:8.2f}  {best / reference_rate:12.2f}  {difference:10.2g}")


if __name__ == "__main__":
    main()
