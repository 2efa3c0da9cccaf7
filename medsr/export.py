"""Export the networks for other runtimes: TorchScript (``.ts``, what MONAI bundles load) and ONNX.

What is exported is the network alone, float32, on normalised slices: the in-plane
:class:`~medsr.model.SRResNet` takes ``low_res`` ``(B, 1, H, W)`` (the intensity window mapped to
[0, 1]) and ``degradation`` ``(B,)`` int64 codes (0 ``bicubic``, 1 ``kspace``) and returns
``(B, 1, s*H, s*W)``; the :class:`~medsr.model.ThroughPlaneNet` takes ``upsampled`` ``(B, 1, H, Z)``
(planes already B-splined onto the thin grid, the slice axis last) and ``factor`` ``(B,)`` float32
and returns ``(B, 1, H, Z)``. Batch and plane size are free. The rules around the network
(intensity window, degradation found from the pixels, flat background, padding, bf16 autocast)
stay in medsr (:class:`medsr.transforms.SuperResolve`); a runtime that takes the exported file
alone must apply them itself.

ONNX has no complex tensors, and the exporter cannot turn ``fftshift`` of a complex spectrum of
free size into ONNX (torch 2.13), so the ONNX export computes the ``kspace`` upsampler without
FFTs: zero-filling a spectrum is linear and separable, ``Re(M_h X M_w^T)`` with ``M`` the
``(s*n, n)`` band-limited interpolation matrix of each axis, built in the graph from the plane's
size (:func:`zero_fill_matrices`). It agrees with the FFT to 1e-5 on [0, 1] slices
(tests/test_export.py). TorchScript keeps the FFT.

Every export is checked: the file is loaded back, run on real slices (or a phantom) and
compared with the PyTorch model; more than :data:`TOLERANCE` apart is an error.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medsr.errors import ExportError, MedsrError
from medsr.model import DEGRADATION_CODES, SRResNet, ThroughPlaneNet

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": ".ts", "onnx": ".onnx"}
# largest |exported - PyTorch| allowed, in normalised units (1 = the intensity window's width):
# 0.01% of the window, 0.1 on a 1,000-wide MR range; measured differences are 1e-6 to 1e-5
TOLERANCE = 1e-4
ONNX_OPSET = 20
CHECK_SLICES = 4
CHECK_FACTOR = 4  # through-plane factor the check runs with


class PortableSRResNet(SRResNet):
    """The :class:`SRResNet` with the ``kspace`` upsampler written without complex numbers, so
    ONNX can hold it (same weights, same answer to 1e-5)."""

    def zero_fill(self, low_res: torch.Tensor) -> torch.Tensor:
        height, width = low_res.shape[-2:]
        real_h, imag_h = zero_fill_matrices(height, self.scale, low_res)
        real_w, imag_w = zero_fill_matrices(width, self.scale, low_res)
        return real_h @ low_res @ real_w.transpose(0, 1) - imag_h @ low_res @ imag_w.transpose(0, 1)


def zero_fill_matrices(size, scale: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of the ``(scale*size, size)`` matrix ``M`` of zero-filled
    k-space interpolation along one axis (:func:`medsr.model.zero_fill_upsample`, one axis):
    ``M[k, j] = 1/n sum_f exp(2 pi i f (k/N - j/n))`` over the ``n`` signed frequencies
    ``f = -n//2 .. n-1-n//2`` the small spectrum holds, ``N = scale * n``.

    Built in float64: a float32 angle ``2 pi f k / N`` loses digits at ``f * k`` in the tens of
    thousands (0.02 rad at 256 pixels); float64 keeps it to 1e-8 rad for planes up to 8,192.
    """
    big = size * scale
    device = like.device
    freqs = torch.arange(size, device=device) - size // 2
    fine, coarse = torch.arange(big, device=device), torch.arange(size, device=device)
    out_angle = (fine[:, None] * freqs[None, :]).to(torch.float64) * (2 * math.pi / big)
    in_angle = (freqs[:, None] * coarse[None, :]).to(torch.float64) * (2 * math.pi / size)
    cos_out, sin_out, cos_in, sin_in = out_angle.cos(), out_angle.sin(), in_angle.cos(), in_angle.sin()
    real = (cos_out @ cos_in + sin_out @ sin_in) / size
    imag = (sin_out @ cos_in - cos_out @ sin_in) / size
    return real.to(like.dtype), imag.to(like.dtype)


