"""Op test cases shared by every device and backend: test_ops_cpu.py and test_ops_cuda.py import
them (``from op_cases import *``) and provide the fixtures they take:

* ``device`` — "cpu" or "cuda";
* ``backend`` — the backend serving the ops on that device for the test ("cpp"; "cuda", "triton"),
  selected with memkd.ops.set_backend by the fixture;
* ``compile_backend`` — the torch.compile backends to run under;
* ``gen`` — a seeded torch.Generator.

Each case compares memkd.ops (forward and gradients) with memkd.ops.reference in float64 on the
same inputs (see op_testing.py for the tolerances).
"""
import numpy as np
import pytest
import scipy.ndimage
import torch
from op_testing import (
    DTYPES,
    GRAD_LAYOUT,
    SHAPES,
    as_float64,
    assert_close,
    leaf,
    make_map,
    randn,
    tolerance,
)

import memkd.ops as ops
from memkd.ops import reference

__all__ = [
    "test_nr_recall_forward_and_gradients",
    "test_cosine_distance_map_forward_and_gradients",
    "test_anomaly_map_matches_reference",
    "test_anomaly_map_follows_scipy_semantics",
    "test_anomaly_map_nan_propagates_into_the_score",
    "test_gradcheck_float64",
    "test_opcheck_every_op",
    "test_torch_compile_fullgraph",
    "test_zero_vectors_give_zero_cosine_not_nan",
]

# The layouts of the op tests: dense either way, and neither (copied by the kernels).
OP_LAYOUTS = ["contiguous", "channels_last", "strided"]


def check_nr_recall(query, keys, values, grad_out, dtype, device, backend, what=""):
    """ops.nr_recall and its three gradients against the reference."""
    query, keys, values = leaf(query), leaf(keys), leaf(values)
    out = ops.nr_recall(query, keys, values)
    assert out.dtype == dtype and out.shape == query.shape and out.device == query.device
    if query.is_contiguous(memory_format=torch.channels_last) and not query.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), "output must keep channels_last"
    grads = torch.autograd.grad(out, (query, keys, values), grad_out)
    ref_inputs = [as_float64(t) for t in (query, keys, values)]
    expected = reference.nr_recall(*ref_inputs)
    expected_grads = torch.autograd.grad(expected, ref_inputs, grad_out.double().cpu())
    tol = tolerance(dtype, backend)
    assert_close(out, expected, dtype, f"{what} output", tol, device)
    for name, got, want in zip(("query", "keys", "values"), grads, expected_grads):
        assert_close(got, want, dtype, f"{what} grad {name}", tol, device)


def check_cosine_distance_map(fs, ft, dtype, device, backend, gen, what=""):
    """ops.cosine_distance_map and its gradients (for a random grad_out) against the reference;
    returns the output and the gradients."""
    out = ops.cosine_distance_map(fs, ft)
    grad_out = randn(*out.shape, generator=gen, dtype=dtype, device=device)
    grads = torch.autograd.grad(out, (fs, ft), grad_out)
    ref_inputs = [as_float64(fs), as_float64(ft)]
    expected = reference.cosine_distance_map(*ref_inputs)
    expected_grads = torch.autograd.grad(expected, ref_inputs, grad_out.double().cpu())
    tol = tolerance(dtype, backend)
    assert_close(out, expected, dtype, f"{what} output", tol, device)
    for name, got, want in zip(("fs", "ft"), grads, expected_grads):
        assert_close(got, want, dtype, f"{what} grad {name}", tol, device)
    return out, grads


