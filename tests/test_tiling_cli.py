"""Tiling wired into the product (issue #17): MemKDConfig.tile_stride / tile_blend stored in the
checkpoint, ``memkd train --tile-stride`` on random tiles of full-resolution images, ``memkd test``
and ``memkd predict`` stitching native-resolution maps with ``tiled_predict``, and ``memkd export``
refusing tiled models. Tiny MVTec-layout tree of 100x130 images, 64x64 tiles, random ResNet-18."""
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memkd.cli import main
from memkd.data import DatasetError, build_dataset
from memkd.data.tiles import TileCrops, tile_key
from memkd.data.transforms import full_resolution_tensor, read_image
from memkd.models import MemKDConfig
from memkd.pipeline import build_train_dataset, predict_images
from memkd.tiling import BLEND_MODES, tiled_predict
from memkd.train import load_checkpoint
from memkd.train.batches import DrawKeyedSampler, ExemplarBatches

TILE, STRIDE = 64, 48
HEIGHT, WIDTH = 100, 130
FAST = ["--backbone", "resnet18", "--weights", "none", "--image-size", str(TILE), "--epochs", "1", "--batch-size", "4",
        "--memory-items", "8", "--exemplars", "2", "--workers", "0", "--device", "cpu", "--figures", "1", "--no-progress"]


def _texture(rng, height=HEIGHT, width=WIDTH):
    noise = rng.normal(128, 30, (height // 4, width // 4, 3))
    return np.asarray(Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC))


def make_category(root: Path, seed: int = 0, height=HEIGHT, width=WIDTH) -> Path:
    """MVTec layout: 4 training images, 2 normal test images, 2 'crack' ones with masks."""
    rng = np.random.default_rng(seed)
    base = root / "plate"
    for split, count in (("train", 4), ("test", 2)):
        for i in range(count):
            path = base / split / "good" / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_texture(rng, height, width)).save(path)
    for i in range(2):
        image, mask = _texture(rng, height, width).copy(), np.zeros((height, width), np.uint8)
        y, x = 10 + 30 * i, 20 + 50 * i
        image[y : y + 6, x : x + 30] = 255  # a thin scratch
        mask[y : y + 6, x : x + 30] = 255
        for folder, name, pixels in (("test/crack", f"{i:03d}.png", image), ("ground_truth/crack", f"{i:03d}_mask.png", mask)):
            path = base / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return base


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hires")
    make_category(root)
    return root


@pytest.fixture(scope="module")
def run_dir(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "plate"
    args = ["train", "--data-root", str(data_root), "--category", "plate", "--out", str(out), *FAST]
    assert main([*args, "--tile-stride", str(STRIDE)]) == 0
    return out


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def stored_config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())["config"]


# ---- configuration ------------------------------------------------------------------------------


def test_config_round_trip_and_defaults():
    config = MemKDConfig(backbone="resnet18", weights=None, image_size=64, tile_stride=48, tile_blend="max")
    assert config.tiled and config.tile_stride == (48, 48) and config.tile_blend == "max"
    data = json.loads(json.dumps(config.to_dict()))
    assert data["tile_stride"] == [48, 48] and data["tile_blend"] == "max"
    assert MemKDConfig.from_dict(data) == config
    assert MemKDConfig(image_size=(64, 96), tile_stride=(32, 96)).tile_stride == (32, 96)
    untiled = MemKDConfig(image_size=64)
    assert not untiled.tiled and untiled.tile_stride is None and untiled.tile_blend == "mean"
    old = {k: v for k, v in untiled.to_dict().items() if not k.startswith("tile_")}  # an earlier version's config.json
    assert MemKDConfig.from_dict(old) == untiled and not MemKDConfig.from_dict(old).tiled
    from memkd.models.config import TILE_BLENDS

    assert TILE_BLENDS == BLEND_MODES


@pytest.mark.parametrize("stride, message", [
    (0, "tile_stride: expected None"), (-4, "tile_stride: expected None"), (True, "tile_stride: expected None"),
    ("48", "tile_stride: expected None"), ((48,), "tile_stride: expected None"), ((48, 0), "tile_stride: expected None"),
    (65, "tile_stride: expected at most the tile"), ((64, 70), "tile_stride: expected at most the tile"),
])
def test_config_rejects_bad_strides(stride, message):
    with pytest.raises(ValueError, match=message):
        MemKDConfig(image_size=64, tile_stride=stride)


def test_config_rejects_bad_blend():
    with pytest.raises(ValueError, match="tile_blend: expected one of"):
        MemKDConfig(image_size=64, tile_stride=48, tile_blend="median")


