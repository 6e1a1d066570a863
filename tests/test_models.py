"""memkd.models: shapes of every variant and backbone, gradient flow, the loss terms against
hand-computed values, inference, teacher weights and configuration errors."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from memkd.models import (
    BACKBONES,
    METHODS,
    CompiledPredictor,
    MemAEMemory,
    MemKDConfig,
    NRMemory,
    Teacher,
    build_model,
    kd_loss,
    normality_memorization_loss,
    orthogonal_loss,
    size_report,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**overrides) -> MemKDConfig:
    settings = dict(backbone="resnet18", weights=None, image_size=32, exemplars=3, memory_items=6)
    return MemKDConfig(**{**settings, **overrides})


def expected_loss_terms(method: str) -> set[str]:
    spec = METHODS[method]
    return {"kd", "total"} | ({"nm"} if spec.nel else set()) | ({"orth"} if spec.orth else set())


# ---- shapes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("method", ["memkd", "rd", "memmkd"])
def test_every_backbone_has_the_teachers_shapes(method, backbone):
    """Built on the meta device: real 256x256 shapes without the compute. The three methods are the
    three student structures (reverse with and without memories, forward with memories)."""
    with torch.device("meta"):
        model = build_model(MemKDConfig(method=method, backbone=backbone, weights=None))
        student, teacher = model(torch.empty(1, 3, 256, 256))
    c1, c2, c3, c4 = BACKBONES[backbone].stage_channels
    expected = [(1, c1, 64, 64), (1, c2, 32, 32), (1, c3, 16, 16)]
    assert [tuple(f.shape) for f in teacher] == expected
    assert [tuple(f.shape) for f in student] == expected

    has_memory = METHODS[method].memory is not None
    assert sorted(model.memories) == (["0", "1", "2"] if has_memory else [])
    if METHODS[method].distillation == "reverse":
        query_channels = [c4, c3, c2]  # bottleneck output, decoder stage 1 and 2 outputs
        stage_inputs = [stage[0].downsample[0].in_channels for stage in model.student.stages]
        assert stage_inputs == [c * (2 if has_memory else 1) for c in query_channels]
    else:
        query_channels = [c1, c2, c3]  # after student layer1..3
        assert [model.student.fuse[k][0].in_channels for k in model.student.fuse] == [2 * c for c in query_channels]
    if has_memory:
        assert [tuple(model.memories[str(p)].keys.shape) for p in range(3)] == [(50, c) for c in query_channels]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_variant_trains_with_its_loss_terms(method):
    torch.manual_seed(0)
    model = build_model(tiny_config(method=method))
    images = torch.randn(2, 3, 32, 32)
    student, teacher = model(images)
    assert [f.shape for f in student] == [f.shape for f in teacher] == [(2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    terms = model.loss(images, torch.randn(3, 3, 32, 32))
    assert set(terms) == expected_loss_terms(method)
    assert all(t.shape == () and torch.isfinite(t) for t in terms.values())
    maps, scores = model.predict(images)
    assert maps.shape == (2, 32, 32) and scores.shape == (2,)


def test_paper_default_model_matches_the_spec():
    with torch.device("meta"):
        model = build_model(MemKDConfig(weights=None))
        bottleneck_out = model.student.bottleneck(model.teacher(torch.empty(1, 3, 256, 256)))
    assert tuple(bottleneck_out.shape) == (1, 2048, 8, 8)
    assert [len(stage) for stage in model.student.stages] == [3, 4, 6]
    assert len(model.student.bottleneck.blocks) == 3
    assert model.student.bottleneck.blocks[0].conv1.in_channels == 3072
    assert model.student.stages[0][0].conv2.__class__ is torch.nn.ConvTranspose2d  # upsampling block
    assert model.student.stages[0][0].conv2.in_channels == 512  # 256 planes x width_per_group 128 / 64
    assert size_report(model)["memory_bank_params_millions"] == pytest.approx(50 * 2 * (2048 + 1024 + 512) / 1e6)


def test_wide_resnet50_runs_on_a_small_input():
    torch.manual_seed(0)
    model = build_model(MemKDConfig(weights=None, image_size=64))
    images = torch.randn(1, 3, 64, 64)
    maps, scores = model.predict(images)
    assert maps.shape == (1, 64, 64) and scores.shape == (1,)
    with torch.no_grad():
        student, teacher = model.eval()(images)
    assert [tuple(f.shape) for f in student] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4)]
    assert [f.shape for f in student] == [f.shape for f in teacher]


# ---- gradients and the frozen teacher --------------------------------------------------------


@pytest.mark.parametrize("method", ["memkd", "memmkd", "memae", "rd"])
def test_gradients_reach_the_student_and_never_the_teacher(method):
    torch.manual_seed(0)
    model = build_model(tiny_config(method=method)).train()
    assert not model.teacher.training  # stays frozen through the parent's train()
    terms = model.loss(torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32))
    terms["total"].backward()

    def reached(module):
        return all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    for key, memory in model.memories.items():
        assert reached(memory), f"memory {key}"
        if isinstance(memory, NRMemory):
            assert memory.keys.grad.abs().sum() > 0 and memory.values.grad.abs().sum() > 0
    if method == "memmkd":
        assert reached(model.student.fuse) and reached(model.student.stages)
    else:
        assert all(reached(part) for part in (model.student.bottleneck, model.student.stages))
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.student.parameters()}


def test_nel_trains_values_only_through_the_exemplars():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    model.normality_memorization_loss(model.exemplar_features(torch.randn(3, 3, 32, 32))).backward()
    for memory in model.memories.values():
        assert memory.values.grad.abs().sum() > 0
        assert memory.keys.grad is None
    assert all(p.grad is None for p in model.student.bottleneck.parameters())


def test_teacher_layer4_only_runs_for_exemplars():
    torch.manual_seed(0)
    calls = []
    for method in ("memkd", "rd"):
        model = build_model(tiny_config(method=method))
        model.teacher.layer4.register_forward_hook(lambda _, inputs, __: calls.append((method, inputs[0].shape[0])))
        model.predict(torch.randn(2, 3, 32, 32))
        model.loss(torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32))
    # only for memkd's 3 exemplars (NEL's memory on the bottleneck output); never for images, never in rd
    assert calls == [("memkd", 3)]


def test_memmkd_nel_uses_teacher_layers_one_to_three():
    torch.manual_seed(0)
    model = build_model(tiny_config(method="memmkd", memory_stages=(0, 2)))
    exemplars = torch.randn(3, 3, 32, 32)
    features = model.teacher(exemplars)
    expected = sum(normality_memorization_loss(features[p], model.memories[str(p)].values) for p in (0, 2))
    torch.testing.assert_close(model.normality_memorization_loss(model.exemplar_features(exemplars)), expected)


def test_loss_from_exemplar_features_equals_loss_from_exemplars():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    images, exemplars = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    from_images = model.loss(images, exemplars)
    from_features = model.loss(images, exemplar_features=model.exemplar_features(exemplars))
    assert set(from_images) == set(from_features) == {"kd", "nm", "orth", "total"}
    for term in from_images:
        torch.testing.assert_close(from_features[term], from_images[term], rtol=0, atol=0)


def test_loss_refuses_ambiguous_or_incomplete_exemplar_features():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    images, exemplars = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    features = model.exemplar_features(exemplars)
    with pytest.raises(ValueError, match="^exemplars, exemplar_features: pass one"):
        model.loss(images, exemplars, features)
    with pytest.raises(ValueError, match="^exemplar_features: expected features for memories .* missing \\['0'\\]"):
        model.loss(images, exemplar_features={k: v for k, v in features.items() if k != "0"})
    with pytest.raises(ValueError, match=r"^exemplar_features\['1'\]: expected \[N, \d+, h, w\]"):
        model.loss(images, exemplar_features={**features, "1": features["0"]})
    with pytest.raises(ValueError, match="^exemplars: expected a \\[B, 3, H, W\\]"):
        model.exemplar_features(torch.randn(3, 32, 32))


# ---- loss terms against hand-computed values ---------------------------------------------------


def test_kd_loss_flat_and_per_pixel_by_hand():
    # One stage, batch of one, C=2, 1x2 pixels. Pixel vectors of the student: (1,0), (0,1); teacher: (1,0), (1,1).
    fs = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    ft = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])
    # flat: vectors (1,0,0,1) and (1,1,0,1): cos = 2 / (sqrt(2) sqrt(3))
    assert kd_loss([fs], [ft], "flat").item() == pytest.approx(1 - 2 / math.sqrt(6), abs=1e-6)
    # pixel: cos 1 at the first pixel, 1/sqrt(2) at the second; mean of 1 - cos
    assert kd_loss([fs], [ft], "pixel").item() == pytest.approx((0 + (1 - 1 / math.sqrt(2))) / 2, abs=1e-6)
    # a sum over stages, a mean over the batch: stage 2 is stage 1 with a second, identical sample
    two = kd_loss([fs, fs.repeat(2, 1, 1, 1)], [ft, torch.cat([ft, fs])], "flat").item()
    assert two == pytest.approx((1 - 2 / math.sqrt(6)) * 1.5, abs=1e-6)
    with pytest.raises(ValueError, match="kd_mode"):
        kd_loss([fs], [ft], "cosine")


def test_normality_memorization_loss_by_hand():
    # values (1,0), (0,1); a pixel (1,0) has cosines 1 and 0 -> weights e/(e+1), 1/(e+1)
    # -> rec = (e, 1)/(e+1), error (1/(e+1), -1/(e+1)), squared norm 2/(e+1)^2.
    e = math.e
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    per_pixel = 2 / (e + 1) ** 2
    # exemplar 1: pixels (1,0), (0,2); (0,2): cosines 0 and 1 -> rec (1, e)/(e+1), error (-1, 2 - e/(e+1)... )
    rec2 = torch.tensor([1.0, e]) / (e + 1)
    second_pixel = ((torch.tensor([0.0, 2.0]) - rec2) ** 2).sum().item()
    exemplar1 = per_pixel + second_pixel
    # exemplar 2: both pixels (1,0)
    exemplar2 = 2 * per_pixel
    features = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]], [[[1.0, 1.0]], [[0.0, 0.0]]]])  # [N=2, C=2, H=1, W=2]
    expected = (exemplar1 + exemplar2) / 2
    assert normality_memorization_loss(features, values, "sum").item() == pytest.approx(expected, rel=1e-6)
    assert normality_memorization_loss(features, values, "mean").item() == pytest.approx(expected / 4, rel=1e-6)


def test_orthogonal_loss_by_hand():
    keys = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    values = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # cos(k1, v1) = 1, cos(k1, v2) = 1/sqrt2, cos(k2, v1) = 0, cos(k2, v2) = 1/sqrt2
    assert orthogonal_loss(keys, values).item() == pytest.approx((1 + 2 / math.sqrt(2)) / 4, abs=1e-6)
    assert orthogonal_loss(keys, -keys).item() == pytest.approx(-0.5, abs=1e-6)


def test_total_loss_weights_the_terms():
    torch.manual_seed(0)
    model = build_model(tiny_config(nm_weight=0.3, orth_weight=2.0))
    terms = model.loss(torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32))
    expected_total = terms["kd"] + 0.3 * terms["nm"] + 2.0 * terms["orth"]
    assert terms["total"].item() == pytest.approx(expected_total.item(), rel=1e-6)
    expected_orth = sum(orthogonal_loss(m.keys, m.values) for m in model.memories.values())
    assert terms["orth"].item() == pytest.approx(expected_orth.item(), rel=1e-6)


# ---- memories ----------------------------------------------------------------------------------


def test_nr_memory_recalls_by_key_and_concatenates():
    memory = NRMemory(channels=2, items=2)
    with torch.no_grad():
        memory.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        memory.values.copy_(torch.tensor([[5.0, 1.0], [-1.0, 3.0]]))
    query = torch.tensor([[[[2.0]], [[0.0]]]])  # one pixel (2, 0): cosines 1, 0
    out = memory(query)
    w = torch.tensor([math.e, 1.0]) / (math.e + 1)
    expected = w[0] * torch.tensor([5.0, 1.0]) + w[1] * torch.tensor([-1.0, 3.0])
    assert out.shape == (1, 4, 1, 1)
    torch.testing.assert_close(out[0, :2, 0, 0], query[0, :, 0, 0])
    torch.testing.assert_close(out[0, 2:, 0, 0], expected)


def test_nr_memory_under_bf16_autocast():
    memory = NRMemory(channels=8, items=4)
    query = torch.randn(2, 8, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = memory(query.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (2, 16, 3, 3)
    torch.testing.assert_close(out[:, 8:].float(), memory.recall(query), atol=0.1, rtol=0.05)


def test_memae_memory_shrinks_small_weights():
    memory = MemAEMemory(channels=2, items=3, shrink_threshold=0.2)
    with torch.no_grad():
        memory.memory.copy_(torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0]]))
    query = torch.tensor([[[[1.0]], [[0.0]]]])  # dot products 2, 0, -2
    logits = torch.tensor([2.0, 0.0, -2.0])
    w = torch.softmax(logits, 0)  # 0.867, 0.117, 0.016: the last two fall under 0.2
    shrunk = F.relu(w - 0.2) * w / (w - 0.2).abs()
    shrunk = shrunk / shrunk.sum()
    assert shrunk[1] == 0 and shrunk[2] == 0
    expected = shrunk @ memory.memory.detach()
    torch.testing.assert_close(memory(query)[0, 2:, 0, 0], expected)
    assert MemAEMemory(channels=4, items=50).shrink_threshold == pytest.approx(1 / 50)


def test_loss_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    images, exemplars = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    compiled = torch.compile(model.loss, fullgraph=True, backend="eager")(images, exemplars)
    eager = model.loss(images, exemplars)
    for term, value in eager.items():
        torch.testing.assert_close(compiled[term], value)


# ---- inference ----------------------------------------------------------------------------------


def test_predict_is_batched_and_restores_the_mode():
    torch.manual_seed(0)
    model = build_model(tiny_config(image_size=64)).train()
    images = torch.randn(3, 3, 64, 64)
    maps, scores = model.predict(images)
    assert model.training and maps.shape == (3, 64, 64) and scores.shape == (3,)
    assert maps.dtype == torch.float32 and not maps.requires_grad
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))
    one_by_one = torch.cat([model.predict(images[i : i + 1])[0] for i in range(3)])
    torch.testing.assert_close(maps, one_by_one, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="images"):
        model.predict(torch.randn(1, 3, 48, 64))


# ---- teacher weights ---------------------------------------------------------------------------


def test_teacher_loads_pth_and_safetensors_files(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18().state_dict()
    torch.save(reference, tmp_path / "r18.pth")
    save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp_path / "r18.safetensors"))
    for name in ("r18.pth", "r18.safetensors"):
        teacher = Teacher("resnet18", str(tmp_path / name))
        for key, value in teacher.state_dict().items():
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="r18.pth"):
        Teacher("resnet34", str(tmp_path / "r18.pth"))  # another backbone's file
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        Teacher("resnet18", str(tmp_path / "junk.pth"))


def test_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "teacher.pth"
    config = tiny_config(weights=str(missing))  # a path is only opened when the model is built
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_model(config)


# ---- configuration -------------------------------------------------------------------------------


def test_config_round_trips_through_json():
    config = MemKDConfig(
        method="memkd-no-orth", memory_stages=[2, 0], memory_items=[7, 9], image_size=(64, 96), kd_mode="pixel"
    )
    assert config.memory_stages == (0, 2) and config.memory_items == (9, 7)  # sorted by position
    assert config.memory_layout == {0: 9, 2: 7}
    assert config.image_size == (64, 96)
    assert MemKDConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert MemKDConfig(method="rd").memory_stages == ()
    assert MemKDConfig().memory_layout == {0: 50, 1: 50, 2: 50}


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(backbone="resnet152"), "backbone"),
        (dict(method="patchcore"), "method"),
        (dict(memory_items=0), "memory_items"),
        (dict(memory_items=[50, 0, 50]), "memory_items"),
        (dict(memory_items=[50, 50]), "memory_items"),
        (dict(image_size=250), "image_size"),
        (dict(image_size=(256, 100)), "image_size"),
        (dict(image_size=0), "image_size"),
        (dict(memory_stages=(0, 3)), "memory_stages"),
        (dict(memory_stages=(1, 1)), "memory_stages"),
        (dict(memory_stages=()), "memory_stages"),
        (dict(method="rd", memory_stages=(0,)), "memory_stages"),
        (dict(exemplars=0), "exemplars"),
        (dict(nm_weight=-0.1), "nm_weight"),
        (dict(orth_weight=float("nan")), "orth_weight"),
        (dict(kd_mode="l2"), "kd_mode"),
        (dict(nm_reduction="max"), "nm_reduction"),
        (dict(weights="imagenet21k"), "weights"),
        (dict(std=(0.2, 0.0, 0.2)), "std"),
        (dict(mean=(0.5, 0.5)), "mean"),
    ],
)
def test_bad_configuration_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        MemKDConfig(**{"weights": None, **overrides})


def test_bad_memory_sizes_and_unknown_fields():
    with pytest.raises(ValueError, match="^items:"):
        NRMemory(channels=8, items=0)
    with pytest.raises(ValueError, match="^items:"):
        MemAEMemory(channels=8, items=-1)
    with pytest.raises(ValueError, match="unknown field.*colour"):
        MemKDConfig.from_dict({"method": "memkd", "colour": "red"})
    with pytest.raises(ValueError, match="^exemplars:"):
        build_model(tiny_config()).loss(torch.randn(2, 3, 32, 32))  # NEL without an exemplar set


# ---- compiled inference ------------------------------------------------------------------------


def test_compiled_predictor_matches_predict_pads_chunks_and_snapshots():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    predictor = CompiledPredictor(model)
    images = torch.randn(5, 3, 32, 32)
    torch._dynamo.utils.counters.clear()
    first = predictor(images[:3])  # compiles for batch 3
    later = predictor(images)  # batch 5: a chunk of 3 and a padded chunk of 2, no recompilation
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1 and predictor.batch_size == 3
    expected_maps, expected_scores = model.predict(images)
    assert later[0].shape == (5, 32, 32) and later[1].shape == (5,)
    # freezing folds BatchNorm into the convolutions: equal up to fp32 rounding
    torch.testing.assert_close(later[0], expected_maps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(later[1], expected_scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first[0], later[0][:3], rtol=0, atol=0)
    with torch.no_grad():  # the predictor holds a snapshot: later changes to the model are not seen
        model.memories["0"].values.mul_(-1)
    torch.testing.assert_close(predictor(images)[0], later[0], rtol=0, atol=0)
    assert model.training and not predictor.model.training
    with pytest.raises(ValueError, match=r"^images: expected a \[B, 3, H, W\]"):
        predictor(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="^model: expected a MemKD"):
        CompiledPredictor(torch.nn.Linear(2, 2))
