"""The ops on CUDA tensors, for both GPU backends, against memkd.ops.reference.

Backends (memkd.ops.set_backend("cuda", ...)): "cuda", the CUDA C++ kernels compiled into memkd._C
(csrc/cuda), and "triton", the Triton kernels (kernels/). Every test is marked ``cuda`` and skipped
without a GPU; the "cuda" backend is skipped when memkd._C has no CUDA kernels, "triton" when Triton
or its kernels are unavailable, each with the reason.

Ground truth is the reference evaluated in float64 on the very same (already rounded) inputs, with
autograd through it for the gradients, so each dtype's tolerance measures only the kernel's
arithmetic error (relative to the largest magnitude of the expected tensor).
"""
import numpy as np
import pytest
import scipy.ndimage
import torch
from helpers import check_ops_compile_fullgraph

import memkd.ops as ops
from memkd.ops import _library, _registry, reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
# Triton's fp32 dots default to "tf32x3" (about fp32 accuracy, but a different rounding).
BACKEND_TOLERANCES = {"triton": {torch.float32: 1e-4}}
DTYPES = list(TOLERANCES)
# (B, C, H, W, L): odd C and H*W, L = 1 and 50 (not a multiple of 16), batch 1.
SHAPES = [(1, 37, 5, 7, 50), (2, 64, 9, 11, 1), (3, 19, 3, 5, 17), (2, 300, 13, 13, 50)]
LAYOUTS = ["contiguous", "channels_last", "strided"]
# grad_out's layout for each query layout, so that mixed layouts are exercised too.
GRAD_LAYOUT = {"contiguous": "channels_last", "channels_last": "contiguous", "strided": "strided"}
BACKENDS = ["cuda", "triton"]


def backend_unavailable(name: str) -> str | None:
    """Why the GPU backend ``name`` cannot run here, or None."""
    ext = _library.EXTENSION
    if name == "cuda":
        if not ext.loaded:
            return f"memkd._C is not loaded ({ext.reason})"
        if not ext.cuda_kernels:
            return f"memkd._C was built without CUDA kernels (build info {ext.build_info}; needs nvcc at build time)"
        return None
    kernels, why = _registry._triton_kernels(_registry.OPS["nr_recall"])
    return None if kernels is not None else why


@pytest.fixture(params=BACKENDS)
def backend(request):
    why = backend_unavailable(request.param)
    if why is not None:
        pytest.skip(f"{request.param} backend unavailable: {why}")
    ops.set_backend("cuda", request.param)
    try:
        yield request.param
    finally:
        ops.set_backend("cuda", "default")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def tolerance(dtype, backend):
    return BACKEND_TOLERANCES.get(backend, {}).get(dtype, TOLERANCES[dtype])


def assert_close(actual, expected, dtype, backend, what):
    assert actual.device.type == "cuda", f"{what}: expected a CUDA result, got {actual.device}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    tol = tolerance(dtype, backend) * max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} ({dtype}, {backend})"


def make_map(shape, dtype, layout, generator):
    b, c, h, w = shape
    if layout == "strided":  # every other column of a wider map: neither NCHW nor NHWC dense
        # (sliced on the device: .to() of a non-dense view would return a contiguous copy)
        x = torch.randn(b, c, h, 2 * w, generator=generator, dtype=torch.float64).to(DEVICE, dtype)[..., ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        return x
    x = torch.randn(b, c, h, w, generator=generator, dtype=torch.float64).to(DEVICE, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def randn(*shape, generator, dtype=torch.float64):
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)


def leaf(x):
    return x.detach().requires_grad_(True)


def as_float64(x):
    return x.detach().double().requires_grad_(True)


def check_nr_recall(query, keys, values, grad_out, dtype, backend, what=""):
    query, keys, values = leaf(query), leaf(keys), leaf(values)
    out = ops.nr_recall(query, keys, values)
    assert out.dtype == dtype and out.shape == query.shape and out.device == query.device
    if query.is_contiguous(memory_format=torch.channels_last) and not query.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), "output must keep channels_last"
    grads = torch.autograd.grad(out, (query, keys, values), grad_out)
    ref_inputs = [as_float64(t) for t in (query, keys, values)]
    expected = reference.nr_recall(*ref_inputs)
    expected_grads = torch.autograd.grad(expected, ref_inputs, grad_out.double())
    assert_close(out, expected, dtype, backend, f"{what} output")
    for name, got, want in zip(("query", "keys", "values"), grads, expected_grads):
        assert got.dtype == dtype
        assert_close(got, want, dtype, backend, f"{what} grad {name}")


