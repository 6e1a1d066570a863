"""End-to-end inference: a normalised image tensor in, the blurred anomaly map and the image score
out (``model.predict``), for memkd and its RD baseline with the WideResNet50 (the paper's) and
ResNet18 teachers at 256x256, random weights (weights do not change speed).

- per image (batch 1) and throughput (batch 16; the best batch comes from test_scaling's sweep);
- the same with the fused ops swapped for the plain-PyTorch reference (``ops=reference``), so the
  kernels' end-to-end gain is visible;
- optimisations of the inference path, each against the default path (``optim/`` cases).

Target: memkd per image with WideResNet50 no slower than 1.1x rd. The paper (Table 3): 0.33 s
per image for MemKD, 0.31 s for RD.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from benchlib import case_id, detect, e2e_key, first_call_seconds, images, reference_ops, settings_of
from memkd.models import CompiledPredictor
from report import Target

METHODS = ("memkd", "rd")
BACKBONES = ("wide_resnet50_2", "resnet18")
MEMKD_VS_RD_PER_IMAGE = 1.1


def _throughput_backbones(settings) -> tuple[str, ...]:
    # A WideResNet50 batch of 16 takes tens of seconds per call on a 2-core CPU: full mode only there.
    return BACKBONES if settings.full or settings.device == "cuda" else ("resnet18",)


def pytest_generate_tests(metafunc):
    settings = settings_of(metafunc.config)
    name = metafunc.function.__name__
    if name == "test_predict":
        cases = []
        for backbone in BACKBONES:
            for batch in (1, 16):
                if batch > 1 and backbone not in _throughput_backbones(settings):
                    continue
                for method in METHODS:
                    for ops in ("kernels", "reference"):
                        if batch > 1 and ops == "reference" and not settings.full:
                            continue  # quick: the kernels' gain is shown at batch 1
                        cases.append((method, backbone, batch, ops))
        metafunc.parametrize("method,backbone,batch,ops", cases, ids=["-".join(map(str, c)) for c in cases])
    elif name == "test_optimisation":
        variants = ["default", "channels_last", "no_grad", "plain", "teacher_layer4", "compiled_predictor"]
        if settings.full:  # compiling takes minutes (CPU) or a minute or more (GPU)
            variants.append("compile_student")
        if settings.device == "cuda":
            variants += ["bf16_autocast", "cuda_graphs"]
        metafunc.parametrize("variant", variants)


# ---- predict -----------------------------------------------------------------------------------


def test_predict(method, backbone, batch, ops, model_cache, measure, settings):
    model = model_cache(method, backbone)
    x = images(batch, 256, settings.device)
    key = e2e_key(method, backbone, batch, 256, settings.device)
    swap = reference_ops() if ops == "reference" else contextlib.nullcontext()
    with swap:
        measure(lambda: model.predict(x), key=key, impl=ops, kind="e2e", role="subject" if ops == "kernels" else "baseline",
                device=settings.device, items=batch, method=method, backbone=backbone, batch=batch)


def test_predict_target(model_cache, judge_in_pairs, settings):
    """memkd against rd per image (WideResNet50, batch 1, the fused ops), judged in pairs."""
    device, backbone = settings.device, "wide_resnet50_2"
    memkd_model, rd_model = model_cache("memkd", backbone), model_cache("rd", backbone)
    x = images(1, 256, device)
    judge_in_pairs(Target(f"memkd per-image inference (WideResNet50, 256x256, {device}) vs rd",
                          case_id(e2e_key("memkd", backbone, 1, 256, device), "kernels"),
                          case_id(e2e_key("rd", backbone, 1, 256, device), "kernels"), "slowdown", MEMKD_VS_RD_PER_IMAGE),
                   lambda: memkd_model.predict(x), lambda: rd_model.predict(x), kind="e2e", device=device)


def test_reference_swap_reaches_every_op(settings):
    """``reference_ops`` must have the reference kernels serve the memkd:: ops of the model's
    inference and training paths (else the ops=reference cases would still time the fused kernels):
    inside the block the reference's ATen ops run within the memkd:: ops, outside they do not."""
    from benchlib import build

    model = build("memkd", "resnet18", 64)
    x = torch.randn(2, 3, 64, 64)

    def aten_ops_within_memkd_ops(fn) -> dict[str, set[str]]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        found: dict[str, set[str]] = {}
        for event in prof.events():
            if event.name.startswith("memkd::"):
                names = found.setdefault(event.name, set())
                stack = list(event.cpu_children)
                while stack:
                    child = stack.pop()
                    names.add(child.name)
                    stack.extend(child.cpu_children)
        return found

    def train_step():
        model.train()
        model.loss(x, x)["total"].backward()
        model.eval()

    # the reference's signature ATen ops: the softmax of the recall, the anomaly map's upsampling
    reference_marks = {"memkd::nr_recall": "aten::_softmax", "memkd::anomaly_map": "aten::upsample_bilinear2d",
                       "memkd::nr_recall_backward": "aten::_softmax"}
    fused = {**aten_ops_within_memkd_ops(lambda: model.predict(x)), **aten_ops_within_memkd_ops(train_step)}
    with reference_ops():
        swapped = {**aten_ops_within_memkd_ops(lambda: model.predict(x)), **aten_ops_within_memkd_ops(train_step)}
    for op, mark in reference_marks.items():
        assert op in fused and op in swapped, (op, sorted(fused), sorted(swapped))
        assert mark not in fused[op] and mark in swapped[op], (op, fused[op], swapped[op])