def portable(model: nn.Module) -> nn.Module:
    """The model ready for ONNX: an SRResNet becomes a :class:`PortableSRResNet` with its weights."""
    if type(model) is SRResNet:
        config = {"scale": model.scale, "in_channels": model.tail.conv.out_channels,
                  "features": model.tail.conv.in_channels, "num_res_blocks": len(model.body)}
        twin = PortableSRResNet(**config)
        twin.load_state_dict(model.state_dict())
        return twin.eval()
    return model.eval()


def input_names(model: nn.Module) -> tuple[str, str]:
    return ("upsampled", "factor") if isinstance(model, ThroughPlaneNet) else ("low_res", "degradation")


def output_name(model: nn.Module) -> str:
    return "refined" if isinstance(model, ThroughPlaneNet) else "high_res"


@dataclass(frozen=True)
class ExportCheck:
    """How an exported file compares with the PyTorch model.

    Attributes:
        max_difference: largest ``|exported - PyTorch|`` over every output voxel, normalised units.
        slices: how many slices (planes) it ran on, and their shape ``(H, W)``.
        source: where the slices came from (a scan path, or ``phantom``).
    """

    max_difference: float
    slices: int
    shape: tuple[int, int]
    source: str
    tolerance: float = TOLERANCE


def check_inputs(model: nn.Module, scan: str | Path | None = None, lower_percentile: float = 0.5,
                 upper_percentile: float = 99.5, count: int = CHECK_SLICES) -> tuple[tuple[torch.Tensor, ...], str]:
    """Inputs the exported model is checked on: ``count`` informative slices of ``scan`` (each
    half told ``bicubic``, half ``kspace``, so both upsamplers run), normalised by the scan's
    intensity window as ``medsr enhance`` does; for the through-plane model, planes across the
    slices told factor :data:`CHECK_FACTOR`. Without a scan, a smooth phantom with edges."""
    from medsr.degradation import informative_planes
    from medsr.engine import survey_scan
    from medsr.reading import open_scan

    through = isinstance(model, ThroughPlaneNet)
    if scan is None:
        grid = np.linspace(-1, 1, 48, dtype=np.float32)
        phantom = np.clip(1.2 - 2 * (grid[:, None] ** 2 + grid[None, :40] ** 2), 0, 1)
        planes, source = [np.roll(phantom, 3 * k, axis=0) for k in range(count)], "phantom"
    else:
        opened = open_scan(scan)
        window = survey_scan(opened, keep_bytes=0).counts.window(lower_percentile, upper_percentile)
        if through:  # planes that hold the slice axis, as the through-plane model sees them
            volume = np.moveaxis(opened.load().array, opened.slice_axis, -1)
            middle = volume.shape[0] // 2
            planes = [volume[middle + k - count // 2] for k in range(count)]
        else:
            planes = informative_planes(opened.read_plane, opened.n_slices, window.low, window.high, limit=count)
        planes, source = [window.forward(plane) for plane in planes], str(scan)
    images = torch.from_numpy(np.stack(planes).astype(np.float32))[:, None]
    if through:
        return (images, torch.full((len(images),), float(CHECK_FACTOR))), source
    codes = torch.tensor([list(DEGRADATION_CODES.values())[k % 2] for k in range(len(images))])
    return (images, codes), source


def export_model(model: nn.Module, output: str | Path, fmt: str, inputs: tuple[torch.Tensor, ...],
                 source: str = "phantom") -> ExportCheck:
    """Write ``model`` (eval, float32, CPU) to ``output`` as ``fmt`` and check it on ``inputs``.

    Args:
        model: an :class:`SRResNet` or :class:`ThroughPlaneNet`.
        output: the file to write; it appears only when written whole.
        fmt: ``torchscript`` or ``onnx``.
        inputs: the model's inputs to check on (:func:`check_inputs`).
        source: where ``inputs`` came from, for the report.

    Returns:
        The :class:`ExportCheck`.

    Raises:
        MedsrError: unknown format, or ONNX asked for without the ``export`` extra;
        ExportError: the export failed, or the file answers more than :data:`TOLERANCE` apart.
    """
    from medsr.writing import atomic_output

    if fmt not in FORMATS:
        raise MedsrError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    output = Path(output)
    model = model.float().cpu().eval()
    with torch.inference_mode():
        expected = model(*inputs).float()
    with atomic_output(output, suffix=f".tmp{SUFFIXES[fmt]}") as temporary:
        if fmt == "torchscript":
            _write_torchscript(model, temporary, inputs)
        else:
            _write_onnx(model, temporary, inputs)
        answer = run_exported(temporary, fmt, inputs)
        difference = float((answer - expected).abs().max())
        check = ExportCheck(difference, len(inputs[0]), tuple(inputs[0].shape[-2:]), source)
        if not difference <= TOLERANCE:
            raise ExportError(f"{output}: the {fmt} export differs from the PyTorch model by up to "
                              f"{difference:.3g} on {check.slices} slices of {source} (tolerance {TOLERANCE:g}); "
                              "nothing was written")
    return check


def run_exported(path: str | Path, fmt: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Run an exported file on ``inputs`` (TorchScript through torch, ONNX through ONNX Runtime)."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 marks torch.jit deprecated
            loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            return loaded(*inputs).float()
    session = onnx_session(path)
    names = [item.name for item in session.get_inputs()]
    feeds = {name: tensor.numpy() for name, tensor in zip(names, inputs, strict=True)}
    return torch.from_numpy(session.run(None, feeds)[0])


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session for ``path``."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _write_torchscript(model: nn.Module, path: Path, inputs: tuple[torch.Tensor, ...]) -> None:
    # traced, not scripted: sizes are read from the input, so any batch and plane size runs
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes about shape arithmetic; checked below
        traced = torch.jit.trace(model, inputs, check_trace=False)
        torch.jit.save(traced, str(path))


def _write_onnx(model: nn.Module, path: Path, inputs: tuple[torch.Tensor, ...]) -> None:
    _require("onnxscript")
    model = portable(model)
    image_name, code_name = input_names(model)
    batch = torch.export.Dim("batch", min=1, max=4096)
    height, width = torch.export.Dim("height", min=4, max=8192), torch.export.Dim("width", min=4, max=8192)
    # an example whose batch and sides differ, so export keeps them free and apart
    example = (torch.rand(2, 1, 36, 28), inputs[1][:1].repeat(2))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, example, dynamo=True, opset_version=ONNX_OPSET, input_names=[image_name, code_name],
                output_names=[output_name(model)], verbose=False,
                dynamic_shapes={image_name: {0: batch, 2: height, 3: width}, code_name: {0: batch}})
    except Exception as exc:
        raise ExportError(f"{path}: ONNX export failed ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]})") from exc
    program.save(str(path))


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MedsrError(f"ONNX export needs {module}; install it with pip install 'medsr[export]'") from None


def check_model_choice(scale: int | None, through_plane: bool) -> None:
    """Which shipped model ``export`` and ``export-bundle`` take: ``--scale`` picks the in-plane
    one, and means nothing with ``--through-plane``.

    Raises:
        MedsrError: both given.
    """
    if through_plane and scale is not None:
        raise MedsrError("--scale picks the in-plane model; the through-plane model serves every factor, "
                         "so drop --scale with --through-plane")


def format_for(output: Path, fmt: str) -> str:
    """The export format: ``fmt``, or with ``auto`` the one the file name ends with
    (:data:`SUFFIXES`). A name that ends with the other format's suffix is refused, so
    ``model.onnx`` never holds TorchScript.

    Raises:
        MedsrError: an unknown format, a name that tells none with ``auto``, or one that
            contradicts ``fmt``.
    """
    named = next((name for name, suffix in SUFFIXES.items() if output.name.lower().endswith(suffix)), None)
    if fmt == "auto":
        if named is None:
            raise MedsrError(f"{output}: the name ends with neither {' nor '.join(SUFFIXES.values())}; "
                             "pass --format torchscript or --format onnx")
        return named
    if fmt not in FORMATS:
        raise MedsrError(f"--format must be auto or one of {', '.join(FORMATS)}, not {fmt!r}")
    if named is not None and named != fmt:
        raise MedsrError(f"{output}: the name says {named} but --format is {fmt}; rename it or change --format")
    return fmt


def export_file(output: str | Path, fmt: str, scale: int | None = None, through_plane: bool = False,
                weights: str | Path | None = None, check_on: str | Path | None = None,
                overwrite: bool = False) -> ExportCheck:
    """``medsr export``: the shipped (or ``weights``') in-plane model for ``scale`` (default 2)
    or the through-plane model, written to ``output`` as ``fmt`` and checked on slices of
    ``check_on`` (a scan; default: a phantom).

    Raises:
        MedsrError: bad options, output path or weights; ExportError: the check failed.
    """
    from medsr.enhance import load_enhancer
    from medsr.writing import check_output_path

    output = Path(output)
    fmt = format_for(output, fmt)
    check_model_choice(scale, through_plane)
    check_output_path(output, [Path(check_on)] if check_on is not None else [], overwrite)
    enhancer = load_enhancer(weights, scale or 2, through_plane)
    inputs, source = check_inputs(enhancer.model, check_on, enhancer.lower_percentile, enhancer.upper_percentile)
    return export_model(enhancer.model, output, fmt, inputs, source)
