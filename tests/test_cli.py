"""The memkd command line, run in-process through memkd.cli.main on tiny MVTec-layout trees
(64x64 images, a random ResNet-18 teacher, one epoch)."""
import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memkd.cli import main
from memkd.ops import backends
from memkd.train import load_checkpoint, save_checkpoint, update_checkpoint_extra

SIZE = 64
FAST = ["--backbone", "resnet18", "--weights", "none", "--image-size", str(SIZE), "--epochs", "1", "--batch-size", "4",
        "--memory-items", "8", "--exemplars", "2", "--workers", "0", "--device", "cpu", "--figures", "2", "--no-progress"]


def _texture(rng, size=SIZE):
    noise = rng.normal(128, 30, (size // 4, size // 4, 3))
    image = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(image)


def make_category(root: Path, category: str, seed: int, train=4, good=2, defects=("crack",), per_defect=2):
    rng = np.random.default_rng(seed)
    base = root / category
    for i in range(train):
        path = base / "train" / "good" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_texture(rng)).save(path)
    for i in range(good):
        path = base / "test" / "good" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_texture(rng)).save(path)
    for defect in defects:
        for i in range(per_defect):
            image = _texture(rng).copy()
            mask = np.zeros((SIZE, SIZE), np.uint8)
            y, x = rng.integers(8, SIZE - 24, 2)
            image[y : y + 16, x : x + 16] = 255
            mask[y : y + 16, x : x + 16] = 255
            path = base / "test" / defect / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            mask_path = base / "ground_truth" / defect / f"{i:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(mask_path)
    return base


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    make_category(root, "bottle", seed=1)
    make_category(root, "cable", seed=2, defects=("cut", "bent"), per_defect=1)
    return root