# ---- optimisations -----------------------------------------------------------------------------


def _optimisation_model(settings) -> str:
    return "wide_resnet50_2" if settings.full or settings.device == "cuda" else "resnet18"


def test_optimisation(variant, model_cache, measure, results, settings):
    """One inference-path optimisation against the default ``model.predict`` (batch 1, 256x256).

    default: predict (eval, inference_mode, teacher layer1..3 only). channels_last: NHWC model and
    input. no_grad / plain: predict's path under torch.no_grad / with autograd recording.
    teacher_layer4: the teacher also computes its unused layer4 (predict already skips it; the
    ratio shows what skipping saves). compiled_predictor: ``CompiledPredictor`` (teacher and
    student compiled with frozen weights). compile_student: plain torch.compile of the student.
    bf16_autocast (GPU): predict under bf16 autocast. cuda_graphs (GPU): the whole path captured
    once and replayed.
    """
    backbone = _optimisation_model(settings)
    device = settings.device
    model = model_cache("memkd", backbone)
    x = images(1, 256, device)
    info = {}
    if variant == "default":
        run = lambda: model.predict(x)  # noqa: E731
    elif variant == "channels_last":
        variant_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        run = lambda: variant_model.predict(xc)  # noqa: E731
    elif variant in ("no_grad", "plain"):
        run = lambda: detect(model, x, grad_mode=variant)  # noqa: E731
    elif variant == "teacher_layer4":
        run = lambda: detect(model, x, teacher_depth=4)  # noqa: E731
    elif variant in ("compile_student", "compiled_predictor"):
        if variant == "compiled_predictor":
            predict = CompiledPredictor(model)
        else:
            variant_model = copy.deepcopy(model)
            variant_model.student = torch.compile(variant_model.student)
            predict = variant_model.predict
        run = lambda: predict(x)  # noqa: E731
    elif variant == "bf16_autocast":
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model.predict(x)
    elif variant == "cuda_graphs":
        try:
            run = _cuda_graph(model, x)
        except Exception as exc:  # capture is fragile; say why instead of failing the suite
            results.note(f"cuda_graphs: capture failed: {type(exc).__name__}: {exc}")
            pytest.skip(f"CUDA graph capture failed: {exc}")
    # every variant settles alike before timing: the first one measured used to read up to 1.4x slow
    seconds = first_call_seconds(run)
    if variant in ("compile_student", "compiled_predictor"):
        info["compile_s"] = seconds
    measure(run, key=f"optim/memkd/{backbone}/B1/256x256/{device}", impl=variant, kind="e2e",
            role="baseline" if variant == "default" else "subject", device=device, items=1, **info)


def _cuda_graph(model, x):
    """The inference path captured as one CUDA graph; replay after copying the input in."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the capture (allocator, cuDNN/Triton autotuning)
            detect(model, static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = detect(model, static_x)

    def run():
        static_x.copy_(x)
        graph.replay()
        return static_out

    return run