def check_cosine_distance_map(fs, ft, dtype, backend, gen, what=""):
    """ops.cosine_distance_map and its gradients (for a random grad_out) against the reference;
    returns the output and the gradients."""
    out = ops.cosine_distance_map(fs, ft)
    grad_out = randn(*out.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad(out, (fs, ft), grad_out)
    ref_inputs = [as_float64(fs), as_float64(ft)]
    expected = reference.cosine_distance_map(*ref_inputs)
    expected_grads = torch.autograd.grad(expected, ref_inputs, grad_out.double())
    assert_close(out, expected, dtype, backend, f"{what} output")
    for name, got, want in zip(("fs", "ft"), grads, expected_grads):
        assert_close(got, want, dtype, backend, f"{what} grad {name}")
    return out, grads


# ---- backend selection ------------------------------------------------------------------------


def test_selected_backend_serves_every_op(backend):
    for op in _registry.OPS:
        assert ops.backend("cuda", op) == backend
        assert ops.backends()[op]["cuda"].startswith(backend)
    if backend == "cuda":
        for op in _registry.schemas():
            assert _library.has_kernel(op, "CUDA"), f"memkd::{op} has no compiled CUDA kernel"


# ---- accuracy against the reference ------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_nr_recall_forward_and_gradients(backend, shape, layout, dtype, gen):
    b, c, h, w, items = shape
    query = make_map((b, c, h, w), dtype, layout, gen)
    keys = randn(items, c, generator=gen, dtype=dtype)
    values = randn(items, c, generator=gen, dtype=dtype)
    grad_out = make_map((b, c, h, w), dtype, GRAD_LAYOUT[layout], gen)
    check_nr_recall(query, keys, values, grad_out, dtype, backend, f"{shape} {layout}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nr_recall_non_contiguous_keys_and_values(backend, dtype, gen):
    query = make_map((2, 40, 6, 5), dtype, "contiguous", gen)
    keys = randn(40, 9, generator=gen, dtype=dtype).t()  # [L, C] views with strides (1, L)
    values = randn(2 * 9, 40, generator=gen, dtype=dtype)[::2]
    grad_out = make_map((2, 40, 6, 5), dtype, "contiguous", gen)
    check_nr_recall(query, keys, values, grad_out, dtype, backend, "strided keys/values")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [s[:4] for s in SHAPES])
def test_cosine_distance_map_forward_and_gradients(backend, shape, layout, dtype, gen):
    fs = leaf(make_map(shape, dtype, layout, gen))
    ft = leaf(make_map(shape, dtype, "contiguous", gen))
    out, grads = check_cosine_distance_map(fs, ft, dtype, backend, gen)
    assert out.shape == (shape[0], shape[2], shape[3]) and out.dtype == dtype and out.is_cuda
    assert all(got.dtype == dtype for got in grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_anomaly_map_matches_reference(backend, layout, dtype, gen):
    stage_shapes = [(2, 13, 16, 16), (2, 26, 8, 8), (2, 51, 4, 4)]
    student = [make_map(s, dtype, layout, gen) for s in stage_shapes]
    teacher = [make_map(s, dtype, "contiguous", gen) for s in stage_shapes]
    for out_size, sigma in [((64, 64), 4.0), ((37, 50), 2.5), ((9, 11), 4.0), ((20, 20), 0.0), ((1, 7), 1.0)]:
        maps, scores = ops.anomaly_map(student, teacher, out_size, sigma)
        assert maps.shape == (2, *out_size) and scores.shape == (2,) and maps.dtype == dtype and maps.is_cuda
        exp_maps, exp_scores = reference.anomaly_map(
            [x.double() for x in student], [x.double() for x in teacher], out_size, sigma
        )
        assert_close(maps, exp_maps, dtype, backend, f"maps {out_size} sigma {sigma}")
        assert_close(scores, exp_scores, dtype, backend, f"scores {out_size} sigma {sigma}")


def test_anomaly_map_many_stages_and_wide_blur(backend, gen):
    """More stages than one kernel launch takes, and blur radii beyond the fused kernel's halo."""
    stage_shapes = [(2, 5 + i, 4 + i % 3, 5) for i in range(18)]
    student = [make_map(s, torch.float32, "contiguous", gen) for s in stage_shapes]
    teacher = [make_map(s, torch.float32, "channels_last", gen) for s in stage_shapes]
    for stages, out_size, sigma in [(18, (12, 13), 1.0), (1, (30, 30), 30.0), (2, (70, 33), 20.0)]:
        maps, scores = ops.anomaly_map(student[:stages], teacher[:stages], out_size, sigma)
        exp_maps, exp_scores = reference.anomaly_map(
            [x.double() for x in student[:stages]], [x.double() for x in teacher[:stages]], out_size, sigma
        )
        assert_close(maps, exp_maps, torch.float32, backend, f"maps {stages} stages sigma {sigma}")
        assert_close(scores, exp_scores, torch.float32, backend, f"scores {stages} stages sigma {sigma}")


def test_anomaly_map_follows_scipy_semantics(backend, gen):
    student = [randn(1, 8, 8, 8, generator=gen)]
    teacher = [randn(1, 8, 8, 8, generator=gen)]
    maps, scores = ops.anomaly_map(student, teacher, (40, 24), 4.0)
    unblurred = torch.nn.functional.interpolate(
        reference.cosine_distance_map(student[0], teacher[0]).unsqueeze(1), size=(40, 24), mode="bilinear",
        align_corners=True,
    )[0, 0].cpu().numpy()
    expected = scipy.ndimage.gaussian_filter(unblurred, sigma=4.0, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(maps[0].cpu().numpy(), expected, rtol=1e-10, atol=1e-12)
    assert scores[0].item() == pytest.approx(expected.max(), abs=1e-12)


# ---- large shapes ------------------------------------------------------------------------------

LARGE = [(16, 1024, 16, 16, 50), (16, 256, 64, 64, 50)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", LARGE, ids=["B16-C1024-16x16", "B16-C256-64x64"])
def test_nr_recall_large_shapes(backend, shape, dtype, gen):
    b, c, h, w, items = shape
    query = make_map((b, c, h, w), dtype, "contiguous", gen)
    keys = randn(items, c, generator=gen, dtype=dtype)
    values = randn(items, c, generator=gen, dtype=dtype)
    grad_out = make_map((b, c, h, w), dtype, "contiguous", gen)
    check_nr_recall(query, keys, values, grad_out, dtype, backend, f"large {shape}")
    # channels_last with the same values
    check_nr_recall(query.contiguous(memory_format=torch.channels_last), keys, values, grad_out, dtype, backend,
                    f"large {shape} channels_last")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cosine_and_anomaly_map_large_shapes(backend, dtype, gen):
    stage_shapes = [(16, 256, 64, 64), (16, 512, 32, 32), (16, 1024, 16, 16)]
    student = [make_map(s, dtype, "channels_last", gen) for s in stage_shapes]
    teacher = [make_map(s, dtype, "contiguous", gen) for s in stage_shapes]
    maps, scores = ops.anomaly_map(student, teacher, (256, 256), 4.0)
    exp_maps, exp_scores = reference.anomaly_map([x.double() for x in student], [x.double() for x in teacher],
                                                 (256, 256), 4.0)
    assert_close(maps, exp_maps, dtype, backend, "large maps")
    assert_close(scores, exp_scores, dtype, backend, "large scores")
    check_cosine_distance_map(leaf(student[0]), leaf(teacher[0]), dtype, backend, gen, "large cosine")


def test_nr_recall_many_memory_items(backend, gen):
    """L beyond what fits in shared memory: both backends fall back to ATen ops (the reference)."""
    for dtype in (torch.float32, torch.float16):
        query = make_map((2, 24, 5, 6), dtype, "channels_last", gen)
        keys, values = randn(2500, 24, generator=gen, dtype=dtype), randn(2500, 24, generator=gen, dtype=dtype)
        grad_out = make_map((2, 24, 5, 6), dtype, "contiguous", gen)
        check_nr_recall(query, keys, values, grad_out, dtype, backend, f"L=2500 {dtype}")


# ---- autograd, dispatcher and compiler contracts -------------------------------------------------


def test_gradcheck_float64(backend, gen):
    if backend == "triton":
        pytest.skip("the Triton kernels take no float64 (float64 is served by the reference)")
    q = as_float64(randn(1, 6, 3, 5, generator=gen))
    k, v = as_float64(randn(5, 6, generator=gen)), as_float64(randn(5, 6, generator=gen))
    assert torch.autograd.gradcheck(ops.nr_recall, (q, k, v))
    q_last = as_float64(randn(2, 7, 4, 3, generator=gen).contiguous(memory_format=torch.channels_last))
    k, v = as_float64(randn(3, 7, generator=gen)), as_float64(randn(3, 7, generator=gen))
    assert torch.autograd.gradcheck(ops.nr_recall, (q_last, k, v))
    fs, ft = as_float64(randn(2, 4, 3, 3, generator=gen)), as_float64(randn(2, 4, 3, 3, generator=gen))
    assert torch.autograd.gradcheck(ops.cosine_distance_map, (fs, ft))


def test_opcheck_every_op(backend, gen):
    q = randn(2, 9, 5, 3, generator=gen, dtype=torch.float32).requires_grad_()
    k = randn(6, 9, generator=gen, dtype=torch.float32).requires_grad_()
    v = randn(6, 9, generator=gen, dtype=torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.memkd.nr_recall, (q, k, v))
    g = randn(2, 9, 5, 3, generator=gen, dtype=torch.float32)
    torch.library.opcheck(torch.ops.memkd.nr_recall_backward, (g, q.detach(), k.detach(), v.detach()))
    fs = randn(2, 9, 5, 3, generator=gen, dtype=torch.float32).requires_grad_()
    ft = randn(2, 9, 5, 3, generator=gen, dtype=torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.memkd.cosine_distance_map, (fs, ft))
    torch.library.opcheck(
        torch.ops.memkd.cosine_distance_map_backward,
        (randn(2, 5, 3, generator=gen, dtype=torch.float32), fs.detach(), ft.detach()),
    )
    stages_s = [randn(2, 4, 8, 8, generator=gen, dtype=torch.float32), randn(2, 6, 4, 4, generator=gen,
                                                                            dtype=torch.float32)]
    stages_t = [randn(2, 4, 8, 8, generator=gen, dtype=torch.float32), randn(2, 6, 4, 4, generator=gen,
                                                                            dtype=torch.float32)]
    torch.library.opcheck(torch.ops.memkd.anomaly_map, (stages_s, stages_t, [16, 16], 2.0))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, compile_backend, gen):
    torch._dynamo.reset()
    q = randn(2, 12, 4, 4, generator=gen, dtype=torch.float32).requires_grad_()
    k = randn(5, 12, generator=gen, dtype=torch.float32).requires_grad_()
    v = randn(5, 12, generator=gen, dtype=torch.float32).requires_grad_()
    fs = [randn(2, 12, 4, 4, generator=gen, dtype=torch.float32)]
    ft = [randn(2, 12, 4, 4, generator=gen, dtype=torch.float32)]
    check_ops_compile_fullgraph(q, k, v, fs, ft, compile_backend)


# ---- determinism, degenerate input, streams and devices -----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_bitwise_deterministic(backend, dtype, gen):
    q = leaf(make_map((4, 96, 24, 24), dtype, "contiguous", gen))
    k = leaf(randn(50, 96, generator=gen, dtype=dtype))
    v = leaf(randn(50, 96, generator=gen, dtype=dtype))
    g = make_map((4, 96, 24, 24), dtype, "contiguous", gen)
    fs, ft = leaf(make_map((4, 96, 24, 24), dtype, "channels_last", gen)), leaf(q.detach().clone())
    gd = randn(4, 24, 24, generator=gen, dtype=dtype)
    runs = []
    for _ in range(2):
        grads = torch.autograd.grad(ops.nr_recall(q, k, v), (q, k, v), g)
        grads += torch.autograd.grad(ops.cosine_distance_map(fs, ft), (fs, ft), gd)
        maps, scores = ops.anomaly_map([fs.detach()], [ft.detach()], (50, 50), 4.0)
        runs.append(grads + (maps, scores))
    for a, b in zip(*runs):
        assert torch.equal(a, b), "results differ between two identical runs"


def test_zero_vectors_give_zero_cosine_not_nan(backend):
    q = torch.zeros(1, 8, 2, 2, device=DEVICE, requires_grad=True)
    k = torch.zeros(3, 8, device=DEVICE, requires_grad=True)
    v = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    out = ops.nr_recall(q, k, v)
    torch.testing.assert_close(out[0, :, 0, 0], v.mean(0))  # all scores 0 -> uniform weights
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    # some zero pixels and some zero keys among ordinary ones
    q2 = torch.randn(2, 12, 3, 5, device=DEVICE, dtype=torch.float64)
    q2[0, :, 1, 2] = 0
    q2[1] = 0
    k2 = torch.randn(7, 12, device=DEVICE, dtype=torch.float64)
    k2[3] = 0
    v2 = torch.randn(7, 12, device=DEVICE, dtype=torch.float64)
    for dtype in (torch.float32, torch.float16):
        qq, kk, vv = leaf(q2.to(dtype)), leaf(k2.to(dtype)), leaf(v2.to(dtype))
        out = ops.nr_recall(qq, kk, vv)
        grads = torch.autograd.grad(out.float().sum(), (qq, kk, vv))
        assert torch.isfinite(out).all() and not any(torch.isnan(g).any() for g in grads), dtype
        # d query at a zero pixel and d keys at a zero key scale with 1 / EPS, beyond float16's range
        # (as in the reference): there only d values must be finite
        finite = grads if dtype == torch.float32 else grads[2:]
        assert all(torch.isfinite(g).all() for g in finite), dtype
    fs = torch.zeros(1, 4, 2, 2, device=DEVICE, requires_grad=True)
    ft = torch.randn(1, 4, 2, 2, device=DEVICE, requires_grad=True)
    d = ops.cosine_distance_map(fs, ft)
    torch.testing.assert_close(d, torch.ones(1, 2, 2, device=DEVICE))
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(d.sum(), (fs, ft)))
    zeros = [torch.zeros(1, 4, 2, 2, device=DEVICE)]
    maps, scores = ops.anomaly_map(zeros, zeros, (4, 4))
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()


@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_anomaly_map_nan_propagates_into_the_score(backend, sigma, gen):
    """NaN features give NaN map pixels and a NaN image score, as in the reference."""
    stage_shapes = [(3, 13, 9, 11), (3, 26, 5, 6)]
    for dtype in (torch.float32, torch.float16):
        student = [make_map(s, dtype, "contiguous", gen) for s in stage_shapes]
        teacher = [make_map(s, dtype, "contiguous", gen) for s in stage_shapes]
        student[1][0, :, 2, 3] = float("nan")  # some NaN pixels in image 0
        student[0][1] = float("nan")  # every pixel of image 1
        maps, scores = ops.anomaly_map(student, teacher, (13, 17), sigma)
        exp_maps, exp_scores = reference.anomaly_map(
            [x.double() for x in student], [x.double() for x in teacher], (13, 17), sigma
        )
        assert torch.equal(maps.isnan(), exp_maps.isnan()), dtype
        assert scores[:2].isnan().all() and exp_scores[:2].isnan().all(), dtype
        assert_close(scores[2:], exp_scores[2:], dtype, backend, "score of the finite image")


def test_anomaly_map_is_cuda_graph_capturable(backend, gen):
    """No host-to-device copy (or other synchronising call) per call: the op is captured in a CUDA
    graph, and replaying the graph on new features gives the eager results."""
    stage_shapes = [(2, 13, 16, 16), (2, 26, 8, 8), (2, 51, 4, 4)]
    student = [make_map(s, torch.float32, "contiguous", gen) for s in stage_shapes]
    teacher = [make_map(s, torch.float32, "contiguous", gen) for s in stage_shapes]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel compilation) outside the capture
        ops.anomaly_map(student, teacher, (64, 64), 4.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        maps, scores = ops.anomaly_map(student, teacher, (64, 64), 4.0)
    for x in student + teacher:
        x.copy_(torch.randn(x.shape, generator=gen, dtype=torch.float64).to(DEVICE, x.dtype))
    graph.replay()
    torch.cuda.synchronize()
    expected_maps, expected_scores = ops.anomaly_map(student, teacher, (64, 64), 4.0)
    torch.testing.assert_close(maps, expected_maps, rtol=0, atol=0)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=0)


def test_runs_on_the_current_stream(backend, gen):
    q = make_map((2, 64, 16, 16), torch.float32, "contiguous", gen)
    k, v = randn(50, 64, generator=gen, dtype=torch.float32), randn(50, 64, generator=gen, dtype=torch.float32)
    expected = ops.nr_recall(q, k, v)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            out = ops.nr_recall(q, k, v)
        maps, _ = ops.anomaly_map([q], [q.flip(1)], (64, 64), 4.0)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(maps, ops.anomaly_map([q], [q.flip(1)], (64, 64), 4.0)[0], rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_a_non_default_device(backend, gen):
    q = make_map((2, 33, 5, 6), torch.float32, "channels_last", gen).to("cuda:1")
    k = randn(7, 33, generator=gen, dtype=torch.float32).to("cuda:1")
    v = randn(7, 33, generator=gen, dtype=torch.float32).to("cuda:1")
    out = ops.nr_recall(q, k, v)
    assert out.device == q.device
    torch.testing.assert_close(out.double(), reference.nr_recall(q.double(), k.double(), v.double()))


def test_compiled_cuda_kernels_check_arguments(backend):
    """Direct torch.ops calls skip the Python checks; the CUDA kernels still refuse bad input."""
    if backend != "cuda":
        pytest.skip("checks of the compiled CUDA entry points")
    q = torch.randn(1, 4, 2, 2, device=DEVICE)
    with pytest.raises(RuntimeError, match="keys: expected C = 4"):
        torch.ops.memkd.nr_recall(q, torch.randn(3, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE))
    with pytest.raises(RuntimeError, match="keys: expected a tensor on cuda"):
        torch.ops.memkd.nr_recall(q, torch.randn(3, 4), torch.randn(3, 4, device=DEVICE))
    with pytest.raises(RuntimeError, match="grad_out: expected the shape of query"):
        torch.ops.memkd.nr_recall_backward(torch.randn(1, 4, 2, 3, device=DEVICE), q, torch.randn(3, 4, device=DEVICE),
                                           torch.randn(3, 4, device=DEVICE))
    with pytest.raises(RuntimeError, match="ft: expected the shape of fs"):
        torch.ops.memkd.cosine_distance_map(q, torch.randn(1, 4, 3, 2, device=DEVICE))
    with pytest.raises(RuntimeError, match="student_features: expected batch"):
        torch.ops.memkd.anomaly_map([q, torch.randn(2, 4, 2, 2, device=DEVICE)],
                                    [q, torch.randn(2, 4, 2, 2, device=DEVICE)], [8, 8], 4.0)
