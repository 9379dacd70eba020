"""MONAI dictionary transforms that build the training target from rater masks.

Typical pipeline::

    LoadImaged(keys=["image", "raters"]) -> ... joint spatial augmentation (nearest for raters) ...
    -> FuseRatersd(method="mean", num_classes=C) -> SmoothLabelsd(epsilon=0.1)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from monai.utils import MAX_SEED
from monai.utils.type_conversion import convert_to_dst_type

from medjdt.labels._checks import as_tensor, check_num_classes, check_weights
from medjdt.labels.fusion import FUSION_METHODS, fuse
from medjdt.labels.smoothing import check_smoothing_args, smooth_labels
from medjdt.validation import check_choice


def _like(result: torch.Tensor, source: Any) -> torch.Tensor:
    """Return ``result`` as a MetaTensor carrying ``source``'s metadata when ``source`` is one."""
    if isinstance(source, MetaTensor):
        return convert_to_dst_type(result, dst=source, dtype=torch.float32)[0]
    return result


class FuseRatersd(MapTransform, Randomizable):
    """Fuse the rater label maps under ``keys`` into a soft target stored under ``output_key``.

    Input ``d[keys]``: integer labels ``(R, *spatial)`` (numpy array, tensor or ``MetaTensor``; e.g. ``R`` masks
    loaded and concatenated along the channel dim). Output ``d[output_key]``: ``(C, *spatial)`` float32 tensor; a
    ``MetaTensor`` with the raters' metadata (affine, ...) when the input is one. The raters key is kept.

    Method ``"random"`` draws a rater with this transform's random state ``R`` on every call, so
    ``set_random_state`` (as MONAI's ``DataLoader`` worker seeding does) makes the draws reproducible. The
    transform is ``Randomizable`` for every method, so a ``CacheDataset`` stops caching at it. ``"staple"`` runs
    SimpleITK's iterative STAPLE, which is far slower than the other methods and estimates every rater's
    sensitivity/specificity from the voxels it is given: run it once per whole case (and cache the result)
    rather than on every training patch.

    Args:
        keys: key of the rater stack; exactly one.
        method: one of ``FUSION_METHODS`` (see :func:`medjdt.labels.fuse`).
        num_classes: number of classes ``C >= 2``.
        output_key: key for the fused target; must differ from ``keys``.
        seed: optional seed for the random state.
        weights: explicit rater weights for ``method="weighted"``.
        allow_missing_keys: skip samples that lack the raters key instead of raising ``KeyError``.

    Raises:
        ValueError: not exactly one key, ``output_key`` equal to it, unknown method, bad ``num_classes`` or
            weights (at construction); bad rater maps (at call time, see :func:`medjdt.labels.fuse`).
    """

    def __init__(
        self,
        keys: KeysCollection = "raters",
        method: str = "mean",
        *,
        num_classes: int,
        output_key: str = "label",
        seed: int | None = None,
        weights: Any = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"FuseRatersd takes exactly one raters key, got {self.keys}")
        if output_key in self.keys:
            raise ValueError(f"output_key {output_key!r} must differ from the raters key (the raters are kept)")
        check_choice("method", method, FUSION_METHODS, where="FuseRatersd")
        if weights is not None:
            if method != "weighted":
                raise ValueError(f"weights only apply to method='weighted', got method={method!r}")
            check_weights(weights)
        self.method = method
        self.num_classes = check_num_classes(num_classes)
        self.output_key = output_key
        self.weights = weights
        self._generator = torch.Generator()
        if seed is not None:
            self.set_random_state(seed=seed)

    def randomize(self, data: Any = None) -> None:
        """Draw the seed of this call's rater choice from ``self.R``."""
        self._generator.manual_seed(int(self.R.randint(MAX_SEED)))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add the fused ``(C, *spatial)`` float32 target to a copy of ``data``."""
        d = dict(data)
        for key in self.key_iterator(d):
            generator = None
            if self.method == "random":
                self.randomize()
                generator = self._generator
            fused = fuse(d[key], self.method, self.num_classes, weights=self.weights, generator=generator)
            d[self.output_key] = _like(fused, d[key])
        return d


class SmoothLabelsd(MapTransform):
    """Label smoothing of the soft targets ``(C, *spatial)`` under ``keys`` (see :func:`medjdt.labels.smooth_labels`).

    The result replaces the input as a ``(C, *spatial)`` float32 tensor, a ``MetaTensor`` with the same metadata
    when the input is one.

    Args:
        keys: keys of the targets to smooth.
        epsilon: smoothing strength in [0, 1].
        mode: ``"uniform"`` or ``"boundary"``.
        kernel_size: odd neighbourhood size for boundary mode.
        allow_missing_keys: skip missing keys instead of raising ``KeyError``.

    Raises:
        ValueError: bad epsilon, mode or kernel size (at construction); targets that are not soft ``(C, *spatial)``
            maps summing to 1 (at call time).
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        epsilon: float = 0.1,
        mode: str = "uniform",
        kernel_size: int = 3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.epsilon, self.kernel_size = check_smoothing_args(epsilon, mode, kernel_size)
        self.mode = mode

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace each target in a copy of ``data`` by its smoothed version."""
        d = dict(data)
        for key in self.key_iterator(d):
            target = as_tensor(d[key], repr(key))
            if not target.is_floating_point():
                raise ValueError(f"{key!r} must hold a floating soft target (C, *spatial), got dtype {target.dtype}")
            smoothed = smooth_labels(target[None], self.epsilon, self.mode, self.kernel_size)[0]
            d[key] = _like(smoothed, d[key])
        return d
