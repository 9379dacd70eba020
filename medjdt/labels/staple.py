"""STAPLE fusion of rater label maps with SimpleITK.

Binary tasks (``C = 2``) use ``SimpleITK.STAPLE`` on the foreground masks; its per-voxel foreground
probability ``p`` gives the target ``[1 - p, p]``.

Multi-class tasks run binary STAPLE once per class (class ``c`` against the rest) and renormalise the
``C`` probabilities per voxel. ``MultiLabelSTAPLE`` was not used because SimpleITK only returns its hard
label map, which would throw away the rater uncertainty that a soft target is meant to carry.
Where the one-vs-rest estimates contradict each other so that every class gets probability 0 (seen on tiny,
unstructured masks, where some rater's sensitivity or specificity converges to exactly 1), the voxel's target
is the raters' mean (the fraction of raters voting for each class).

STAPLE runs at most ``MAX_ITERATIONS`` EM iterations. Masks with real structure converge in tens of
iterations; unstructured ones (e.g. label noise) can need 10^5 iterations, which would stall a data loader.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

MAX_ITERATIONS = 1000


def staple_foreground(masks: np.ndarray) -> np.ndarray:
    """STAPLE foreground probability of binary rater masks.

    Args:
        masks: bool ``(R, *spatial)``.

    Returns:
        float64 ``(*spatial)`` in [0, 1]. When no rater marks any voxel (or every rater marks every voxel)
        STAPLE's sensitivity/specificity are undefined (SimpleITK returns NaN); the unanimous answer, 0 (or 1),
        is returned instead.

    Raises:
        RuntimeError: SimpleITK returned non-finite probabilities in any other case.
    """
    if not masks.any():
        return np.zeros(masks.shape[1:], dtype=np.float64)
    if masks.all():
        return np.ones(masks.shape[1:], dtype=np.float64)
    images = [sitk.GetImageFromArray(m.astype(np.uint8)) for m in masks]
    probability = sitk.GetArrayFromImage(sitk.STAPLE(images, 1.0, 1.0, MAX_ITERATIONS))
    if not np.isfinite(probability).all():
        raise RuntimeError(f"SimpleITK STAPLE returned non-finite probabilities for masks of shape {masks.shape}")
    return probability


def staple_probabilities(stack: torch.Tensor, num_classes: int) -> torch.Tensor:
    """STAPLE soft target of a validated label stack.

    Args:
        stack: integer labels ``(R, *spatial)`` in ``[0, num_classes)``, 2 or 3 spatial dims.
        num_classes: number of classes ``C >= 2``.

    Returns:
        float32 ``(C, *spatial)`` on the device of ``stack``, summing to 1 over ``C``; multi-class voxels where
        every one-vs-rest probability is 0 hold the raters' mean instead.
    """
    labels = stack.cpu().numpy()
    if num_classes == 2:
        foreground = staple_foreground(labels == 1)
        probabilities = np.stack([1.0 - foreground, foreground])
    else:
        votes = np.stack([labels == c for c in range(num_classes)])
        probabilities = np.stack([staple_foreground(v) for v in votes])
        total = probabilities.sum(axis=0)
        undefined = total <= 0
        probabilities = np.where(undefined, votes.mean(axis=1), probabilities / np.where(undefined, 1.0, total))
    return torch.from_numpy(probabilities.astype(np.float32)).to(stack.device)
