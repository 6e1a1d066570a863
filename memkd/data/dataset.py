"""The dataset all layouts share: a list of indexed samples, loaded and transformed on access."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from memkd.data.errors import DatasetError
from memkd.data.transforms import ImageSize, as_size, full_resolution_tensor, image_to_tensor, mask_to_tensor, read_image, read_mask

GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One image of a split, as found by a layout's indexer."""

    image_path: Path
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" for normal images
    mask_path: Optional[Path] = None  # None: an all-zero mask (normal image, or a layout without masks)


class AnomalyDataset(Dataset):
    """Items are dicts with
    ``image`` float32 [3, H, W] (ImageNet-normalised), ``mask`` uint8 {0, 1} [1, H, W],
    ``label`` int, ``path`` str, ``defect`` str, and with ``native_masks=True`` also
    ``mask_native`` uint8 {0, 1} [1, h, w] at the image file's own resolution.

    ``has_masks`` is False for a folder dataset without ground truth: its masks are all zero and
    pixel metrics must not be computed from them.

    ``full_resolution=True`` (the test images of a tiled model, ``memkd.tiling``): ``image`` is the
    file's own resolution, not resized, and ``mask`` is the native mask [1, h, w] of that size.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: ImageSize = 256,
        native_masks: bool = False,
        has_masks: bool = True,
        description: str = "",
        full_resolution: bool = False,
    ):
        if not samples:
            raise DatasetError(f"no images found for {description or 'this dataset'}")
        self.samples = list(samples)
        self.image_size = as_size(image_size)
        self.native_masks = native_masks
        self.has_masks = has_masks
        self.description = description
        self.full_resolution = full_resolution

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [sample.label for sample in self.samples]

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = read_image(sample.image_path)
        item = {
            "image": full_resolution_tensor(image) if self.full_resolution else image_to_tensor(image, self.image_size),
            "label": sample.label,
            "path": str(sample.image_path),
            "defect": sample.defect,
        }
        native_shape = (image.height, image.width)
        if sample.mask_path is None:
            native_mask = np.zeros(native_shape, dtype=bool)
        else:
            native_mask = read_mask(sample.mask_path)
            if native_mask.shape != native_shape:
                raise DatasetError(
                    f"mask {sample.mask_path} is {native_mask.shape[1]}x{native_mask.shape[0]} but its "
                    f"image {sample.image_path} is {image.width}x{image.height}"
                )
        native = torch.from_numpy(native_mask.astype(np.uint8))[None]
        if self.full_resolution:
            item["mask"] = native
        elif sample.mask_path is None:
            item["mask"] = torch.zeros((1, *self.image_size), dtype=torch.uint8)
        else:
            item["mask"] = mask_to_tensor(native_mask, self.image_size)
        if self.native_masks:
            item["mask_native"] = native
        return item

    def check_files(self, workers: Optional[int] = None, progress: bool = False) -> None:
        """Load every item now (images and masks decoded, sizes checked), so that a bad file fails
        before training rather than when training reaches it; raises DatasetError naming the file.
        ``workers`` threads decode in parallel (None: ``default_workers()``)."""
        from tqdm.auto import tqdm

        threads = max(1, default_workers() if workers is None else workers)
        with ThreadPoolExecutor(threads) as pool:
            loads = pool.map(self.__getitem__, range(len(self)))
            for _ in tqdm(loads, total=len(self), desc=f"check {self.description}", unit="image", disable=not progress, leave=False):
                pass

    def __repr__(self) -> str:
        anomalous = sum(self.labels)
        return (
            f"AnomalyDataset({self.description}: {len(self)} images, {anomalous} anomalous, "
            f"size {self.image_size[0]}x{self.image_size[1]})"
        )


def collate_samples(items: list[dict]) -> dict:
    """Stacks tensors of equal shape (native masks of different sizes stay a list), labels become a
    tensor, strings a list."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            batch[key] = torch.stack(values)
        elif key == "label":
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch


def default_workers() -> int:
    """One loader process per available CPU core, at most 8 (enough to keep one GPU fed)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cores)


def make_loader(
    dataset: Dataset,
    batch_size: int = 16,
    shuffle: bool = False,
    workers: Optional[int] = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader that decodes in ``workers`` processes (default: ``default_workers()``; 0 loads in
    the calling process) and pins memory when CUDA is present."""
    workers = default_workers() if workers is None else workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate_samples,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
    )
