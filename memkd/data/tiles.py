"""Training tiles of full-resolution images, for tiled models (``MemKDConfig.tile_stride``).

``TileCrops`` reads each image at its own resolution and returns one ``tile``-sized crop of it (no
resize), at a position drawn from (seed, draw, image index): a different random tile of every image
in every epoch, reproducible across runs, processes and resumes. The draw is part of the item key
(``key = draw * len(dataset) + index``; ``tile_key``), so that the data loader's workers need no
shared state: memkd's trainer keys the training items of epoch e with draw ``2e`` and NEL's
exemplar set of step s with draw ``2s + 1`` (``memkd.train``), so exemplars are tiles drawn the
same way, never the training tile of the same epoch. Keys below ``len(dataset)`` (draw 0) are
plain indices, so that checking the files (``check_files``) reads every image once.

An image smaller than the tile in either dimension is an error naming the file: padding would show
the model content that is not there, and a smaller tile (``image_size``) is one option away.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from memkd.data.dataset import AnomalyDataset, Sample
from memkd.data.errors import DatasetError
from memkd.data.transforms import ImageSize, full_resolution_tensor, read_image


def tile_key(index: int, draw: int, size: int) -> int:
    """The item key of tile draw ``draw`` of image ``index`` in a ``TileCrops`` of ``size`` images."""
    return draw * size + index


class TileCrops(AnomalyDataset):
    """Items are dicts with ``image`` float32 [3, T_h, T_w] (ImageNet-normalised, a crop of the
    full-resolution image), ``label``, ``path`` and ``defect``, as ``AnomalyDataset``'s training
    items; ``origin`` is the crop's (y, x). ``draw_keys`` tells memkd's trainer that keys carry
    the draw (module docstring)."""

    draw_keys = True

    def __init__(self, samples: Sequence[Sample], tile: ImageSize, seed: int = 0, description: str = ""):
        super().__init__(samples, tile, native_masks=False, has_masks=False, description=description)
        self.seed = int(seed)

    @classmethod
    def of(cls, dataset: AnomalyDataset, seed: int = 0) -> "TileCrops":
        """The tiles of ``dataset``'s images at its ``image_size`` (the model's tile)."""
        return cls(dataset.samples, dataset.image_size, seed, f"{dataset.description} (tiles)")

    def origin(self, index: int, draw: int, height: int, width: int) -> tuple[int, int]:
        """The (y, x) of draw ``draw``'s tile in image ``index`` of height x width."""
        th, tw = self.image_size
        state = np.random.SeedSequence([self.seed, draw, index]).generate_state(2, np.uint64)
        return int(state[0] % np.uint64(height - th + 1)), int(state[1] % np.uint64(width - tw + 1))

    def __getitem__(self, key: int) -> dict:
        key = int(key)
        if key < 0:
            raise IndexError(f"tile key: expected >= 0, got {key}")
        draw, index = divmod(key, len(self))
        sample = self.samples[index]
        image = read_image(sample.image_path)
        th, tw = self.image_size
        if image.height < th or image.width < tw:
            raise DatasetError(
                f"image {sample.image_path} is {image.width}x{image.height}, smaller than the tile {tw}x{th} "
                "(--image-size); pass a smaller tile or untiled training"
            )
        y, x = self.origin(index, draw, image.height, image.width)
        pixels = full_resolution_tensor(image.crop((x, y, x + tw, y + th)))
        return {
            "image": pixels,
            "label": sample.label,
            "path": str(sample.image_path),
            "defect": sample.defect,
            "origin": torch.tensor((y, x)),
        }

    def __repr__(self) -> str:
        th, tw = self.image_size
        return f"TileCrops({self.description}: {len(self)} images, random {th}x{tw} tiles, seed {self.seed})"
