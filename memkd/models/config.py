"""The model configuration: one JSON-serialisable record of everything that defines a model."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import InitVar, dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from memkd.data import IMAGENET_MEAN, IMAGENET_STD
from memkd.models.backbones import IMAGENET, WEIGHT_FILE_SUFFIXES, backbone_spec, is_weight_enum_name
from memkd.models.losses import KD_MODES, NM_REDUCTIONS

MEMORY_POSITIONS = (0, 1, 2)
TILE_BLENDS = ("mean", "max")  # memkd.tiling blends (memkd.tiling.BLEND_MODES is this tuple)


@dataclass(frozen=True)
class Method:
    """What a method name switches on."""

    distillation: str  # "reverse" (RD4AD) or "forward" (MKD-style)
    memory: Optional[str]  # "nr", "memae" or None
    nel: bool  # normality embedding learning (L_NM on exemplars)
    orth: bool  # pairwise orthogonal loss on keys and values


METHODS: dict[str, Method] = {
    "memkd": Method("reverse", "nr", nel=True, orth=True),  # the paper
    "rd": Method("reverse", None, nel=False, orth=False),  # RD4AD baseline (Table 4a row 1)
    "memkd-no-nel": Method("reverse", "nr", nel=False, orth=True),  # NR Memory + L_Orth (Table 4a)
    "memkd-no-orth": Method("reverse", "nr", nel=True, orth=False),  # NR Memory + L_NM (Table 4a)
    "memae": Method("reverse", "memae", nel=False, orth=False),  # MemAE-style memory (Table 3)
    "memmkd": Method("forward", "nr", nel=True, orth=True),  # forward distillation (Table 5)
    "mkd": Method("forward", None, nel=False, orth=False),  # its baseline (Table 5)
}


@dataclass(frozen=True)
class MemKDConfig:
    """A model: method, teacher, memory layout, losses, input size and normalisation.

    method: one of ``METHODS``. backbone: the teacher (``backbones.BACKBONES``); a forward
    student is its plain ResNet counterpart. weights: "imagenet" (torchvision IMAGENET1K_V1),
    another torchvision weight name, None (random init) or a .pth/.pt/.safetensors path.
    image_size: (height, width) or an int, multiples of 32 (the bottleneck is 1/32 of the input).
    memory_stages: memory positions 0-2 (reverse: on the bottleneck output and after decoder
    stages 1 and 2; forward: after student layer1..3); None means all three for a method with a
    memory. memory_items: L per memory, one int for all or one per stage.
    exemplars: N, the exemplar set size per iteration for NEL.
    nm_weight, orth_weight: lambda_1, lambda_2 of Eq. 11.
    kd_mode: "flat" (whole-map cosine, the paper) or "pixel" (``losses.kd_loss``).
    nm_reduction: "sum" (Eq. 10 literally) or "mean" (``losses.normality_memorization_loss``).

    Tiling (``memkd.tiling``, for high-resolution images): ``tile_stride`` None (default) is
    untiled, every image resized to ``image_size``; an int or (height, width) turns tiling on, and
    ``image_size`` is then the tile: training reads the full-resolution images and cuts one tile
    per image per epoch at a seeded random position, inference runs every tile of the
    ``tile_stride`` grid on the full-resolution image and blends the per-tile maps with
    ``tile_blend`` ("mean": overlaps averaged, no seams; "max": the largest, most sensitive).
    One size field instead of a separate tile size, because the model only ever sees
    ``image_size`` inputs either way: the tile is the scale it was trained at, and a stride is the
    only new fact. The stride is at most the tile (a larger one would leave gaps);
    ``memkd.tiling.default_stride`` (224 for 256) is the suggested overlap. Checkpoints of earlier
    versions (no such fields in config.json) load untiled.

    Inputs are normalised with ImageNet's statistics, ``memkd.data.IMAGENET_MEAN`` and
    ``IMAGENET_STD`` (every teacher is an ImageNet-trained torchvision network); the model does not
    apply it. That is no setting: ``mean`` and ``std`` read those constants, and as arguments (from
    checkpoints of earlier versions, whose config.json stores them) they are accepted only equal to
    them; ``to_dict`` records them for readers of config.json.
    """

    method: str = "memkd"
    backbone: str = "wide_resnet50_2"
    weights: Optional[str] = IMAGENET
    image_size: Union[int, tuple[int, int]] = (256, 256)
    memory_stages: Optional[tuple[int, ...]] = None
    memory_items: Union[int, tuple[int, ...]] = 50
    exemplars: int = 16
    nm_weight: float = 0.1
    orth_weight: float = 0.1
    kd_mode: str = "flat"
    nm_reduction: str = "sum"
    tile_stride: Optional[Union[int, tuple[int, int]]] = None
    tile_blend: str = "mean"
    mean: InitVar[Optional[Sequence[float]]] = None  # not fields: see the class doc (and the end of this module)
    std: InitVar[Optional[Sequence[float]]] = None

    def __post_init__(self, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; expected one of {sorted(METHODS)}")
        backbone_spec(self.backbone)
        self._normalise("image_size", _image_size(self.image_size))
        self._check_weights()
        self._normalise_memory()
        check_int("exemplars", self.exemplars, minimum=1)
        for name in ("nm_weight", "orth_weight"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
            self._normalise(name, float(value))
        if self.kd_mode not in KD_MODES:
            raise ValueError(f"kd_mode: expected one of {KD_MODES}, got {self.kd_mode!r}")
        if self.nm_reduction not in NM_REDUCTIONS:
            raise ValueError(f"nm_reduction: expected one of {NM_REDUCTIONS}, got {self.nm_reduction!r}")
        self._normalise_tiling()
        _check_imagenet("mean", mean, IMAGENET_MEAN, positive=False)
        _check_imagenet("std", std, IMAGENET_STD, positive=True)

    def _normalise(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen dataclass: fix up fields once, while validating

    def _check_weights(self) -> None:
        w = self.weights
        named = isinstance(w, str) and is_weight_enum_name(self.backbone, w)
        if w is None or named or isinstance(w, str) and w.endswith(WEIGHT_FILE_SUFFIXES):
            return
        raise ValueError(
            f"weights: expected 'imagenet', a torchvision weight name of {self.backbone}, None (random init) "
            f"or a path ending in {', '.join(WEIGHT_FILE_SUFFIXES)}; got {w!r}"
        )

    def _normalise_memory(self) -> None:
        stages = self.memory_stages
        if self.method_spec.memory is None:
            if stages:
                raise ValueError(f"memory_stages: method {self.method!r} has no memory, got {stages!r}")
            self._normalise("memory_stages", ())
            self._normalise("memory_items", ())
            return
        stages = MEMORY_POSITIONS if stages is None else stages
        if isinstance(stages, int) or not isinstance(stages, Sequence):
            raise ValueError(f"memory_stages: expected a list of positions from {MEMORY_POSITIONS}, got {stages!r}")
        stages = tuple(stages)
        valid = all(s in MEMORY_POSITIONS and not isinstance(s, bool) for s in stages)
        if not stages or not valid or len(set(stages)) != len(stages):
            raise ValueError(
                f"memory_stages: expected distinct positions from {MEMORY_POSITIONS} (at least one; use method "
                f"'rd' or 'mkd' for none), got {self.memory_stages!r}"
            )
        items = self.memory_items
        items = (items,) * len(stages) if isinstance(items, int) else tuple(items)
        if len(items) != len(stages):
            raise ValueError(
                f"memory_items: expected one count per memory stage ({len(stages)}), got {self.memory_items!r}"
            )
        for count in items:
            check_int("memory_items", count, minimum=1)
        order = sorted(range(len(stages)), key=stages.__getitem__)
        self._normalise("memory_stages", tuple(stages[i] for i in order))
        self._normalise("memory_items", tuple(items[i] for i in order))

    def _normalise_tiling(self) -> None:
        stride = self.tile_stride
        if stride is not None:
            pair = (stride, stride) if isinstance(stride, int) else tuple(stride) if isinstance(stride, Sequence) else None
            if pair is None or len(pair) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in pair):
                raise ValueError(f"tile_stride: expected None (untiled), a positive int or (height, width), got {stride!r}")
            if pair[0] > self.image_size[0] or pair[1] > self.image_size[1]:
                raise ValueError(
                    f"tile_stride: expected at most the tile (image_size {self.image_size}; a larger stride leaves "
                    f"gaps), got {stride!r}"
                )
            self._normalise("tile_stride", pair)
        if self.tile_blend not in TILE_BLENDS:
            raise ValueError(f"tile_blend: expected one of {TILE_BLENDS}, got {self.tile_blend!r}")

    @property
    def tiled(self) -> bool:
        """Whether images are tiled (``tile_stride`` set) rather than resized to ``image_size``."""
        return self.tile_stride is not None

    @property
    def method_spec(self) -> Method:
        return METHODS[self.method]

    @property
    def memory_layout(self) -> dict[int, int]:
        """{position: items} of every memory."""
        return dict(zip(self.memory_stages, self.memory_items))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (tuples become lists), with the input normalisation recorded."""
        values = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {**values, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MemKDConfig":
        check_known_fields(cls, {k: v for k, v in data.items() if k not in NORMALISATION}, "config")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# The input normalisation, read-only: the class attributes the dataclass left for the two InitVars
# become properties (defined in the class body, they would be taken for the arguments' defaults).
NORMALISATION = ("mean", "std")
MemKDConfig.mean = property(lambda self: IMAGENET_MEAN, doc="ImageNet's mean per RGB channel (memkd.data.IMAGENET_MEAN).")
MemKDConfig.std = property(lambda self: IMAGENET_STD, doc="ImageNet's std per RGB channel (memkd.data.IMAGENET_STD).")


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def check_known_fields(cls: type, data: Mapping[str, Any], what: str) -> None:
    """A clear error for keys of ``data`` that are not fields of the dataclass ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown}; known fields are {sorted(known)}")


def _image_size(size: Any) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, Sequence) else None
    if hw is None or len(hw) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in hw):
        raise ValueError(f"image_size: expected a positive int or (height, width), got {size!r}")
    if any(s % 32 for s in hw):
        raise ValueError(
            f"image_size: height and width must be multiples of 32 (the student's bottleneck is 1/32 of the "
            f"input), got {size!r}"
        )
    return hw


def _check_imagenet(name: str, value: Any, expected: tuple[float, float, float], positive: bool) -> None:
    """A ``mean``/``std`` argument must be None or ImageNet's (``expected``)."""
    if value is None:
        return
    given = _triple(name, value, positive)
    if not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(given, expected)):
        raise ValueError(
            f"{name}: memkd models take inputs normalised with ImageNet's statistics ({name} {list(expected)}), "
            f"got {list(given)}"
        )


def _triple(name: str, value: Any, positive: bool) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in triple):
        condition = " > 0" if positive else ""
        raise ValueError(f"{name}: expected three finite numbers (one per RGB channel){condition}, got {value!r}")
    return triple
