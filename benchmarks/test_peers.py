"""Peers, when installed: anomalib's Reverse Distillation inference on the same input and device,
side by side with memkd's ``rd`` and ``memkd`` (WideResNet50, random weights, batch 1, 256x256),
and memkd through ``CompiledPredictor`` (``memkd test/predict --compile``; the one-off compile is
not timed, its duration is recorded). Without anomalib the cases are skipped with how to install
it: ``pip install anomalib``.

Target: memkd per image faster than anomalib's RD (eager ``predict`` and compiled, each a target).
"""
from __future__ import annotations

import functools
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


IMPLS = ("memkd", "memkd-compiled", "memkd-rd", "anomalib-rd")
KEY = "peers/reverse-distillation/wide_resnet50_2/B1/256x256/{device}"


@pytest.fixture(scope="module")
def peer_calls(anomalib_rd, model_cache, settings):
    """The timed call of each impl on one image, and what is known of it beside the time; built
    once per module, since the compiled predictor compiles on its first call."""
    x = images(1, 256, settings.device)
    calls = {}
    for impl in IMPLS:
        info = {}
        if impl == "anomalib-rd":
            def run():
                with torch.inference_mode():
                    return anomalib_rd(x)
        elif impl == "memkd-compiled":
            run = functools.partial(CompiledPredictor(model_cache("memkd", "wide_resnet50_2")), x)
            info["compile_s"] = first_call_seconds(run)
        else:
            run = functools.partial(model_cache("memkd" if impl == "memkd" else "rd", "wide_resnet50_2").predict, x)
        calls[impl] = (run, info)
    return calls


@pytest.mark.parametrize("impl", IMPLS)
def test_reverse_distillation_peers(impl, peer_calls, measure, settings):
    run, info = peer_calls[impl]
    measure(run, key=KEY.format(device=settings.device), impl=impl, kind="e2e",
            role="baseline" if impl == "anomalib-rd" else "subject", device=settings.device, items=1, **info)


@pytest.mark.parametrize("impl", ["memkd", "memkd-compiled"])
def test_reverse_distillation_peers_target(impl, peer_calls, judge_in_pairs, settings):
    """memkd per image (eager predict, and compiled) faster than anomalib's RD, judged in pairs."""
    device = settings.device
    key = KEY.format(device=device)
    how = "compiled (CompiledPredictor)" if impl == "memkd-compiled" else "eager predict"
    judge_in_pairs(Target(f"memkd per-image inference, {how} (WideResNet50, 256x256, {device}) vs anomalib's RD",
                          case_id(key, impl), case_id(key, "anomalib-rd"), "speedup", 1.0),
                   peer_calls[impl][0], peer_calls["anomalib-rd"][0], kind="e2e", device=device)
