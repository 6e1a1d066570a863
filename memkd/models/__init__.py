"""MemKD models: the frozen teacher, the students with NR Memory (or MemAE-style) modules, the
losses, and ``build_model(MemKDConfig(...))``."""
from memkd.models.backbones import BACKBONES, BackboneSpec, Teacher
from memkd.models.config import METHODS, MemKDConfig, Method
from memkd.models.losses import kd_loss, normality_memorization_loss, orthogonal_loss
from memkd.models.memkd import CompiledPredictor, MemKD, build_model, size_report
from memkd.models.memory import MemAEMemory, NRMemory
from memkd.models.student import ForwardStudent, OneClassBottleneck, ReverseStudent

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "CompiledPredictor",
    "ForwardStudent",
    "METHODS",
    "MemAEMemory",
    "MemKD",
    "MemKDConfig",
    "Method",
    "NRMemory",
    "OneClassBottleneck",
    "ReverseStudent",
    "Teacher",
    "build_model",
    "kd_loss",
    "normality_memorization_loss",
    "orthogonal_loss",
    "size_report",
]
