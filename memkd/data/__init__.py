"""Anomaly detection datasets: MVTec AD, MPDD, VisA, MVTec 3D-AD (RGB), Eyecandies (RGB) and plain
folders, all yielding the same items (see AnomalyDataset) through build_dataset and make_loader."""
from memkd.data.categories import DATASET_CATEGORIES, DATASET_NAMES, discover_categories, known_categories
from memkd.data.dataset import AnomalyDataset, Sample, collate_samples, default_workers, make_loader
from memkd.data.errors import DatasetError
from memkd.data.factory import build_dataset
from memkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "AnomalyDataset",
    "DATASET_CATEGORIES",
    "DATASET_NAMES",
    "DatasetError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Sample",
    "build_dataset",
    "collate_samples",
    "default_workers",
    "discover_categories",
    "known_categories",
    "make_loader",
]
