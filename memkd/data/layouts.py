"""Indexers: each turns one dataset layout on disk into a list of Samples, checking it on the way.

Nothing is skipped silently: a missing folder, an empty image folder, an unexpected file, an
anomalous image without its mask or a mask without its image raises DatasetError naming the path.
Hidden files (names starting with '.', e.g. .DS_Store) are the only entries ignored.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from memkd.data.dataset import GOOD, Sample
from memkd.data.errors import DatasetError
from memkd.data.transforms import read_mask

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
SPLITS = ("train", "test")


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}")
    return path


def visible_entries(directory: Path) -> list[Path]:
    return sorted(entry for entry in directory.iterdir() if not entry.name.startswith("."))


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(directory: Path, what: str) -> list[Path]:
    """The image files of a folder that must hold images and nothing else, sorted by name."""
    require_dir(directory, what)
    images = []
    for entry in visible_entries(directory):
        if not is_image_file(entry):
            raise DatasetError(f"unexpected {'folder' if entry.is_dir() else 'file'} in {what}: {entry}")
        images.append(entry)
    if not images:
        raise DatasetError(f"{what} is empty: {directory}")
    return images


def index_masks(directory: Path, suffix: str, what: str) -> dict[str, Path]:
    """The masks of a folder keyed by the stem of their image (the mask's stem minus ``suffix``)."""
    masks = {}
    for path in list_images(directory, what):
        if not path.stem.endswith(suffix):
            raise DatasetError(f"mask name does not end in {suffix!r}.<ext>: {path}")
        image_stem = path.stem[: len(path.stem) - len(suffix)]
        if image_stem in masks:
            raise DatasetError(f"two masks for image {image_stem!r}: {masks[image_stem]} and {path}")
        masks[image_stem] = path
    return masks


@dataclass(frozen=True)
class DefectTree:
    """The MVTec-like layout shared by MVTec AD, MPDD, MVTec 3D-AD and plain folders:

    train images  <root>/train/good/<image_subdir>/*
    test images   <root>/test/<defect>/<image_subdir>/*   (defect "good" is normal)
    masks         <mask_root>/<defect>/<mask_subdir>/<image stem><mask_suffix>.<ext>

    MVTec AD and MPDD: mask_root <root>/ground_truth, suffix "_mask". MVTec 3D-AD: image_subdir "rgb",
    mask_root <root>/test, mask_subdir "gt", no suffix. ``mask_root=None``: no ground truth.
    """

    root: Path
    image_subdir: str = ""
    mask_root: Optional[Path] = None
    mask_subdir: str = ""
    mask_suffix: str = "_mask"

    def samples(self, split: str) -> list[Sample]:
        if split == "train":
            train_dir = self.root / "train" / GOOD / self.image_subdir
            return [Sample(path, 0, GOOD) for path in list_images(train_dir, "training image folder")]
        return self.test_samples()

    def test_samples(self) -> list[Sample]:
        test_dir = require_dir(self.root / "test", "test folder")
        defects = []
        for entry in visible_entries(test_dir):
            if not entry.is_dir():
                raise DatasetError(f"unexpected file in test folder (expected one folder per defect): {entry}")
            defects.append(entry.name)
        if not defects:
            raise DatasetError(f"test folder has no defect folders: {test_dir}")
        if self.mask_root is not None:
            self.check_no_orphan_mask_folders(set(defects))
        samples = []
        for defect in defects:
            images = list_images(test_dir / defect / self.image_subdir, f"test image folder of {defect!r}")
            if defect == GOOD:
                samples += [Sample(path, 0, GOOD) for path in images]
            elif self.mask_root is None:
                samples += [Sample(path, 1, defect) for path in images]
            else:
                samples += self.with_masks(images, defect)
        return samples

    def check_no_orphan_mask_folders(self, defects: set[str]) -> None:
        require_dir(self.mask_root, "ground-truth folder")
        for entry in visible_entries(self.mask_root):
            if entry.name != GOOD and entry.name not in defects:
                raise DatasetError(f"masks without images: {entry} has no test folder of the same defect")

    def with_masks(self, images: list[Path], defect: str) -> list[Sample]:
        mask_dir = self.mask_root / defect / self.mask_subdir
        masks = index_masks(mask_dir, self.mask_suffix, f"mask folder of {defect!r}")
        samples = []
        for path in images:
            mask_path = masks.pop(path.stem, None)
            if mask_path is None:
                raise DatasetError(
                    f"anomalous image without mask: {path} (expected {mask_dir}/{path.stem}{self.mask_suffix}.png)"
                )
            samples.append(Sample(path, 1, defect, mask_path))
        if masks:
            image_stem, orphan = next(iter(masks.items()))
            raise DatasetError(f"mask without image: {orphan} (no {images[0].parent}/{image_stem}.*)")
        return samples


def mvtec_samples(category_dir: Path, split: str) -> list[Sample]:
    """MVTec AD and MPDD."""
    return DefectTree(category_dir, mask_root=category_dir / "ground_truth").samples(split)


def mvtec3d_samples(category_dir: Path, split: str) -> list[Sample]:
    """MVTec 3D-AD, RGB images and ground truth only (the xyz point clouds are not read)."""
    tree = DefectTree(category_dir, image_subdir="rgb", mask_root=category_dir / "test", mask_subdir="gt", mask_suffix="")
    return tree.samples(split)


def folder_mask_root(root: Path, mask_dir: Optional[Path]) -> Optional[Path]:
    """The ground truth of a plain folder: ``mask_dir`` when given, else <root>/ground_truth if present."""
    if mask_dir is not None:
        return require_dir(Path(mask_dir), "mask folder")
    default = root / "ground_truth"
    return default if default.is_dir() else None


def folder_samples(root: Path, split: str, mask_dir: Optional[Path] = None, mask_suffix: str = "_mask") -> list[Sample]:
    """<root>/train/good, <root>/test/good, <root>/test/<defect>, masks optional (see folder_mask_root)."""
    return DefectTree(root, mask_root=folder_mask_root(root, mask_dir), mask_suffix=mask_suffix).samples(split)


VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_LABELS = {"normal": 0, "anomaly": 1}


def visa_split_csv(root: Path) -> Path:
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DatasetError(f"VisA split file not found: {csv_path}")
    return csv_path


def read_visa_rows(root: Path) -> list[tuple[int, dict]]:
    """The rows of VisA's split_csv/1cls.csv with their line numbers."""
    csv_path = visa_split_csv(root)
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in VISA_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{csv_path} lacks the columns {missing} (has {reader.fieldnames})")
        return [(reader.line_num, row) for row in reader]


def visa_samples(root: Path, category: str, split: str) -> list[Sample]:
    """VisA through split_csv/1cls.csv (paths relative to ``root``). Normal rows must have an empty
    mask column; anomalous rows a mask file. VisA names no defect types, so anomalous images get the
    defect "anomaly"."""
    csv_path = visa_split_csv(root)
    rows = [(line, row) for line, row in read_visa_rows(root) if row["object"] == category]
    if not rows:
        objects = sorted({row["object"] for _, row in read_visa_rows(root)})
        raise DatasetError(f"category {category!r} not in {csv_path} (it lists {objects})")
    samples = []
    for line, row in rows:
        if row["split"] != split:
            continue
        where = f"{csv_path} line {line}"
        if row["label"] not in VISA_LABELS:
            raise DatasetError(f"{where}: label {row['label']!r} is neither 'normal' nor 'anomaly'")
        label = VISA_LABELS[row["label"]]
        image_path = root / row["image"]
        if not image_path.is_file():
            raise DatasetError(f"{where}: image not found: {image_path}")
        mask_name = row["mask"].strip()
        if label == 0:
            if mask_name:
                raise DatasetError(f"{where}: normal image {image_path} has a mask {root / mask_name}")
            samples.append(Sample(image_path, 0, GOOD))
            continue
        if not mask_name:
            raise DatasetError(f"{where}: anomalous image without mask: {image_path}")
        mask_path = root / mask_name
        if not mask_path.is_file():
            raise DatasetError(f"{where}: mask not found: {mask_path}")
        samples.append(Sample(image_path, 1, "anomaly", mask_path))
    if not samples:
        raise DatasetError(f"{csv_path} lists no {split} images of {category!r}")
    return samples


EYECANDIES_SPLIT_DIRS = {"train": "train", "test": "test_public"}


def eyecandies_samples(category_dir: Path, split: str, light: int = 4) -> list[Sample]:
    """Eyecandies, RGB only. Assumed layout (from the dataset's documentation, not checked against a
    download): <category>/{train,test_public}/data/<id>_image_<light>.png, six lightings 0..5
    (default 4, as the brief asks), with depth, normals and other files beside them that are not read.
    Test labels come from <id>_mask.png in test_public/data: any non-zero pixel means anomalous
    (defect "bad"), an empty mask normal. The training split is all normal and its masks are not read.
    """
    data_dir = require_dir(category_dir / EYECANDIES_SPLIT_DIRS[split] / "data", f"Eyecandies {split} folder")
    image_suffix = f"_image_{light}"
    images = {}
    masks = {}
    for entry in visible_entries(data_dir):
        if not is_image_file(entry):
            continue  # the folder also holds depth maps, normals and metadata of other formats
        if entry.stem.endswith(image_suffix):
            images[entry.stem[: -len(image_suffix)]] = entry
        elif entry.stem.endswith("_mask"):
            masks[entry.stem[: -len("_mask")]] = entry
    if not images:
        raise DatasetError(f"no *{image_suffix}.png images in {data_dir}")
    if split == "train":
        return [Sample(path, 0, GOOD) for _, path in sorted(images.items())]
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DatasetError(f"mask without image: {masks[orphans[0]]} (no {data_dir}/{orphans[0]}{image_suffix}.png)")
    samples = []
    for sample_id, image_path in sorted(images.items()):
        if sample_id not in masks:
            raise DatasetError(f"test image without mask: {image_path} (expected {data_dir}/{sample_id}_mask.png)")
        if read_mask(masks[sample_id]).any():
            samples.append(Sample(image_path, 1, "bad", masks[sample_id]))
        else:
            samples.append(Sample(image_path, 0, GOOD))
    return samples
