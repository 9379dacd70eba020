"""Network factory: build a segmentation network from a ``class_path``/``init_args`` spec.

A spec is a plain dict, as written in a LightningCLI YAML::

    network:
      class_path: monai.networks.nets.UNet      # or the short name "UNet"
      init_args: {spatial_dims: 3, in_channels: 1, out_channels: 3, channels: [16, 32, 64], strides: [2, 2]}

Keeping the spec (not the built module) in the LightningModule's hyper-parameters makes every
checkpoint self-describing: a teacher or a prediction run rebuilds the network from it alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import DynUNet

from medjdt.models.specs import check_spec, instantiate

__all__ = ["build_network", "network_channels", "deep_supervision_heads"]

_SHORT_PREFIX = "monai.networks.nets"


def build_network(spec: Mapping[str, Any]) -> torch.nn.Module:
    """Instantiate the network described by ``spec`` (``{"class_path": ..., "init_args": {...}}``).

    Raises:
        ValueError: unknown class, a class that is not an ``nn.Module``, or arguments it rejects.
    """
    return instantiate(spec, torch.nn.Module, "network", short_prefix=_SHORT_PREFIX)


def network_channels(spec: Mapping[str, Any]) -> tuple[int, int, int | None]:
    """Return ``(in_channels, out_channels, spatial_dims)`` declared by a network spec.

    ``spatial_dims`` is None for networks that do not take it (e.g. UNETR infers it from ``img_size``).

    Raises:
        ValueError: the spec does not declare ``in_channels``/``out_channels``.
    """
    class_path, init_args = check_spec(spec, "network")
    missing = [k for k in ("in_channels", "out_channels") if k not in init_args]
    if missing:
        raise ValueError(f"network {class_path}: init_args must set {missing} explicitly")
    dims = init_args.get("spatial_dims")
    return int(init_args["in_channels"]), int(init_args["out_channels"]), None if dims is None else int(dims)


def deep_supervision_heads(network: torch.nn.Module, output: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Split a training-mode forward output into the main logits and the low-resolution head logits.

    MONAI's ``DynUNet(deep_supervision=True)`` returns, in training mode, the main output stacked with
    every head *upsampled by nearest interpolation* to full size: ``(B, 1 + H, C, *spatial)``. Training a soft
    target against nearest-upsampled logits is wrong at the boundaries, so the raw head outputs (still at
    their own resolution, ``(B, C, *spatial_h)``) are taken from ``network.heads`` instead; the caller
    downsamples the soft target to each head with area interpolation.

    Args:
        network: the network that produced ``output``.
        output: ``(B, C, *spatial)`` for plain networks, ``(B, 1 + H, C, *spatial)`` for deep supervision.

    Returns:
        ``(logits, heads)`` with ``logits`` of shape ``(B, C, *spatial)`` and ``heads`` a list (possibly empty)
        of ``(B, C, *spatial_h)`` tensors, finest first.
    """
    if isinstance(network, DynUNet) and network.deep_supervision and network.training:
        if output.dim() < 4 or output.shape[1] != 1 + network.deep_supr_num:
            raise ValueError(f"unexpected deep-supervision output shape {tuple(output.shape)}")
        return output[:, 0], list(network.heads)
    return output, []
