"""The ops on CUDA tensors, for both GPU backends, against memkd.ops.reference.

Backends (memkd.ops.set_backend("cuda", ...)): "cuda", the CUDA C++ kernels compiled into memkd._C
(csrc/cuda), and "triton", the Triton kernels (kernels/). Every test is marked ``cuda`` and skipped
without a GPU; the "cuda" backend is skipped when memkd._C has no CUDA kernels, "triton" when Triton
or its kernels are unavailable, each with the reason.

The cases shared with the CPU come from op_cases.py (run here with device "cuda" for each backend);
the ones below are about the GPU backends only. Ground truth and tolerances: op_testing.py.
"""
import pytest
import torch
from op_cases import *  # noqa: F401,F403  (the shared cases, collected here for both GPU backends)
from op_cases import check_cosine_distance_map, check_nr_recall
from op_testing import assert_close, leaf, make_map, make_memory, randn, tolerance

import memkd.ops as ops
from memkd.ops import _library, _registry, reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
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
def device():
    return DEVICE


@pytest.fixture(params=["aot_eager", "inductor"])
def compile_backend(request):
    return request.param


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# ---- backend selection ------------------------------------------------------------------------


def test_selected_backend_serves_every_op(backend):
    for op in _registry.OPS:
        assert ops.backend("cuda", op) == backend
        assert ops.backends()[op]["cuda"].startswith(backend)
    if backend == "cuda":
        for op in _registry.schemas():
            assert _library.has_kernel(op, "CUDA"), f"memkd::{op} has no compiled CUDA kernel"


# ---- accuracy against the reference ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nr_recall_non_contiguous_keys_and_values(backend, dtype, gen):
    query = make_map((2, 40, 6, 5), dtype, "contiguous", gen, DEVICE)
    keys = randn(40, 9, generator=gen, dtype=dtype, device=DEVICE).t()  # [L, C] views with strides (1, L)
    values = randn(2 * 9, 40, generator=gen, dtype=dtype, device=DEVICE)[::2]
    grad_out = make_map((2, 40, 6, 5), dtype, "contiguous", gen, DEVICE)
    check_nr_recall(query, keys, values, grad_out, dtype, DEVICE, backend, "strided keys/values")


def test_anomaly_map_many_stages_and_wide_blur(backend, gen):
    """More stages than one kernel launch takes, and blur radii beyond the fused kernel's halo."""
    stage_shapes = [(2, 5 + i, 4 + i % 3, 5) for i in range(18)]
    student = [make_map(s, torch.float32, "contiguous", gen, DEVICE) for s in stage_shapes]
    teacher = [make_map(s, torch.float32, "channels_last", gen, DEVICE) for s in stage_shapes]
    for stages, out_size, sigma in [(18, (12, 13), 1.0), (1, (30, 30), 30.0), (2, (70, 33), 20.0)]:
        maps, scores = ops.anomaly_map(student[:stages], teacher[:stages], out_size, sigma)
        exp_maps, exp_scores = reference.anomaly_map(
            [x.double() for x in student[:stages]], [x.double() for x in teacher[:stages]], out_size, sigma
        )
        tol = tolerance(torch.float32, backend)
        assert_close(maps, exp_maps, torch.float32, f"maps {stages} stages sigma {sigma}", tol, DEVICE)
        assert_close(scores, exp_scores, torch.float32, f"scores {stages} stages sigma {sigma}", tol, DEVICE)


# ---- large shapes ------------------------------------------------------------------------------

