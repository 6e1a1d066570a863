"""build_dataset: one entry point for every supported layout."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from memkd.data.categories import category_dir, check_dataset_name
from memkd.data.dataset import AnomalyDataset
from memkd.data.layouts import (
    SPLITS,
    eyecandies_samples,
    folder_mask_root,
    folder_samples,
    mvtec3d_samples,
    mvtec_samples,
    require_dir,
    visa_samples,
)
from memkd.data.transforms import ImageSize

PathLike = Union[str, Path]


def build_dataset(
    name: str,
    root: PathLike,
    category: Optional[str] = None,
    split: str = "train",
    image_size: ImageSize = 256,
    native_masks: bool = False,
    mask_dir: Optional[PathLike] = None,
    mask_suffix: str = "_mask",
    eyecandies_light: int = 4,
    full_resolution: bool = False,
) -> AnomalyDataset:
    """The ``split`` ("train" or "test") of ``category`` of dataset ``name`` stored under ``root``.

    name: mvtec, mpdd, visa, mvtec3d, eyecandies or folder. For "folder", ``category`` is a sub-folder
    of ``root`` or None for ``root`` itself; ``mask_dir`` (default <dataset>/ground_truth when it
    exists) holds <defect>/<stem><mask_suffix>.<ext>; without masks the dataset has
    ``has_masks=False``. ``eyecandies_light`` picks the lighting <id>_image_<light>.png.
    ``full_resolution``: images and masks at their own resolution (``AnomalyDataset``; tiled models).
    Raises DatasetError (a ValueError) naming the path when the data does not match the layout.
    """
    check_dataset_name(name)
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    root = require_dir(Path(root), f"{name} dataset root")
    has_masks = True
    if name == "folder":
        dataset_dir = root if category is None else category_dir(name, root, category)
        samples = folder_samples(dataset_dir, split, mask_dir, mask_suffix)
        has_masks = folder_mask_root(dataset_dir, mask_dir) is not None
    elif category is None:
        raise ValueError(f"category: required for the {name} dataset")
    elif name == "visa":
        samples = visa_samples(root, category, split)
    elif name == "eyecandies":
        samples = eyecandies_samples(category_dir(name, root, category), split, eyecandies_light)
    elif name == "mvtec3d":
        samples = mvtec3d_samples(category_dir(name, root, category), split)
    else:  # mvtec and mpdd share a layout
        samples = mvtec_samples(category_dir(name, root, category), split)
    description = f"{name} {category or root.name} {split}"
    return AnomalyDataset(samples, image_size, native_masks, has_masks, description, full_resolution)
