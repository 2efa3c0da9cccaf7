"""SRResNet for 2-D slices, built from ``monai.networks.blocks``, told how the input was made.

Head (9x9 convolution + PReLU) -> ``num_res_blocks`` residual blocks (conv-PReLU-conv + skip,
no normalisation: batch statistics hurt intensity fidelity in super-resolution) -> a long skip
-> log2(scale) PixelShuffle x2 stages -> 9x9 output convolution.

Why the model is told the degradation: the two ways a low-res slice arises put its pixels on
different grids. Anti-aliased resampling (``bicubic``, also CT reconstructed on a coarse
matrix) centres each low-res pixel on the block of high-res pixels it covers; k-space
truncation (MR acquired with fewer phase/frequency steps) samples the band-limited image at
every ``scale``-th high-res pixel, half a high-res pixel away. One blind network averages the
two and loses to both classical answers (measured: -1.1 dB against bicubic, -2.3 dB against
zero-filling). So the network gets a degradation flag as an extra input plane and predicts
the residual over the matching classical upsampler: cubic interpolation for ``bicubic``,
zero-filled k-space for ``kspace``. An untrained network (output convolution zero) is exactly
that classical answer, and training only has to add the missing detail.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit, SubpixelUpsample
from torch import nn

SCALES = (2, 4)
DEGRADATION_CODES = {"bicubic": 0, "kspace": 1}
THROUGH_PLANE_FACTORS = range(2, 9)  # thin slices per thick slice the through-plane model takes


def zero_fill_upsample(low_res: torch.Tensor, scale: int) -> torch.Tensor:
    """Zero-filled k-space (sinc) interpolation of ``(B, C, h, w)`` to ``(B, C, s*h, s*w)``.

    The low-res spectrum is placed around DC of the larger one, the inverse of the protocol's
    ``kspace`` degradation; computed in float32 whatever the autocast dtype.
    """
    height, width = low_res.shape[-2:]
    big_h, big_w = height * scale, width * scale
    spectrum = torch.fft.fftshift(torch.fft.fft2(low_res.float()), dim=(-2, -1))
    padded = spectrum.new_zeros(*low_res.shape[:-2], big_h, big_w)
    top, left = big_h // 2 - height // 2, big_w // 2 - width // 2
    padded[..., top:top + height, left:left + width] = spectrum
    return torch.fft.ifft2(torch.fft.ifftshift(padded, dim=(-2, -1))).real * (scale * scale)


class SRResNet(nn.Module):
    """Super-resolution residual network for single-channel slices.

    Args:
        scale: in-plane upscaling factor, 2 or 4.
        in_channels: channels of the input slices (1 for CT/MR).
        features: feature maps in every convolution of the body.
        num_res_blocks: residual blocks in the body.

    Shapes:
        ``low_res`` ``(B, in_channels, H, W)`` in the normalised range (about [0, 1]);
        ``degradation`` ``(B,)`` integer codes from ``DEGRADATION_CODES`` (default: all
        ``bicubic``); output ``(B, in_channels, scale * H, scale * W)`` in the same range.

    Example:
        >>> model = SRResNet(scale=2)
        >>> mr_slices = torch.rand(4, 1, 128, 128)
        >>> model(mr_slices, torch.full((4,), DEGRADATION_CODES["kspace"])).shape
        torch.Size([4, 1, 256, 256])
    """

    spatial_dims = 2

    def __init__(self, scale: int = 2, in_channels: int = 1, features: int = 64,
                 num_res_blocks: int = 8) -> None:
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, not {scale}")
        if features < 1 or num_res_blocks < 1 or in_channels < 1:
            raise ValueError(
                "features, num_res_blocks and in_channels must be positive, not "
                f"{features}, {num_res_blocks}, {in_channels}"
            )
        self.scale = scale
        dims = self.spatial_dims
        # one extra input plane carries the degradation flag
        self.head = Convolution(dims, in_channels + 1, features, kernel_size=9, act="PRELU", norm=None)
        self.body = nn.Sequential(*[
            ResidualUnit(dims, features, features, kernel_size=3, subunits=2, act="PRELU",
                         norm=None, last_conv_only=True)
            for _ in range(num_res_blocks)
        ])
        self.body_out = Convolution(dims, features, features, kernel_size=3, conv_only=True)
        stages = []
        for _ in range(int(math.log2(scale))):
            stages += [
                SubpixelUpsample(dims, features, features, scale_factor=2, apply_pad_pool=False),
                nn.PReLU(features),
            ]
        self.upsample = nn.Sequential(*stages)
        self.tail = Convolution(dims, features, in_channels, kernel_size=9, conv_only=True)
        nn.init.zeros_(self.tail.conv.weight)
        nn.init.zeros_(self.tail.conv.bias)

    def forward(self, low_res: torch.Tensor, degradation: torch.Tensor | None = None,
                grid: str | None = None) -> torch.Tensor:
        """``grid`` (``"bicubic"`` or ``"kspace"``), when every slice of the batch is on the same
        one, computes only that classical upsampler (enhancing a scan); without it each slice
        gets the upsampler of its own ``degradation`` code (training batches mix them)."""
        batch, _, height, width = low_res.shape
        if degradation is None:
            degradation = torch.zeros(batch, dtype=torch.long, device=low_res.device)
        is_kspace = (degradation == DEGRADATION_CODES["kspace"]).view(batch, 1, 1, 1)
        flag = is_kspace.to(low_res.dtype).expand(batch, 1, height, width)
        features = self.head(torch.cat([low_res, flag], dim=1))
        features = features + self.body_out(self.body(features))
        detail = self.tail(self.upsample(features))
        return self.classical_upsample(low_res, is_kspace, grid) + detail

    def classical_upsample(self, low_res: torch.Tensor, is_kspace: torch.Tensor,
                           grid: str | None = None) -> torch.Tensor:
        """The upsampler each slice's grid calls for, in float32 whatever the autocast dtype
        (bf16 would round the image itself, not just the detail added to it).

        For a mixed batch both are computed and one is picked per slice: no data-dependent
        branch, so no device sync and one graph for torch.compile.
        """
        with torch.autocast(low_res.device.type, enabled=False):
            low_res = low_res.float()
            if grid == "kspace":
                return self.zero_fill(low_res)
            cubic = F.interpolate(low_res, scale_factor=self.scale, mode="bicubic", align_corners=False)
            if grid == "bicubic":
                return cubic
            return torch.where(is_kspace, self.zero_fill(low_res), cubic)

    def zero_fill(self, low_res: torch.Tensor) -> torch.Tensor:
        """The ``kspace`` upsampler, :func:`zero_fill_upsample` (the ONNX export swaps in the
        same map without complex numbers, :class:`medsr.export.PortableSRResNet`)."""
        return zero_fill_upsample(low_res, self.scale)


class ThroughPlaneNet(nn.Module):
    """Through-plane refinement for planes that contain the slice axis, from MONAI blocks.

    Thick slices are first made thin by cubic B-spline interpolation along the slice axis (the
    protocol v1-z baseline, :func:`medsr.transforms.bspline_upsample`, which handles any integer
    factor); this network adds the detail the thick slices lost. Head (3x3 convolution + PReLU)
    -> ``num_res_blocks`` residual blocks -> 3x3 output convolution, started at zero, so an
    untrained network is exactly the B-spline baseline. It is told the factor as an extra input
    plane (``factor / 8``), since a 2 mm and a 5 mm slice hide detail at different scales.

    Args:
        features: feature maps in every convolution of the body.
        num_res_blocks: residual blocks in the body.

    Shapes:
        ``upsampled`` ``(B, 1, H, Z)`` normalised planes, the slice axis last, already on the
        thin grid; ``factor`` ``(B,)`` thin slices per thick slice; output ``(B, 1, H, Z)``.

    Example:
        >>> model = ThroughPlaneNet()
        >>> coronal = torch.rand(2, 1, 256, 192)  # 48 slices of 4 mm, B-splined to 1 mm
        >>> model(coronal, torch.full((2,), 4.0)).shape
        torch.Size([2, 1, 256, 192])
    """

    spatial_dims = 2
    FACTOR_SCALE = 8.0

    def __init__(self, features: int = 32, num_res_blocks: int = 6) -> None:
        super().__init__()
        if features < 1 or num_res_blocks < 1:
            raise ValueError(f"features and num_res_blocks must be positive, not {features}, {num_res_blocks}")
        dims = self.spatial_dims
        self.head = Convolution(dims, 2, features, kernel_size=3, act="PRELU", norm=None)
        self.body = nn.Sequential(*[
            ResidualUnit(dims, features, features, kernel_size=3, subunits=2, act="PRELU",
                         norm=None, last_conv_only=True)
            for _ in range(num_res_blocks)
        ])
        self.tail = Convolution(dims, features, 1, kernel_size=3, conv_only=True)
        nn.init.zeros_(self.tail.conv.weight)
        nn.init.zeros_(self.tail.conv.bias)

    def forward(self, upsampled: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = upsampled.shape
        plane = (factor.to(upsampled.dtype) / self.FACTOR_SCALE).view(batch, 1, 1, 1)
        features = self.head(torch.cat([upsampled, plane.expand(batch, 1, height, width)], dim=1))
        detail = self.tail(self.body(features))
        return upsampled.float() + detail


class DefaultFactorThroughPlaneNet(ThroughPlaneNet):
    """A :class:`ThroughPlaneNet` whose ``factor`` may be left out: ``default_factor`` then.

    Called with one input, it is what MONAI's bundle tools expect of ``network_def``:
    ``ckpt_export`` traces ``network(image)``, so its TorchScript has the factor fixed at
    ``default_factor``. Given a factor (as :class:`medsr.transforms.SuperResolved` gives each
    scan's own), it is a ThroughPlaneNet; the state dict is the same.
    """

    def __init__(self, default_factor: int = 4, features: int = 32, num_res_blocks: int = 6) -> None:
        super().__init__(features=features, num_res_blocks=num_res_blocks)
        if default_factor not in THROUGH_PLANE_FACTORS:
            raise ValueError(f"default_factor must be {THROUGH_PLANE_FACTORS.start} to "
                             f"{THROUGH_PLANE_FACTORS.stop - 1}, not {default_factor}")
        self.default_factor = default_factor

    def forward(self, upsampled: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
        if factor is None:
            factor = torch.full((upsampled.shape[0],), float(self.default_factor), device=upsampled.device)
        return super().forward(upsampled, factor)
