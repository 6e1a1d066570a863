"""Tiled inference (memkd.tiling.tiled_predict) on a 2048x2448 line-camera image: throughput in
megapixels per second against resizing the image to 256x256 and predicting; the tiling's own cost
(cutting, stitching, the full-size blur) against running the same tiles through ``predict``; the
peak memory of a 20-megapixel image (fresh processes); and the seam measure
(memkd.tiling.seam_excess) of a random-weight model. Tiles 256, stride 224, tile_batch 16, blend
"mean" (tiled_predict's defaults for a 256x256 model); random weights (they do not change speed).

WideResNet50 tiled (99 tiles) takes 40 s or more per call on a 2-core CPU: quick mode there
times ResNet18 tiled only (and both resized), ``--full`` both.

    python benchmarks/test_tiling.py memory '{"what": "tiled", "backbone": "resnet18", "height": 4000,
        "width": 5000, "tile": 256, "stride": 224, "tile_batch": 16, "device": "cpu", "threads": 2}'

runs one memory probe alone (one JSON line; "what": "tiled" or "chunk").
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchlib import settings_of

HEIGHT, WIDTH = 2048, 2448
TILE, STRIDE, TILE_BATCH = 256, 224, 16
MEGAPIXELS = HEIGHT * WIDTH / 1e6
BACKBONES = ("resnet18", "wide_resnet50_2")
# tiling's own cost on top of the model's calls on the same tiles
TILING_OVERHEAD = 1.15


def line_camera_image(device: str, height: int = HEIGHT, width: int = WIDTH):
    from benchlib import images

    return images(1, max(height, width), device)[:, :, :height, :width].contiguous()


def resized_predict(model, x):
    """The untiled path: the image resized to 256x256, predicted, and its map resized back to the
    image's size (so that both paths give a full-resolution map)."""
    small = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False, antialias=True)
    maps, scores = model.predict(small)
    return F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0], scores


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ != "test_tiled_throughput":
        return
    settings = settings_of(metafunc.config)
    cases = [(backbone, impl) for backbone in BACKBONES for impl in ("tiled", "resized")
             if settings.full or settings.device == "cuda" or (backbone, impl) != ("wide_resnet50_2", "tiled")]
    metafunc.parametrize("backbone,impl", cases, ids=["-".join(c) for c in cases])


def test_tiled_throughput(backbone, impl, model_cache, measure, results, settings):
    """Megapixels per second (``items_per_s``: items are the image's megapixels) of the tiled path
    and of the resized one. Quick mode on a CPU: WideResNet50 tiled is not timed (40 s or more per
    call on 2 cores), and the tiled calls get the "train" plan's rounds."""
    from benchlib import first_call_seconds
    from memkd.tiling import tiled_predict

    device = settings.device
    model = model_cache("memkd", backbone)
    x = line_camera_image(device)
    if impl == "tiled":
        run = lambda: tiled_predict(model, x, TILE, STRIDE, tile_batch=TILE_BATCH)  # noqa: E731
    else:
        run = lambda: resized_predict(model, x)  # noqa: E731
        first_call_seconds(run)  # a tiled call is dozens of predict calls: its warm-up round settles it
    slow = impl == "tiled" and device == "cpu" and not settings.full
    if not settings.full and device == "cpu":
        results.note("tiling: quick mode on a CPU does not time WideResNet50 tiled (40 s or more per call); run --full")
    measure(run, key=f"tiling/memkd/{backbone}/{HEIGHT}x{WIDTH}/{device}", impl=impl,
            kind="train" if slow else "e2e", role="subject" if impl == "tiled" else "baseline",
            device=device, items=MEGAPIXELS, backbone=backbone, tile=TILE, stride=STRIDE, tile_batch=TILE_BATCH,
            unit="megapixels")


def test_tiling_overhead_target(model_cache, judge_in_pairs, settings):
    """tiled_predict against ``predict(sigma=0)`` on the same tiles, already cut, in the same
    batches: what cutting, stitching and the full-size blur add (ResNet18, so that the network
    does not drown them; quick mode on a CPU: a 1024x1024 crop, 25 tiles)."""
    from benchlib import case_id
    from memkd.tiling import tile_grid, tiled_predict
    from report import Target

    device = settings.device
    model = model_cache("memkd", "resnet18")
    height, width = (HEIGHT, WIDTH) if settings.full or device == "cuda" else (1024, 1024)
    x = line_camera_image(device, height, width)
    grid = tile_grid(height, width, TILE, STRIDE)
    tiles = torch.cat([x[:, :, y:y + TILE, x0:x0 + TILE] for y, x0 in grid.origins().tolist()])

    def tiles_only():
        for chunk in tiles.split(TILE_BATCH):
            model.predict(chunk, sigma=0.0)

    key = f"tiling/memkd/resnet18/{height}x{width}/{device}"
    judge_in_pairs(Target(f"tiled inference ({height}x{width}, {len(grid)} tiles, ResNet18, {device}) vs predict on "
                          f"the same tiles", case_id(key, "tiled"), case_id(key, "tiles-only"), "slowdown",
                          TILING_OVERHEAD),
                   lambda: tiled_predict(model, x, TILE, STRIDE, tile_batch=TILE_BATCH), tiles_only, kind="train",
                   device=device)


