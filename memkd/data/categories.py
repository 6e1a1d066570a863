"""The categories of each dataset, as published and as found on disk."""
from __future__ import annotations

from pathlib import Path

from memkd.data.errors import DatasetError
from memkd.data.layouts import read_visa_rows, require_dir, visible_entries

DATASET_CATEGORIES = {
    "mvtec": (
        "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
        "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
    ),
    "mpdd": ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"),
    "visa": (
        "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
        "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
    ),
    "mvtec3d": (
        "bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire",
    ),
    "eyecandies": (
        "CandyCane", "ChocolateCookie", "ChocolatePraline", "Confetto", "GummyBear",
        "HazelnutTruffle", "LicoriceSandwich", "Lollipop", "Marshmallow", "PeppermintCandy",
    ),
    "folder": (),  # user data: categories are whatever folders hold a dataset
}
DATASET_NAMES = tuple(DATASET_CATEGORIES)

# The folder whose presence marks a category directory, per layout.
_CATEGORY_MARKERS = {
    "mvtec": "train",
    "mpdd": "train",
    "mvtec3d": "train",
    "eyecandies": "train",
    "folder": "train/good",
}


def check_dataset_name(name: str) -> str:
    if name not in DATASET_CATEGORIES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    return name


def known_categories(name: str) -> tuple[str, ...]:
    """The published categories of a dataset (empty for "folder")."""
    return DATASET_CATEGORIES[check_dataset_name(name)]


def discover_categories(name: str, root) -> list[str]:
    """The categories present under ``root``, sorted: for VisA the objects its split csv lists, else
    the sub-folders holding a train folder (for "folder", train/good). Unknown names count too (a
    custom category in MVTec layout is fine); a root that is itself a folder dataset is not listed
    (use category None for it)."""
    check_dataset_name(name)
    root = require_dir(Path(root), f"{name} dataset root")
    if name == "visa":
        return sorted({row["object"] for _, row in read_visa_rows(root)})
    marker = _CATEGORY_MARKERS[name]
    return [entry.name for entry in visible_entries(root) if (entry / marker).is_dir()]


def category_dir(name: str, root: Path, category: str) -> Path:
    """<root>/<category>, or a DatasetError listing the categories that are there."""
    path = root / category
    if not path.is_dir():
        found = discover_categories(name, root)
        raise DatasetError(f"category {category!r} not found: {path} (categories under {root}: {found})")
    return path
