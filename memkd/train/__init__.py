"""Training MemKD models (single process or torchrun DDP) and their checkpoints."""
from memkd.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    has_checkpoint,
    load_checkpoint,
    read_header,
    save_checkpoint,
    update_checkpoint_extra,
)
from memkd.train.batches import ExemplarBatches, ExemplarFeatureCache, collate_images, image_of
from memkd.train.config import RESUME_CHANGEABLE, TrainConfig, resume_changes
from memkd.train.distributed import DistributedContext, init_distributed
from memkd.train.trainer import Trainer, train

__all__ = [
    "RESUME_CHANGEABLE",
    "Checkpoint",
    "CheckpointError",
    "DistributedContext",
    "ExemplarBatches",
    "ExemplarFeatureCache",
    "TrainConfig",
    "Trainer",
    "collate_images",
    "has_checkpoint",
    "image_of",
    "init_distributed",
    "load_checkpoint",
    "read_header",
    "resume_changes",
    "save_checkpoint",
    "train",
    "update_checkpoint_extra",
]
