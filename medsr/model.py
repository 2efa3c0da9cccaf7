"""SRResNet for 2-D slices, built from ``monai.networks.blocks``.

Head (9x9 convolution + PReLU) -> ``num_res_blocks`` residual blocks (conv-PReLU-conv + skip,
no normalisation: batch statistics hurt intensity fidelity in super-resolution) -> a long skip
-> log2(scale) PixelShuffle x2 stages -> 9x9 output convolution. The network predicts the
residual over a bicubic upsampling of its input, so an untrained network (output convolution
initialised to zero) starts exactly at bicubic interpolation and training only has to learn the
missing detail.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit, SubpixelUpsample
from torch import nn

SCALES = (2, 4)


class SRResNet(nn.Module):
    """Super-resolution residual network for single-channel slices.

    Args:
        scale: in-plane upscaling factor, 2 or 4.
        in_channels: channels of the input slices (1 for CT/MR).
        features: feature maps in every convolution of the body.
        num_res_blocks: residual blocks in the body.

    Shapes:
        input ``(B, in_channels, H, W)`` in the normalised range (about [0, 1]);
        output ``(B, in_channels, scale * H, scale * W)`` in the same range.

    Example:
        >>> model = SRResNet(scale=2)
        >>> model(torch.zeros(4, 1, 128, 128)).shape
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
        self.head = Convolution(dims, in_channels, features, kernel_size=9, act="PRELU", norm=None)
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

    def forward(self, low_res: torch.Tensor) -> torch.Tensor:
        features = self.head(low_res)
        features = features + self.body_out(self.body(features))
        detail = self.tail(self.upsample(features))
        base = F.interpolate(low_res, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return base + detail
