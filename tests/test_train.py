"""memkd.train: training lowers the loss, checkpoints reproduce the model, resuming is exact, and
bad checkpoints or settings fail with clear errors."""
import json
import math
import os

import pytest
import torch
import torchvision
from safetensors import safe_open
from torch.utils.data import DataLoader

import memkd
from memkd.models import MemKDConfig, build_model
from memkd.train import (
    CheckpointError,
    ExemplarBatches,
    ExemplarFeatureCache,
    TrainConfig,
    Trainer,
    load_checkpoint,
    resume_changes,
    save_checkpoint,
    train,
    update_checkpoint_extra,
)
from memkd.train import checkpoint as checkpoint_module

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def striped_images(count: int, seed: int = 0) -> list[torch.Tensor]:
    """'Normal' images: stripes of random phase and orientation plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    coordinates = torch.arange(SIZE, dtype=torch.float32)
    ys, xs = torch.meshgrid(coordinates, coordinates, indexing="ij")
    images = []
    for _ in range(count):
        angle, phase = torch.rand(2, generator=g) * math.tau
        stripes = torch.sin((xs * torch.cos(angle) + ys * torch.sin(angle)) / 2 + phase)
        images.append(stripes.expand(3, -1, -1) + 0.1 * torch.randn(3, SIZE, SIZE, generator=g))
    return images


def model_config(**overrides) -> MemKDConfig:
    settings = dict(backbone="resnet18", weights=None, image_size=SIZE, exemplars=3, memory_items=6)
    return MemKDConfig(**{**settings, **overrides})


def train_config(**overrides) -> TrainConfig:
    settings = dict(epochs=3, batch_size=4, workers=0, log_every=1, progress=False, seed=3)
    return TrainConfig(**{**settings, **overrides})


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def tensors_of(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted memkd run: 8 images, batch 4, 3 epochs (6 steps), checkpointed at the end."""
    run_dir = tmp_path_factory.mktemp("run")
    model = train(striped_images(8), run_dir, model_config(), train_config())
    return run_dir, model


# ---- training ------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_logs_every_term(trained):
    run_dir, _ = trained
    log = read_log(run_dir)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in log] == [1, 1, 2, 2, 3, 3]
    for record in log:
        assert {"kd", "nm", "orth", "total", "images_per_s", "lr"} <= set(record)
        assert record["total"] == pytest.approx(record["kd"] + 0.1 * record["nm"] + 0.1 * record["orth"], rel=1e-5)
    assert log[-1]["kd"] < 0.8 * log[0]["kd"]
    assert log[-1]["nm"] < log[0]["nm"] and log[-1]["total"] < log[0]["total"]
    assert log[-1]["orth"] < log[0]["orth"]


def test_checkpoint_files_and_config(trained):
    run_dir, model = trained
    files = sorted(p.name for p in run_dir.iterdir())
    version = os.readlink(run_dir / "checkpoint")
    assert version.startswith(".checkpoint-e3-s6-")
    assert files == [version, ".memkd.lock", "checkpoint", "config.json", "log.jsonl", "model.safetensors", "training_state.pt"]
    for name in ("config.json", "model.safetensors", "training_state.pt"):  # one version, reached through `checkpoint`
        assert os.readlink(run_dir / name) == f"checkpoint/{name}"
        assert (run_dir / os.readlink(run_dir / "checkpoint") / name).is_file()
    header = json.loads((run_dir / "config.json").read_text())
    assert header["memkd_version"] == memkd.__version__
    assert header["config"] == model.config.to_dict()
    assert header["config"]["memory_stages"] == [0, 1, 2] and header["config"]["memory_items"] == [6, 6, 6]
    assert header["config"]["mean"] == [0.485, 0.456, 0.406] and header["config"]["image_size"] == [SIZE, SIZE]
    assert (header["epoch"], header["step"], header["extra"], header["teacher_stored"]) == (3, 6, {}, True)
    assert header["training"]["epochs"] == 3
    keys = tensors_of(run_dir / "model.safetensors").keys()
    assert any(k.startswith("teacher.layer4.") for k in keys)  # a random-init teacher is stored
    assert "student.memories.0.keys" in keys and "student.memories.2.values" in keys