LARGE = [(16, 1024, 16, 16, 50), (16, 256, 64, 64, 50)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", LARGE, ids=["B16-C1024-16x16", "B16-C256-64x64"])
def test_nr_recall_large_shapes(backend, shape, dtype, gen):
    b, c, h, w, items = shape
    query = make_map((b, c, h, w), dtype, "contiguous", gen, DEVICE)
    keys = randn(items, c, generator=gen, dtype=dtype, device=DEVICE)
    values = randn(items, c, generator=gen, dtype=dtype, device=DEVICE)
    grad_out = make_map((b, c, h, w), dtype, "contiguous", gen, DEVICE)
    check_nr_recall(query, keys, values, grad_out, dtype, DEVICE, backend, f"large {shape}")
    # channels_last with the same values
    check_nr_recall(query.contiguous(memory_format=torch.channels_last), keys, values, grad_out, dtype, DEVICE, backend,
                    f"large {shape} channels_last")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cosine_and_anomaly_map_large_shapes(backend, dtype, gen):
    stage_shapes = [(16, 256, 64, 64), (16, 512, 32, 32), (16, 1024, 16, 16)]
    student = [make_map(s, dtype, "channels_last", gen, DEVICE) for s in stage_shapes]
    teacher = [make_map(s, dtype, "contiguous", gen, DEVICE) for s in stage_shapes]
    maps, scores = ops.anomaly_map(student, teacher, (256, 256), 4.0)
    exp_maps, exp_scores = reference.anomaly_map([x.double() for x in student], [x.double() for x in teacher],
                                                 (256, 256), 4.0)
    assert_close(maps, exp_maps, dtype, "large maps", tolerance(dtype, backend), DEVICE)
    assert_close(scores, exp_scores, dtype, "large scores", tolerance(dtype, backend), DEVICE)
    check_cosine_distance_map(leaf(student[0]), leaf(teacher[0]), dtype, DEVICE, backend, gen, "large cosine")


def test_nr_recall_many_memory_items(backend, gen):
    """L beyond what fits in shared memory: both backends fall back to ATen ops (the reference)."""
    for dtype in (torch.float32, torch.float16):
        query = make_map((2, 24, 5, 6), dtype, "channels_last", gen, DEVICE)
        keys, values = make_memory(2500, 24, dtype, gen, DEVICE)
        grad_out = make_map((2, 24, 5, 6), dtype, "contiguous", gen, DEVICE)
        check_nr_recall(query, keys, values, grad_out, dtype, DEVICE, backend, f"L=2500 {dtype}")


# ---- determinism, degenerate input, streams and devices -----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_bitwise_deterministic(backend, dtype, gen):
    q = leaf(make_map((4, 96, 24, 24), dtype, "contiguous", gen, DEVICE))
    k = leaf(randn(50, 96, generator=gen, dtype=dtype, device=DEVICE))
    v = leaf(randn(50, 96, generator=gen, dtype=dtype, device=DEVICE))
    g = make_map((4, 96, 24, 24), dtype, "contiguous", gen, DEVICE)
    fs, ft = leaf(make_map((4, 96, 24, 24), dtype, "channels_last", gen, DEVICE)), leaf(q.detach().clone())
    gd = randn(4, 24, 24, generator=gen, dtype=dtype, device=DEVICE)
    runs = []
    for _ in range(2):
        grads = torch.autograd.grad(ops.nr_recall(q, k, v), (q, k, v), g)
        grads += torch.autograd.grad(ops.cosine_distance_map(fs, ft), (fs, ft), gd)
        maps, scores = ops.anomaly_map([fs.detach()], [ft.detach()], (50, 50), 4.0)
        runs.append(grads + (maps, scores))
    for a, b in zip(*runs):
        assert torch.equal(a, b), "results differ between two identical runs"


def test_anomaly_map_is_cuda_graph_capturable(backend, gen):
    """No host-to-device copy (or other synchronising call) per call: the op is captured in a CUDA
    graph, and replaying the graph on new features gives the eager results."""
    stage_shapes = [(2, 13, 16, 16), (2, 26, 8, 8), (2, 51, 4, 4)]
    student = [make_map(s, torch.float32, "contiguous", gen, DEVICE) for s in stage_shapes]
    teacher = [make_map(s, torch.float32, "contiguous", gen, DEVICE) for s in stage_shapes]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel compilation) outside the capture
        ops.anomaly_map(student, teacher, (64, 64), 4.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        maps, scores = ops.anomaly_map(student, teacher, (64, 64), 4.0)
    for x in student + teacher:
        x.copy_(randn(*x.shape, generator=gen, dtype=x.dtype, device=DEVICE))
    graph.replay()
    torch.cuda.synchronize()
    expected_maps, expected_scores = ops.anomaly_map(student, teacher, (64, 64), 4.0)
    torch.testing.assert_close(maps, expected_maps, rtol=0, atol=0)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=0)


def test_runs_on_the_current_stream(backend, gen):
    q = make_map((2, 64, 16, 16), torch.float32, "contiguous", gen, DEVICE)
    k, v = make_memory(50, 64, torch.float32, gen, DEVICE)
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
    q = make_map((2, 33, 5, 6), torch.float32, "channels_last", gen, DEVICE).to("cuda:1")
    k = randn(7, 33, generator=gen, dtype=torch.float32, device=DEVICE).to("cuda:1")
    v = randn(7, 33, generator=gen, dtype=torch.float32, device=DEVICE).to("cuda:1")
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
