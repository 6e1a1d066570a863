"""The frozen teacher: a torchvision ResNet trunk, and the facts about each supported backbone."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

Block = Union[type[BasicBlock], type[Bottleneck]]


@dataclass(frozen=True)
class BackboneSpec:
    """How a torchvision ResNet is built; the students mirror it.

    ``forward_student`` is the plain ResNet a forward-distillation student uses for this teacher
    (MemMKD, paper Table 5: WideResNet50 teacher, ResNet50 student); its layer1..3 channels equal
    the teacher's.
    """

    block: Block
    layers: tuple[int, int, int, int]
    width_per_group: int
    forward_student: str

    @property
    def stage_channels(self) -> tuple[int, int, int, int]:
        """Output channels of layer1..layer4."""
        return tuple(64 * 2**i * self.block.expansion for i in range(4))


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(BasicBlock, (2, 2, 2, 2), 64, "resnet18"),
    "resnet34": BackboneSpec(BasicBlock, (3, 4, 6, 3), 64, "resnet34"),
    "resnet50": BackboneSpec(Bottleneck, (3, 4, 6, 3), 64, "resnet50"),
    "wide_resnet50_2": BackboneSpec(Bottleneck, (3, 4, 6, 3), 128, "resnet50"),
    "wide_resnet101_2": BackboneSpec(Bottleneck, (3, 4, 23, 3), 128, "resnet101"),
}

IMAGENET = "imagenet"  # torchvision's IMAGENET1K_V1, the weights RD4AD and MemKD use
TRUNK_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"backbone: unknown backbone {name!r}; expected one of {sorted(BACKBONES)}") from None


def is_weight_enum_name(backbone: str, weights: str) -> bool:
    """Whether ``weights`` names a torchvision weight set of ``backbone`` ("imagenet", "IMAGENET1K_V2", ...)."""
    return weights == IMAGENET or weights in torchvision.models.get_model_weights(backbone).__members__


def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """A state_dict from a torchvision-style ``.pth``/``.pt`` file or a ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: no such file {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # every reader has its own error types; all mean "unreadable"
        raise ValueError(f"weights: cannot read {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights: {path} does not hold a state_dict of tensors")
    return state


class Teacher(nn.Module):
    """A frozen torchvision ResNet trunk (stem, layer1..layer4; no pooling or classifier).

    ``weights``: "imagenet" (torchvision's IMAGENET1K_V1, fetched into torchvision's cache), another
    torchvision weight enum name such as "IMAGENET1K_V2", None (random init), or the path of a
    torchvision state_dict (.pth/.pt) or a .safetensors file. The teacher stays in eval mode whatever
    its parent's mode, has no trainable parameters and runs without autograd.
    """

    def __init__(self, backbone: str, weights: Optional[str] = IMAGENET):
        super().__init__()
        self.spec = backbone_spec(backbone)
        net = torchvision.models.get_model(backbone, weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if weights is not None:
            self.load_trunk(self._fetch_state_dict(backbone, weights), source=str(weights))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _fetch_state_dict(backbone: str, weights: str) -> dict[str, torch.Tensor]:
        if not is_weight_enum_name(backbone, weights):
            return read_state_dict(weights)
        enum = torchvision.models.get_model_weights(backbone)
        weight_set = enum.IMAGENET1K_V1 if weights == IMAGENET else enum[weights]
        try:
            return weight_set.get_state_dict(progress=True, check_hash=True)
        except OSError as exc:  # URLError is an OSError: no network and nothing in the cache
            raise RuntimeError(
                f"weights: cannot fetch {weight_set.url} ({exc}); put the file in torch's hub cache "
                f"({torch.hub.get_dir()}/checkpoints) or pass its local path as weights"
            ) from exc

    def load_trunk(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load a full torchvision state_dict (its classifier is ignored) or a trunk-only one."""
        state = {k: v for k, v in state.items() if k.startswith(TRUNK_PREFIXES)}
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"weights: {source} does not fit a {type(self).__name__} of this backbone: "
                f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if v.shape != own[k].shape]
        if wrong:
            key, got, want = wrong[0]
            raise ValueError(f"weights: {source}: {key} has shape {got}, this backbone needs {want}")
        self.load_state_dict(state)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # frozen BatchNorm statistics, always

    @torch.no_grad()
    def forward(self, images: torch.Tensor, depth: int = 3) -> list[torch.Tensor]:
        """Outputs of layer1..layer{depth}; layer4 (``depth=4``) is only computed when asked for."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4)[:depth]:
            x = layer(x)
            features.append(x)
        return features