@pytest.fixture(scope="module")
def run_dir(data_root, tmp_path_factory):
    """One trained MemKD checkpoint (category bottle), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "bottle"
    assert main(["train", "--data-root", str(data_root), "--category", "bottle", "--out", str(out), *FAST]) == 0
    return out


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def single_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("memkd: error: ") and "Traceback" not in captured.err
    return lines[0]


def is_png(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.width > 0


# ---- help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["train"], ["test"], ["predict"], ["info"], ["demo"]])
def test_help_for_every_command(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: memkd")
    if command and command != ["info"]:
        assert "(default:" in out


def test_python_m_memkd_help(tmp_path):
    # Run outside the checkout so the installed package is imported, not the source tree.
    result = subprocess.run([sys.executable, "-m", "memkd", "--help"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("train", "test", "predict", "info", "demo"):
        assert command in result.stdout


def test_usage_error_is_one_line(capsys):
    assert main(["train", "--category", "bottle"]) == 2  # --out missing (--data-root may come from a resumed run)
    assert "required: --out" in single_error_line(capsys)


# ---- train --------------------------------------------------------------------------------------


def test_train_writes_checkpoint_metrics_and_threshold(run_dir):
    for name in ("config.json", "model.safetensors", "metrics.json", "metrics.md"):
        assert (run_dir / name).is_file(), name
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["category"] == "bottle" and report["method"] == "memkd" and report["images"] == 4
    for name in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro"):
        assert 0.0 <= report["metrics"][name] <= 1.0, name
    figures = sorted((run_dir / "figures").glob("*.png"))
    assert len(figures) == 2 and all(is_png(f) for f in figures)
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint.extra["threshold"] == pytest.approx(report["threshold"]["value"])
    assert checkpoint.extra["category"] == "bottle" and checkpoint.extra["dataset"] == "mvtec"
    # The stored threshold reproduces the F1-max decisions with the strict rule score > threshold.
    decisions = report["threshold"]["image_decisions"]
    assert decisions["tp"] + decisions["fp"] + decisions["tn"] + decisions["fn"] == 4


def test_train_refuses_existing_run(run_dir, data_root, capsys):
    assert main(["train", "--data-root", str(data_root), "--category", "bottle", "--out", str(run_dir), *FAST]) == 1
    assert "already holds a checkpoint" in single_error_line(capsys)


def test_train_all_categories_writes_table_with_mean(data_root, tmp_path, capsys):
    out = tmp_path / "all"
    args = ["train", "--data-root", str(data_root), "--category", "all", "--method", "rd", "--out", str(out), *FAST]
    assert main(args) == 0
    for category in ("bottle", "cable"):
        assert (out / category / "metrics.json").is_file() and (out / category / "config.json").is_file()
    table = (out / "results.md").read_text()
    assert "| bottle |" in table and "| cable |" in table and "**mean**" in table
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["categories"]) == {"bottle", "cable"}
    for name, mean in summary["mean"].items():
        values = [summary["categories"][c][name] for c in ("bottle", "cable")]
        assert mean == pytest.approx(float(np.mean(values)))
    assert "**mean**" in capsys.readouterr().out
    # memkd test on the whole run directory evaluates each category and writes the table again.
    assert main(["test", str(out), "--out", str(tmp_path / "retest"), "--figures", "0", "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    assert "**mean**" in (tmp_path / "retest" / "results.md").read_text()
    assert (tmp_path / "retest" / "cable" / "metrics.json").is_file()


# ---- test ---------------------------------------------------------------------------------------


def test_test_command_writes_reports_and_stores_threshold(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    out = tmp_path / "eval"
    # Data root, dataset and category come from the checkpoint.
    assert main(["test", str(run), "--out", str(out), "--threshold-mode", "pixel", "--figures", "3", "--workers", "0", "--no-progress"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["threshold"]["mode"] == "pixel"
    md = (out / "metrics.md").read_text()
    assert "| bottle |" in md and "**mean**" in md and "I-AUROC" in md and "AUPRO@0.3" in md
    figures = sorted((out / "figures").glob("*.png"))
    assert len(figures) == 3 and all(is_png(f) for f in figures)
    extra = load_checkpoint(run).extra
    assert extra["threshold_mode"] == "pixel" and extra["threshold"] == pytest.approx(report["threshold"]["value"])
    # Native-resolution evaluation is available as an option.
    assert main(["test", str(run / "config.json"), "--out", str(tmp_path / "native"), "--eval-size", "native", "--figures", "0", "--no-progress", "--workers", "0"]) == 0
    assert json.loads((tmp_path / "native" / "metrics.json").read_text())["eval_size"] == "native"


def test_threshold_survives_save_and_load(run_dir, tmp_path):
    checkpoint = load_checkpoint(run_dir)
    threshold = checkpoint.extra["threshold"]
    assert isinstance(threshold, float) and math.isfinite(threshold)
    resaved = save_checkpoint(checkpoint.model, tmp_path / "resaved", extra=checkpoint.extra)
    assert load_checkpoint(resaved).extra["threshold"] == threshold


# ---- predict ------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_uses_stored_threshold(run_dir, data_root, tmp_path, capsys):
    threshold = load_checkpoint(run_dir).extra["threshold"]
    test_dir = data_root / "bottle" / "test"
    single = test_dir / "good" / "000.png"
    out = tmp_path / "pred"
    assert main(["predict", str(run_dir), str(test_dir), str(single), "--out", str(out), "--batch-size", "3", "--workers", "0", "--no-progress"]) == 0
    rows = read_rows(out / "predictions.csv")
    assert len(rows) == 5  # four test images, one given twice
    assert len({r["heatmap"] for r in rows}) == 5
    for row in rows:
        assert row["decision"] == ("anomalous" if float(row["score"]) > threshold else "normal")
        assert float(row["threshold"]) == pytest.approx(threshold)
        assert is_png(out / row["heatmap"])
    assert "from the checkpoint" in capsys.readouterr().out


def test_predict_threshold_option_overrides(run_dir, data_root, tmp_path):
    test_dir = data_root / "bottle" / "test"
    for threshold, decision in (("-1e9", "anomalous"), ("1e9", "normal")):
        out = tmp_path / threshold
        assert main(["predict", str(run_dir), str(test_dir), "--out", str(out), f"--threshold={threshold}", "--workers", "0", "--no-progress"]) == 0
        assert {r["decision"] for r in read_rows(out / "predictions.csv")} == {decision}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_predict_scores_match_test_scores(run_dir, data_root, tmp_path, compiled):
    """Batched prediction on files gives the scores of the evaluation on the dataset; with --compile
    too (batches of 3: the last one is padded), up to the rounding of BatchNorm folded into the convolutions."""
    out = tmp_path / "pred"
    options = ["--compile", "--batch-size", "3"] if compiled else []
    assert main(["predict", str(run_dir), str(data_root / "bottle" / "test"), "--out", str(out), "--workers", "0", "--no-progress", *options]) == 0
    scores = {Path(r["path"]).resolve(): float(r["score"]) for r in read_rows(out / "predictions.csv")}
    checkpoint = load_checkpoint(run_dir)
    from memkd.evaluation import build_test_dataset, predict_dataset

    predictions = predict_dataset(checkpoint.model, build_test_dataset("mvtec", data_root, "bottle", checkpoint.config), progress=False)
    for path, score in zip(predictions.paths, predictions.scores):
        assert scores[Path(path).resolve()] == pytest.approx(float(score), rel=1e-4 if compiled else 1e-5, abs=1e-6)


def test_predict_figure_explains_itself_at_a_readable_size(run_dir, tmp_path):
    """A 10x10 input gives a figure of at least 256 pixels per image panel, titled with the name, the
    decision, score and threshold, with a colour bar over the range stored by `memkd test`."""
    from memkd import reports
    from memkd.reports import write_prediction_figure

    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(tiny)
    out = tmp_path / "pred"
    assert main(["predict", str(run_dir), str(tiny), "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    with Image.open(out / "tiny_heatmap.png") as picture:
        assert picture.width >= 2 * 256 and picture.height >= 256
    captured = {}
    original = reports.prediction_figure
    extra = load_checkpoint(run_dir).extra
    try:
        reports.prediction_figure = lambda *args: captured.setdefault("figure", original(*args))
        amap = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
        write_prediction_figure(tmp_path / "a.png", np.zeros((10, 10, 3), np.uint8), amap, 0.75, 0.5, "tiny.png", extra["heatmap_range"])
    finally:
        reports.prediction_figure = original
    figure = captured["figure"]
    assert figure._suptitle.get_text() == "tiny.png: anomalous, score 0.75 > threshold 0.5"
    bar = figure.axes[-1]  # the colour bar's axis
    assert bar.get_ylim() == pytest.approx(tuple(extra["heatmap_range"]))
    assert "fixed for this model" in figure._supxlabel.get_text()
    assert figure.axes[1].images[0].get_array().shape[0] >= 256


def test_predict_into_a_folder_in_use_is_refused_and_a_rerun_says_it_replaces(run_dir, data_root, tmp_path, capsys):
    out = tmp_path / "pred"
    out.mkdir()
    images = str(data_root / "bottle" / "test" / "good")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)", str(out / ".memkd.lock")],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        assert main(["predict", str(run_dir), images, "--out", str(out), "--threshold", "1", "--workers", "0", "--no-progress"]) == 1
        assert "another memkd process is writing into" in single_error_line(capsys)
        assert not (out / "predictions.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    for _ in range(2):
        assert main(["predict", str(run_dir), images, "--out", str(out), "--threshold", "1", "--workers", "0", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("holds the predictions.csv of an earlier run: it is replaced") == 1


def test_out_that_is_a_file(run_dir, data_root, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    assert main(["train", "--data-root", str(data_root), "--category", "bottle", "--out", str(file), *FAST]) == 1
    assert "is a file" in single_error_line(capsys)
    assert main(["predict", str(run_dir), str(data_root / "bottle" / "test"), "--out", str(file), "--threshold", "1", "--workers", "0"]) == 1
    assert "--out" in single_error_line(capsys)


def test_undecodable_training_image_fails_before_training(data_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data_root / "bottle", root / "bottle")
    (root / "bottle" / "train" / "good" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "run"
    assert main(["train", "--data-root", str(root), "--category", "bottle", "--out", str(out), *FAST]) == 1
    line = single_error_line(capsys)
    assert "cannot read image" in line and "002.png" in line
    assert not out.exists()  # nothing started


# ---- resume -------------------------------------------------------------------------------------


def test_resume_keeps_the_stored_settings_and_announces_changes(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)  # a copy without symlinks: plain files and directories
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--save-every", "3", "--no-progress"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"resuming {run} at epoch 1 of 2 with its stored settings; --epochs 1 -> 2; --save-every 10 -> 3"
    checkpoint = load_checkpoint(run)
    assert checkpoint.epoch == 2 and checkpoint.step == 2  # batch 4 of 4 images, as stored (not the default 16)
    assert (checkpoint.training["batch_size"], checkpoint.training["save_every"], checkpoint.training["workers"]) == (4, 3, 0)
    assert checkpoint.config.backbone == "resnet18" and checkpoint.extra["threshold"] is not None


@pytest.mark.parametrize(
    "option, value, stored",
    [("--backbone", "resnet34", "resnet18"), ("--image-size", "32", "(64, 64)"), ("--method", "rd", "memkd"),
     ("--memory-items", "9", "(8, 8, 8)"), ("--batch-size", "8", "4"), ("--lr", "0.01", "0.005"), ("--seed", "1", "0"),
     ("--category", "cable", "bottle")],
)
def test_resume_refuses_a_changed_model_recipe_or_data(option, value, stored, run_dir, tmp_path, capsys):
    before = (run_dir / "config.json").read_bytes()
    assert main(["train", "--resume", "--out", str(run_dir), option, value]) == 1
    line = single_error_line(capsys)
    assert line.startswith(f"memkd: error: {option} {value}: the run in {run_dir}") and stored in line, line
    assert (run_dir / "config.json").read_bytes() == before


def test_resume_all_categories_starts_the_missing_ones_with_the_stored_settings(data_root, tmp_path, capsys):
    out = tmp_path / "all"
    assert main(["train", "--data-root", str(data_root), "--category", "bottle", "--method", "rd", "--out", str(out / "bottle"), *FAST]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--data-root", str(data_root), "--category", "all", "--out", str(out), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"resuming {out / 'bottle'} (all 1 epochs trained) with its stored settings"
    assert lines[1] == f"{out / 'cable'}: no checkpoint yet; training it from the start with the settings of {out / 'bottle'}"
    cable = load_checkpoint(out / "cable")
    assert cable.config == load_checkpoint(out / "bottle").config and cable.config.method == "rd"
    assert (cable.training["batch_size"], cable.training["epochs"]) == (4, 1) and cable.extra["category"] == "cable"
    assert "| cable |" in (out / "results.md").read_text()


def test_resume_without_a_checkpoint(tmp_path, capsys):
    assert main(["train", "--resume", "--out", str(tmp_path / "empty")]) == 1
    assert "holds no checkpoint to resume" in single_error_line(capsys)
    assert main(["train", "--out", str(tmp_path / "empty")]) == 1
    assert "--data-root: required" in single_error_line(capsys)


# ---- info ---------------------------------------------------------------------------------------


def test_info_prints_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for package in ("memkd", "torch", "torchvision", "triton"):
        assert f"\n{package} " in "\n" + out
    for op, per_device in backends().items():
        assert f"  {op}:" in out
        for device, why in per_device.items():
            assert why in out


# ---- bad input ----------------------------------------------------------------------------------


def test_missing_data_root(tmp_path, capsys):
    assert main(["train", "--data-root", str(tmp_path / "nope"), "--category", "bottle", "--out", str(tmp_path / "o"), *FAST]) != 0
    assert "not found" in single_error_line(capsys)


def test_unknown_category(data_root, tmp_path, capsys):
    assert main(["train", "--data-root", str(data_root), "--category", "teapot", "--out", str(tmp_path / "o"), *FAST]) != 0
    line = single_error_line(capsys)
    assert "teapot" in line and "bottle" in line  # names the categories that are there


def test_invalid_config_value(data_root, tmp_path, capsys):
    args = [a if a != str(SIZE) else "100" for a in FAST]  # not a multiple of 32
    assert main(["train", "--data-root", str(data_root), "--category", "bottle", "--out", str(tmp_path / "o"), *args]) != 0
    assert "multiple" in single_error_line(capsys)


@pytest.mark.parametrize("command", ["test", "predict"])
def test_corrupt_checkpoint(command, run_dir, data_root, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    (run / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    args = [command, str(run)] + ([str(data_root / "bottle" / "test"), "--out", str(tmp_path / "p")] if command == "predict" else [])
    assert main(args + ["--no-progress", "--workers", "0"]) != 0
    assert "corrupt" in single_error_line(capsys)


def test_corrupt_checkpoint_config(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    (run / "config.json").write_text("{ not json")
    assert main(["test", str(run), "--no-progress"]) != 0
    assert "config.json" in single_error_line(capsys)


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"123")
    assert main(["test", str(tmp_path / "weights.bin")]) != 0
    assert "not a memkd checkpoint" in single_error_line(capsys)
    assert main(["test", str(tmp_path / "missing")]) != 0
    assert "no such file" in single_error_line(capsys)


def test_predict_without_threshold(run_dir, data_root, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    update_checkpoint_extra(run, {"threshold": None})
    args = ["predict", str(run), str(data_root / "bottle" / "test"), "--out", str(tmp_path / "p"), "--no-progress", "--workers", "0"]
    assert main(args) != 0
    line = single_error_line(capsys)
    assert "no decision threshold" in line and "--threshold" in line
    assert main(args + ["--threshold", "1.0"]) == 0  # an explicit threshold is enough


def test_predict_missing_image(run_dir, tmp_path, capsys):
    assert main(["predict", str(run_dir), str(tmp_path / "nope.png"), "--out", str(tmp_path / "p")]) != 0
    assert "nope.png" in single_error_line(capsys)


def test_predict_unreadable_image_is_reported(run_dir, data_root, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(data_root / "bottle" / "test" / "crack", images)
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "p"
    assert main(["predict", str(run_dir), str(images), "--out", str(out), "--no-progress", "--workers", "0"]) == 1
    rows = {Path(r["path"]).name: r for r in read_rows(out / "predictions.csv")}
    assert rows["broken.png"]["decision"] == "error" and rows["000.png"]["decision"] in ("normal", "anomalous")


def test_debug_shows_traceback(tmp_path, capsys):
    assert main(["--debug", "test", str(tmp_path / "missing")]) != 0
    assert "Traceback" in capsys.readouterr().err
