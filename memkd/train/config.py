"""How to train (``TrainConfig``, the paper's recipe by default) and what a resumed run may change."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from memkd.models.config import check_int, check_known_fields

# The train settings a resumed run may change: none alters the data order, the exemplar sets or
# the recipe of the remaining steps (device, channels_last and compile can change rounding).
RESUME_CHANGEABLE = (
    "epochs", "save_every", "log_every", "workers", "device", "channels_last", "compile", "compile_backend",
    "cache_exemplar_features", "progress",
)


@dataclass(frozen=True)
class TrainConfig:
    """How to train. The defaults are the paper's recipe (Sec. 5.2) and RD4AD's optimiser.

    batch_size: the global batch, split evenly over distributed processes. save_every: write the
    checkpoint every this many epochs (and after the last). log_every: log the mean loss terms
    over this many steps (each log synchronises with the device). workers: data loading processes
    per loader (None: ``memkd.data.default_workers()``). device: None for cuda:LOCAL_RANK when
    available, else the CPU. amp: bf16 autocast. channels_last: NHWC convolutions (GPUs).
    compile: ``torch.compile`` the training step with ``compile_backend``. sync_batchnorm: global
    batch statistics in distributed runs. cache_exemplar_features: keep NEL's teacher features of
    each exemplar image after its first draw (exact: the teacher is frozen and exemplars are not
    augmented), on the training device; it costs the features' size per distinct training image
    (3.7 MB in fp32 for WideResNet50 at 256x256) and saves the exemplar set's teacher pass on later
    steps. A Dataset is batched here; a DataLoader given instead is used as it is (its batch size
    and order), and its dataset provides the exemplars.
    """

    epochs: int = 100
    batch_size: int = 16
    lr: float = 0.005
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 0
    save_every: int = 10
    log_every: int = 10
    workers: Optional[int] = None
    device: Optional[str] = None
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    sync_batchnorm: bool = True
    cache_exemplar_features: bool = True
    progress: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size", "save_every", "log_every"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("seed", self.seed, minimum=0)
        if self.workers is not None:
            check_int("workers", self.workers, minimum=0)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: expected a finite number > 0, got {self.lr!r}")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        check_known_fields(cls, data, "train config")
        return cls(**data)


def resume_changes(stored: TrainConfig, requested: TrainConfig, epoch: int) -> dict[str, tuple[Any, Any]]:
    """The settings in which ``requested`` differs from the ``stored`` config of a run at ``epoch``,
    as {name: (stored, requested)}; raises ValueError when one may not change on resume (see
    ``RESUME_CHANGEABLE``) or fewer epochs than done are asked for."""
    changes = {
        f.name: (getattr(stored, f.name), getattr(requested, f.name))
        for f in dataclasses.fields(TrainConfig)
        if getattr(stored, f.name) != getattr(requested, f.name)
    }
    fixed = {name: change for name, change in changes.items() if name not in RESUME_CHANGEABLE}
    if fixed:
        listed = ", ".join(f"{name} {old!r} (got {new!r})" for name, (old, new) in fixed.items())
        raise ValueError(
            f"train_config: a resumed run keeps its {listed}, or it would not continue the same training; "
            "train into a new run directory to change them"
        )
    if requested.epochs < epoch:
        raise ValueError(f"epochs: the run has already trained {epoch} epochs, got {requested.epochs}")
    return changes
