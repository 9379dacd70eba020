"""Whole-case rater fusion, computed once per case on the preprocessed grid and cached on disk.

STAPLE estimates every rater's sensitivity and specificity, and the ``weighted`` method every rater's weight
(Dice against the majority vote), from the voxels they are given. Run on a training patch (often almost all
background or almost all organ), those estimates are poor and change from patch to patch; run on the whole
case they are what the methods are meant to estimate. STAPLE is also the slowest fusion method. So these
methods run once per case (the first time a case is loaded) and the target is stored next to the preprocessed
case, under its own settings digest: other fusion methods neither compute nor invalidate it. The training
chain then crops and augments this soft target together with the image.

The pointwise methods (``mean``, ``majority``) give the same target per patch as per case, and ``random`` must
draw a new rater per patch and epoch, so those still fuse per patch (see :mod:`medjdt.data.transforms`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from medjdt.data.cache import CaseCache, PreprocessedCases
from medjdt.data.manifest import CaseRecord
from medjdt.labels import fuse
from medjdt.labels.staple import MAX_ITERATIONS
from medjdt.validation import check_choice

CASE_FUSION_METHODS = ("staple", "weighted")
TARGET_SCHEMA: dict[str, type] = {"label": torch.Tensor, "case_id": str, "checksums": dict}


class CaseFusedTargets:
    """Callable that turns a labelled :class:`CaseRecord` into a preprocessed case plus its whole-case fused target.

    Returns the dict of ``cases`` (see :func:`medjdt.data.cache.from_payload`) with one more key, ``"label"``:
    the fused soft target ``(C, *spatial)`` float32 of the preprocessed raters ``(R, *spatial)``, computed with
    ``medjdt.labels.fuse(raters, method, num_classes)`` on the first call for a case and read from the cache
    afterwards (in this and later processes).

    Args:
        cases: loader of the preprocessed cases; its settings, classes and dims key the cached targets.
        method: one of ``CASE_FUSION_METHODS``.
        cache_dir: cache root (the one ``cases`` uses), or ``None`` to fuse on every call.

    ``fused`` counts the cases this object fused (cache misses) in this process.

    Raises:
        ValueError: unknown ``method`` (at construction); an unlabelled record (at call time).
    """

    def __init__(self, cases: PreprocessedCases, method: str = "staple", cache_dir: str | os.PathLike | None = None):
        check_choice("method", method, CASE_FUSION_METHODS, where="whole-case fusion")
        self.cases = cases
        self.method = method
        # target_format: bump when the fusion code changes what it returns for the same raters.
        key = {**cases.key, "content": "fused target", "method": method, "target_format": 1}
        if method == "staple":
            key["staple_max_iterations"] = MAX_ITERATIONS
        self.cache = CaseCache(cache_dir, key, schema=TARGET_SCHEMA) if cache_dir is not None else None
        self.fused = 0

    def __call__(self, record: CaseRecord) -> dict[str, Any]:
        """The preprocessed case of ``record`` with its fused target under ``"label"``."""
        if not record.labelled:
            raise ValueError(f"case {record.case_id!r} has no annotations to fuse")
        case = self.cases(record)
        expected = (self.cases.num_classes, *case["raters"].shape[1:])
        payload = self.cache.read(record) if self.cache is not None else None
        if payload is not None and tuple(payload["label"].shape) != expected:
            self.cache.discard(record, f"target shape {list(payload['label'].shape)}, raters need {list(expected)}")
            payload = None
        if payload is None:
            self.fused += 1
            target = fuse(case["raters"], self.method, self.cases.num_classes)
            payload = {"label": target.contiguous(), "case_id": record.case_id, "checksums": {}}
            if self.cache is not None:
                self.cache.write(record, payload)
        return {**case, "label": payload["label"]}
