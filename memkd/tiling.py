"""Tiled inference: anomaly maps of high-resolution images, stitched from per-tile maps.

Line cameras deliver 2-20 megapixel images, and defects a few pixels wide vanish when a whole image
is resized to the model's input size. ``tiled_predict`` instead cuts tiles from the full-resolution
normalised image, runs them through the model in batches, blends the per-tile *unblurred* maps into
one full-resolution canvas and only then applies the Gaussian blur of ``MemKD.predict``; the image
score is the maximum of the blurred stitched map, as in ``memkd.ops.anomaly_map``. With one tile
covering the whole image the result is ``model.predict``'s (float32 rounding apart).

Tile grid (``tile_grid``). Along each axis of length ``size`` with tile ``T`` and stride ``S``
(1 <= S <= T): tiles start at 0, S, 2S, ... as long as they fit, plus one tile flush with the far
edge (start ``size - T``) when ``size - T`` is not a multiple of S, so every pixel is covered and
no tile reaches past the image. An image smaller than the tile in either dimension is refused (one
line naming ``images`` and the tile): padding it would show the model content that is not there
(mirrored or constant borders it never saw in training) and could raise false alarms, while a
smaller tile is one argument away.

Blending (``blend``):

- ``"mean"`` (default): every pixel is the average of the tiles covering it. A CNN's response
  within about a receptive field of a tile's edge is distorted by the convolutions' zero padding;
  with overlapping tiles the neighbour sees the same pixels away from its own edge, and averaging
  dilutes the artefact instead of keeping it, so the stitched map has no seams on normal images
  (tests/test_tiling.py measures the seam).
- ``"max"``: every pixel is the largest of the covering tiles' values: the most sensitive choice
  (a defect seen well by any one tile survives in full), at the price of keeping each tile's edge
  artefacts, which shows as lines along tile borders when the model has them.

Memory. Tiles are cut, run and stitched ``tile_batch`` at a time; all tiles' features never exist
at once. Beyond the input image and the model, for B images of H x W, tiles T_h x T_w and
n = ``tile_batch`` (float32, bytes):

    peak ~ max(4*B*H*W + n*(A(T) + 24*T_h*T_w),   # canvas + one chunk in flight
               8*B*H*W + 40 MB)                   # canvas + blur buffer + blur strips

where A(T) is what ``model.predict`` needs per T_h x T_w tile (its activations and features; the
24*T_h*T_w are the tile copy, its stitching indices and its map). The coverage counts are two
vectors (H + W), not a canvas, because the grid is separable. The blur runs in strips of rows
(scipy 'reflect' borders, the taps of ``memkd.ops.reference.gaussian_blur``; the 40 MB of strip
buffers were measured at 20 MP).
benchmarks/test_tiling.py measures the peak for a 20-megapixel image.

On CUDA the "mean" canvas sums overlapping tiles with atomic adds, so results may differ between
runs in the last bits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from memkd.models import MemKD
from memkd.models.config import TILE_BLENDS
from memkd.ops.reference import gaussian_taps, reflect_indices

BLEND_MODES = TILE_BLENDS  # one list for the config and this module
DEFAULT_TILE_BATCH = 16
# Elements of one blur strip: 4 MiB of float32 stays in cache for the 33 passes over it (a 20 MP
# blur took 0.7 s; 1 MiB strips 2.3 s, per-call overhead) and is small next to a 20 MP canvas.
_STRIP_ELEMENTS = 1 << 20

Size = Union[int, Sequence[int]]
Predict = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _pair(value: Size, name: str) -> tuple[int, int]:
    """``value`` as (height, width) of positive ints; an int means both."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a positive int or (height, width), got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    try:
        pair = tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name}: expected a positive int or (height, width), got {value!r}")
    return pair


def tile_positions(size: int, tile: int, stride: int) -> tuple[int, ...]:
    """Start offsets of the tiles along one axis: 0, stride, 2*stride, ... while a tile fits, and a
    last one flush with the far edge (``size - tile``) when the regular ones stop short of it."""
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return tuple(starts)


