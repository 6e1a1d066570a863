"""Training, by default the paper's recipe: Adam (lr 0.005, betas (0.5, 0.999)), global batch 16,
100 epochs, a fresh exemplar set of N normal training images every iteration for NEL. Only the
student (bottleneck, decoder or trunk, memories) is optimised.

Single process: ``train(dataset, run_dir, MemKDConfig(...), TrainConfig(...))``. Distributed:
the same call in a script started by ``torchrun --nproc_per_node=K`` (NCCL on GPUs, Gloo on
CPUs); ``batch_size`` stays the global batch, split over the processes, BatchNorm statistics
cover the global batch (``sync_batchnorm``), and rank 0 alone logs and writes checkpoints.

Determinism and resuming: the data order of epoch e comes from (seed, e) and the exemplar set of
step s from (seed, s), both independent of the process count; checkpoints are taken at epoch ends
with the optimizer and RNG states, so a resumed run continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from tqdm.auto import tqdm

from memkd.data import default_workers
from memkd.files import folder_lock
from memkd.models import MemKD, MemKDConfig, build_model
from memkd.train.batches import (
    DrawKeyedSampler,
    ExemplarBatches,
    ExemplarFeatureCache,
    IndexedItems,
    UncachedExemplars,
    collate_images,
    collate_indexed_images,
    image_of,
)
from memkd.train.checkpoint import (
    capture_rng_state,
    has_checkpoint,
    load_checkpoint,
    load_training_state,
    read_header,
    restore_rng_state,
    save_checkpoint,
)
from memkd.train.config import TrainConfig, resume_changes
from memkd.train.distributed import DistributedContext, all_reduce_mean, init_distributed, sync_batchnorm

LOG_FILE = "log.jsonl"
TrainingData = Union[Dataset, DataLoader]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TrainingStep(nn.Module):
    """``model.loss`` as a module's forward, so DistributedDataParallel and torch.compile see it."""

    def __init__(self, model: MemKD):
        super().__init__()
        self.model = model

    def forward(
        self,
        images: torch.Tensor,
        exemplars: Optional[torch.Tensor] = None,
        exemplar_features: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> dict[str, torch.Tensor]:
        return self.model.loss(images, exemplars, exemplar_features)


class LossMeter:
    """Sums of the loss terms on the device since the last report, read with one synchronisation."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = self.images = 0
        self.started = time.perf_counter()

    def add(self, terms: Mapping[str, torch.Tensor], images: int) -> None:
        for key, value in terms.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps += 1
        self.images += images

    def report(self, world_size: int) -> tuple[dict[str, float], float]:
        """Mean of each term over steps and processes, and global images per second; then resets."""
        keys = list(self.sums)
        means = all_reduce_mean(torch.stack([self.sums[k] for k in keys]) / self.steps).tolist()
        rate = self.images * world_size / max(time.perf_counter() - self.started, 1e-9)
        self.reset()
        return dict(zip(keys, means)), rate


class Trainer:
    """Trains a model into ``run_dir`` (checkpoint files and ``log.jsonl``); see the module doc.

    ``resume=True`` continues the checkpoint in ``run_dir``: the model config comes from it (one
    passed must equal it), the train config too unless one is passed, which may differ from the
    stored one only in ``RESUME_CHANGEABLE`` (e.g. more epochs; ``resume_changes`` holds what
    changed). The log keeps the records up to the checkpoint's step. Without ``resume`` a
    ``run_dir`` that already holds a checkpoint is refused; a log left by a run stopped before its
    first checkpoint is replaced. ``extra`` is stored in every checkpoint (e.g. where the data is).
    """

    def __init__(
        self,
        data: TrainingData,
        run_dir: Union[str, Path],
        model_config: Optional[MemKDConfig] = None,
        train_config: Optional[TrainConfig] = None,
        resume: bool = False,
        extra: Optional[Mapping[str, Any]] = None,
    ):
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise NotADirectoryError(f"run_dir: {self.run_dir} is a file, not a directory")
        self.extra = dict(extra or {})
        self.resume_changes: dict[str, tuple[Any, Any]] = {}
        self.train_config = config = self._train_config(model_config, train_config, resume)
        self.ctx: DistributedContext = init_distributed(config.device)
        if config.batch_size % self.ctx.world_size:
            raise ValueError(
                f"batch_size: the global batch {config.batch_size} does not split over {self.ctx.world_size} processes"
            )

        training_state = None
        if resume:
            checkpoint = load_checkpoint(self.run_dir)
            training_state = load_training_state(self.run_dir, checkpoint.epoch, checkpoint.step)
            self.model = checkpoint.model
        else:
            seed_everything(config.seed)  # the same initial weights on every rank
            self.model = build_model(model_config or MemKDConfig())
        self.model.to(self.ctx.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.ctx.is_distributed and config.sync_batchnorm:
            self.model.student = sync_batchnorm(self.model.student, self.ctx.device)
        self.model.train()
        self.optimizer = torch.optim.Adam(self.model.trainable_parameters(), lr=config.lr, betas=config.betas)
        self.epoch = self.step = 0
        if training_state is not None:
            self.optimizer.load_state_dict(training_state["optimizer"])
            restore_rng_state(training_state["rng"])
            self.epoch, self.step = training_state["epoch"], training_state["step"]

        step: nn.Module = TrainingStep(self.model)
        if self.ctx.is_distributed:
            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            step = DistributedDataParallel(step, device_ids=device_ids)
        self.training_step = torch.compile(step, backend=config.compile_backend) if config.compile else step
        self.loader = self._make_loader(data)
        # a tiled model's exemplars are random tiles (memkd.data.tiles): an index's features change
        use_cache = config.cache_exemplar_features and self.config.method_spec.nel and not self._draw_keys
        self.exemplar_cache = ExemplarFeatureCache(self.model) if use_cache else None
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def _start_log(self) -> None:
        """Keep the log records up to the checkpoint's step (all of a fresh run's are stale)."""
        path = self.run_dir / LOG_FILE
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines(keepends=True) if self._logged_before(line)]
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text("".join(kept))
        temporary.replace(path)

    def _logged_before(self, line: str) -> bool:
        try:
            return json.loads(line)["step"] <= self.step
        except (ValueError, KeyError, TypeError):
            return False  # a record cut short by a kill

    def _train_config(
        self, model_config: Optional[MemKDConfig], train_config: Optional[TrainConfig], resume: bool
    ) -> TrainConfig:
        """The train config to use, after checking ``run_dir`` against ``resume`` and the model config."""
        if not resume:
            if has_checkpoint(self.run_dir):
                raise FileExistsError(
                    f"run_dir: {self.run_dir} already holds a checkpoint; resume it or choose another directory"
                )
            return train_config or TrainConfig()
        header = read_header(self.run_dir)
        stored = MemKDConfig.from_dict(header["config"])
        if model_config is not None and model_config != stored:
            changed = [k for k, v in stored.to_dict().items() if model_config.to_dict()[k] != v]
            raise ValueError(f"model_config: differs from the checkpoint in {self.run_dir} in {changed}")
        stored_training = TrainConfig.from_dict(header["training"]) if header.get("training") else TrainConfig()
        if train_config is None:
            return stored_training
        self.resume_changes = resume_changes(stored_training, train_config, header.get("epoch") or 0)
        return train_config

    @property
    def config(self) -> MemKDConfig:
        return self.model.config

    def _workers(self) -> int:
        return default_workers() if self.train_config.workers is None else self.train_config.workers

    def _make_loader(self, data: TrainingData) -> DataLoader:
        if isinstance(data, DataLoader):
            if self.ctx.is_distributed and not isinstance(data.sampler, DistributedSampler):
                raise ValueError(
                    "data: a DataLoader for distributed training must shard with a DistributedSampler; "
                    "pass the Dataset instead"
                )
            return data
        if isinstance(data, IterableDataset) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise TypeError(
                "data: expected a map-style Dataset (indexable, with a length) or a DataLoader, "
                f"got {type(data).__name__}"
            )
        if len(data) == 0:
            raise ValueError("data: the training dataset is empty")
        workers = self._workers()
        # the same permutation on every rank, rank r taking items r, r + world, ...: together they
        # cover what one process would take in the same step
        sampler = (DrawKeyedSampler if getattr(data, "draw_keys", False) else DistributedSampler)(
            data, self.ctx.world_size, self.ctx.rank, shuffle=True, seed=self.train_config.seed
        )
        return DataLoader(
            data,
            batch_size=self.train_config.batch_size // self.ctx.world_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_images,
            pin_memory=self.ctx.device.type == "cuda",
            persistent_workers=workers > 0,
        )

    def _exemplar_batches(self) -> Optional[Iterator[tuple[list[int], tuple[list[int], Optional[torch.Tensor]]]]]:
        """Each step's exemplar set as (its dataset indices, (the indices loaded, their images)), None
        without NEL. With the cache only the images it lacks are loaded; without it, all of them."""
        if not self.config.method_spec.nel:
            return None
        dataset = self.loader.dataset
        if isinstance(dataset, IterableDataset):
            raise TypeError("data: NEL draws exemplars by index; an IterableDataset cannot provide them")
        sampler = ExemplarBatches(
            len(dataset), self.config.exemplars, self.train_config.seed, self.ctx.rank, self.ctx.world_size, self.step,
            draw_keys=self._draw_keys,
        )
        loader = DataLoader(
            IndexedItems(dataset),
            batch_sampler=sampler if self.exemplar_cache is None else UncachedExemplars(sampler, self.exemplar_cache),
            num_workers=self._workers(),
            collate_fn=collate_indexed_images,
            pin_memory=self.ctx.device.type == "cuda",
        )
        return zip(iter(sampler), loader)  # the loader yields its batch sampler's lists in order

    @property
    def _draw_keys(self) -> bool:
        """Whether the training items are keyed by (draw, index) (``memkd.data.tiles.TileCrops``)."""
        return bool(getattr(self.loader.dataset, "draw_keys", False))

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.ctx.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.train_config.channels_last else images

    def fit(self) -> MemKD:
        """Train up to ``train_config.epochs`` and return the model (checkpointed in ``run_dir``).
        Rank 0 holds the run directory's lock meanwhile: a second process training into it fails."""
        if not self.ctx.is_main:
            return self._fit()
        with folder_lock(self.run_dir, "run_dir"):
            self._start_log()
            return self._fit()

    def _fit(self) -> MemKD:
        config = self.train_config
        exemplar_batches = self._exemplar_batches()
        meter = LossMeter()
        steps_per_epoch = len(self.loader)
        for epoch in range(self.epoch, config.epochs):
            if isinstance(self.loader.sampler, DistributedSampler):
                self.loader.sampler.set_epoch(epoch)
            bar = tqdm(
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                disable=not (config.progress and self.ctx.is_main),
            )
            meter.reset()  # the interval starts with this epoch's data loading
            for index, batch in enumerate(self.loader):
                images = self._to_device(image_of(batch))
                exemplars = features = None
                if exemplar_batches is not None:
                    indices, (loaded, exemplar_images) = next(exemplar_batches)
                    if exemplar_images is not None:
                        exemplars = self._to_device(exemplar_images)
                with torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=config.amp):
                    if self.exemplar_cache is not None:
                        if exemplars is not None:
                            self.exemplar_cache.add(loaded, exemplars)
                        exemplars, features = None, self.exemplar_cache.features(indices)
                    terms = self.training_step(images, exemplars, features)
                self.optimizer.zero_grad(set_to_none=True)
                terms["total"].backward()
                self.optimizer.step()
                self.step += 1
                meter.add(terms, images.shape[0])
                if self.step % config.log_every == 0 or index == steps_per_epoch - 1:
                    self._log(meter, epoch, bar)
                bar.update()
            bar.close()
            self.epoch = epoch + 1
            if self.epoch % config.save_every == 0 or self.epoch == config.epochs:
                self.save()
        if self.ctx.is_distributed:
            dist.barrier()  # every rank returns once the final checkpoint exists
        return self.model

    def _log(self, meter: LossMeter, epoch: int, bar: tqdm) -> None:
        means, rate = meter.report(self.ctx.world_size)
        if not all(math.isfinite(v) for v in means.values()):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1}, step {self.step}: loss terms {means}")
        if not self.ctx.is_main:
            return
        bar.set_postfix({**{k: f"{v:.4g}" for k, v in means.items()}, "step": self.step, "img/s": f"{rate:.1f}"})
        record = {
            "epoch": epoch + 1,
            "step": self.step,
            **means,
            "images_per_s": rate,
            "lr": self.optimizer.param_groups[0]["lr"],
            "time": time.time(),
        }
        with open(self.run_dir / LOG_FILE, "a") as log:
            log.write(json.dumps(record) + "\n")

    def save(self) -> None:
        """Checkpoint the model and the training state into ``run_dir`` (rank 0)."""
        if self.ctx.is_main:
            save_checkpoint(
                self.model,
                self.run_dir,
                extra=self.extra,
                epoch=self.epoch,
                step=self.step,
                training=self.train_config.to_dict(),
                training_state={"optimizer": self.optimizer.state_dict(), "rng": capture_rng_state()},
            )


def train(
    data: TrainingData,
    run_dir: Union[str, Path],
    model_config: Optional[MemKDConfig] = None,
    train_config: Optional[TrainConfig] = None,
    resume: bool = False,
    extra: Optional[Mapping[str, Any]] = None,
) -> MemKD:
    """Train a model on ``data`` (normal images: tensors, dicts with "image" or (image, ...) tuples,
    normalised [3, H, W]) into ``run_dir``; see ``Trainer``."""
    return Trainer(data, run_dir, model_config, train_config, resume, extra).fit()
