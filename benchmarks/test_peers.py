"""Peers, when installed: anomalib's Reverse Distillation inference on the same input and device,
side by side with memkd's ``rd`` and ``memkd`` (WideResNet50, random weights, batch 1, 256x256).
Without anomalib the cases are skipped with how to install it: ``pip install anomalib``.
"""
from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch

from benchlib import images

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


@pytest.mark.parametrize("impl", ["memkd", "memkd-rd", "anomalib-rd"])
def test_reverse_distillation_peers(impl, anomalib_rd, model_cache, measure, settings):
    device = settings.device
    x = images(1, 256, device)
    if impl == "anomalib-rd":
        def run():
            with torch.inference_mode():
                return anomalib_rd(x)
    else:
        model = model_cache("memkd" if impl == "memkd" else "rd", "wide_resnet50_2")
        run = lambda: model.predict(x)  # noqa: E731
    measure(run, key=f"peers/reverse-distillation/wide_resnet50_2/B1/256x256/{device}", impl=impl, kind="e2e",
            role="baseline" if impl == "anomalib-rd" else "subject", device=device, items=1)
