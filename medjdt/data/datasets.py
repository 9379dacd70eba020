"""Datasets of cases for the data module, with per-sample random streams that do not depend on the workers.

A training item is requested as ``(epoch, position, index)`` by :class:`EpochSampler`; :class:`CaseDataset` seeds
the random transforms (patch sampling, augmentation, random-rater fusion) of that item from
``(seed, epoch, position, index)`` before applying them. The patches of a given seed are thus the same whether the
DataLoader uses 0 or 8 worker processes, and a resumed run draws the patches of its epochs as the uninterrupted run
would have. Worker processes ignore SIGINT and SIGTERM: the main process stops training cleanly, then stops them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import Dataset, MetaTensor
from monai.data.utils import worker_init_fn as monai_worker_init_fn
from monai.transforms import Compose, apply_transform
from torch.utils.data import Sampler

from medjdt.data.cache import CaseCache, PreprocessedCases, from_payload, to_payload
from medjdt.data.io import read_image
from medjdt.data.manifest import CaseRecord
from medjdt.data.preprocess import PreprocessSettings, preprocess_case

__all__ = ["CaseDataset", "CaseLoader", "EpochSampler", "UnlabelledCases", "stop_data_workers", "worker_init"]


def item_seed(seed: int, epoch: int, position: int, index: int) -> int:
    """The seed of one training item, a function of the run's seed, the epoch, the draw and the case only."""
    return int(np.random.SeedSequence([seed, epoch, position, index]).generate_state(1, dtype=np.uint32)[0])


class EpochSampler(Sampler):
    """Yields ``(epoch, position, index)`` triples: a seeded shuffle (or ``num_samples`` draws) per epoch.

    Args:
        size: number of items in the dataset.
        seed: seeds the order of every epoch (together with the epoch number).
        shuffle: a new permutation each epoch; otherwise ``0..size-1`` in order.
        num_samples: draws per epoch (default ``size``); more than ``size`` chains several permutations, so every
            item is drawn as evenly as possible.

    Lightning calls :meth:`set_epoch` at the start of each epoch (also after resuming); iterating without it
    advances the epoch by one per pass.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, num_samples: int | None = None):
        if size < 1:
            raise ValueError(f"EpochSampler needs at least one item, got {size}")
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.num_samples = size if num_samples is None else int(num_samples)
        self.epoch = 0
        self._epoch_set = False

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass."""
        self.epoch = int(epoch)
        self._epoch_set = True

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch = self.epoch
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False
        rng = np.random.default_rng([self.seed, epoch])
        order: list[int] = []
        while len(order) < self.num_samples:
            order += (rng.permutation(self.size) if self.shuffle else np.arange(self.size)).tolist()
        for position, index in enumerate(order[: self.num_samples]):
            yield epoch, position, index


class CaseDataset(Dataset):
    """A MONAI ``Dataset`` of cases: each item is ``transform(load(record))``.

    Args:
        records: the cases.
        load: callable ``CaseRecord -> dict`` (a :class:`CaseLoader`, or for whole-case fusion a
            :class:`~medjdt.data.case_fusion.CaseFusedTargets`).
        transform: applied to the loaded case (may return a list of patches).
        seed: with an ``(epoch, position, index)`` item key (from :class:`EpochSampler`), the transform's random
            state is set from ``(seed, epoch, position, index)`` first; a plain integer index leaves it alone.
    """

    def __init__(self, records: Sequence[CaseRecord], load: Callable[[CaseRecord], dict], transform: Compose,
                 seed: int = 0):
        super().__init__(data=list(records), transform=transform)
        self.load = load
        self.seed = seed

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple) and len(key) == 3:
            epoch, position, index = (int(k) for k in key)
            self.transform.set_random_state(seed=item_seed(self.seed, epoch, position, index))
            return self._transform(index)
        return super().__getitem__(key)

    def _transform(self, index: int) -> Any:
        return apply_transform(self.transform, self.load(self.data[index]))


def worker_init(worker_id: int) -> None:
    """DataLoader worker start-up: MONAI's per-worker seeding, and SIGINT/SIGTERM left to the main process.

    A scheduler's SIGTERM and a terminal's Ctrl-C reach every process of the job; a worker that died of them would
    make the main process fail with "DataLoader worker exited unexpectedly" before it could stop cleanly. Since
    the workers then also ignore the SIGTERM by which Python's exit would end them, a process that stops early
    calls :func:`stop_data_workers` first.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    monai_worker_init_fn(worker_id)


def stop_data_workers(timeout: float = 5.0) -> int:
    """Kill this process's worker processes (DataLoader workers ignore SIGTERM, see :func:`worker_init`); returns
    how many there were. Call it only when no DataLoader will be iterated again, e.g. before exiting."""
    children = multiprocessing.active_children()
    if children and threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler would raise "DataLoader worker is killed" in the middle of this
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout)
    return len(children)


class UnlabelledCases:
    """Callable that turns an unlabelled :class:`CaseRecord` into a preprocessed image, through the disk cache.

    The image goes through the same preprocessing as labelled cases (:func:`preprocess_case`). Returns
    ``{"image": MetaTensor (K, *spatial) float32, "case_id": str}`` with the same meta as
    :func:`medjdt.data.cache.from_payload` (so predictions map back to the stored grid).

    Args:
        spatial_dims: 2 or 3.
        settings: the preprocessing settings.
        cache_dir: cache root, or ``None`` to preprocess on every call.
        in_channels: the image channels ``K`` the manifest declares; an image with another count is an error.
    """

    def __init__(self, spatial_dims: int, settings: PreprocessSettings, cache_dir: str | os.PathLike | None,
                 in_channels: int | None = None):
        settings.check_dims(spatial_dims)
        self.spatial_dims = spatial_dims
        self.settings = settings
        self.in_channels = in_channels
        key = {**settings.key(), "spatial_dims": spatial_dims, "cache_format": 1, "content": "unlabelled image"}
        self.cache = CaseCache(cache_dir, key) if cache_dir is not None else None

    def __call__(self, record: CaseRecord) -> dict[str, Any]:
        """Load and preprocess the image of ``record`` (which must have no annotation), or read it from the cache."""
        if record.labelled:
            raise ValueError(f"case {record.case_id!r} is labelled; load it with PreprocessedCases")
        payload = self.cache.read(record) if self.cache is not None else None
        if payload is None:
            image = read_image(record.image, case_id=record.case_id, spatial_dims=self.spatial_dims,
                               in_channels=self.in_channels)
            # preprocess_case moves an image and its rater masks together; an all-background placeholder mask
            # runs that same chain and is dropped afterwards, leaving zero raters.
            placeholder = MetaTensor(torch.zeros((1, *image.shape[1:]), dtype=torch.uint8), affine=image.affine)
            case = {"image": image, "raters": placeholder, "case_id": record.case_id, "rater_names": []}
            case = preprocess_case(case, self.settings, self.spatial_dims)
            case["raters"] = torch.zeros((0, *case["image"].shape[1:]), dtype=torch.uint8)
            payload = to_payload(case)
            if self.cache is not None:
                self.cache.write(record, payload)
        case = from_payload(payload)
        return {"image": case["image"], "case_id": case["case_id"]}


class CaseLoader:
    """Callable ``CaseRecord -> dict``: labelled cases through ``labelled``, unlabelled ones through ``unlabelled``."""

    def __init__(self, labelled: PreprocessedCases, unlabelled: UnlabelledCases):
        self.labelled = labelled
        self.unlabelled = unlabelled

    def __call__(self, record: CaseRecord) -> dict[str, Any]:
        return self.labelled(record) if record.labelled else self.unlabelled(record)
