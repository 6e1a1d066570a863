"""Peers, when installed: anomalib's Reverse Distillation inference on the same input and device,
side by side with memkd's ``rd`` and ``memkd`` (WideResNet50, random weights, batch 1, 256x256),
and memkd through ``CompiledPredictor`` (``memkd test/predict --compile``; the one-off compile is
not timed, its duration is recorded). Without anomalib the cases are skipped with how to install
it: ``pip install anomalib``.

Target: memkd per image faster than anomalib's RD (eager ``predict`` and compiled, each a target).
"""
from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch

from benchlib import case_id, first_call_seconds, images
from memkd.models import CompiledPredictor
from report import Target

INSTALL = "pip install anomalib"


def _anomalib_rd(device: str):
    """anomalib's ReverseDistillationModel (torch model, no Lightning), random weights, eval mode.
    Its constructor changed across releases; the arguments are matched by name."""
    from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

    wanted = {
        "backbone": "wide_resnet50_2",
        "input_size": (256, 256),
        "layers": ["layer1", "layer2", "layer3"],
        "anomaly_map_mode": "add",  # RD4AD's sum over stages, like memkd
        "pre_trained": False,
    }
    params = inspect.signature(ReverseDistillationModel).parameters
    model = ReverseDistillationModel(**{k: v for k, v in wanted.items() if k in params})
    return model.to(device).eval()


@pytest.fixture(scope="module")
def anomalib_rd(results, settings):
    if importlib.util.find_spec("anomalib") is None:
        results.note(f"Peers skipped: anomalib is not installed ({INSTALL})")
        pytest.skip(f"anomalib not installed: {INSTALL}")
    try:
        return _anomalib_rd(settings.device)
    except Exception as exc:  # an anomalib release this code does not know
        results.note(f"Peers skipped: anomalib's ReverseDistillationModel could not be built: {type(exc).__name__}: {exc}")
        pytest.skip(f"anomalib ReverseDistillationModel unavailable: {exc}")


@pytest.mark.parametrize("impl", ["memkd", "memkd-compiled", "memkd-rd", "anomalib-rd"])
def test_reverse_distillation_peers(impl, anomalib_rd, model_cache, measure, results, settings):
    device = settings.device
    key = f"peers/reverse-distillation/wide_resnet50_2/B1/256x256/{device}"
    x = images(1, 256, device)
    info = {}
    if impl == "anomalib-rd":
        def run():
            with torch.inference_mode():
                return anomalib_rd(x)
    elif impl == "memkd-compiled":
        predictor = CompiledPredictor(model_cache("memkd", "wide_resnet50_2"))
        run = lambda: predictor(x)  # noqa: E731
        info["compile_s"] = first_call_seconds(run)
    else:
        model = model_cache("memkd" if impl == "memkd" else "rd", "wide_resnet50_2")
        run = lambda: model.predict(x)  # noqa: E731
    if impl in ("memkd", "memkd-compiled"):
        how = "compiled (CompiledPredictor)" if impl == "memkd-compiled" else "eager predict"
        results.add_target(Target(
            f"memkd per-image inference, {how} (WideResNet50, 256x256, {device}) vs anomalib's RD",
            case_id(key, impl), case_id(key, "anomalib-rd"), "speedup", 1.0))
    measure(run, key=key, impl=impl, kind="e2e", role="baseline" if impl == "anomalib-rd" else "subject",
            device=device, items=1, **info)