@pytest.mark.parametrize("options, status, message", [
    (["--tile-stride", "0"], 2, "--tile-stride: expected a positive integer"),
    (["--tile-stride", "x"], 2, "--tile-stride: expected a positive integer"),
    (["--tile-blend", "median", "--tile-stride", "48"], 2, "--tile-blend: invalid choice"),
    (["--tile-stride", "65"], 1, "--tile-stride 65: expected at most the tile, --image-size 64"),
    (["--tile-blend", "max"], 1, "--tile-blend: only with --tile-stride"),
])
def test_train_rejects_bad_tiling_options(options, status, message, data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data-root", str(data_root), "--category", "plate", "--out", str(out), *FAST, *options]) == status
    assert message in error_line(capsys)
    assert not (out / "config.json").exists()


# ---- training tiles -----------------------------------------------------------------------------


def test_training_tiles_are_seeded_random_crops_without_resize(data_root):
    config = MemKDConfig(backbone="resnet18", weights=None, image_size=TILE, tile_stride=STRIDE)
    tiles = build_train_dataset("mvtec", data_root, "plate", config, seed=3)
    assert isinstance(tiles, TileCrops) and len(tiles) == 4
    assert not isinstance(build_train_dataset("mvtec", data_root, "plate", MemKDConfig(image_size=TILE)), TileCrops)
    origins = set()
    for draw in range(6):
        item = tiles[tile_key(1, draw, len(tiles))]
        y, x = item["origin"].tolist()
        assert 0 <= y <= HEIGHT - TILE and 0 <= x <= WIDTH - TILE
        full = full_resolution_tensor(read_image(tiles.samples[1].image_path))
        assert item["image"].shape == (3, TILE, TILE)
        assert torch.equal(item["image"], full[:, y : y + TILE, x : x + TILE])  # a crop, not a resize
        origins.add((y, x))
    assert len(origins) > 3  # a new position per draw
    again = TileCrops.of(build_dataset("mvtec", data_root, "plate", "train", image_size=TILE), seed=3)
    assert torch.equal(again[tile_key(2, 4, 4)]["image"], tiles[tile_key(2, 4, 4)]["image"])  # reproducible
    other = TileCrops.of(build_dataset("mvtec", data_root, "plate", "train", image_size=TILE), seed=4)
    assert any(other[tile_key(i, 2, 4)]["origin"].tolist() != tiles[tile_key(i, 2, 4)]["origin"].tolist() for i in range(4))


def test_samplers_key_training_and_exemplar_draws(data_root):
    tiles = TileCrops.of(build_dataset("mvtec", data_root, "plate", "train", image_size=TILE), seed=0)
    sampler = DrawKeyedSampler(tiles, 1, 0, shuffle=True, seed=0)
    sampler.set_epoch(0)
    assert sorted(sampler) == [0, 1, 2, 3]
    sampler.set_epoch(3)
    assert sorted(sampler) == [24, 25, 26, 27]  # draw 2 * epoch
    exemplars = ExemplarBatches(4, 2, seed=0, draw_keys=True)
    plain = ExemplarBatches(4, 2, seed=0)
    for step in (0, 5):
        keys = exemplars.indices(step)
        assert [k - (2 * step + 1) * 4 for k in keys] == plain.indices(step)  # draw 2 * step + 1: the same images


def test_tiled_training_reads_epoch_and_exemplar_tiles(data_root, tmp_path, monkeypatch):
    keys = []
    original = TileCrops.__getitem__

    def recording(self, key):
        keys.append(int(key))
        return original(self, key)

    monkeypatch.setattr(TileCrops, "__getitem__", recording)
    out = tmp_path / "run"
    options = [*FAST, "--epochs", "2", "--tile-stride", str(STRIDE), "--figures", "0"]
    assert main(["train", "--data-root", str(data_root), "--category", "plate", "--out", str(out), *options]) == 0
    draws = {key // 4 for key in keys}
    assert {0, 2} <= draws  # the training tiles of epochs 1 and 2 (and the file check's)
    assert {1, 3} <= draws  # the exemplar tiles of steps 0 and 1 (one step per epoch)


def test_images_smaller_than_the_tile_are_refused_naming_the_file(tmp_path, capsys):
    root = tmp_path / "small"
    make_category(root, height=60, width=130)  # 60 < the 64 tile
    out = tmp_path / "run"
    assert main(["train", "--data-root", str(root), "--category", "plate", "--out", str(out), *FAST,
                 "--tile-stride", str(STRIDE)]) == 1
    line = error_line(capsys)
    assert "smaller than the tile 64x64" in line and "/plate/train/good/00" in line and ".png" in line
    with pytest.raises(DatasetError, match="000.png is 130x60, smaller than the tile"):
        TileCrops.of(build_dataset("mvtec", root, "plate", "train", image_size=TILE))[0]


# ---- train, test, predict -----------------------------------------------------------------------


def test_train_stores_the_tiling_and_evaluates_at_native_resolution(run_dir):
    config = stored_config(run_dir)
    assert config["tile_stride"] == [STRIDE, STRIDE] and config["tile_blend"] == "mean" and config["image_size"] == [TILE, TILE]
    checkpoint = load_checkpoint(run_dir, device="cpu")
    assert checkpoint.config.tiled and checkpoint.config.tile_stride == (STRIDE, STRIDE)
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["eval_size"] == "native"
    assert report["tiling"] == {"tile": [TILE, TILE], "stride": [STRIDE, STRIDE], "blend": "mean"}
    assert report["images"] == 4 and math.isfinite(report["metrics"]["pixel_auroc"])
    assert report["threshold"] is not None and report["figures"]
    with Image.open(run_dir / report["figures"][0]) as figure:
        assert figure.size[0] > 0


def test_test_and_predict_need_no_tiling_options(run_dir, data_root, tmp_path, capsys):
    assert main(["test", str(run_dir), "--out", str(tmp_path / "t"), "--workers", "0", "--no-progress", "--figures", "1"]) == 0
    report = json.loads((tmp_path / "t" / "metrics.json").read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert report["eval_size"] == "native" and report["tiling"] == trained["tiling"]
    assert report["metrics"] == pytest.approx(trained["metrics"])
    assert main(["test", str(run_dir), "--out", str(tmp_path / "n"), "--eval-size", "native", "--workers", "0",
                 "--no-progress", "--figures", "0"]) == 0
    assert json.loads((tmp_path / "n" / "metrics.json").read_text())["metrics"] == pytest.approx(report["metrics"])
    assert main(["test", str(run_dir), "--out", str(tmp_path / "s"), "--eval-size", "32", "--workers", "0",
                 "--no-progress", "--figures", "0"]) == 0
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["eval_size"] == 32
    images = data_root / "plate" / "test"
    out = tmp_path / "p"
    assert main(["predict", str(run_dir), str(images), "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    assert "inference: tiled (64x64 tiles at stride [48, 48], mean blend)" in capsys.readouterr().out
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["decision"] in ("normal", "anomalous") for r in rows)
    for row in rows:
        with Image.open(out / row["heatmap"]) as heatmap:
            assert heatmap.size[0] > 0


def test_tiled_predict_of_a_file_equals_tiled_predict_on_its_tensor(run_dir, data_root, tmp_path):
    checkpoint = load_checkpoint(run_dir, device="cpu")
    model = checkpoint.model
    path = data_root / "plate" / "test" / "crack" / "001.png"
    _, rows = predict_images(model, [path], tmp_path / "p", threshold=0.0, progress=False)
    image = full_resolution_tensor(read_image(path))
    assert image.shape == (3, HEIGHT, WIDTH)
    maps, scores = tiled_predict(model, image[None], TILE, STRIDE, blend="mean")
    assert maps.shape == (1, HEIGHT, WIDTH)
    assert rows[0]["score"] == pytest.approx(float(scores[0]), rel=1e-6)
    resized = model.predict(torch.nn.functional.interpolate(image[None], (TILE, TILE), mode="bilinear"))[1]
    assert float(resized[0]) != pytest.approx(float(scores[0]), rel=1e-3)  # not the resized image's score
    max_maps, max_scores = tiled_predict(model, image[None], TILE, STRIDE, blend="max")
    assert not torch.allclose(max_maps, maps)  # the blend matters where tiles overlap


def test_a_checkpoint_without_the_tiling_fields_loads_untiled(run_dir, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(run_dir, run, symlinks=True)
    config_file = (run / "config.json").resolve()
    header = json.loads(config_file.read_text())
    assert "tile_stride" in header["config"]
    for key in ("tile_stride", "tile_blend"):
        del header["config"][key]
    config_file.write_text(json.dumps(header))
    config = load_checkpoint(run, device="cpu").config
    assert not config.tiled and config.tile_stride is None and config.image_size == (TILE, TILE)


def test_export_refuses_tiled_models(run_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 1
    line = error_line(capsys)
    assert "tiled models cannot be exported yet" in line and "tile_stride [48, 48]" in line
    assert not out.exists()


def test_a_resumed_tiled_run_continues_with_the_same_tiles(data_root, tmp_path):
    def train(out, epochs, *extra):
        options = [*FAST, "--epochs", str(epochs), "--tile-stride", str(STRIDE), "--figures", "0", "--save-every", "1"]
        assert main(["train", "--data-root", str(data_root), "--category", "plate", "--out", str(out), *options, *extra]) == 0
        return load_checkpoint(out, device="cpu").model.state_dict()

    straight = train(tmp_path / "straight", 2)
    train(tmp_path / "resumed", 1)
    resumed = train(tmp_path / "resumed", 2, "--resume")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
