"""What a training step reads: image batches from dataset items, and NEL's exemplar sets (drawn
per step, deterministically) with the cache of their teacher features."""
from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from memkd.models import MemKD


def image_of(item: Any) -> torch.Tensor:
    """The image tensor of a dataset item or a collated batch: a tensor, a dict with "image", or an
    (image, ...) tuple."""
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, Mapping) and isinstance(item.get("image"), torch.Tensor):
        return item["image"]
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    raise TypeError(
        "training data: expected image tensors, dicts with an 'image' tensor or (image, ...) tuples, "
        f"got {type(item).__name__}"
    )


def collate_images(items: list[Any]) -> torch.Tensor:
    """Stack the images of dataset items into a batch, dropping everything else (labels, paths)."""
    return torch.stack([image_of(item) for item in items])


class ExemplarBatches(Sampler[list[int]]):
    """The exemplar set of every step from ``start_step`` on, as dataset indices for this rank.

    Step s draws ``per_rank * world_size`` distinct indices (with replacement only when the dataset
    is smaller) from a generator seeded by (seed, s), the same on every rank, and rank r takes the
    r-th slice: the ranks together hold one exemplar set of N images, as a single process would
    (N is rounded up to a multiple of the process count). Stateless per step, so resuming at step s
    continues the same sequence.
    """

    def __init__(
        self, dataset_size: int, exemplars: int, seed: int, rank: int = 0, world_size: int = 1, start_step: int = 0,
        draw_keys: bool = False,
    ):
        if dataset_size < 1:
            raise ValueError("training data: the dataset is empty; exemplars cannot be drawn")
        self.dataset_size, self.seed, self.rank, self.world_size = dataset_size, seed, rank, world_size
        self.draw_keys = draw_keys  # keys of draw 2 * step + 1 (memkd.data.tiles) instead of indices
        self.per_rank = math.ceil(exemplars / world_size)
        self.start_step = start_step

    def indices(self, step: int) -> list[int]:
        total = self.per_rank * self.world_size
        seed = int(np.random.SeedSequence([self.seed, step]).generate_state(1, np.uint64)[0]) >> 1
        generator = torch.Generator().manual_seed(seed)
        if self.dataset_size >= total:
            chosen = torch.randperm(self.dataset_size, generator=generator)[:total]
        else:
            chosen = torch.randint(self.dataset_size, (total,), generator=generator)
        chosen = chosen[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        if self.draw_keys:
            chosen = chosen + (2 * step + 1) * self.dataset_size
        return chosen.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.indices(step)
            step += 1


class DrawKeyedSampler(DistributedSampler):
    """``DistributedSampler`` whose indices of epoch e are keys of draw ``2 * e`` of a dataset with
    ``draw_keys`` (``memkd.data.tiles.TileCrops``): a fresh random tile of every image per epoch."""

    def __iter__(self) -> Iterator[int]:
        offset = 2 * self.epoch * len(self.dataset)
        return (index + offset for index in super().__iter__())


class ExemplarFeatureCache:
    """NEL's teacher features (``MemKD.exemplar_features``) of exemplar images by dataset index.

    An image's features never change (frozen teacher, no augmentation), so each is computed once, on
    its first draw. Images are encoded one at a time so that an image's cached features do not depend
    on which other images were drawn with it: a resumed or distributed run caches the same values.
    """

    def __init__(self, model: MemKD):
        self.model = model
        self.entries: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def missing(self, indices: list[int]) -> list[int]:
        """The indices, in order and without repeats, whose features are not cached yet."""
        return [index for index in dict.fromkeys(indices) if index not in self.entries]

    def add(self, indices: list[int], images: torch.Tensor) -> None:
        """Encode and keep the features of those ``images`` [N, 3, H, W] (dataset items ``indices``)
        that are not cached yet."""
        if len(indices) != images.shape[0]:
            raise ValueError(f"indices: expected one per exemplar image ({images.shape[0]}), got {len(indices)}")
        for row, index in enumerate(indices):
            if index not in self.entries:
                encoded = self.model.exemplar_features(images[row : row + 1])
                self.entries[index] = {key: f[0] for key, f in encoded.items()}

    def features(self, indices: list[int], images: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """The features of the dataset items ``indices`` by memory key, after adding ``images`` (the
        items ``indices``, when given)."""
        if images is not None:
            self.add(indices, images)
        uncached = self.missing(indices)
        if uncached:
            raise KeyError(f"indices: no cached features for dataset items {uncached}; pass their images")
        return {key: torch.stack([self.entries[index][key] for index in indices]) for key in self.model.memories}


class UncachedExemplars(Sampler[list[int]]):
    """Each step's exemplar indices that ``cache`` still lacks (possibly none): what the exemplar
    loader must read. Drawn ahead of use by a prefetching loader, a list may hold an index cached
    meanwhile; the cache then keeps its first features."""

    def __init__(self, batches: ExemplarBatches, cache: ExemplarFeatureCache):
        self.batches, self.cache = batches, cache

    def __iter__(self) -> Iterator[list[int]]:
        return (self.cache.missing(indices) for indices in self.batches)


class IndexedItems(Dataset):
    """``dataset`` with each item returned as (index, item), so that a loaded batch says which items it holds."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


def collate_indexed_images(items: list[tuple[int, Any]]) -> tuple[list[int], Optional[torch.Tensor]]:
    """(indices, stacked images) of ``IndexedItems`` items; None for the images of an empty batch."""
    return [index for index, _ in items], collate_images([item for _, item in items]) if items else None
