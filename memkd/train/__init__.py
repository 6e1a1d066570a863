"""Training MemKD models (single process or torchrun DDP) and their checkpoints."""
from memkd.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    read_header,
    save_checkpoint,
    update_checkpoint_extra,
)
from memkd.train.distributed import DistributedContext, init_distributed
from memkd.train.trainer import (
    ExemplarBatches,
    ExemplarFeatureCache,
    TrainConfig,
    Trainer,
    collate_images,
    image_of,
    train,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DistributedContext",
    "ExemplarBatches",
    "ExemplarFeatureCache",
    "TrainConfig",
    "Trainer",
    "collate_images",
    "image_of",
    "init_distributed",
    "load_checkpoint",
    "read_header",
    "save_checkpoint",
    "train",
    "update_checkpoint_extra",
]