@dataclass(frozen=True)
class TileGrid:
    """The tiles covering one H x W image: ``ys`` x ``xs`` start offsets of ``tile`` = (T_h, T_w)
    tiles, row-major (tile k starts at (ys[k // len(xs)], xs[k % len(xs)]))."""

    height: int
    width: int
    tile: tuple[int, int]
    stride: tuple[int, int]
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def origins(self, device=None) -> torch.Tensor:
        """[len(self), 2] (y, x) start of every tile, row-major."""
        ys = torch.tensor(self.ys, device=device)
        xs = torch.tensor(self.xs, device=device)
        return torch.cartesian_prod(ys, xs).reshape(-1, 2)

    def axis_counts(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """How many tile rows cover each image row [H] and tile columns each column [W] (int64)."""
        return (_coverage(self.height, self.ys, self.tile[0], device),
                _coverage(self.width, self.xs, self.tile[1], device))

    def counts(self, device=None) -> torch.Tensor:
        """[H, W] number of tiles covering each pixel: the outer product of ``axis_counts``."""
        rows, cols = self.axis_counts(device)
        return rows[:, None] * cols[None, :]


def _coverage(size: int, starts: Sequence[int], tile: int, device) -> torch.Tensor:
    pixel = torch.arange(size, device=device)[:, None]
    start = torch.tensor(starts, device=device)[None, :]
    return ((pixel >= start) & (pixel < start + tile)).sum(1)


def tile_grid(height: int, width: int, tile: Size, stride: Optional[Size] = None) -> TileGrid:
    """The grid of ``tile`` (int or (T_h, T_w)) tiles at ``stride`` (default: ``default_stride``)
    covering an H x W image to the last pixel (see the module docstring for the policy)."""
    th, tw = _pair(tile, "tile")
    sh, sw = _pair(default_stride((th, tw)) if stride is None else stride, "stride")
    if sh > th or sw > tw:
        raise ValueError(f"stride: expected at most the tile {(th, tw)} (a larger one leaves gaps), got {(sh, sw)}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
        raise ValueError(f"height, width: expected positive ints, got {(height, width)!r}")
    h, w = height, width
    if h < th or w < tw:
        raise ValueError(
            f"images: {h}x{w} is smaller than the tile {th}x{tw}; pass a tile no larger than the image"
        )
    return TileGrid(h, w, (th, tw), (sh, sw), tile_positions(h, th, sh), tile_positions(w, tw, sw))


def default_stride(tile: Size) -> tuple[int, int]:
    """tile - tile // 8 per axis (224 for 256): an overlap of 1/8 of a tile, enough for the
    neighbour to see a tile's padding-distorted edge away from its own edge, at 1.3x the tiles of
    a grid without overlap."""
    th, tw = _pair(tile, "tile")
    return th - th // 8, tw - tw // 8


class Stitcher:
    """Blends per-tile maps of ``batch`` images tiled by ``grid`` into [batch, H, W] canvases.

    ``add(tiles, maps)`` takes any subset of the batch's tiles, numbered ``image * len(grid) +
    tile`` (tile in the grid's row-major order), with their maps [n, T_h, T_w]; ``result()``
    returns the blended maps once every tile was added (overlaps averaged for "mean", the
    maximum for "max"; see the module docstring).
    """

    def __init__(self, grid: TileGrid, batch: int, blend: str = "mean", device=None):
        if blend not in BLEND_MODES:
            raise ValueError(f"blend: expected one of {BLEND_MODES}, got {blend!r}")
        self.grid, self.batch, self.blend = grid, batch, blend
        fill = 0.0 if blend == "mean" else -math.inf
        self.canvas = torch.full((batch, grid.height, grid.width), fill, device=device)
        th, tw = grid.tile
        self._origins = grid.origins(self.canvas.device)
        # flat offset of each pixel of a tile from the tile's first pixel
        self._offsets = (torch.arange(th, device=self.canvas.device)[:, None] * grid.width
                         + torch.arange(tw, device=self.canvas.device)[None, :])

    def add(self, tiles: torch.Tensor, maps: torch.Tensor) -> None:
        n = tiles.numel()
        if maps.shape != (n, *self.grid.tile):
            raise ValueError(f"maps: expected [{n}, {self.grid.tile[0]}, {self.grid.tile[1]}] for {n} tiles, "
                             f"got {tuple(maps.shape)}")
        tiles = tiles.to(self.canvas.device)
        image, tile = tiles // len(self.grid), tiles % len(self.grid)
        y, x = self._origins[tile].unbind(1)
        first = (image * self.grid.height + y) * self.grid.width + x
        index = (first[:, None, None] + self._offsets).reshape(-1)
        values = maps.to(self.canvas.device, self.canvas.dtype).reshape(-1)
        flat = self.canvas.view(-1)
        if self.blend == "mean":
            flat.index_add_(0, index, values)
        else:
            flat.scatter_reduce_(0, index, values, "amax")

    def result(self) -> torch.Tensor:
        """The blended canvas [batch, H, W] (the stitcher's own tensor, divided in place for "mean")."""
        if self.blend == "mean":
            rows, cols = self.grid.axis_counts(self.canvas.device)
            for r in _strips(self.grid.height, self.batch * self.grid.width):
                self.canvas[:, r].div_(rows[r, None] * cols[None, :])
        return self.canvas


def _strips(length: int, elements_per_line: int) -> list[slice]:
    """Slices of ``length`` lines holding about _STRIP_ELEMENTS elements each."""
    step = max(1, _STRIP_ELEMENTS // max(1, elements_per_line))
    return [slice(i, min(i + step, length)) for i in range(0, length, step)]


def gaussian_blur_strips(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """``memkd.ops.reference.gaussian_blur`` (scipy's gaussian_filter: truncate 4, 'reflect'
    borders) of [B, H, W] maps in strips of rows, so that it needs one extra map-sized buffer plus
    a strip; overwrites and returns ``maps``. Each tap is one multiply-add of a shifted view of the
    padded strip: conv1d with one channel unfolds its input once per tap (33x the strip for
    sigma 4), which made a 20-megapixel blur take 0.4 GB and 3 s instead of 0.1 GB and 0.7 s."""
    taps = gaussian_taps(float(sigma))
    radius = (len(taps) - 1) // 2
    b, h, w = maps.shape
    padded_cols = reflect_indices(w, radius, maps.device)
    padded_rows = reflect_indices(h, radius, maps.device)
    across = torch.empty_like(maps)
    for r in _strips(h, b * (w + 2 * radius)):
        _taps_sum(maps[:, r].index_select(2, padded_cols), taps, 2, across[:, r])
    for r in _strips(h, b * w):
        # the rows of the strip and ``radius`` reflected rows on either side
        _taps_sum(across.index_select(1, padded_rows[r.start:r.stop + 2 * radius]), taps, 1, maps[:, r])
    return maps


def _taps_sum(padded: torch.Tensor, taps: Sequence[float], dim: int, out: torch.Tensor) -> None:
    """out = sum_k taps[k] * padded shifted by k along ``dim`` (a 1-D correlation, valid part)."""
    n = out.shape[dim]
    torch.mul(padded.narrow(dim, 0, n), taps[0], out=out)
    for k in range(1, len(taps)):
        out.add_(padded.narrow(dim, k, n), alpha=taps[k])


def seam_excess(maps: torch.Tensor, grid: TileGrid, band: int = 8) -> torch.Tensor:
    """Seam measure of stitched maps [B, H, W] tiled by ``grid``, per image [B]: the maximum on
    the tile borders inside the image (first and last row and column of every tile, the image's
    own edges excluded) minus the maximum over the tiles' interiors (pixels farther than ``band``
    from every tile edge and image edge), as a fraction of the map's range. Positive values mean
    the borders are brighter than anything inside a tile: a seam. The default band is twice the
    blur's sigma, so that a border's blurred ridge does not count as interior."""
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3 or tuple(maps.shape[1:]) != (grid.height, grid.width):
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"maps: expected [B, {grid.height}, {grid.width}] like the grid, got {shape}")
    masks = []
    for size, starts, tile in ((grid.height, grid.ys, grid.tile[0]), (grid.width, grid.xs, grid.tile[1])):
        edges = torch.tensor(sorted(set(starts) | {s + tile - 1 for s in starts}), device=maps.device)
        pixel = torch.arange(size, device=maps.device)
        on_edge = (pixel[:, None] == edges[None, :]).any(1) & (pixel > 0) & (pixel < size - 1)
        inside = (pixel[:, None] - edges[None, :]).abs().min(1).values > band
        masks.append((on_edge, inside))
    (row_edge, row_inside), (col_edge, col_inside) = masks
    border = row_edge[:, None] | col_edge[None, :]
    interior = row_inside[:, None] & col_inside[None, :]
    if not border.any():
        raise ValueError("grid: a single tile has no borders inside the image to measure")
    if not interior.any():
        raise ValueError(f"band: no pixel is farther than {band} from every tile edge; pass a smaller band")
    flat = maps.flatten(1)
    spread = flat.amax(1) - flat.amin(1)
    return (maps[:, border].amax(1) - maps[:, interior].amax(1)) / spread


def _predictor(model) -> Predict:
    if isinstance(model, MemKD):
        return model.predict
    if callable(model):
        return model
    raise TypeError(f"model: expected a MemKD or a callable like MemKD.predict, got {type(model).__name__}")


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a non-empty [B, 3, H, W] tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images: expected normalised floating-point images, got {images.dtype}")


def tiled_predict(
    model,
    images: torch.Tensor,
    tile: Optional[Size] = None,
    stride: Optional[Size] = None,
    *,
    blend: str = "mean",
    sigma: float = 4.0,
    tile_batch: int = DEFAULT_TILE_BATCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps [B, H, W] (float32) and image scores [B] of full-resolution images, from tiles.

    ``model``: a ``MemKD`` (its ``predict`` runs the tiles, eval mode and inference mode as there)
    or a callable with ``predict``'s signature, ``(tiles [n, 3, T_h, T_w], sigma=0.0) -> (maps
    [n, T_h, T_w], scores)``, such as a ``CompiledPredictor``. ``images``: [B, 3, H, W] normalised
    like the model's training images, any H and W at least the tile; they stay on their device and
    each batch of tiles moves to the model's, where the maps are returned.

    ``tile``: int or (T_h, T_w), default the model's ``config.image_size`` for a MemKD (the scale it
    was trained at); multiples of 32 for a MemKD. ``stride``: default ``default_stride(tile)``.
    ``blend``: "mean" or "max" (module docstring). ``sigma``: the blur of the stitched map, as in
    ``predict`` (0 skips it). ``tile_batch``: tiles per model call; peak memory grows with it
    (module docstring).
    """
    predict = _predictor(model)
    if tile is None:
        if not isinstance(model, MemKD):
            raise ValueError("tile: required when model is not a MemKD (no config.image_size to default to)")
        tile = model.config.image_size
    th, tw = _pair(tile, "tile")
    if isinstance(model, MemKD) and (th % 32 or tw % 32):
        raise ValueError(f"tile: expected multiples of 32 for a MemKD (its input constraint), got {(th, tw)}")
    if blend not in BLEND_MODES:
        raise ValueError(f"blend: expected one of {BLEND_MODES}, got {blend!r}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma: expected a finite value >= 0, got {sigma!r}")
    if isinstance(tile_batch, bool) or not isinstance(tile_batch, int) or tile_batch < 1:
        raise ValueError(f"tile_batch: expected a positive int, got {tile_batch!r}")
    _check_images(images)
    b, _, h, w = images.shape
    grid = tile_grid(h, w, (th, tw), stride)

    with torch.inference_mode():
        # every (y, x) start as a view [B, 3, H - T_h + 1, W - T_w + 1, T_h, T_w] of the images, so
        # that one gather per chunk copies exactly its tiles, already contiguous [n, 3, T_h, T_w]
        sb, sc, sy, sx = images.stride()
        windows = images.as_strided((b, 3, h - th + 1, w - tw + 1, th, tw), (sb, sc, sy, sx, sy, sx))
        origins = grid.origins(images.device)
        total = b * len(grid)
        stitcher = None
        for start in range(0, total, tile_batch):
            tiles = torch.arange(start, min(start + tile_batch, total), device=images.device)
            image, (y, x) = tiles // len(grid), origins[tiles % len(grid)].unbind(1)
            maps, _ = predict(windows[image, :, y, x], sigma=0.0)
            if not isinstance(maps, torch.Tensor) or maps.shape != (tiles.numel(), th, tw):
                shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
                raise ValueError(f"model: returned maps {shape} for {tiles.numel()} tiles, expected "
                                 f"[{tiles.numel()}, {th}, {tw}]")
            if stitcher is None:  # the canvas goes where the model puts its maps
                stitcher = Stitcher(grid, b, blend, maps.device)
            stitcher.add(tiles, maps)
        stitched = stitcher.result()
        if sigma > 0:
            stitched = gaussian_blur_strips(stitched, sigma)
        return stitched, stitched.flatten(1).amax(dim=1)


def predict_full_resolution(
    model: MemKD,
    image: torch.Tensor,
    *,
    predictor: Optional[Predict] = None,
    tile_batch: int = DEFAULT_TILE_BATCH,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The anomaly map [H, W] and score (0-d) of one normalised full-resolution image [3, H, W]
    with the tiling stored in a tiled model's config (tile ``image_size``, ``tile_stride``,
    ``tile_blend``), through ``predictor`` (a callable like ``MemKD.predict``; default the
    model's). An image smaller than the tile is refused in one line naming ``name`` (its file)."""
    config = model.config
    if not config.tiled:
        raise ValueError("model: not a tiled model (its config has no tile_stride)")
    th, tw = config.image_size
    if image.dim() != 3 or image.shape[-2] < th or image.shape[-1] < tw:
        where = f"image {name}" if name else "image"
        raise ValueError(
            f"{where}: {tuple(image.shape)} is smaller than the model's tile {th}x{tw} (or not [3, H, W]); "
            "tiled models need images at least the tile"
        )
    maps, scores = tiled_predict(
        predictor or model, image[None], (th, tw), config.tile_stride, blend=config.tile_blend, tile_batch=tile_batch
    )
    return maps[0], scores[0]
