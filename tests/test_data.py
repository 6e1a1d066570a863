"""memkd.data on tiny trees of each layout built in tmp_path (40x30 images, odd sizes)."""
import numpy as np
import pytest
import torch
from PIL import Image

from memkd.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    build_dataset,
    discover_categories,
    known_categories,
    make_loader,
)

WIDTH, HEIGHT = 40, 30
SIZE = 16


def write_image(path, color=(200, 100, 50), mode="RGB", size=(WIDTH, HEIGHT)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def write_mask(path, region=(slice(0, 15), slice(0, 20)), value=255, size=(WIDTH, HEIGHT)):
    """A mask with ``value`` over ``region`` (rows, columns) of a ``size`` (width, height) image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros(size[::-1], np.uint8)
    if region is not None:
        pixels[region] = value
    Image.fromarray(pixels).save(path)
    return path


def make_mvtec_category(root, category="bottle"):
    base = root / category
    write_image(base / "train/good/000.png")
    write_image(base / "train/good/001.png")
    write_image(base / "test/good/000.png")
    write_image(base / "test/broken/000.png")
    write_image(base / "test/broken/001.png")
    write_mask(base / "ground_truth/broken/000_mask.png")
    write_mask(base / "ground_truth/broken/001_mask.png")
    return base


@pytest.fixture
def mvtec_root(tmp_path):
    make_mvtec_category(tmp_path / "mvtec")
    return tmp_path / "mvtec"


@pytest.mark.parametrize("name", ["mvtec", "mpdd"])
def test_mvtec_layout_items(mvtec_root, name):
    train = build_dataset(name, mvtec_root, "bottle", "train", image_size=SIZE)
    assert len(train) == 2 and train.labels == [0, 0]
    item = train[0]
    assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, SIZE, SIZE) and item["mask"].dtype == torch.uint8
    assert item["mask"].sum() == 0 and item["label"] == 0 and item["defect"] == "good"
    assert item["path"].endswith("train/good/000.png")

    test = build_dataset(name, mvtec_root, "bottle", "test", image_size=SIZE, native_masks=True)
    assert [(s.defect, s.label) for s in test.samples] == [("broken", 1), ("broken", 1), ("good", 0)]
    anomalous = test[0]
    assert anomalous["label"] == 1 and anomalous["mask"].sum() > 0
    assert anomalous["mask_native"].shape == (1, HEIGHT, WIDTH)
    assert anomalous["mask_native"].sum() == 15 * 20
    assert test[2]["mask"].sum() == 0 and test[2]["mask_native"].sum() == 0


def test_image_normalisation_and_grayscale(tmp_path):
    color = (255, 0, 128)
    write_image(tmp_path / "d/train/good/rgb.png", color)
    write_image(tmp_path / "d/train/good/gray.png", 77, mode="L")
    write_image(tmp_path / "d/train/good/rgba.png", (10, 20, 30, 0), mode="RGBA")
    gray16 = tmp_path / "d/train/good/gray16.png"
    Image.fromarray(np.full((HEIGHT, WIDTH), 20000, np.uint16)).save(gray16)
    dataset = build_dataset("folder", tmp_path / "d", split="train", image_size=(12, 20))
    by_name = {item["path"].split("/")[-1]: item["image"] for item in dataset}
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    expected = (torch.tensor(color) / 255.0)[:, None, None].sub(mean).div(std).expand(3, 12, 20)
    assert by_name["rgb.png"].shape == (3, 12, 20)
    torch.testing.assert_close(by_name["rgb.png"], expected)
    # 16-bit 20000 is 20000 / 65535 * 255 = 77.8 in 8 bits.
    for name, value in [("gray.png", 77), ("rgba.png", None), ("gray16.png", 78)]:
        pixels = by_name[name] * std + mean  # back to [0, 1]
        assert pixels.shape == (3, 12, 20)
        if value is not None:  # grayscale replicated into all three channels
            torch.testing.assert_close(pixels, torch.full_like(pixels, value / 255.0), atol=1e-5, rtol=0)
    torch.testing.assert_close((by_name["rgba.png"] * std + mean)[:, 0, 0], torch.tensor([10, 20, 30]) / 255.0)


def test_mask_resize_is_bilinear_then_half(tmp_path):
    base = make_mvtec_category(tmp_path)
    # Left half (columns 0..19 of 40) set: shrunk to 16 columns, a column is set when the bilinear
    # average passes 0.5, i.e. columns 0..7 (column 7 averages source 16..21, 0.7 set).
    write_mask(base / "ground_truth/broken/000_mask.png", (slice(None), slice(0, 20)), value=1)
    mask = build_dataset("mvtec", tmp_path, "bottle", "test", image_size=SIZE)[0]["mask"][0]
    expected = torch.zeros(SIZE, SIZE, dtype=torch.uint8)
    expected[:, :8] = 1
    assert torch.equal(mask, expected)
    # A one-pixel line (column 18) averages to at most 0.36 and vanishes; nearest would keep it.
    write_mask(base / "ground_truth/broken/000_mask.png", (slice(None), slice(18, 19)), value=1)
    mask = build_dataset("mvtec", tmp_path, "bottle", "test", image_size=SIZE)[0]["mask"]
    assert mask.sum() == 0


def test_loader_runs_in_worker_processes(mvtec_root):
    dataset = build_dataset("mvtec", mvtec_root, "bottle", "test", image_size=SIZE, native_masks=True)
    batches = list(make_loader(dataset, batch_size=2, shuffle=False, workers=2))
    assert [len(batch["path"]) for batch in batches] == [2, 1]
    first = batches[0]
    assert first["image"].shape == (2, 3, SIZE, SIZE) and first["mask"].shape == (2, 1, SIZE, SIZE)
    assert first["mask_native"].shape == (2, 1, HEIGHT, WIDTH)
    assert torch.equal(first["label"], torch.tensor([1, 1])) and first["defect"] == ["broken", "broken"]


def test_loader_reports_unreadable_image_from_worker(mvtec_root):
    broken = mvtec_root / "bottle/test/good/000.png"
    broken.write_bytes(b"not a png")
    dataset = build_dataset("mvtec", mvtec_root, "bottle", "test", image_size=SIZE)
    with pytest.raises(DatasetError, match="cannot read image .*test/good/000.png"):
        dataset[2]
    with pytest.raises(DatasetError, match="test/good/000.png"):
        list(make_loader(dataset, batch_size=3, workers=1))


def test_mask_of_other_size_than_image(mvtec_root):
    write_mask(mvtec_root / "bottle/ground_truth/broken/000_mask.png", size=(WIDTH + 1, HEIGHT))
    dataset = build_dataset("mvtec", mvtec_root, "bottle", "test")
    with pytest.raises(DatasetError, match="000_mask.png is 41x30 but its image .*000.png is 40x30"):
        dataset[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_check_files_decodes_every_image_and_mask_up_front(mvtec_root, workers):
    for split in ("train", "test"):
        build_dataset("mvtec", mvtec_root, "bottle", split, image_size=SIZE).check_files(workers)
    (mvtec_root / "bottle/train/good/001.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    train = build_dataset("mvtec", mvtec_root, "bottle", "train", image_size=SIZE)  # indexing does not open files
    with pytest.raises(DatasetError, match="cannot read image .*train/good/001.png"):
        train.check_files(workers)
    write_mask(mvtec_root / "bottle/ground_truth/broken/001_mask.png", size=(WIDTH, HEIGHT + 2))
    with pytest.raises(DatasetError, match="001_mask.png is 40x32 but its image"):
        build_dataset("mvtec", mvtec_root, "bottle", "test", image_size=SIZE).check_files(workers)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda base: (base / "ground_truth/broken/001_mask.png").unlink(), "anomalous image without mask: .*broken/001.png"),
        (lambda base: (base / "test/broken/001.png").unlink(), "mask without image: .*001_mask.png"),
        (lambda base: write_mask(base / "ground_truth/crack/000_mask.png"), "masks without images: .*ground_truth/crack"),
        (lambda base: (base / "test/broken/notes.txt").write_text("x"), "unexpected file .*notes.txt"),
        (lambda base: write_mask(base / "ground_truth/broken/001.png"), "does not end in '_mask'.*broken/001.png"),
        (lambda base: [p.unlink() for p in (base / "test/good").iterdir()], "is empty: .*test/good"),
    ],
)
def test_mvtec_layout_errors_name_the_path(mvtec_root, damage, message):
    damage(mvtec_root / "bottle")
    (mvtec_root / "bottle/test/.DS_Store").write_text("hidden files are ignored")
    with pytest.raises(DatasetError, match=message):
        build_dataset("mvtec", mvtec_root, "bottle", "test")


def test_wrong_root_missing_category_and_empty_training_folder(mvtec_root, tmp_path):
    with pytest.raises(DatasetError, match="mvtec dataset root not found: .*nowhere"):
        build_dataset("mvtec", tmp_path / "nowhere", "bottle")
    with pytest.raises(DatasetError, match=r"category 'cable' not found: .*cable \(categories under .*\['bottle'\]\)"):
        build_dataset("mvtec", mvtec_root, "cable")
    for path in (mvtec_root / "bottle/train/good").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="training image folder is empty: .*train/good"):
        build_dataset("mvtec", mvtec_root, "bottle", "train")
    with pytest.raises(ValueError, match="unknown dataset 'mvtec4'"):
        build_dataset("mvtec4", mvtec_root, "bottle")
    with pytest.raises(ValueError, match="split"):
        build_dataset("mvtec", mvtec_root, "bottle", "validation")
    with pytest.raises(ValueError, match="category: required"):
        build_dataset("mvtec", mvtec_root)


def test_mvtec3d_layout(tmp_path):
    base = tmp_path / "bagel"
    write_image(base / "train/good/rgb/000.png")
    (base / "train/good/xyz").mkdir(parents=True)
    write_image(base / "test/good/rgb/000.png")
    write_mask(base / "test/good/gt/000.png", None)
    write_image(base / "test/hole/rgb/000.png")
    write_mask(base / "test/hole/gt/000.png")
    (base / "test/hole/xyz").mkdir()
    (base / "test/hole/xyz/000.tiff").write_bytes(b"point cloud, not read")
    train = build_dataset("mvtec3d", tmp_path, "bagel", "train", image_size=SIZE)
    assert len(train) == 1 and train[0]["image"].shape == (3, SIZE, SIZE)
    test = build_dataset("mvtec3d", tmp_path, "bagel", "test", image_size=SIZE)
    assert [(s.defect, s.label) for s in test.samples] == [("good", 0), ("hole", 1)]
    assert test[1]["mask"].sum() > 0 and test[0]["mask"].sum() == 0
    (base / "test/hole/gt/000.png").unlink()
    with pytest.raises(DatasetError, match="mask folder of 'hole' is empty: .*hole/gt"):
        build_dataset("mvtec3d", tmp_path, "bagel", "test")


VISA_HEADER = "object,split,label,image,mask\n"


def make_visa(root):
    write_image(root / "candle/Data/Images/Normal/0000.JPG")
    write_image(root / "candle/Data/Images/Normal/0001.JPG")
    write_image(root / "candle/Data/Images/Anomaly/000.JPG")
    # VisA masks hold defect indices (1, 2, ...), not 255.
    write_mask(root / "candle/Data/Masks/Anomaly/000.png", value=2)
    rows = [
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,",
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",
    ]
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv/1cls.csv").write_text(VISA_HEADER + "\n".join(rows) + "\n")


def test_visa_layout(tmp_path):
    make_visa(tmp_path)
    train = build_dataset("visa", tmp_path, "candle", "train", image_size=SIZE)
    assert len(train) == 1 and train[0]["label"] == 0
    test = build_dataset("visa", tmp_path, "candle", "test", image_size=SIZE, native_masks=True)
    assert test.labels == [0, 1]
    assert test[1]["defect"] == "anomaly" and test[1]["mask_native"].sum() == 15 * 20
    assert set(test[1]["mask_native"].unique().tolist()) == {0, 1}
    assert discover_categories("visa", tmp_path) == ["candle"]


@pytest.mark.parametrize(
    "row, message",
    [
        ("candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,", "line 5: anomalous image without mask"),
        ("candle,test,anomaly,candle/Data/Images/Anomaly/001.JPG,candle/Data/Masks/Anomaly/000.png", "line 5: image not found: .*001.JPG"),
        ("candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/009.png", "line 5: mask not found: .*009.png"),
        ("candle,test,defect,candle/Data/Images/Anomaly/000.JPG,", "line 5: label 'defect'"),
    ],
)
def test_visa_errors_name_the_line_and_path(tmp_path, row, message):
    make_visa(tmp_path)
    with open(tmp_path / "split_csv/1cls.csv", "a") as handle:
        handle.write(row + "\n")
    with pytest.raises(DatasetError, match=message):
        build_dataset("visa", tmp_path, "candle", "test")


def test_visa_unknown_category_and_missing_csv(tmp_path):
    make_visa(tmp_path)
    with pytest.raises(DatasetError, match=r"'pcb1' not in .*1cls.csv \(it lists \['candle'\]\)"):
        build_dataset("visa", tmp_path, "pcb1", "test")
    (tmp_path / "split_csv/1cls.csv").unlink()
    with pytest.raises(DatasetError, match="VisA split file not found: .*split_csv/1cls.csv"):
        build_dataset("visa", tmp_path, "candle", "test")


def make_eyecandies(root):
    train = root / "CandyCane/train/data"
    for light in range(6):
        write_image(train / f"000_image_{light}.png")
    write_mask(train / "000_depth.png", None)
    (train / "000_info.yaml").write_text("not read")
    test = root / "CandyCane/test_public/data"
    write_image(test / "000_image_4.png")
    write_mask(test / "000_mask.png", None)
    write_image(test / "001_image_4.png")
    write_mask(test / "001_mask.png")
    return test


def test_eyecandies_layout(tmp_path):
    test_dir = make_eyecandies(tmp_path)
    train = build_dataset("eyecandies", tmp_path, "CandyCane", "train", image_size=SIZE)
    assert [s.image_path.name for s in train.samples] == ["000_image_4.png"]
    assert build_dataset("eyecandies", tmp_path, "CandyCane", "train", eyecandies_light=0).samples[0].image_path.name == "000_image_0.png"
    test = build_dataset("eyecandies", tmp_path, "CandyCane", "test", image_size=SIZE)
    assert [(s.defect, s.label) for s in test.samples] == [("good", 0), ("bad", 1)]
    assert test[1]["mask"].sum() > 0 and test[0]["mask"].sum() == 0
    write_mask(test_dir / "002_mask.png")
    with pytest.raises(DatasetError, match="mask without image: .*002_mask.png"):
        build_dataset("eyecandies", tmp_path, "CandyCane", "test")
    (test_dir / "002_mask.png").unlink()
    (test_dir / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match="test image without mask: .*001_image_4.png"):
        build_dataset("eyecandies", tmp_path, "CandyCane", "test")


def make_folder(root):
    write_image(root / "train/good/a.png")
    write_image(root / "test/good/b.png")
    write_image(root / "test/scratch/c.jpg")
    return root


def test_folder_without_masks(tmp_path):
    make_folder(tmp_path / "parts")
    test = build_dataset("folder", tmp_path / "parts", split="test", image_size=SIZE)
    assert not test.has_masks
    assert [(s.defect, s.label) for s in test.samples] == [("good", 0), ("scratch", 1)]
    assert test[1]["mask"].sum() == 0
    assert len(build_dataset("folder", tmp_path, "parts", "train")) == 1  # category = sub-folder
    assert discover_categories("folder", tmp_path) == ["parts"]


def test_folder_with_ground_truth_or_explicit_mask_dir(tmp_path):
    root = make_folder(tmp_path / "parts")
    write_mask(root / "ground_truth/scratch/c_mask.png")
    test = build_dataset("folder", root, split="test", image_size=SIZE)
    assert test.has_masks and test[1]["mask"].sum() > 0
    write_mask(tmp_path / "labels/scratch/c.png")
    explicit = build_dataset("folder", root, split="test", mask_dir=tmp_path / "labels", mask_suffix="")
    assert explicit.samples[1].mask_path == tmp_path / "labels/scratch/c.png"
    (root / "ground_truth/scratch/c_mask.png").unlink()
    with pytest.raises(DatasetError, match="mask folder of 'scratch' is empty"):
        build_dataset("folder", root, split="test")
    with pytest.raises(DatasetError, match="mask folder not found: .*missing"):
        build_dataset("folder", root, split="test", mask_dir=tmp_path / "missing")


def test_known_and_discovered_categories(tmp_path):
    counts = {"mvtec": 15, "mpdd": 6, "visa": 12, "mvtec3d": 10, "eyecandies": 10, "folder": 0}
    assert {name: len(known_categories(name)) for name in counts} == counts
    assert "metal_nut" in known_categories("mvtec") and "pipe_fryum" in known_categories("visa")
    make_mvtec_category(tmp_path, "zipper")
    make_mvtec_category(tmp_path, "my_part")
    (tmp_path / "not_a_category").mkdir()
    assert discover_categories("mvtec", tmp_path) == ["my_part", "zipper"]
