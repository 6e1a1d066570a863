"""memkd demo: the synthetic defects, the dataset it builds, and the quick demo end to end."""
import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from memkd import demo
from memkd.cli import main
from memkd.data import build_dataset, discover_categories


@pytest.fixture(scope="module")
def texture():
    return demo._rgb(demo.available_textures()["brick"][:128, :128])


def test_textures_are_available():
    textures = demo.available_textures()
    assert set(textures) == set(demo.TEXTURES)  # all three ship with the pinned scikit-image
    assert all(t.shape == (512, 512) and t.dtype == np.uint8 for t in textures.values())


@pytest.mark.parametrize("defect", demo.DEFECTS)
def test_defects_change_the_image_only_inside_or_near_their_mask(defect, texture):
    rng = np.random.default_rng(3)
    if defect == "patch":
        other = demo._rgb(demo.available_textures()["gravel"][:128, :128])
        out, mask = demo.add_patch(texture, other, rng)
    elif defect == "scratch":
        out, mask = demo.add_scratch(texture, rng)
    else:
        out, mask = demo.add_stain(texture, rng)
    assert out.shape == texture.shape and out.dtype == np.uint8 and mask.shape == texture.shape[:2]
    area = mask.mean()
    assert 0.003 < area < 0.2, area
    changed = np.abs(out.astype(int) - texture.astype(int)).max(axis=2)
    if defect in ("patch", "scratch"):
        assert not changed[~mask].any()  # exact masks: nothing changes outside them
        assert changed[mask].mean() > 10
    else:
        # A blurred stain fades out beyond its mask (opacity < half its peak there).
        assert changed[mask].mean() > 2 * changed[~mask].mean()


def test_make_dataset_layout_and_reproducibility(tmp_path):
    settings = replace(demo.QUICK, categories=("grass", "gravel"), train_images=3, test_good=2, test_per_defect=1)
    counts = demo.make_dataset(tmp_path / "a", settings, seed=5, progress=False)
    assert set(counts) == {"grass", "gravel"}
    assert discover_categories("mvtec", tmp_path / "a") == ["grass", "gravel"]
    test = build_dataset("mvtec", tmp_path / "a", "gravel", "test", image_size=settings.image_size)
    assert len(test) == 2 + len(demo.DEFECTS) and sum(test.labels) == len(demo.DEFECTS)
    for item in test:
        assert (item["mask"].sum() > 0) == (item["defect"] != "good")
    assert len(build_dataset("mvtec", tmp_path / "a", "grass", "train", image_size=settings.image_size)) == 3

    def digest(root):
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.png")))).hexdigest()

    demo.make_dataset(tmp_path / "b", settings, seed=5, progress=False)
    demo.make_dataset(tmp_path / "c", settings, seed=6, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_weights_fall_back_to_a_random_teacher(monkeypatch, tmp_path):
    import torch
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache
    weight_set = type(torchvision.models.get_model_weights("resnet18").IMAGENET1K_V1)

    def offline(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(weight_set, "get_state_dict", offline)
    weights, text = demo.resolve_weights("auto", "resnet18", timeout=5)
    assert weights is None and "random" in text and "no network" in text
    with pytest.raises(RuntimeError, match="unavailable"):
        demo.resolve_weights("imagenet", "resnet18", timeout=5)
    assert demo.resolve_weights("none", "resnet18")[0] is None


def test_demo_refuses_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(tmp_path), "--weights", "none"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--weights", "none", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert str((out / "report.md").resolve()) in printed.out
    assert "randomly initialised" in printed.err
    report = (out / "report.md").read_text()
    assert "| brick | memkd |" in report and "| brick | rd |" in report and "Random teacher" in report
    with Image.open(out / "heatmaps.png") as grid:
        assert grid.format == "PNG" and grid.height > 4 * 100  # one row per defect type and a normal image
    summary = json.loads((out / "report.json").read_text())
    assert summary["random_teacher"] and set(summary["results"]) == {"memkd", "rd"}
    for method in ("memkd", "rd"):
        metrics = summary["results"][method]["brick"]
        assert all(0.0 <= metrics[name] <= 1.0 for name in ("image_auroc", "pixel_auroc", "aupro"))
        extra = json.loads((out / "runs" / method / "brick" / "config.json").read_text())["extra"]
        assert extra["threshold"] == pytest.approx(summary["thresholds"][method]["brick"])
    # Running again into the same folder replaces the earlier demo's data and runs.
    assert main(["demo", "--quick", "--out", str(out), "--weights", "none", "--no-progress"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["results"] == summary["results"]  # seeded: the same numbers