def test_saved_model_predicts_the_same_maps(trained):
    run_dir, model = trained
    images = torch.stack(striped_images(3, seed=9))
    maps, scores = model.predict(images)
    loaded = load_checkpoint(run_dir / "model.safetensors")
    assert loaded.config == model.config and (loaded.epoch, loaded.step) == (3, 6)
    loaded_maps, loaded_scores = loaded.model.predict(images)
    assert torch.equal(maps, loaded_maps) and torch.equal(scores, loaded_scores)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name
    assert not loaded.model.teacher.training and not any(p.requires_grad for p in loaded.model.teacher.parameters())


def test_resume_continues_exactly(trained, tmp_path):
    uninterrupted_dir, uninterrupted = trained
    train(striped_images(8), tmp_path, model_config(), train_config(epochs=1))
    resumed = train(striped_images(8), tmp_path, train_config=train_config(epochs=3), resume=True)
    expected, got = read_log(uninterrupted_dir), read_log(tmp_path)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected[2:], got[2:]):  # every step after the interruption, the first one included
        for term in ("kd", "nm", "orth", "total"):
            assert b[term] == pytest.approx(a[term], rel=1e-6, abs=1e-7), (a["step"], term)
    for name, tensor in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_dataloader_of_dicts_and_progress_bar(tmp_path, capsys):
    items = [{"image": image, "label": 0, "path": f"{i}.png"} for i, image in enumerate(striped_images(4))]
    loader = DataLoader(items, batch_size=4)
    model = train(loader, tmp_path, model_config(), train_config(epochs=1, progress=True))
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "kd=" in err and "nm=" in err and "img/s=" in err
    assert read_log(tmp_path)[0]["step"] == 1 and load_checkpoint(tmp_path).step == 1
    assert model.training


def test_bf16_autocast_and_channels_last(tmp_path):
    train(striped_images(4), tmp_path, model_config(), train_config(epochs=1, amp=True, channels_last=True))
    record = read_log(tmp_path)[0]
    assert all(math.isfinite(record[k]) for k in ("kd", "nm", "orth", "total"))
    assert load_checkpoint(tmp_path).model.student.memories["0"].keys.dtype == torch.float32