def _probe(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "memory", json.dumps(spec)], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_peak_memory_20_megapixels(results, settings):
    """One tiled call on a 4000x5000 image and, in another fresh process, one predict call on a
    chunk of tile_batch tiles (the n*A(T) of memkd.tiling's formula), so that neither reuses
    memory the other freed; the record carries the formula's value from the measured chunk."""
    spec = {"backbone": "resnet18", "height": 4000, "width": 5000, "tile": TILE, "stride": STRIDE,
            "tile_batch": TILE_BATCH, "device": settings.device, "threads": settings.threads}
    chunk = _probe({**spec, "what": "chunk"})
    record = _probe({**spec, "what": "tiled"})
    h, w = spec["height"], spec["width"]
    canvas_MB = 4 * h * w / 1e6
    tile_MB = 24 * TILE * TILE * TILE_BATCH / 1e6
    record.update(one_chunk_predict_MB=chunk["delta_MB"], canvas_MB=canvas_MB, image_MB=3 * canvas_MB,
                  formula_MB=max(canvas_MB + chunk["delta_MB"] + tile_MB, 2 * canvas_MB + 2 ** 25 / 1e6))
    results.memory.append(record)


def test_seam_on_a_random_weight_model(model_cache, results, settings):
    """memkd.tiling.seam_excess (max on tile borders minus max in tile interiors, as a fraction of
    the map's range) for a random-weight ResNet18 on a smooth texture, per blend: how much of the
    network's tile-edge response each blend keeps. Recorded, not judged: random weights."""
    from memkd.tiling import seam_excess, tile_grid, tiled_predict

    model = model_cache("memkd", "resnet18")
    g = torch.Generator().manual_seed(0)
    x = 0.2 * F.avg_pool2d(torch.randn(1, 3, 704, 704, generator=g), 5, stride=1, padding=2, count_include_pad=False)
    grid = tile_grid(704, 704, TILE, STRIDE)
    results.facts["tiling_seam_excess_random_resnet18"] = {
        blend: seam_excess(tiled_predict(model, x.to(settings.device), TILE, STRIDE, blend=blend)[0], grid).item()
        for blend in ("mean", "max")
    }


# ---- the memory probe (a fresh process) --------------------------------------------------------------


def _status_kb(field: str) -> int:
    import re

    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def memory_probe(spec: dict) -> dict:
    """Peak memory of one call in this (fresh) process, above the loaded model and input
    (benchmarks/memory_probe.py's method: peak-RSS mark reset with /proc/self/clear_refs once they
    exist, VmHWM read after the call). ``what``: "tiled", tiled_predict on a ``height`` x
    ``width`` image; "chunk", predict on ``tile_batch`` tiles. GPU: max_memory_allocated."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import build
    from memkd.tiling import tile_grid, tiled_predict

    torch.set_num_threads(spec["threads"])
    device, h, w, tile = spec["device"], spec["height"], spec["width"], spec["tile"]
    model = build("memkd", spec["backbone"], tile, device)
    g = torch.Generator().manual_seed(0)
    if spec["what"] == "tiled":  # drawn at its size: a larger temporary freed now would be reused unseen
        x = torch.randn(1, 3, h, w, generator=g).to(device)
        call = lambda: tiled_predict(model, x, tile, spec["stride"], tile_batch=spec["tile_batch"])  # noqa: E731
        what = (f"tiled inference {h}x{w} ({h * w / 1e6:.0f} MP, {len(tile_grid(h, w, tile, spec['stride']))} tiles of "
                f"{tile}, stride {spec['stride']}, tile_batch {spec['tile_batch']})")
    else:
        x = torch.randn(spec["tile_batch"], 3, tile, tile, generator=g).to(device)
        call = lambda: model.predict(x, sigma=0.0)  # noqa: E731
        what = f"predict on {spec['tile_batch']} tiles of {tile} (one chunk)"
    if device == "cuda":
        torch.cuda.synchronize()
        loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        peak, delta = None, (torch.cuda.max_memory_allocated() - loaded) / 1e6
        how = "torch.cuda.max_memory_allocated above the allocated before"
    else:
        loaded = _status_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")
        call()
        peak = _status_kb("VmHWM") * 1024
        delta, peak = (peak - loaded) / 1e6, peak / 1e6
        how = ("fresh process: VmHWM after one call (peak mark reset just before) minus VmRSS then; model and input "
               "already loaded")
    return {**spec, "what": what, "method": "memkd", "batch": 1, "peak_MB": peak, "delta_MB": delta, "how": how}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "memory":
        raise SystemExit("usage: python benchmarks/test_tiling.py memory '<json spec>'")
    print(json.dumps(memory_probe(json.loads(sys.argv[2]))))
