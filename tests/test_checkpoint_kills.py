"""A checkpoint is one atomic unit: a real `memkd train` process killed at any point of a save, or
at a random moment, leaves a run directory that `memkd test`, `memkd predict` and
`memkd train --resume --out RUN` accept, and the resumed run ends bit for bit where an
uninterrupted one ends (tiny folder dataset, random ResNet-18 teacher, one thread)."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from memkd.cli import main
from memkd.train import has_checkpoint, load_checkpoint
from memkd.train.checkpoint import KILL_VARIABLE, SAVE_POINTS, VERSION_PREFIX, load_training_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EPOCHS = 3
SETTINGS = ["--dataset", "folder", "--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--epochs",
            str(EPOCHS), "--save-every", "1", "--batch-size", "2", "--memory-items", "4", "--exemplars", "2",
            "--seed", "5", "--workers", "0", "--device", "cpu", "--figures", "0", "--no-progress"]
BEFORE_SWITCH = SAVE_POINTS.index("checkpoint switched")  # points 1..4 come before it


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A folder dataset: 4 training images, 2 normal and 2 defective test images, no masks."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, count in (("train/good", 4), ("test/good", 2), ("test/spot", 2)):
        (root / split).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            if "spot" in split:
                pixels[10:20, 10:20] = 255
            Image.fromarray(pixels).save(root / split / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", "--data-root", str(data_root), "--out", str(out), *SETTINGS]) == 0
    return out


def train_process(data_root: Path, out: Path, kill_plan: str = "") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", KILL_VARIABLE: kill_plan}
    command = [sys.executable, "-m", "memkd", "train", "--data-root", str(data_root), "--out", str(out), *SETTINGS]
    # cwd outside the checkout: `-m` puts the working directory first on sys.path, and the checkout's
    # memkd/ (no compiled modules unless installed editable) would run instead of the tested install.
    # SIGINT at its default in the child: a shell starts background jobs with SIGINT ignored, the
    # child would inherit that, and the SIGINT cases would test nothing of memkd.
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=out.parent,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def tensors(run: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def losses(run: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["step"], r["kd"], r["nm"], r["orth"], r["total"]) for r in records]


def check_accepted_and_resumes_exactly(run: Path, reference: Path, data_root: Path, tmp_path: Path, capsys) -> None:
    """What the next commands must accept after a kill, and that resuming ends as the reference."""
    if has_checkpoint(run):
        checkpoint = load_checkpoint(run)
        load_training_state(run, checkpoint.epoch, checkpoint.step)
        image = next((data_root / "test" / "spot").iterdir())
        assert main(["test", str(run), "--out", str(tmp_path / "tested"), "--figures", "0", "--no-progress", "--workers", "0"]) == 0
        assert main(["predict", str(run), str(image), "--out", str(tmp_path / "predicted"), "--threshold", "0.5", "--no-progress", "--workers", "0"]) == 0
        assert main(["train", "--resume", "--out", str(run)]) == 0
    else:  # killed before the first checkpoint: a fresh start is accepted, --resume says why not
        assert main(["train", "--resume", "--out", str(run)]) == 1
        assert "holds no checkpoint to resume" in capsys.readouterr().err
        assert main(["train", "--data-root", str(data_root), "--out", str(run), *SETTINGS]) == 0
    expected, got = tensors(reference), tensors(run)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert losses(run) == losses(reference)
    assert json.loads((run / "metrics.json").read_text())["metrics"] == json.loads((reference / "metrics.json").read_text())["metrics"]
    assert [p.name for p in run.iterdir() if p.name.startswith(VERSION_PREFIX)] == [os.readlink(run / "checkpoint")]


# SIGKILL at every point of a save; SIGTERM and SIGINT (which runs the save's clean-up) at points
# on both sides of the switch.
KILLS = [(point, "SIGKILL") for point in range(1, len(SAVE_POINTS) + 1)]
KILLS += [(point, name) for name in ("SIGTERM", "SIGINT") for point in (2, BEFORE_SWITCH, BEFORE_SWITCH + 1, len(SAVE_POINTS))]


@pytest.mark.parametrize("point, signal_name", KILLS)
def test_kill_at_every_point_of_a_save(point, signal_name, data_root, reference, tmp_path, capsys):
    run = tmp_path / "run"
    process = train_process(data_root, run, f"2.{point}:{signal_name}")  # inside the second save (epoch 2)
    output = process.communicate(timeout=300)[0].decode()
    expected_status = 130 if signal_name == "SIGINT" else -getattr(signal, signal_name)
    assert process.returncode == expected_status, output
    kept_epoch = 1 if point <= BEFORE_SWITCH else 2
    assert load_checkpoint(run).epoch == kept_epoch, SAVE_POINTS[point - 1]
    check_accepted_and_resumes_exactly(run, reference, data_root, tmp_path, capsys)


@pytest.mark.parametrize("seed", range(3))
def test_sigkill_at_a_random_moment(seed, data_root, reference, tmp_path, capsys):
    run = tmp_path / "run"
    process = train_process(data_root, run)
    time.sleep(random.Random(seed).uniform(2.0, 12.0))
    process.kill()
    process.communicate(timeout=60)
    check_accepted_and_resumes_exactly(run, reference, data_root, tmp_path, capsys)