def test_exemplar_sets_are_seeded_per_step_and_split_over_ranks():
    single = ExemplarBatches(dataset_size=40, exemplars=6, seed=5)
    again = ExemplarBatches(dataset_size=40, exemplars=6, seed=5, start_step=7)
    first = [single.indices(step) for step in range(10)]
    assert all(len(set(s)) == 6 for s in first)  # distinct within a set
    assert len({tuple(s) for s in first}) == 10  # a fresh set every step
    assert next(iter(again)) == first[7]  # stateless: resuming at step 7 draws the same set
    ranks = [ExemplarBatches(40, 6, seed=5, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].indices(3) + ranks[1].indices(3) == first[3]  # the ranks share one set of N
    assert ExemplarBatches(40, 6, seed=6).indices(0) != first[0]
    assert len(ExemplarBatches(dataset_size=2, exemplars=6, seed=0).indices(0)) == 6  # tiny data: with replacement


class CountingDataset(torch.utils.data.Dataset):
    """A list of items that counts its loads (workers=0: every load happens in this process)."""

    def __init__(self, items):
        self.items, self.loads = items, 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        self.loads += 1
        return self.items[index]


def test_exemplar_cache_encodes_and_loads_each_image_once_and_trains_as_without_it(tmp_path):
    runs = {}
    for cache in (True, False):
        data = CountingDataset(striped_images(8))
        trainer = Trainer(data, tmp_path / str(cache), model_config(), train_config(cache_exemplar_features=cache))
        encoded = []  # the exemplar path alone reaches layer4
        trainer.model.teacher.layer4.register_forward_hook(lambda _, inputs, __: encoded.append(inputs[0].shape[0]))
        runs[cache] = (trainer, trainer.fit(), encoded, data.loads)
    steps = runs[True][0].step
    drawn = [ExemplarBatches(8, 3, seed=3).indices(step) for step in range(steps)]
    assert steps == 6 and sum(encoded for encoded in runs[False][2]) == 3 * steps
    distinct = len({i for s in drawn for i in s})
    assert distinct < 3 * steps and len(runs[True][0].exemplar_cache) == distinct
    assert runs[True][2] == [1] * distinct  # each drawn image once, one at a time
    assert runs[False][0].exemplar_cache is None
    # 3 epochs of the 8 training images, plus the exemplars: each image once with the cache, every draw without
    assert runs[True][3] == 3 * 8 + distinct and runs[False][3] == 3 * 8 + 3 * steps
    expected, got = read_log(tmp_path / "False"), read_log(tmp_path / "True")
    for a, b in zip(expected, got, strict=True):
        for term in ("kd", "nm", "orth", "total"):
            assert b[term] == pytest.approx(a[term], rel=1e-5, abs=1e-6), (a["step"], term)


def test_exemplar_cache_returns_what_the_teacher_computes():
    torch.manual_seed(0)
    model = build_model(model_config())
    cache = ExemplarFeatureCache(model)
    images = torch.stack(striped_images(4))
    first = cache.features([7, 2, 7, 5], images[[0, 1, 0, 2]])
    again = cache.features([5, 7], images[[3, 3]])  # cached indices keep their first images' features
    # the teacher's output for each image alone, bit for bit (batched, rounding may differ by ~1e-6)
    alone = [model.exemplar_features(images[i : i + 1]) for i in (0, 1, 0, 2)]
    assert set(first) == set(model.memories) and len(cache) == 3
    for key in first:
        assert torch.equal(first[key], torch.cat([features[key] for features in alone]))
        assert torch.equal(again[key], first[key][[3, 0]])
    assert torch.equal(cache.features([2, 5])["0"], first["0"][[1, 3]])  # cached: no images needed
    assert cache.missing([4, 2, 4, 9]) == [4, 9]
    with pytest.raises(ValueError, match="^indices: expected one per exemplar image"):
        cache.features([1], images[:2])
    with pytest.raises(KeyError, match=r"indices: no cached features for dataset items \[4\]"):
        cache.features([2, 4])


# ---- checkpoints -------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(model_config(method="memkd-no-nel"))
    return save_checkpoint(model, tmp_path / "ckpt", epoch=1, step=2), model


def test_named_teacher_is_fetched_again_not_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # a private torchvision cache
    torch.manual_seed(4)
    imagenet_file = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "hub" / "checkpoints" / imagenet_file)
    model = build_model(model_config(method="rd", weights="imagenet"))
    directory = save_checkpoint(model, tmp_path / "ckpt")
    assert not any(k.startswith("teacher.") for k in tensors_of(directory / "model.safetensors"))
    loaded = load_checkpoint(directory).model
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    stored = save_checkpoint(model, tmp_path / "with_teacher", include_teacher=True)
    assert any(k.startswith("teacher.") for k in tensors_of(stored / "model.safetensors"))


def test_extra_is_kept_and_updated(saved):
    directory, model = saved
    assert update_checkpoint_extra(directory, {"threshold": 0.25}) == {"threshold": 0.25}
    assert update_checkpoint_extra(directory / "config.json", {"note": "ok"}) == {"threshold": 0.25, "note": "ok"}
    assert load_checkpoint(directory).extra == {"threshold": 0.25, "note": "ok"}
    with pytest.raises(TypeError):
        update_checkpoint_extra(directory, {"bad": object()})
    assert load_checkpoint(directory).extra == {"threshold": 0.25, "note": "ok"}
    other = save_checkpoint(model, directory / "other", extra={"threshold": 1.5})
    assert load_checkpoint(other).extra == {"threshold": 1.5}


def tree(directory) -> dict:
    """Every entry under ``directory``: a symlink's target, a file's bytes (a directory holds its entries)."""
    return {
        str(p.relative_to(directory)): os.readlink(p) if p.is_symlink() else p.read_bytes()
        for p in directory.rglob("*")
        if p.is_symlink() or p.is_file()
    }


def test_failed_save_leaves_the_previous_checkpoint(saved, monkeypatch):
    directory, model = saved
    before = tree(directory)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, directory, epoch=9, step=99, training_state={"optimizer": {}})
    assert tree(directory) == before  # nothing replaced, no temporary files


def test_truncated_weights_name_the_file(saved):
    directory, _ = saved
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(directory)


