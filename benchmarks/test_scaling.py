"""How time grows: end-to-end inference against batch size (1..16, which also gives the best
batch for throughput) and image size; the fused nr_recall forward against H*W and against C.
Every series gets a straight-line fit (slope per unit, R^2) in the results and a plot.
"""
from __future__ import annotations

import torch

import memkd.ops
from benchlib import MEMORY_ITEMS, images, settings_of

BATCHES = (1, 2, 4, 8, 16)
OP_BATCH = 4


def _models(settings):
    if settings.full:
        return [(m, b) for b in ("wide_resnet50_2", "resnet18") for m in ("memkd", "rd")]
    if settings.device == "cuda":
        return [("memkd", "wide_resnet50_2"), ("rd", "wide_resnet50_2")]
    return [("memkd", "resnet18")]  # quick on a CPU: WideResNet50 at batch 16 takes too long


def pytest_generate_tests(metafunc):
    settings = settings_of(metafunc.config)
    name = metafunc.function.__name__
    if name == "test_inference_vs_batch":
        cases = [(m, b, n) for m, b in _models(settings) for n in BATCHES]
        metafunc.parametrize("method,backbone,batch", cases, ids=["-".join(map(str, c)) for c in cases])
    elif name == "test_inference_vs_size":
        backbone = "wide_resnet50_2" if settings.full or settings.device == "cuda" else "resnet18"
        sizes = (256, 320, 384, 448, 512) if settings.full else (256, 384, 512)
        metafunc.parametrize("backbone,size", [(backbone, s) for s in sizes], ids=[f"{backbone}-{s}" for s in sizes])
    elif name == "test_op_vs_pixels":
        sides = (16, 24, 32, 48, 64, 96, 128) if settings.full else (16, 24, 32, 48, 64)
        ops = ("nr_recall", "cosine_distance_map") if settings.full else ("nr_recall",)
        cases = [(op, device, s) for device in settings.op_devices for op in ops for s in sides]
        metafunc.parametrize("op,device,side", cases, ids=[f"{o}-{d}-{s}x{s}" for o, d, s in cases])
    elif name == "test_op_vs_channels":
        channels = (128, 256, 512, 1024, 2048, 4096) if settings.full else (128, 256, 512, 1024, 2048)
        cases = [(device, c) for device in settings.op_devices for c in channels]
        metafunc.parametrize("device,channels", cases, ids=[f"{d}-C{c}" for d, c in cases])


def test_inference_vs_batch(method, backbone, batch, model_cache, measure, settings):
    model = model_cache(method, backbone)
    x = images(batch, 256, settings.device)
    measure(lambda: model.predict(x), key=f"scaling/inference-vs-batch/{method}/{backbone}/B{batch}/256x256/{settings.device}",
            impl="kernels", kind="scaling", device=settings.device, items=batch,
            series=f"inference vs batch: {method} {backbone} 256x256 {settings.device}", x=batch, x_label="batch")


def test_inference_vs_size(backbone, size, model_cache, measure, settings):
    model = model_cache("memkd", backbone)
    x = images(1, size, settings.device)
    measure(lambda: model.predict(x), key=f"scaling/inference-vs-size/memkd/{backbone}/B1/{size}x{size}/{settings.device}",
            impl="kernels", kind="scaling", device=settings.device, items=1,
            series=f"inference vs pixels: memkd {backbone} B1 {settings.device}", x=size * size, x_label="pixels (H*W)")


def _op_call(op: str, channels: int, side: int, device: str):
    torch.manual_seed(0)
    q = torch.randn(OP_BATCH, channels, side, side, device=device)
    if op == "nr_recall":
        k, v = torch.randn(MEMORY_ITEMS, channels, device=device), torch.randn(MEMORY_ITEMS, channels, device=device)
        return lambda: memkd.ops.nr_recall(q, k, v)
    t = torch.randn_like(q)
    return lambda: memkd.ops.cosine_distance_map(q, t)


def test_op_vs_pixels(op, device, side, measure):
    channels = 256
    with torch.no_grad():
        measure(_op_call(op, channels, side, device), key=f"scaling/{op}-vs-pixels/fwd/B{OP_BATCH}-C{channels}-{side}x{side}/{device}",
                impl="fused", kind="op", device=device, items=OP_BATCH,
                series=f"{op} forward vs H*W: B={OP_BATCH}, C={channels}, {device}", x=side * side, x_label="H*W")


def test_op_vs_channels(device, channels, measure):
    side = 32
    with torch.no_grad():
        measure(_op_call("nr_recall", channels, side, device), key=f"scaling/nr_recall-vs-channels/fwd/B{OP_BATCH}-C{channels}-{side}x{side}/{device}",
                impl="fused", kind="op", device=device, items=OP_BATCH,
                series=f"nr_recall forward vs C: B={OP_BATCH}, {side}x{side}, {device}", x=channels, x_label="C")
