"""Network factory, specs, schedules and deep-supervision plumbing."""

import math

import pytest
import torch
from monai.networks.nets import DynUNet, SegResNet, UNet

from medjdt.models.networks import build_network, deep_supervision_heads, network_channels
from medjdt.models.schedules import lr_factor
from medjdt.models.specs import instantiate

UNET3D = {
    "class_path": "monai.networks.nets.UNet",
    "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2]},
}


@pytest.mark.parametrize(
    ("spec", "cls", "shape"),
    [
        (UNET3D, UNet, (1, 1, 16, 16, 16)),
        ({"class_path": "UNet", "init_args": {**UNET3D["init_args"], "spatial_dims": 2}}, UNet, (1, 1, 16, 16)),
        (
            {"class_path": "SegResNet", "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                                                      "init_filters": 8}},
            SegResNet,
            (1, 1, 16, 16, 16),
        ),
        (
            {"class_path": "DynUNet", "init_args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 3,
                                                    "kernel_size": [3, 3, 3], "strides": [1, 2, 2],
                                                    "upsample_kernel_size": [2, 2]}},
            DynUNet,
            (1, 1, 16, 16),
        ),
    ],
)
def test_build_network_full_and_short_names(spec, cls, shape):
    net = build_network(spec)
    assert isinstance(net, cls)
    out = net(torch.randn(shape))
    assert out.shape == (shape[0], 3, *shape[2:])
    assert network_channels(spec)[:2] == (1, 3)


def test_unknown_network_and_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown network 'NoSuchNet'"):
        build_network({"class_path": "NoSuchNet", "init_args": {}})
    with pytest.raises(ValueError, match="not a torch.nn.modules.module.Module subclass"):
        build_network({"class_path": "collections.OrderedDict"})
    with pytest.raises(ValueError, match="cannot build network"):
        build_network({"class_path": "UNet", "init_args": {"spatial_dims": 3, "bogus": 1}})
    with pytest.raises(ValueError, match="unknown keys"):
        build_network({"class_path": "UNet", "args": {}})
    with pytest.raises(ValueError, match="must set"):
        network_channels({"class_path": "SegResNet", "init_args": {"spatial_dims": 3}})


def test_instantiate_spec_with_arguments():
    lin = instantiate({"class_path": "torch.nn.Linear", "init_args": {"in_features": 2, "out_features": 5}},
                      torch.nn.Module, "layer")
    assert isinstance(lin, torch.nn.Linear) and lin.out_features == 5


def test_dynunet_deep_supervision_heads_are_raw_low_resolution_outputs():
    net = DynUNet(3, 1, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                  deep_supervision=True, deep_supr_num=1).train()
    x = torch.randn(2, 1, 16, 16, 16)
    out = net(x)
    logits, heads = deep_supervision_heads(net, out)
    assert logits.shape == (2, 3, 16, 16, 16)
    assert [tuple(h.shape) for h in heads] == [(2, 3, 8, 8, 8)]
    # MONAI's stacked output holds the same head, only nearest-upsampled: the raw head is what it came from.
    upsampled = torch.nn.functional.interpolate(heads[0], size=(16, 16, 16), mode="nearest")
    torch.testing.assert_close(out[:, 1], upsampled)
    net.eval()
    with torch.no_grad():
        plain = net(x)
    assert deep_supervision_heads(net, plain)[1] == []


def test_lr_schedule_warmup_then_decay():
    total, warm = 100, 10
    factors = [lr_factor(s, total, warm, "poly") for s in range(total)]
    assert all(a < b for a, b in zip(factors[:warm], factors[1:warm + 1]))  # strictly rising during warm-up
    assert factors[warm] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[warm:], factors[warm + 1:]))  # non-increasing afterwards
    assert lr_factor(total, total, warm, "poly") == 0.0
    mid = warm + (total - warm) // 2
    assert lr_factor(mid, total, warm, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(mid, total, warm, "poly") == pytest.approx(0.5**0.9)
    assert lr_factor(50, total, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, 10, 0, "linear")
