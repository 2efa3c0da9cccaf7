from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsr.evaluation import upscale_zero_fill
from medsr.model import DEGRADATION_CODES, DefaultFactorThroughPlaneNet, SRResNet, ThroughPlaneNet, zero_fill_upsample

CASES = [  # (kwargs, input shape, expected output shape)
    ({"scale": 2}, (2, 1, 24, 20), (2, 1, 48, 40)),
    ({"scale": 4}, (1, 1, 16, 16), (1, 1, 64, 64)),
    ({"scale": 2, "features": 16, "num_res_blocks": 3}, (3, 1, 9, 13), (3, 1, 18, 26)),
    ({"scale": 4, "in_channels": 2, "features": 8, "num_res_blocks": 1}, (1, 2, 8, 8), (1, 2, 32, 32)),
]


@pytest.mark.parametrize("kwargs, input_shape, expected_shape", CASES)
def test_forward_backward_shape_no_nan_and_gradient_everywhere(kwargs, input_shape, expected_shape):
    torch.manual_seed(0)
    model = SRResNet(**kwargs)
    torch.nn.init.normal_(model.tail.conv.weight, std=0.01)  # zero at init would block gradients
    codes = torch.arange(input_shape[0]) % 2  # both degradations in one batch
    output = model(torch.rand(input_shape), codes)
    assert output.shape == expected_shape
    assert torch.isfinite(output).all()
    (output - torch.rand(expected_shape)).abs().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        assert torch.isfinite(parameter.grad).all(), name


def test_untrained_model_is_the_classical_upsampler_for_each_degradation():
    low_res = torch.rand(2, 1, 16, 12)
    bicubic = F.interpolate(low_res, scale_factor=2, mode="bicubic", align_corners=False)
    model = SRResNet(scale=2)
    torch.testing.assert_close(model(low_res), bicubic)
    mixed = model(low_res, torch.tensor([DEGRADATION_CODES["kspace"], DEGRADATION_CODES["bicubic"]]))
    torch.testing.assert_close(mixed[0], zero_fill_upsample(low_res, 2)[0])
    torch.testing.assert_close(mixed[1], bicubic[1])


def test_zero_fill_matches_the_evaluation_baseline():
    low_res = np.random.default_rng(0).random((3, 17, 20)).astype(np.float32)
    ours = zero_fill_upsample(torch.from_numpy(low_res)[:, None], 2)[:, 0].numpy()
    baseline = np.moveaxis(upscale_zero_fill(np.moveaxis(low_res, 0, 2), 2, 2), 2, 0)
    np.testing.assert_allclose(ours, baseline, atol=1e-5)


def test_uses_monai_blocks():
    from monai.networks.blocks import ResidualUnit, SubpixelUpsample

    model = SRResNet(scale=4, num_res_blocks=8)
    assert sum(isinstance(m, ResidualUnit) for m in model.modules()) == 8
    assert sum(isinstance(m, SubpixelUpsample) for m in model.modules()) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": 3}, "scale must be one of"), ({"features": 0}, "must be positive"),
    ({"num_res_blocks": 0}, "must be positive"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SRResNet(**kwargs)


@pytest.mark.parametrize("grid", ["bicubic", "kspace"])
def test_one_grid_for_the_batch_computes_the_same_as_per_slice_codes(grid):
    torch.manual_seed(0)
    model = SRResNet(scale=2, features=8, num_res_blocks=1).eval()
    torch.nn.init.normal_(model.tail.conv.weight, std=1e-3)
    low_res = torch.rand(3, 1, 24, 20)
    codes = torch.full((3,), DEGRADATION_CODES[grid])
    with torch.no_grad():
        torch.testing.assert_close(model(low_res, codes, grid=grid), model(low_res, codes), rtol=0, atol=0)


def test_default_factor_through_plane_net_is_a_through_plane_net_whose_factor_may_be_left_out():
    torch.manual_seed(0)
    plain = ThroughPlaneNet(features=4, num_res_blocks=1)
    torch.nn.init.normal_(plain.tail.conv.weight, std=0.1)  # zero at init would hide the factor
    model = DefaultFactorThroughPlaneNet(default_factor=3, features=4, num_res_blocks=1)
    model.load_state_dict(plain.state_dict())  # the same weights load
    planes = torch.rand(2, 1, 12, 10)
    torch.testing.assert_close(model(planes), plain(planes, torch.full((2,), 3.0)))
    torch.testing.assert_close(model(planes, torch.full((2,), 5.0)), plain(planes, torch.full((2,), 5.0)))
    with pytest.raises(ValueError, match="default_factor must be 2 to 8, not 9"):
        DefaultFactorThroughPlaneNet(default_factor=9)
