"""Deployment paths side by side: memkd's inference (WideResNet50 and ResNet18 teachers, 256x256,
random weights) as eager ``model.predict``, ``CompiledPredictor`` (torch.compile), an AOTInductor
package (``memkd.export.write_aoti``), and the ONNX export on onnxruntime and on OpenVINO
(``memkd.deploy``; fp32), all on the same normalised input, per image (batch 1) and batch-16
throughput. The one-off costs (compile, export) are recorded with each case, not timed, and so is
each path's largest deviation from eager predict (``maps_rel_diff``, ``scores_rel_diff``).

The default path of ``memkd predict``/``memkd test`` on the CPU, once its package is cached
(``memkd.compiled_cache``), is OpenVINO with the export extra installed, else the AOTI package.
Targets, each judged in interleaved pairs: that default path per image faster than eager; and,
when anomalib is installed, at least 1.2x faster than anomalib's Reverse Distillation per image
with WideResNet50. The models differ: anomalib builds its WideResNet50 bottleneck with base width
64 (about 39 M parameters), memkd follows RD4AD's code with 128 (58.9 M parameters), so memkd does
more work per image.
"""
from __future__ import annotations

import functools
import importlib.util
import time

import numpy as np
import pytest
import torch

from benchlib import case_id, first_call_seconds, images
from memkd.models import CompiledPredictor
from report import Target

BACKBONES = ("wide_resnet50_2", "resnet18")
IMPLS = ("eager", "compiled", "aoti", "onnxruntime", "openvino")
DEFAULT_PATH_VS_ANOMALIB_RD = 1.2
SIZE = 256


def _batches(settings, backbone: str) -> tuple[int, ...]:
    # A WideResNet50 batch of 16 takes tens of seconds per call on a 2-core CPU: full mode only there.
    return (1, 16) if settings.full or backbone == "resnet18" or settings.device == "cuda" else (1,)


def pytest_generate_tests(metafunc):
    from benchlib import settings_of

    if metafunc.function.__name__ == "test_deployment_path":
        settings = settings_of(metafunc.config)
        cases = [(b, n, impl) for b in BACKBONES for n in _batches(settings, b) for impl in IMPLS]
        metafunc.parametrize("backbone,batch,impl", cases, ids=["-".join(map(str, c)) for c in cases])


def export_key(backbone: str, batch: int) -> str:
    return f"deploy/memkd/{backbone}/B{batch}/{SIZE}x{SIZE}/cpu"


@pytest.fixture(scope="module")
def deployment_calls(model_cache, settings, tmp_path_factory):
    """``get(backbone, batch, impl)``: the timed call of one path on the shared input and its one-off
    cost; each is built once per module (compiling and exporting WideResNet50 take minutes)."""
    built = {}

    def get(backbone: str, batch: int, impl: str):
        if (backbone, batch, impl) not in built:
            built[(backbone, batch, impl)] = _build(model_cache("memkd", backbone), batch, impl, settings, tmp_path_factory)
        return built[(backbone, batch, impl)]

    return get


def _build(model, batch: int, impl: str, settings, tmp_path_factory):
    """(call, info) of one path; info holds its one-off cost and how far its maps and scores are
    from eager predict's (max abs difference over the largest eager value; the tests require <= 1e-4)."""
    run, info = _build_call(model, batch, impl, settings, tmp_path_factory)
    maps, scores = model.predict(images(batch, SIZE, "cpu"))
    got = run()
    got_maps, got_scores = (got.maps, got.scores) if hasattr(got, "maps") else (got[0].numpy(), got[1].numpy())
    for name, value, want in (("maps", got_maps, maps.numpy()), ("scores", got_scores, scores.numpy())):
        info[f"{name}_rel_diff"] = float(np.abs(np.asarray(value, np.float64) - want).max() / np.abs(want).max())
    return run, info


def _build_call(model, batch: int, impl: str, settings, tmp_path_factory):
    from memkd import compiled_cache, deploy, export

    x = images(batch, SIZE, "cpu")
    info = {}
    if impl == "eager":
        return functools.partial(model.predict, x), info
    if impl == "compiled":
        run = functools.partial(CompiledPredictor(model), x)
        info["compile_s"] = first_call_seconds(run)
        return run, info
    folder = tmp_path_factory.mktemp(f"{impl}-{model.config.backbone}-b{batch}")
    started = time.perf_counter()
    if impl == "aoti":
        path = folder / "model.pt2"
        export.write_aoti(model, path, compiled_cache.INPUT_KIND, None, batch_size=batch)
        info["compile_s"] = time.perf_counter() - started
        package = compiled_cache.CachedPackage(path, "aoti", True, info["compile_s"])
        return functools.partial(compiled_cache.CachedPredictor(package, batch, (SIZE, SIZE)), x), info
    fmt = "onnx" if impl == "onnxruntime" else "openvino"
    export.export_model(model, folder / fmt, fmt, input_kind="normalized")
    info["export_s"] = time.perf_counter() - started
    inferencer = deploy.Inferencer(folder / fmt, threads=settings.threads)
    array = x.numpy()
    return functools.partial(inferencer.predict, array), info


def test_deployment_path(backbone, batch, impl, deployment_calls, measure, settings):
    if impl in ("onnxruntime", "openvino") and importlib.util.find_spec(impl) is None:
        pytest.skip(f"{impl} is not installed: pip install \"memkd[export]\"")
    run, info = deployment_calls(backbone, batch, impl)
    measure(run, key=export_key(backbone, batch), impl=impl, kind="e2e", role="baseline" if impl == "eager" else "subject",
            device="cpu", items=batch, backbone=backbone, batch=batch, **info)


def default_impl() -> str:
    """The case of the default CPU path of memkd predict/test (memkd.compiled_cache)."""
    from memkd.compiled_cache import default_backend

    return default_backend()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_default_path_target(backbone, deployment_calls, judge_in_pairs):
    """The default CPU path of memkd predict (its cached package) per image against eager predict."""
    key, impl = export_key(backbone, 1), default_impl()
    judge_in_pairs(Target(f"memkd predict default path per image ({impl} package, {backbone}, {SIZE}x{SIZE}, cpu) vs eager",
                          case_id(key, impl), case_id(key, "eager"), "speedup", 1.0),
                   deployment_calls(backbone, 1, impl)[0], deployment_calls(backbone, 1, "eager")[0], kind="e2e")


def test_default_path_vs_anomalib_rd(deployment_calls, judge_in_pairs, results, settings):
    """memkd's default CPU path per image (WideResNet50) at least 1.2x faster than anomalib's RD."""
    from test_peers import INSTALL, KEY, _anomalib_rd

    if importlib.util.find_spec("anomalib") is None:
        results.note(f"Default path vs anomalib's RD skipped: anomalib is not installed ({INSTALL})")
        pytest.skip(f"anomalib not installed: {INSTALL}")
    anomalib_rd = _anomalib_rd("cpu")
    x = images(1, SIZE, "cpu")

    def anomalib_call():
        with torch.inference_mode():
            return anomalib_rd(x)

    first_call_seconds(anomalib_call)
    impl = default_impl()
    judge_in_pairs(Target(f"memkd predict default path per image ({impl} package, WideResNet50, {SIZE}x{SIZE}, cpu) vs anomalib's RD",
                          case_id(export_key("wide_resnet50_2", 1), impl), case_id(KEY.format(device="cpu"), "anomalib-rd"),
                          "speedup", DEFAULT_PATH_VS_ANOMALIB_RD),
                   deployment_calls("wide_resnet50_2", 1, impl)[0], anomalib_call, kind="e2e")