def test_corrupt_config_names_the_file(saved):
    directory, _ = saved
    (directory / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(directory)
    (directory / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="config.json.*not a memkd"):
        load_checkpoint(directory)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(method="rd", memory_stages=[], memory_items=[]), r"safetensors does not match.*unexpected \['memories"),
        (dict(memory_items=[6, 7, 6]), r"safetensors does not match.*memories.1.keys is torch.float32 \(6, 256\)"),
        (dict(backbone="resnet34"), "model.safetensors does not match"),
        (dict(image_size=[48, 48]), "config.json holds an invalid model config: image_size"),
    ],
)
def test_mismatched_config_names_the_file(saved, change, message):
    directory, _ = saved
    header = json.loads((directory / "config.json").read_text())
    header["config"].update(change)
    (directory / "config.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(directory)


def test_torn_checkpoint_is_detected(saved):
    directory, _ = saved
    header = json.loads((directory / "config.json").read_text())
    header["step"] = 3
    (directory / "config.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="torn"):
        load_checkpoint(directory)


def test_missing_files(saved, tmp_path):
    directory, _ = saved
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path / "nothing")
    (directory / "checkpoint" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(directory)


# ---- training settings ---------------------------------------------------------------------------------


def test_resume_refuses_a_corrupt_state_or_another_config(tmp_path):
    data = striped_images(4)
    train(data, tmp_path, model_config(method="rd"), train_config(epochs=1))
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        train(data, tmp_path, model_config(method="rd"), train_config(epochs=2))
    with pytest.raises(ValueError, match=r"model_config: .*\['memory_items'\]|model_config: .*differs"):
        train(data, tmp_path, model_config(method="rd", exemplars=5), train_config(epochs=2), resume=True)
    with pytest.raises(ValueError, match=r"train_config: a resumed run keeps its batch_size 4 \(got 2\)"):
        train(data, tmp_path, train_config=train_config(epochs=2, batch_size=2), resume=True)
    (tmp_path / "training_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="training_state.pt"):
        train(data, tmp_path, train_config=train_config(epochs=2), resume=True)
    with pytest.raises(FileNotFoundError, match="config.json"):
        train(data, tmp_path / "fresh", train_config=train_config(), resume=True)


def test_resume_changes_allows_only_what_keeps_the_training():
    stored = train_config(epochs=4)
    assert resume_changes(stored, train_config(epochs=6, save_every=2, workers=1), epoch=3) == {
        "epochs": (4, 6), "save_every": (10, 2), "workers": (0, 1)
    }
    for unsafe in (dict(batch_size=2), dict(lr=0.01), dict(seed=4), dict(amp=True), dict(betas=(0.9, 0.999))):
        with pytest.raises(ValueError, match=f"train_config: a resumed run keeps its {next(iter(unsafe))} "):
            resume_changes(stored, train_config(epochs=4, **unsafe), epoch=3)
    with pytest.raises(ValueError, match="^epochs: the run has already trained 3 epochs, got 2"):
        resume_changes(stored, train_config(epochs=2), epoch=3)


def test_files_honour_the_umask(tmp_path):
    torch.manual_seed(0)
    model = build_model(model_config(method="rd"))
    previous = os.umask(0o027)
    try:
        directory = save_checkpoint(model, tmp_path / "ckpt", training_state={"optimizer": {}})
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "config.json", "training_state.pt"):
        assert (directory / name).stat().st_mode & 0o777 == 0o640, name
    assert (directory / "checkpoint").stat().st_mode & 0o777 == 0o750


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(epochs=0), "epochs"),
        (dict(batch_size=0), "batch_size"),
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.5)), "betas"),
        (dict(workers=-1), "workers"),
        (dict(save_every=0), "save_every"),
        (dict(seed=-2), "seed"),
    ],
)
def test_bad_train_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        TrainConfig(**overrides)


def test_bad_training_data(tmp_path):
    with pytest.raises(TypeError, match="data"):
        train(iter(striped_images(2)), tmp_path / "a", model_config(method="rd"), train_config(epochs=1))
    with pytest.raises(TypeError, match="image"):
        unlabelled = [{"img": torch.zeros(3, SIZE, SIZE)}] * 4
        train(unlabelled, tmp_path / "b", model_config(method="rd"), train_config(epochs=1))
