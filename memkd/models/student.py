"""The students: RD4AD's one-class bottleneck and mirrored decoder (reverse distillation), and a
plain ResNet trunk (forward distillation), each carrying its memories.

Both are generic over torchvision's Bottleneck and BasicBlock, so every teacher in
``backbones.BACKBONES`` gets its matching student; channel counts follow the backbone. RD4AD's
public code is the reference for every detail the MemKD paper leaves out.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck, conv1x1, conv3x3

from memkd.models.backbones import BackboneSpec, Block
from memkd.models.memory import ConcatMemory

MemoryFactory = Callable[[int, int], ConcatMemory]  # (channels, items) -> memory module


def deconv2x2(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    """RD4AD's upsampling convolution: kernel 2, stride 2, no bias."""
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)


def rd4ad_init_(module: nn.Module) -> None:
    """RD4AD's initialisation: Kaiming-normal (fan_out) convolutions, unit BatchNorm. As there,
    transposed convolutions keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def upsampling_stage(block: Block, in_channels: int, planes: int, blocks: int, width_per_group: int) -> nn.Sequential:
    """A decoder stage: ``blocks`` residual blocks, the first doubling the resolution.

    As in RD4AD's de_resnet: the first block's strided 3x3 conv (Bottleneck's conv2, BasicBlock's
    conv1) becomes a 2x2 transposed conv, and its residual is deconv2x2 + BatchNorm.
    """
    out_channels = planes * block.expansion
    upsample = nn.Sequential(deconv2x2(in_channels, out_channels), nn.BatchNorm2d(out_channels))
    first = block(in_channels, planes, downsample=upsample, base_width=width_per_group)
    if block is Bottleneck:
        width = first.conv2.in_channels
        first.conv2 = deconv2x2(width, width)
    else:
        first.conv1 = deconv2x2(in_channels, planes)
    rest = [block(out_channels, planes, base_width=width_per_group) for _ in range(blocks - 1)]
    return nn.Sequential(first, *rest)


class OneClassBottleneck(nn.Module):
    """RD4AD's OCBE: fuses teacher layer1..3 into the compact code the decoder starts from.

    layer1 -> conv3x3 s2, BN, ReLU, conv3x3 s2, BN, ReLU; layer2 -> conv3x3 s2, BN, ReLU; both now
    match layer3, which joins them in a concat (3 x layer3 channels) -> as many residual blocks as
    the teacher's layer4 has (3 for WRN50; RD4AD's choice), the first with stride 2 and a
    conv1x1 s2 + BN shortcut. WRN50: 3072x16x16 -> 2048x8x8.
    """

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        c1, c2, c3, c4 = spec.stage_channels
        self.reduce_layer1 = nn.Sequential(
            conv3x3(c1, c2, stride=2), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            conv3x3(c2, c3, stride=2), nn.BatchNorm2d(c3), nn.ReLU(inplace=True),
        )
        self.reduce_layer2 = nn.Sequential(conv3x3(c2, c3, stride=2), nn.BatchNorm2d(c3), nn.ReLU(inplace=True))
        fused, planes = 3 * c3, c4 // spec.block.expansion
        shortcut = nn.Sequential(conv1x1(fused, c4, stride=2), nn.BatchNorm2d(c4))
        self.blocks = nn.Sequential(
            spec.block(fused, planes, stride=2, downsample=shortcut, base_width=spec.width_per_group),
            *[spec.block(c4, planes, base_width=spec.width_per_group) for _ in range(spec.layers[3] - 1)],
        )

    def forward(self, teacher_features: list[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = teacher_features[:3]
        return self.blocks(torch.cat([self.reduce_layer1(f1), self.reduce_layer2(f2), f3], dim=1))


def _build_memories(channels: Mapping[int, int], items: Mapping[int, int], factory: MemoryFactory) -> nn.ModuleDict:
    return nn.ModuleDict({str(p): factory(channels[p], items[p]) for p in sorted(items)})


class ReverseStudent(nn.Module):
    """Reverse distillation student (RD4AD; MemKD's "MemRD"): bottleneck, then a decoder mirroring
    the teacher: stage i (i = 0, 1, 2) upsamples to teacher layer{3-i}'s shape with
    ``spec.layers[i]`` blocks (RD4AD's [3, 4, 6] for WRN50).

    Memory position p sits on the input of decoder stage p: p=0 on the bottleneck output, p=1 after
    stage 0, p=2 after stage 1 (the paper's three modules). Its query has the shape of teacher
    layer{4-p}, which NEL uses as exemplar features. A stage after a memory takes 2C channels.
    """

    kind = "reverse"

    def __init__(self, spec: BackboneSpec, memory_items: Mapping[int, int], memory_factory: MemoryFactory):
        super().__init__()
        channels = spec.stage_channels
        query_channels = {p: channels[3 - p] for p in range(3)}
        self.bottleneck = OneClassBottleneck(spec)
        self.memories = _build_memories(query_channels, memory_items, memory_factory)
        self.stages = nn.ModuleList(
            upsampling_stage(
                spec.block,
                query_channels[i] * (2 if str(i) in self.memories else 1),
                channels[2 - i] // spec.block.expansion,
                spec.layers[i],
                spec.width_per_group,
            )
            for i in range(3)
        )
        rd4ad_init_(self.bottleneck)
        rd4ad_init_(self.stages)

    @staticmethod
    def teacher_layer(position: int) -> int:
        """The teacher layer (1-4) whose features have the shape of memory ``position``'s query."""
        return 4 - position

    def forward(self, images: torch.Tensor, teacher_features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Features aligned with teacher layer1..3 (finest first)."""
        x = self.bottleneck(teacher_features)
        outputs = []
        for i, stage in enumerate(self.stages):
            if str(i) in self.memories:
                x = self.memories[str(i)](x)
            x = stage(x)
            outputs.append(x)
        return outputs[::-1]


class ForwardStudent(nn.Module):
    """Forward distillation student (MKD-style; the paper's "MemMKD", Table 5): a randomly
    initialised plain ResNet trunk (``spec.forward_student``: ResNet50 for a WRN50 teacher) whose
    layer1..3 outputs are compared with the teacher's.

    Memory position p sits after student layer{p+1}; its query has teacher layer{p+1}'s shape.
    There the 2C-channel concatenation is mapped back to C by conv1x1 + BN + ReLU (the stage's own
    output ends in BN + ReLU too); the result is both the compared feature and the next stage's
    input, so every later layer is unchanged.
    """

    kind = "forward"

    def __init__(self, spec: BackboneSpec, memory_items: Mapping[int, int], memory_factory: MemoryFactory):
        super().__init__()
        net = torchvision.models.get_model(spec.forward_student, weights=None)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3])
        query_channels = {p: spec.stage_channels[p] for p in range(3)}
        self.memories = _build_memories(query_channels, memory_items, memory_factory)
        self.fuse = nn.ModuleDict(
            {
                key: nn.Sequential(
                    conv1x1(2 * query_channels[int(key)], query_channels[int(key)]),
                    nn.BatchNorm2d(query_channels[int(key)]),
                    nn.ReLU(inplace=True),
                )
                for key in self.memories
            }
        )
        rd4ad_init_(self.fuse)

    @staticmethod
    def teacher_layer(position: int) -> int:
        return position + 1

    def forward(self, images: torch.Tensor, teacher_features: list[torch.Tensor]) -> list[torch.Tensor]:
        x = self.stem(images)
        outputs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if str(i) in self.memories:
                x = self.fuse[str(i)](self.memories[str(i)](x))
            outputs.append(x)
        return outputs