def check_anomaly_map(student, teacher, out_size, sigma, dtype, device, backend, what=""):
    maps, scores = ops.anomaly_map(student, teacher, out_size, sigma)
    assert maps.shape == (student[0].shape[0], *out_size) and scores.shape == (student[0].shape[0],)
    exp_maps, exp_scores = reference.anomaly_map(
        [x.double().cpu() for x in student], [x.double().cpu() for x in teacher], out_size, sigma
    )
    tol = tolerance(dtype, backend)
    assert_close(maps, exp_maps, dtype, f"{what} maps {out_size} sigma {sigma}", tol, device)
    assert_close(scores, exp_scores, dtype, f"{what} scores {out_size} sigma {sigma}", tol, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", OP_LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_nr_recall_forward_and_gradients(device, backend, shape, layout, dtype, gen):
    b, c, h, w, items = shape
    query = make_map((b, c, h, w), dtype, layout, gen, device)
    keys = randn(items, c, generator=gen, dtype=dtype, device=device)
    values = randn(items, c, generator=gen, dtype=dtype, device=device)
    grad_out = make_map((b, c, h, w), dtype, GRAD_LAYOUT[layout], gen, device)
    check_nr_recall(query, keys, values, grad_out, dtype, device, backend, f"{shape} {layout}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", OP_LAYOUTS)
@pytest.mark.parametrize("shape", [s[:4] for s in SHAPES])
def test_cosine_distance_map_forward_and_gradients(device, backend, shape, layout, dtype, gen):
    fs = leaf(make_map(shape, dtype, layout, gen, device))
    ft = leaf(make_map(shape, dtype, "contiguous", gen, device))
    out, grads = check_cosine_distance_map(fs, ft, dtype, device, backend, gen)
    assert out.shape == (shape[0], shape[2], shape[3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_anomaly_map_matches_reference(device, backend, layout, dtype, gen):
    stage_shapes = [(2, 13, 16, 16), (2, 26, 8, 8), (2, 51, 4, 4)]
    student = [make_map(s, dtype, layout, gen, device) for s in stage_shapes]
    teacher = [make_map(s, dtype, "contiguous", gen, device) for s in stage_shapes]
    for out_size, sigma in [((64, 64), 4.0), ((37, 50), 2.5), ((9, 11), 4.0), ((20, 20), 0.0), ((1, 7), 1.0)]:
        check_anomaly_map(student, teacher, out_size, sigma, dtype, device, backend)


def test_anomaly_map_follows_scipy_semantics(device, backend, gen):
    student = [randn(1, 8, 8, 8, generator=gen, device=device)]
    teacher = [randn(1, 8, 8, 8, generator=gen, device=device)]
    maps, scores = ops.anomaly_map(student, teacher, (40, 24), 4.0)
    unblurred = torch.nn.functional.interpolate(
        reference.cosine_distance_map(student[0], teacher[0]).unsqueeze(1), size=(40, 24), mode="bilinear",
        align_corners=True,
    )[0, 0].cpu().numpy()
    expected = scipy.ndimage.gaussian_filter(unblurred, sigma=4.0, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(maps[0].cpu().numpy(), expected, rtol=1e-10, atol=1e-12)
    assert scores[0].item() == pytest.approx(expected.max(), abs=1e-12)
    assert len(reference.gaussian_taps(4.0)) == 33


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_anomaly_map_nan_propagates_into_the_score(device, backend, sigma, dtype, gen):
    """NaN features give NaN map pixels and a NaN image score, as in the reference (a max that skips
    NaN gives a finite score, or -inf when every pixel is NaN); the other images stay finite."""
    stage_shapes = [(3, 13, 9, 11), (3, 26, 5, 6)]
    student = [make_map(s, dtype, "contiguous", gen, device) for s in stage_shapes]
    teacher = [make_map(s, dtype, "contiguous", gen, device) for s in stage_shapes]
    student[1][0, :, 2, 3] = float("nan")  # some NaN pixels in image 0
    student[0][1] = float("nan")  # every pixel of image 1
    maps, scores = ops.anomaly_map(student, teacher, (13, 17), sigma)
    exp_maps, exp_scores = reference.anomaly_map(
        [x.double().cpu() for x in student], [x.double().cpu() for x in teacher], (13, 17), sigma
    )
    assert torch.equal(maps.isnan().cpu(), exp_maps.isnan())
    assert scores[:2].isnan().all() and exp_scores[:2].isnan().all()
    assert_close(scores[2:], exp_scores[2:], dtype, "score of the finite image", tolerance(dtype, backend), device)


def test_gradcheck_float64(device, backend, gen):
    if backend == "triton":
        pytest.skip("the Triton kernels take no float64 (float64 is served by the reference)")
    q = leaf(randn(1, 6, 3, 5, generator=gen, device=device))
    k, v = leaf(randn(5, 6, generator=gen, device=device)), leaf(randn(5, 6, generator=gen, device=device))
    assert torch.autograd.gradcheck(ops.nr_recall, (q, k, v))
    q_last = leaf(randn(2, 7, 4, 3, generator=gen, device=device).contiguous(memory_format=torch.channels_last))
    k, v = leaf(randn(3, 7, generator=gen, device=device)), leaf(randn(3, 7, generator=gen, device=device))
    assert torch.autograd.gradcheck(ops.nr_recall, (q_last, k, v))
    fs = leaf(randn(2, 4, 3, 3, generator=gen, device=device))
    ft = leaf(randn(2, 4, 3, 3, generator=gen, device=device))
    assert torch.autograd.gradcheck(ops.cosine_distance_map, (fs, ft))


def test_opcheck_every_op(device, backend, gen):
    def f32(*shape):
        return randn(*shape, generator=gen, dtype=torch.float32, device=device)

    q, k, v = leaf(f32(2, 9, 5, 3)), leaf(f32(6, 9)), leaf(f32(6, 9))
    torch.library.opcheck(torch.ops.memkd.nr_recall, (q, k, v))
    torch.library.opcheck(torch.ops.memkd.nr_recall_backward, (f32(2, 9, 5, 3), q.detach(), k.detach(), v.detach()))
    fs, ft = leaf(f32(2, 9, 5, 3)), leaf(f32(2, 9, 5, 3))
    torch.library.opcheck(torch.ops.memkd.cosine_distance_map, (fs, ft))
    torch.library.opcheck(torch.ops.memkd.cosine_distance_map_backward, (f32(2, 5, 3), fs.detach(), ft.detach()))
    stages_s = [f32(2, 4, 8, 8), f32(2, 6, 4, 4)]
    stages_t = [f32(2, 4, 8, 8), f32(2, 6, 4, 4)]
    torch.library.opcheck(torch.ops.memkd.anomaly_map, (stages_s, stages_t, [16, 16], 2.0))


def test_torch_compile_fullgraph(device, backend, compile_backend, gen):
    """torch.compile(fullgraph=True) of the memkd ops gives the eager results: loss and gradients of
    a step through nr_recall and cosine_distance_map, and anomaly maps."""
    torch._dynamo.reset()

    def f32(*shape):
        return randn(*shape, generator=gen, dtype=torch.float32, device=device)

    q, k, v = leaf(f32(2, 12, 4, 4)), leaf(f32(5, 12)), leaf(f32(5, 12))
    fs, ft = [f32(2, 12, 4, 4)], [f32(2, 12, 4, 4)]

    def step(q, k, v):
        out = ops.nr_recall(q, k, v)
        return out.square().mean() + ops.cosine_distance_map(out, q).mean()

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected_loss = step(q, k, v)
    expected_grads = torch.autograd.grad(expected_loss, (q, k, v))
    torch.testing.assert_close(loss, expected_loss)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    amap = torch.compile(lambda a, b: ops.anomaly_map(a, b, (8, 8), 1.0), fullgraph=True, backend=compile_backend)
    torch.testing.assert_close(amap(fs, ft), ops.anomaly_map(fs, ft, (8, 8), 1.0))


def test_zero_vectors_give_zero_cosine_not_nan(device, backend):
    q = torch.zeros(1, 8, 2, 2, device=device, requires_grad=True)
    k = torch.zeros(3, 8, device=device, requires_grad=True)
    v = torch.randn(3, 8, device=device, requires_grad=True)
    out = ops.nr_recall(q, k, v)
    torch.testing.assert_close(out[0, :, 0, 0], v.mean(0))  # all scores 0 -> uniform weights
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    # some zero pixels and some zero keys among ordinary ones
    q2 = torch.randn(2, 12, 3, 5, device=device, dtype=torch.float64)
    q2[0, :, 1, 2] = 0
    q2[1] = 0
    k2 = torch.randn(7, 12, device=device, dtype=torch.float64)
    k2[3] = 0
    v2 = torch.randn(7, 12, device=device, dtype=torch.float64)
    for dtype in (torch.float32, torch.float16):
        qq, kk, vv = leaf(q2.to(dtype)), leaf(k2.to(dtype)), leaf(v2.to(dtype))
        out = ops.nr_recall(qq, kk, vv)
        grads = torch.autograd.grad(out.float().sum(), (qq, kk, vv))
        assert torch.isfinite(out).all() and not any(torch.isnan(g).any() for g in grads), dtype
        # d query at a zero pixel and d keys at a zero key scale with 1 / EPS, beyond float16's range
        # (as in the reference): there only d values must be finite
        finite = grads if dtype == torch.float32 else grads[2:]
        assert all(torch.isfinite(g).all() for g in finite), dtype
    fs = torch.zeros(1, 4, 2, 2, device=device, requires_grad=True)
    ft = torch.randn(1, 4, 2, 2, device=device, requires_grad=True)
    d = ops.cosine_distance_map(fs, ft)
    torch.testing.assert_close(d, torch.ones(1, 2, 2, device=device))
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(d.sum(), (fs, ft)))
    zeros = [torch.zeros(1, 4, 2, 2, device=device)]
    maps, scores = ops.anomaly_map(zeros, zeros, (4, 4))
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()
