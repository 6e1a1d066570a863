"""The model: frozen teacher, student with memories, the training loss and inference."""
from __future__ import annotations

import copy
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from memkd.models.backbones import Teacher, backbone_spec
from memkd.models.config import MemKDConfig
from memkd.models.losses import kd_loss, normality_memorization_loss, orthogonal_loss
from memkd.models.memory import MemAEMemory, NRMemory
from memkd.models.student import ForwardStudent, ReverseStudent
from memkd.ops import anomaly_map

MEMORY_CLASSES = {"nr": NRMemory, "memae": MemAEMemory}
STUDENT_CLASSES = {"reverse": ReverseStudent, "forward": ForwardStudent}


def check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected a [B, 3, H, W] tensor, got {shape}")
    if images.shape[0] == 0 or images.shape[2] % 32 or images.shape[3] % 32 or min(images.shape[2:]) == 0:
        raise ValueError(f"{name}: expected a non-empty batch with H and W multiples of 32, got {tuple(images.shape)}")


class MemKD(nn.Module):
    """Teacher-student anomaly detector; ``config.method`` picks the variant (``config.METHODS``).

    Inputs are image batches [B, 3, H, W], normalised with ImageNet's mean and std (``memkd.data``), H and W
    multiples of 32. Only ``student`` (bottleneck, decoder or trunk, memories) is trained.
    """

    def __init__(self, config: MemKDConfig, load_teacher_weights: bool = True):
        """``load_teacher_weights=False`` leaves the teacher randomly initialised whatever
        ``config.weights`` says, for callers that load its weights from elsewhere (a checkpoint)."""
        super().__init__()
        self.config = config
        method = config.method_spec
        self.teacher = Teacher(config.backbone, config.weights if load_teacher_weights else None)
        self.student = STUDENT_CLASSES[method.distillation](
            backbone_spec(config.backbone), config.memory_layout, MEMORY_CLASSES.get(method.memory)
        )

    @property
    def memories(self) -> nn.ModuleDict:
        """The memory modules by position ("0", "1", "2"); empty for "rd" and "mkd"."""
        return self.student.memories

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: bottleneck + decoder (or forward trunk) + memories."""
        return list(self.student.parameters())

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Student and teacher features, each a list aligned with teacher layer1..3 (finest first)."""
        check_images(images)
        teacher_features = self.teacher(images)
        return self.student(images, teacher_features), teacher_features

    def loss(
        self,
        images: torch.Tensor,
        exemplars: Optional[torch.Tensor] = None,
        exemplar_features: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> dict[str, torch.Tensor]:
        """The loss terms of one training step (Eq. 11): "kd", plus "nm" with NEL and "orth" with
        the orthogonal loss, and "total" = kd + nm_weight * nm + orth_weight * orth.

        Methods with NEL need the step's exemplar set: either ``exemplars`` [N, 3, H, W], normal
        training images, or ``exemplar_features``, what ``exemplar_features(exemplars)`` returned
        for them (the teacher is frozen, so callers may cache it). L_NM and L_Orth are summed over
        the memory modules.
        """
        method, config = self.config.method_spec, self.config
        student_features, teacher_features = self(images)
        terms = {"kd": kd_loss(student_features, teacher_features, config.kd_mode)}
        total = terms["kd"]
        if method.nel:
            if exemplars is not None and exemplar_features is not None:
                raise ValueError("exemplars, exemplar_features: pass one of them, not both")
            if exemplar_features is None:
                if exemplars is None:
                    raise ValueError(f"exemplars: method {config.method!r} learns from an exemplar set; got None")
                exemplar_features = self.exemplar_features(exemplars)
            terms["nm"] = self.normality_memorization_loss(exemplar_features)
            total = total + config.nm_weight * terms["nm"]
        if method.orth:
            terms["orth"] = sum(orthogonal_loss(m.keys, m.values) for m in self.memories.values())
            total = total + config.orth_weight * terms["orth"]
        terms["total"] = total
        return terms

    def exemplar_features(self, exemplars: torch.Tensor) -> dict[str, torch.Tensor]:
        """NEL's normality embedding of an exemplar set [N, 3, H, W]: for each memory (by key), the
        teacher layer output whose shape matches the memory's queries, [N, C, h, w]. It depends on
        each image alone, never on training, since the teacher is frozen."""
        check_images(exemplars, "exemplars")
        layer_of = {key: self.student.teacher_layer(int(key)) for key in self.memories}
        features = self.teacher(exemplars, depth=max(layer_of.values()))
        return {key: features[layer - 1] for key, layer in layer_of.items()}

    def normality_memorization_loss(self, exemplar_features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """L_NM summed over the memories, from ``exemplar_features(exemplars)``."""
        missing = sorted(set(self.memories) - set(exemplar_features))
        if missing:
            raise ValueError(f"exemplar_features: expected features for memories {sorted(self.memories)}, missing {missing}")
        total = None
        for key, memory in self.memories.items():
            features = exemplar_features[key]
            channels = memory.values.shape[1]
            if not isinstance(features, torch.Tensor) or features.dim() != 4 or features.shape[1] != channels:
                shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
                raise ValueError(f"exemplar_features[{key!r}]: expected [N, {channels}, h, w], got {shape}")
            term = normality_memorization_loss(features, memory.values, self.config.nm_reduction)
            total = term if total is None else total + term
        return total

    def predict(self, images: torch.Tensor, sigma: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps [B, H, W] at the input size and image scores [B] (Eq. 3-4), in eval mode
        under ``torch.inference_mode`` (the previous mode is restored). Runs in fp32 unless called
        inside autocast; the maps are fp32 either way."""
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                student, teacher = self(images.to(self.device))
                return _anomaly_map_fp32(student, teacher, images.shape[-2:], sigma)
        finally:
            self.train(was_training)


def _anomaly_map_fp32(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], size, sigma: float):
    """Eq. 3-4 on the features in fp32 (they may come from autocast): maps [B, *size], scores [B]."""
    return anomaly_map([f.float() for f in student], [f.float() for f in teacher], size, sigma)


class CompiledPredictor:
    """``model.predict`` with the teacher and student compiled by ``torch.compile`` (inductor) with
    freezing: the weights become constants, so BatchNorm folds into the convolutions and CPUs get
    prepacked oneDNN weights. The first call compiles (about a minute for WideResNet50 on a 2-core
    CPU); the speed-up is measured in benchmarks/ (``optim/`` and ``peers/`` cases).

    It works on an eval-mode copy of ``model`` taken now: later changes to ``model`` are not seen.
    The first call fixes the batch size: a smaller batch is padded to it and a larger one runs in
    chunks of it, so a test set's last batch does not compile again.
    """

    def __init__(self, model: MemKD):
        if not isinstance(model, MemKD):
            raise TypeError(f"model: expected a MemKD, got {type(model).__name__}")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._forward = torch.compile(self.model, dynamic=False)
        self.batch_size: Optional[int] = None

    @staticmethod
    def _freezing():
        # torch.compile(options={"freezing": True}) is not honoured (torch 2.14): patch inductor's
        # config around every call instead, so that a recompilation freezes too
        from torch._inductor import config as inductor_config

        return inductor_config.patch(freezing=True)

    def __call__(self, images: torch.Tensor, sigma: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps [B, H, W] and image scores [B], as ``MemKD.predict``."""
        check_images(images)
        if self.batch_size is None:
            self.batch_size = images.shape[0]
        images = images.to(self.model.device)
        maps, scores = [], []
        with self._freezing(), torch.inference_mode():
            for chunk in images.split(self.batch_size):
                count = chunk.shape[0]
                # every chunk a new contiguous inference tensor: a guard on the dispatch keys or the
                # strides would otherwise compile again for the padded chunk
                padding = [chunk.new_zeros(self.batch_size - count, *chunk.shape[1:])] if count < self.batch_size else []
                chunk = torch.cat([chunk, *padding]).contiguous()
                student, teacher = self._forward(chunk)
                chunk_maps, chunk_scores = _anomaly_map_fp32(
                    [f[:count] for f in student], [f[:count] for f in teacher], images.shape[-2:], sigma
                )
                maps.append(chunk_maps)
                scores.append(chunk_scores)
        return torch.cat(maps), torch.cat(scores)


def build_model(config: MemKDConfig, load_teacher_weights: bool = True) -> MemKD:
    """The model for ``config`` (see ``MemKD``)."""
    if not isinstance(config, MemKDConfig):
        raise TypeError(f"config: expected a MemKDConfig, got {type(config).__name__}")
    return MemKD(config, load_teacher_weights)


def _megabytes(tensors: Sequence[torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


def size_report(model: MemKD) -> dict[str, float]:
    """Parameter counts (millions) and sizes (MB = 1e6 bytes) of the teacher, the student (with its
    memories) and the memory bank alone (the paper's Table 3 "Mem. Size")."""
    parts = {
        "teacher": list(model.teacher.parameters()),
        "student": list(model.student.parameters()),
        "memory_bank": list(model.memories.parameters()),
    }
    report = {}
    for name, params in parts.items():
        report[f"{name}_params_millions"] = sum(p.numel() for p in params) / 1e6
        report[f"{name}_mb"] = _megabytes(params)
    return report
