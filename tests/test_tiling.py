"""memkd.tiling: the tile grid, stitching, the blur after stitching, equality with ``predict`` for a
single tile, seams, defects across tile borders, batching and argument errors.

Real models are random-weight ResNet18 MemKDs at 64x64 tiles (what the grid and the blur order do
does not depend on the weights). Where a property is about the stitching and not the network
(seams, a defect across a border), a deterministic stand-in "model" with ``predict``'s signature
gives per-tile maps whose correct stitched result is known; a random-weight network has no notion
of normal, so it cannot show a defect.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import memkd.ops as ops
import memkd.tiling as tiling
from memkd.models import MemKDConfig, build_model
from memkd.ops import reference
from memkd.tiling import (
    BLEND_MODES,
    Stitcher,
    default_stride,
    gaussian_blur_strips,
    seam_excess,
    tile_grid,
    tile_positions,
    tiled_predict,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# float32 rounding only: the stitched map goes through the same kernels as predict's, and the
# blur's 33 taps are summed in a different order (conv1d strips vs the fused kernel)
RTOL, ATOL = 1e-5, 1e-6


def small_model(device="cpu"):
    torch.manual_seed(0)
    config = MemKDConfig(backbone="resnet18", weights=None, image_size=64, exemplars=3, memory_items=6)
    return build_model(config, load_teacher_weights=False).to(device).eval()


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(params=["cpp", "reference"])
def backend(request):
    ops.set_backend("cpu", request.param)
    try:
        yield request.param
    finally:
        ops.set_backend("cpu", "default")


def images(b, h, w, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


class Recorder:
    """A stand-in model: ``fn(tiles) -> maps`` with predict's signature; records each call's batch."""

    def __init__(self, fn):
        self.fn, self.batches = fn, []

    def __call__(self, tiles, sigma=4.0):
        assert sigma == 0.0, "tiled_predict must ask for unblurred per-tile maps"
        self.batches.append(tiles.shape[0])
        maps = self.fn(tiles)
        return maps, maps.flatten(1).amax(1)


def coordinate_image(b, h, w, seed=0):
    """Channel 0 random, channels 1 and 2 the pixel's row and column: a stand-in can tell where a
    tile was cut from."""
    x = images(b, h, w, seed)
    x[:, 1] = torch.arange(h, dtype=x.dtype)[:, None]
    x[:, 2] = torch.arange(w, dtype=x.dtype)[None, :]
    return x


def origin_dependent(tiles):
    """Per-tile maps that disagree between overlapping tiles (they depend on the tile's origin), so
    a wrong placement, count or blend changes the stitched map."""
    y0, x0 = tiles[:, 1, :1, :1], tiles[:, 2, :1, :1]
    return tiles[:, 0] * (1 + 0.01 * y0) + torch.sin(0.1 * x0)


def loop_stitch(fn, x, tile, stride, blend, blur_tiles_sigma=0.0):
    """The slow obvious version: every tile in a Python loop, sums and counts (or maxima) per
    pixel; ``blur_tiles_sigma`` blurs each tile's map before stitching (the wrong order)."""
    b, _, h, w = x.shape
    th, tw = tile
    total = torch.zeros(b, h, w, dtype=torch.float64)
    count = torch.zeros(h, w, dtype=torch.float64)
    best = torch.full((b, h, w), -math.inf, dtype=torch.float64)
    ys = sorted(set(list(range(0, h - th + 1, stride[0])) + [h - th]))
    xs = sorted(set(list(range(0, w - tw + 1, stride[1])) + [w - tw]))
    for y in ys:
        for x0 in xs:
            m = fn(x[:, :, y:y + th, x0:x0 + tw])
            if blur_tiles_sigma:
                m = reference.gaussian_blur(m, blur_tiles_sigma)
            m = m.double()
            total[:, y:y + th, x0:x0 + tw] += m
            count[y:y + th, x0:x0 + tw] += 1
            best[:, y:y + th, x0:x0 + tw] = torch.maximum(best[:, y:y + th, x0:x0 + tw], m)
    return (total / count if blend == "mean" else best).float()


# ---- (a) one tile covering the image is predict ---------------------------------------------------


@pytest.mark.parametrize("blend", BLEND_MODES)
@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_one_tile_covering_the_image_equals_predict(model, backend, size, blend):
    x = images(2, *size)
    expected_maps, expected_scores = model.predict(x)
    maps, scores = tiled_predict(model, x, tile=size, blend=blend)
    assert maps.shape == (2, *size) and maps.dtype == torch.float32
    torch.testing.assert_close(maps, expected_maps, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(scores, expected_scores, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1), rtol=0, atol=0)


@pytest.mark.parametrize("blend", BLEND_MODES)
def test_blur_comes_after_stitching(model, backend, blend):
    """Two overlapping tiles of a real model: tiled_predict equals the loop that stitches the
    unblurred maps and then blurs, and is far from the loop that blurs every tile first."""
    x = images(1, 64, 96, seed=1)
    unblurred = lambda t: model.predict(t, sigma=0.0)[0]  # noqa: E731
    expected = reference.gaussian_blur(loop_stitch(unblurred, x, (64, 64), (32, 32), blend), 4.0)
    maps, scores = tiled_predict(model, x, tile=64, stride=32, blend=blend)
    torch.testing.assert_close(maps, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(scores, expected.flatten(1).amax(1), rtol=RTOL, atol=ATOL)
    wrong_order = loop_stitch(unblurred, x, (64, 64), (32, 32), blend, blur_tiles_sigma=4.0)
    assert (maps - wrong_order).abs().max() > 1000 * ATOL


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_tile_equals_predict_on_cuda():
    """Model on the GPU, images left on the CPU: the tiles move, the maps come back on the GPU."""
    model = small_model("cuda")
    x = images(2, 64, 96)
    expected_maps, expected_scores = model.predict(x.cuda())
    maps, scores = tiled_predict(model, x, tile=(64, 96))
    assert maps.device.type == "cuda"
    torch.testing.assert_close(maps, expected_maps, rtol=1e-4, atol=1e-5)  # Triton's fp32 dots may be tf32x3
    torch.testing.assert_close(scores, expected_scores, rtol=1e-4, atol=1e-5)
    tiled, _ = tiled_predict(model, x, tile=64, stride=32)
    unblurred = lambda t: model.predict(t.cuda(), sigma=0.0)[0].cpu()  # noqa: E731
    expected = reference.gaussian_blur(loop_stitch(unblurred, x, (64, 64), (32, 32), "mean"), 4.0)
    torch.testing.assert_close(tiled.cpu(), expected, rtol=1e-4, atol=1e-5)


# ---- (b) the grid covers every pixel ----------------------------------------------------------------


def test_grid_of_sizes_not_multiples_of_the_stride():
    grid = tile_grid(77, 93, 32, 24)
    assert grid.ys == (0, 24, 45) and grid.xs == (0, 24, 48, 61)  # last tiles flush with the far edge
    assert len(grid) == 12
    counts = torch.zeros(77, 93, dtype=torch.int64)
    for y in grid.ys:
        for x in grid.xs:
            counts[y:y + 32, x:x + 32] += 1
    assert torch.equal(grid.counts(), counts)
    assert counts.min() >= 1


def test_tiles_land_where_the_grid_says():
    """Ones from every tile summed on the canvas (before the division) are the grid's counts, in
    both images of a batch."""
    grid = tile_grid(77, 93, 32, 24)
    stitcher = Stitcher(grid, batch=2)
    tiles = torch.arange(2 * len(grid))
    stitcher.add(tiles[:7], torch.ones(7, 32, 32))
    stitcher.add(tiles[7:], torch.ones(2 * len(grid) - 7, 32, 32))
    assert torch.equal(stitcher.canvas, grid.counts().float().expand(2, -1, -1))


@pytest.mark.parametrize(
    "size,tile,stride,expected",
    [(32, 32, 24, (0,)), (96, 32, 32, (0, 32, 64)), (100, 32, 32, (0, 32, 64, 68)), (5, 3, 1, (0, 1, 2))],
)
def test_tile_positions(size, tile, stride, expected):
    assert tile_positions(size, tile, stride) == expected


def test_default_stride_overlaps_an_eighth():
    assert default_stride(256) == (224, 224)
    assert default_stride((64, 96)) == (56, 84)
    assert tile_grid(300, 300, 256).stride == (224, 224)


# ---- (c) stitching ------------------------------------------------------------------------------------


@pytest.mark.parametrize("blend", BLEND_MODES)
def test_constant_tile_maps_stitch_to_that_constant(blend):
    """No seam from the blending itself: overlaps of a constant average (or max) to the constant,
    every pixel covered (an uncovered one would stay 0 or -inf), blurred or not."""
    x = images(2, 77, 93)
    stand_in = Recorder(lambda t: torch.full(t.shape[:1] + t.shape[2:], 0.7))
    for sigma in (0.0, 4.0):
        maps, scores = tiled_predict(stand_in, x, tile=32, stride=24, blend=blend, sigma=sigma, tile_batch=5)
        torch.testing.assert_close(maps, torch.full((2, 77, 93), 0.7), rtol=1e-6, atol=0)
        torch.testing.assert_close(scores, torch.full((2,), 0.7), rtol=1e-6, atol=0)


@pytest.mark.parametrize("tile_batch", [1, 5, 100])
@pytest.mark.parametrize("blend", BLEND_MODES)
def test_stitching_equals_a_loop(blend, tile_batch):
    x = coordinate_image(2, 77, 93)
    maps, _ = tiled_predict(Recorder(origin_dependent), x, tile=32, stride=24, blend=blend, sigma=0.0,
                            tile_batch=tile_batch)
    torch.testing.assert_close(maps, loop_stitch(origin_dependent, x, (32, 32), (24, 24), blend), rtol=1e-6, atol=1e-6)
    blurred, scores = tiled_predict(Recorder(origin_dependent), x, tile=32, stride=24, blend=blend,
                                    tile_batch=tile_batch)
    expected = reference.gaussian_blur(loop_stitch(origin_dependent, x, (32, 32), (24, 24), blend), 4.0)
    torch.testing.assert_close(blurred, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(scores, expected.flatten(1).amax(1), rtol=RTOL, atol=ATOL)


def test_rectangular_tiles_and_strides():
    x = coordinate_image(1, 70, 90)
    maps, _ = tiled_predict(Recorder(origin_dependent), x, tile=(32, 48), stride=(20, 40), sigma=0.0)
    torch.testing.assert_close(maps, loop_stitch(origin_dependent, x, (32, 48), (20, 40), "mean"), rtol=1e-6, atol=1e-6)


def test_tiles_run_in_batches_of_tile_batch():
    """24 tiles (2 images x 12) at tile_batch 5: five model calls, never more than 5 tiles each."""
    stand_in = Recorder(origin_dependent)
    tiled_predict(stand_in, coordinate_image(2, 77, 93), tile=32, stride=24, tile_batch=5)
    assert stand_in.batches == [5, 5, 5, 5, 4]


@pytest.mark.parametrize("blend", BLEND_MODES)
def test_nan_in_a_tile_map_gives_a_nan_score(blend):
    """anomaly_map's NaN rule: an image with a NaN map pixel gets a NaN score, the other image not."""
    def with_nan(t):
        m = t[:, 0].clone()
        m[(t[:, 1, 0, 0] == 0) & (t[:, 2, 0, 0] == 0) & (t[:, 0, 0, 0] > 100)] = math.nan
        return m

    x = coordinate_image(2, 64, 64)
    x[0, 0, 0, 0] = 1000.0  # marks image 0's first tile
    _, scores = tiled_predict(Recorder(with_nan), x, tile=32, stride=24, blend=blend)
    assert math.isnan(scores[0]) and math.isfinite(scores[1])


@pytest.mark.parametrize("size,sigma", [((2, 50, 70), 4.0), ((1, 5, 7), 4.0), ((3, 40, 33), 0.7)])
def test_strip_blur_equals_the_reference_blur(monkeypatch, size, sigma):
    """Strips of a few lines (forced tiny here) give scipy's blur, including maps narrower than the
    kernel's radius (reflected more than once)."""
    monkeypatch.setattr(tiling, "_STRIP_ELEMENTS", 150)
    maps = torch.randn(*size, generator=torch.Generator().manual_seed(3))
    expected = reference.gaussian_blur(maps, sigma)
    torch.testing.assert_close(gaussian_blur_strips(maps.clone(), sigma), expected, rtol=1e-6, atol=1e-6)


# ---- (d) seams on a normal image, (e) a defect across a tile border ------------------------------------------


def normal_texture(h, w, seed=0):
    """A smooth random texture around a constant colour (a "normal" surface)."""
    noise = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
    return 0.2 * F.avg_pool2d(noise, 5, stride=1, padding=2, count_include_pad=False)


def pointwise(tiles):
    """Position-independent per-tile map: each pixel's squared distance from the normal colour."""
    return tiles.pow(2).sum(1)


SEAM_MARGIN = 0.01  # of the map's range


@pytest.mark.parametrize("blend", BLEND_MODES)
def test_no_seam_on_a_normal_image(blend):
    """memkd.tiling.seam_excess for a position-independent per-tile map: the tile borders' maximum
    exceeds the tile interiors' maximum by no more than SEAM_MARGIN of the map's range, and the
    stitched map is the untiled one."""
    x = normal_texture(200, 232)
    grid = tile_grid(200, 232, 64, 56)
    maps, _ = tiled_predict(Recorder(pointwise), x, tile=64, stride=56, blend=blend)
    excess = seam_excess(maps, grid)
    assert excess.max() <= SEAM_MARGIN, excess
    torch.testing.assert_close(maps, reference.gaussian_blur(pointwise(x), 4.0), rtol=RTOL, atol=ATOL)


def test_the_seam_measure_finds_tile_edge_artefacts():
    """The measure of the test above trips on per-tile maps raised near their own edges (what zero
    padding does to a CNN): it can fail."""
    def edge_artefact(tiles):
        m = pointwise(tiles)
        m[:, :2], m[:, -2:], m[:, :, :2], m[:, :, -2:] = (v + 0.5 for v in (m[:, :2], m[:, -2:], m[:, :, :2], m[:, :, -2:]))
        return m

    x = normal_texture(200, 232)
    maps, _ = tiled_predict(Recorder(edge_artefact), x, tile=64, stride=56, blend="max")
    excess = seam_excess(maps, tile_grid(200, 232, 64, 56))
    assert excess.min() > SEAM_MARGIN, excess


def test_seam_excess_of_hand_made_maps():
    grid = tile_grid(200, 232, 64, 56)  # row edges 0, 56, 63, 112, 119, 136, 175, 199
    maps = torch.zeros(2, 200, 232)
    maps[0, 63, 30] = 1.0  # on a border: excess 1 of range 1
    maps[1, 63, 30], maps[1, 30, 30], maps[1, 0, 30] = 1.0, 2.0, 4.0  # interior 2, image edge ignored
    torch.testing.assert_close(seam_excess(maps, grid), torch.tensor([1.0, -0.25]))
    with pytest.raises(ValueError, match=r"^grid: "):
        seam_excess(torch.zeros(1, 64, 64), tile_grid(64, 64, 64))
    with pytest.raises(ValueError, match=r"^band: "):
        seam_excess(maps, grid, band=40)
    with pytest.raises(ValueError, match=r"^maps: "):
        seam_excess(maps[:, :100], grid)


def context_dependent(tiles):
    """Per-tile map relative to the tile's own notion of normal: each pixel's squared distance from
    the tile's median colour (so a tile's map depends on where it was cut, like a real model's)."""
    median = tiles.flatten(2).median(dim=2).values[:, :, None, None]
    return (tiles - median).pow(2).sum(1)


@pytest.mark.parametrize("blend", BLEND_MODES)
def test_defect_across_a_tile_border_is_found_there(blend):
    """A 4x4 defect straddling the last column of the tile at x=0 (and inside the one at x=24):
    the blurred stitched map peaks on it. A stand-in: a random-weight network knows no normal."""
    x = normal_texture(96, 96, seed=2)
    x[:, :, 40:44, 30:34] += 2.0
    grid = tile_grid(96, 96, 32, 24)
    assert grid.xs[:2] == (0, 24)  # columns 30-33 cross the first tile's last column, 31
    maps, scores = tiled_predict(Recorder(context_dependent), x, tile=32, stride=24, blend=blend)
    y, x0 = divmod(int(maps[0].argmax()), 96)
    assert abs(y - 41.5) <= 3 and abs(x0 - 31.5) <= 3, (y, x0)
    assert scores[0] == maps[0].max()


# ---- (f) arguments ------------------------------------------------------------------------------------


def ones(tiles):
    return tiles.new_ones(tiles.shape[0], *tiles.shape[2:])


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(tile=0), ValueError, "tile"),
        (dict(tile=(32,)), ValueError, "tile"),
        (dict(tile=32.0), ValueError, "tile"),
        (dict(tile=32, stride=40), ValueError, "stride"),
        (dict(tile=32, stride=0), ValueError, "stride"),
        (dict(tile=32, blend="median"), ValueError, "blend"),
        (dict(tile=32, sigma=-1.0), ValueError, "sigma"),
        (dict(tile=32, sigma=math.nan), ValueError, "sigma"),
        (dict(tile=32, tile_batch=0), ValueError, "tile_batch"),
        (dict(tile=32, tile_batch=2.5), ValueError, "tile_batch"),
        (dict(tile=128), ValueError, "images"),
        (dict(tile=32, images=torch.zeros(3, 64, 64)), ValueError, "images"),
        (dict(tile=32, images=torch.zeros(1, 1, 64, 64)), ValueError, "images"),
        (dict(tile=32, images=torch.zeros(0, 3, 64, 64)), ValueError, "images"),
        (dict(tile=32, images=torch.zeros(1, 3, 64, 64, dtype=torch.uint8)), ValueError, "images"),
        (dict(), ValueError, "tile"),  # a stand-in has no config.image_size
        (dict(tile=32, model=object()), TypeError, "model"),
        (dict(tile=32, model=lambda t, sigma: (torch.zeros(1, 5, 5), None)), ValueError, "model"),
    ],
)
def test_bad_arguments_give_one_line_errors(kwargs, error, name):
    args = dict(model=Recorder(ones), images=torch.zeros(1, 3, 64, 100))
    args.update(kwargs)
    with pytest.raises(error, match=rf"^{name}: ") as info:
        tiled_predict(args.pop("model"), args.pop("images"), **args)
    assert "\n" not in str(info.value)


def test_memkd_tiles_must_be_multiples_of_32(model):
    with pytest.raises(ValueError, match=r"^tile: expected multiples of 32"):
        tiled_predict(model, images(1, 64, 64), tile=48)


def test_memkd_tile_defaults_to_the_training_size(model):
    """64x64 tiles (config.image_size), not one tile of the whole 64x96 image."""
    x = images(1, 64, 96)
    maps = tiled_predict(model, x)[0]
    torch.testing.assert_close(maps, tiled_predict(model, x, tile=64)[0], rtol=0, atol=0)
    assert (maps - tiled_predict(model, x, tile=(64, 96))[0]).abs().max() > 1000 * ATOL
