"""memkd export and memkd.deploy: every export scores exactly as MemKD.predict (memkd and rd, tiny
random-weight resnet18 models at 64x64), decides as `memkd predict` does, runs without torch (ONNX,
OpenVINO), and bad input gets a one-line error. Each (method, format) export is built once per
module: the AOTI compile takes about a minute on two cores."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from memkd import cli, deploy, export
from memkd.models import MemKDConfig, build_model
from memkd.ops import reference
from memkd.train import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

METHODS = ("memkd", "rd")
SIZE = 64
RTOL = 1e-4  # fp32 exports against MemKD.predict


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| relative to the largest |want|: the maps are sums of cosine distances, ~1 here."""
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max() / np.abs(want).max())


def assert_close(got, want, what: str) -> None:
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=RTOL * float(np.abs(want).max()), err_msg=what)


def normalized(pixels: np.ndarray, config: MemKDConfig) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> what MemKD.predict takes, via memkd.data's own conversion."""
    from memkd.images import normalized_pixels

    return torch.from_numpy(np.ascontiguousarray(normalized_pixels(pixels, config.mean, config.std).transpose(0, 3, 1, 2)))


def random_pixels(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Six PNG files of other sizes than the model's (so the resizing is exercised), smooth with a
    bright square on some so that the scores spread."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for index in range(6):
        height, width = 80 + 8 * index, 72
        base = np.linspace(0, 200, width, dtype=np.float32)[None, :, None] + rng.normal(0, 20, (height, width, 3))
        if index % 2:
            base[10:30, 20:40] = 255
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(folder / f"image{index}.png")
    return folder


def score_files(model, folder: Path) -> np.ndarray:
    from memkd.images import read_rgb, resized_pixels

    pixels = np.stack([resized_pixels(read_rgb(p), (SIZE, SIZE)) for p in sorted(folder.glob("*.png"))])
    return model.predict(normalized(pixels, model.config))[1].numpy()


@pytest.fixture(scope="module", params=METHODS)
def run(request, tmp_path_factory, images):
    """A checkpoint of a random-weight model whose stored threshold is the median score of the
    test images, so that both decisions occur."""
    torch.manual_seed(0)
    config = MemKDConfig(method=request.param, backbone="resnet18", weights=None, image_size=SIZE, memory_items=5)
    model = build_model(config).eval()
    scores = np.sort(score_files(model, images))
    threshold = float((scores[2] + scores[3]) / 2)
    extra = {"threshold": threshold, "threshold_mode": "image", "threshold_rule": "anomalous if score > threshold",
             "threshold_source": {"dataset": "folder", "category": "test", "eval_size": "input"}, "heatmap_range": [0.0, 2.0]}
    directory = save_checkpoint(model, tmp_path_factory.mktemp(f"run-{request.param}"), extra=extra)
    return load_checkpoint(directory)


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    """The three exports of ``run`` (raw uint8 input), built once."""
    root = tmp_path_factory.mktemp(f"exports-{run.config.method}")
    return {fmt: export.export_run(run.directory, fmt, root / fmt) for fmt in export.FORMATS}


@pytest.fixture(scope="module")
def cli_predictions(run, images, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"cli-{run.config.method}")
    assert cli.main(["predict", str(run.directory), str(images), "--out", str(out), "--no-progress", "--workers", "0"]) == 0
    return read_csv(out / "predictions.csv")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("batch", [1, 3])
def test_export_matches_predict(run, exports, fmt, batch):
    """Maps and scores equal MemKD.predict to 1e-4 relative at batch sizes other than the traced one (2)."""
    inferencer = deploy.Inferencer(exports[fmt])
    pixels = random_pixels(batch, seed=batch)
    result = inferencer.predict(pixels)
    maps, scores = run.model.predict(normalized(pixels, run.config))
    assert result.maps.shape == (batch, SIZE, SIZE) and result.scores.shape == (batch,)
    assert_close(result.maps, maps.numpy(), f"{fmt} maps")
    assert_close(result.scores, scores.numpy(), f"{fmt} scores")
    np.testing.assert_array_equal(result.anomalous, result.scores > inferencer.threshold)


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_export_decides_as_the_cli(run, exports, images, cli_predictions, fmt, tmp_path):
    """The export's decisions (its own ``anomalous`` output) equal `memkd predict CHECKPOINT`'s, both
    decisions occur, and `memkd predict EXPORT_DIR` writes the same CSV."""
    paths = [row["path"] for row in cli_predictions]
    result = deploy.Inferencer(exports[fmt]).predict_files(paths)
    expected = [row["decision"] == "anomalous" for row in cli_predictions]
    assert 0 < sum(expected) < len(expected)
    assert result.anomalous.tolist() == expected
    assert_close(result.scores, np.array([float(row["score"]) for row in cli_predictions]), f"{fmt} scores")

    assert cli.main(["predict", str(exports[fmt]), str(images), "--out", str(tmp_path), "--no-progress"]) == 0
    rows = read_csv(tmp_path / "predictions.csv")
    assert [(r["path"], r["decision"], r["heatmap"], r["threshold"]) for r in rows] == [
        (r["path"], r["decision"], r["heatmap"], r["threshold"]) for r in cli_predictions
    ]
    assert all((tmp_path / r["heatmap"]).is_file() for r in rows)


def test_metadata(run, exports):
    for fmt, directory in exports.items():
        metadata = deploy.read_metadata(directory)
        assert metadata["model_format"] == fmt and (directory / metadata["model_file"]).is_file()
        assert metadata["format_version"] == deploy.FORMAT_VERSION
        assert (metadata["method"], metadata["backbone"], metadata["image_size"]) == (run.config.method, "resnet18", [SIZE, SIZE])
        assert metadata["mean"] == list(run.config.mean) and metadata["std"] == list(run.config.std)
        assert metadata["input"]["kind"] == "raw" and metadata["input"]["dtype"] == "uint8"
        assert metadata["threshold"]["value"] == run.extra["threshold"] and metadata["threshold"]["mode"] == "image"
        assert metadata["torch_version"] == torch.__version__ and metadata["memkd_version"]
        assert metadata["outputs"] == ["maps", "scores", "anomalous"]


def test_onnx_has_standard_operators_only(exports):
    import onnx

    model = onnx.load(str(exports["onnx"] / "model.onnx"))
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # dynamic batch


def test_normalized_input_export(run, tmp_path):
    """--input normalized takes what MemKD.predict takes."""
    directory = export.export_model(run.model, tmp_path / "onnx", "onnx", input_kind="normalized", extra=run.extra)
    inferencer = deploy.Inferencer(directory)
    assert inferencer.metadata["input"]["kind"] == "normalized"
    images = normalized(random_pixels(3, seed=7), run.config)
    result = inferencer.predict(images.numpy())
    maps, scores = run.model.predict(images)
    assert_close(result.maps, maps.numpy(), "maps")
    assert_close(result.scores, scores.numpy(), "scores")


# ---- the exactness check catches a wrong blur border, upsampling mode or threshold --------------


def _scipy_blur_with(mode):
    def blur(maps, sigma):
        taps = torch.tensor(reference.gaussian_taps(float(sigma)), dtype=maps.dtype)
        radius = (taps.numel() - 1) // 2
        x = F.pad(maps.unsqueeze(1), (radius,) * 4, mode=mode).squeeze(1)
        x = F.conv1d(x.reshape(-1, 1, x.shape[-1]), taps.view(1, 1, -1)).reshape(maps.shape[0], x.shape[1], -1)
        x = x.transpose(1, 2)
        x = F.conv1d(x.reshape(-1, 1, x.shape[-1]), taps.view(1, 1, -1)).reshape(maps.shape[0], maps.shape[2], -1)
        return x.transpose(1, 2)

    return blur


@pytest.mark.parametrize("broken", ["replicate borders", "zero borders", "align_corners=False", "nearest upsampling"])
def test_exactness_check_fails_on_a_wrong_anomaly_map(run, monkeypatch, broken):
    """What an exporter could get wrong in the traced anomaly map is far outside the tolerance."""
    pixels = random_pixels(2, seed=3)
    images = normalized(pixels, run.config)
    maps, _ = run.model.predict(images)
    if broken.endswith("borders"):
        monkeypatch.setattr(reference, "gaussian_blur", _scipy_blur_with("replicate" if broken.startswith("replicate") else "constant"))
    else:
        original = F.interpolate

        def wrong(x, size=None, mode="bilinear", align_corners=None):
            if broken == "nearest upsampling":
                return original(x, size=size, mode="nearest")
            return original(x, size=size, mode="bilinear", align_corners=False)

        monkeypatch.setattr(F, "interpolate", wrong)
    module = export.DeploymentModule(run.model, "raw", fused_anomaly_map=False).eval()
    with torch.no_grad():
        wrong_maps, _ = module(torch.from_numpy(pixels))
    assert relative_error(wrong_maps.numpy(), maps.numpy()) > 10 * RTOL
    with pytest.raises(AssertionError):
        assert_close(wrong_maps.numpy(), maps.numpy(), broken)


# ---- runtimes without torch ---------------------------------------------------------------------


BLOCK_TORCH = """
import importlib.abc, json, sys
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({name})")
sys.meta_path.insert(0, BlockTorch())
from memkd.deploy import Inferencer
result = Inferencer(sys.argv[1]).predict_files(sys.argv[2:])
assert "torch" not in sys.modules
print(json.dumps({"scores": result.scores.tolist(), "anomalous": result.anomalous.tolist()}))
"""


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_runtime_without_torch(run, exports, images, fmt):
    paths = sorted(str(p) for p in images.glob("*.png"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(exports[fmt]), *paths], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    expected = deploy.Inferencer(exports["onnx"]).predict_files(paths)
    assert_close(np.array(got["scores"]), expected.scores, f"{fmt} without torch")
    assert got["anomalous"] == expected.anomalous.tolist()


# ---- bad input ----------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_unknown_format(run, tmp_path, capsys):
    code, err = run_cli(capsys, "export", str(run.directory), "--format", "tflite", "--out", str(tmp_path / "x"))
    assert code == cli.EXIT_USAGE and "--format" in err and "tflite" in err and len(err.splitlines()) == 1
    with pytest.raises(export.ExportError, match="format: expected one of onnx, openvino, aoti, got 'tflite'"):
        export.export_run(run.directory, "tflite", tmp_path / "x")


def test_run_dir_without_checkpoint(tmp_path, capsys):
    code, err = run_cli(capsys, "export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "x"))
    assert code == cli.EXIT_ERROR and err.startswith("memkd: error: run_dir:") and str(tmp_path) in err and len(err.splitlines()) == 1
    code, err = run_cli(capsys, "export", str(tmp_path / "missing"), "--format", "onnx", "--out", str(tmp_path / "x"))
    assert code == cli.EXIT_ERROR and "run_dir: no such file or directory" in err


def test_checkpoint_without_threshold(run, tmp_path, images, capsys):
    """The export works, says it has no threshold, and gives scores only; predict then needs --threshold."""
    directory = save_checkpoint(run.model, tmp_path / "run", extra={})
    out = export.export_run(directory, "onnx", tmp_path / "onnx")
    metadata = deploy.read_metadata(out)
    assert metadata["threshold"]["value"] is None and "no decision threshold" in metadata["threshold"]["note"]
    assert metadata["outputs"] == ["maps", "scores"]
    inferencer = deploy.Inferencer(out)
    result = inferencer.predict(random_pixels(2, seed=5))
    assert result.anomalous is None and result.scores.shape == (2,)
    code, err = run_cli(capsys, "predict", str(out), str(images), "--out", str(tmp_path / "p"), "--no-progress")
    assert code == cli.EXIT_ERROR and "no decision threshold" in err and "--threshold" in err
    assert cli.main(["predict", str(out), str(images), "--out", str(tmp_path / "p"), "--threshold", "1.0", "--no-progress"]) == 0


def test_incompatible_format_version(exports, tmp_path):
    import shutil

    copy = Path(shutil.copytree(exports["onnx"], tmp_path / "old"))
    path = copy / deploy.METADATA_FILE
    metadata = json.loads(path.read_text())
    path.write_text(json.dumps({**metadata, "format_version": 99}))
    with pytest.raises(deploy.DeployError, match=f"export_dir: {path} has export format version 99"):
        deploy.Inferencer(copy)
    with pytest.raises(deploy.DeployError, match="is not a memkd export"):
        deploy.Inferencer(tmp_path)


def test_wrong_image_size(exports):
    inferencer = deploy.Inferencer(exports["onnx"])
    with pytest.raises(deploy.DeployError, match=r"images: this export takes \[B, H, W, 3\] uint8 RGB at its input size 64x64 \(got shape \(1, 32, 64, 3\)\)"):
        inferencer.predict(np.zeros((1, 32, 64, 3), np.uint8))
    with pytest.raises(deploy.DeployError, match="images: this export takes uint8"):
        inferencer.predict(np.zeros((1, SIZE, SIZE, 3), np.float32))


def test_failed_export_leaves_nothing(run, tmp_path, monkeypatch):
    def fail(model, path, input_kind, threshold):
        path.write_bytes(b"half a model")
        raise RuntimeError("exporter crashed")

    monkeypatch.setitem(export.WRITERS, "onnx", (fail, "model.onnx"))
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export.export_run(run.directory, "onnx", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_not_an_export_is_refused(run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(export.ExportError, match=f"out: {tmp_path} exists and is not a memkd export"):
        export.export_run(run.directory, "onnx", tmp_path)


def test_missing_extra_names_it(monkeypatch, run, tmp_path):
    real = export.importlib.import_module

    def without_onnx(name, *args):
        if name == "onnxscript":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(export.importlib, "import_module", without_onnx)
    with pytest.raises(export.ExportError, match=r"format onnx: the Python package 'onnxscript' is missing; install the export extra: pip install \"memkd\[export\]\""):
        export.export_run(run.directory, "onnx", tmp_path / "x")


# ---- the cached compiled package of memkd predict / memkd test ----------------------------------


def test_cached_compiled_package(images, tmp_path, capsys):
    """--compile builds the package once; a later run without --compile loads it and decides and
    scores as eager; a re-saved checkpoint (new model file) is not served by the old package."""
    from memkd.compiled_cache import CACHE_DIR, default_backend

    assert default_backend() == "openvino"  # the test extra installs the export extra

    torch.manual_seed(2)
    model = build_model(MemKDConfig(method="memkd", backbone="resnet18", weights=None, image_size=SIZE, memory_items=5)).eval()
    threshold = float(np.median(score_files(model, images)))
    directory = save_checkpoint(model, tmp_path / "run", extra={"threshold": threshold})
    common = [str(images), "--batch-size", "4", "--no-progress", "--workers", "0"]

    def predict(out, *flags):
        code = cli.main(["predict", str(directory), *common, "--out", str(tmp_path / out), *flags])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return captured.out, read_csv(tmp_path / out / "predictions.csv")

    built, _ = predict("compiled", "--compile")
    assert "inference: openvino package" in built and "built in" in built
    assert len([p for p in (directory / CACHE_DIR).iterdir() if p.is_dir()]) == 1
    loaded, cached_rows = predict("cached")
    assert "inference: openvino package" in loaded and "loaded in" in loaded
    eager_out, eager_rows = predict("eager", "--eager")
    assert "inference:" not in eager_out
    assert [r["decision"] for r in cached_rows] == [r["decision"] for r in eager_rows]
    assert 0 < sum(r["decision"] == "anomalous" for r in eager_rows) < len(eager_rows)
    assert_close([float(r["score"]) for r in cached_rows], np.array([float(r["score"]) for r in eager_rows]), "cached package scores")

    save_checkpoint(model, directory, extra={"threshold": threshold})  # a new model file: the package is stale
    stale, _ = predict("stale")
    assert "inference:" not in stale
    code = cli.main(["predict", str(directory), *common, "--out", str(tmp_path / "x"), "--compile", "--eager"])
    assert code == cli.EXIT_ERROR and "--compile, --eager" in capsys.readouterr().err


def test_fp32_threshold_decides_as_float64():
    """Scores one float32 step either side of a threshold that rounds up onto the upper one."""
    lower = np.float32(1.0)
    upper = np.nextafter(lower, np.float32(2.0))
    threshold = (float(lower) + float(upper)) / 2 + 1e-12  # rounds to upper in float32
    assert float(np.float32(threshold)) == float(upper)
    scores = torch.tensor([lower, upper])
    module_threshold = export.fp32_threshold(threshold)
    assert (scores > module_threshold).tolist() == [float(s) > threshold for s in scores.tolist()] == [False, True]


def test_cached_aoti_package_pads_and_chunks(run, tmp_path):
    """The AOTI backend of the cache (used without OpenVINO): a batch-4 package scores 3 and 6
    images (padded; chunked) as eager predict, and a run asking for another batch size finds it."""
    from memkd import compiled_cache

    directory = save_checkpoint(run.model, tmp_path / "run", extra=run.extra)
    built = compiled_cache.cached_predictor(run.model, directory, None, None, 4, "cpu", build=True, backend="aoti")
    assert built.package.built and built.package.path.suffix == ".pt2" and built.batch_size == 4
    for count in (3, 6):
        images = normalized(random_pixels(count, seed=count), run.config)
        maps, scores = built(images)
        want_maps, want_scores = run.model.predict(images)
        assert maps.shape == (count, SIZE, SIZE)
        assert_close(maps.numpy(), want_maps.numpy(), f"aoti maps, {count} images")
        assert_close(scores.numpy(), want_scores.numpy(), f"aoti scores, {count} images")
    found = compiled_cache.cached_predictor(run.model, directory, None, None, 16, "cpu", build=False, backend="aoti")
    assert found is not None and not found.package.built and found.batch_size == 4
    assert compiled_cache.cached_predictor(run.model, directory, None, None, 4, "cpu", build=False, backend="openvino") is None
