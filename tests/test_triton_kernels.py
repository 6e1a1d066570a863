"""The Triton kernels (kernels/, memkd.kernels) against the reference ops.

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before any import) on CPU tensors; with one, the same tests run on CUDA tensors. Ground truth is
memkd.ops.reference evaluated in float64 on the very same (already rounded) inputs, gradients by
torch.autograd.grad through the reference forward, so each tolerance measures only the kernels'
arithmetic error. Shapes are small and odd (C = 37 and H*W = 5x7 are not powers of two; L = 1, 17,
50) and the tests mostly pass small tiles (16) so that every kernel loops over several C chunks and
pixel blocks with ragged, masked edges; the interpreter is slow, so the shapes stay tiny.
"""
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import memkd.kernels as K  # noqa: E402
from memkd.kernels import _common  # noqa: E402
from memkd.kernels.nr_recall import backward_config, forward_config  # noqa: E402
from memkd.ops import reference  # noqa: E402
from op_testing import TRITON_KERNEL_TOLERANCES, as_float64, assert_close, make_map, make_memory  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRETED = _common.interpreting()

DTYPES = list(TRITON_KERNEL_TOLERANCES)
# query layouts: NCHW, NHWC, a channel slice of a wider map (addressed in place, stride_b != C*H*W)
# and a crop of a wider map (H, W do not collapse into one pixel axis: copied first).
KERNEL_LAYOUTS = ["contiguous", "channels_last", "channel_slice", "cropped"]
SMALL = dict(block_p=16, block_c=16)  # several C chunks (37 = 16 + 16 + 5) and pixel blocks


def test_runs_where_expected():
    assert CUDA or INTERPRETED, "no GPU and TRITON_INTERPRET unset: conftest.py did not run first"


def assert_kernel_close(actual, expected, dtype, what):
    """assert_close with the tolerances of the launchers called with input_precision="ieee"."""
    assert_close(actual, expected, dtype, what, TRITON_KERNEL_TOLERANCES[dtype])


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def _restore_settings():
    precision, deterministic = K.get_input_precision(), K.get_deterministic()
    yield
    K.set_input_precision(precision)
    K.set_deterministic(deterministic)


# ---- NR recall -----------------------------------------------------------------------------------

# (B, C, H, W, L): batch 1 and 2, L = 50, 1 and 17 (none a power of two but 1), odd C and H*W.
NR_SHAPES = [(1, 37, 5, 7, 50), (2, 37, 5, 7, 17), (2, 20, 3, 5, 1)]
NR_CASES = (
    [(shape, torch.float32, "contiguous") for shape in NR_SHAPES]
    + [(NR_SHAPES[1], dtype, layout) for dtype in DTYPES for layout in KERNEL_LAYOUTS
       if (dtype, layout) != (torch.float32, "contiguous")]
)
NR_IDS = [f"{'x'.join(map(str, s))}-{str(d)[6:]}-{lay}" for s, d, lay in NR_CASES]


def nr_expected(query, keys, values, grad_out):
    q, k, v = as_float64(query), as_float64(keys), as_float64(values)
    out = reference.nr_recall(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.double().cpu())
    return out.detach(), grads


@pytest.mark.parametrize("shape,dtype,layout", NR_CASES, ids=NR_IDS)
def test_nr_recall_forward_backward(shape, dtype, layout, gen):
    b, c, h, w, l = shape
    query = make_map((b, c, h, w), dtype, layout, gen, DEVICE)
    keys, values = make_memory(l, c, dtype, gen, DEVICE)
    grad_out = make_map((b, c, h, w), dtype, "contiguous", gen, DEVICE)
    expected_out, (eq, ek, ev) = nr_expected(query, keys, values, grad_out)

    out = K.nr_recall_forward(query, keys, values, input_precision="ieee", **SMALL)
    assert_kernel_close(out, expected_out, dtype, "out")
    dq, dk, dv = K.nr_recall_backward(grad_out, query, keys, values, input_precision="ieee", **SMALL)
    assert_kernel_close(dq, eq, dtype, "grad query")
    assert_kernel_close(dk, ek, dtype, "grad keys")
    assert_kernel_close(dv, ev, dtype, "grad values")
    if layout == "channels_last":  # results keep the query's memory format
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert dq.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous() and dq.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nr_recall_default_tiles(dtype, gen):
    """The GPU launch parameters (BLOCK_L 64, BLOCK_P 32/64, BLOCK_C 16..64): ragged tiles."""
    b, c, h, w, l = 2, 37, 5, 7, 50
    query = make_map((b, c, h, w), dtype, "channels_last", gen, DEVICE)
    keys, values = make_memory(l, c, dtype, gen, DEVICE)
    grad_out = make_map((b, c, h, w), dtype, "contiguous", gen, DEVICE)
    expected_out, expected_grads = nr_expected(query, keys, values, grad_out)
    assert_kernel_close(K.nr_recall_forward(query, keys, values, input_precision="ieee"), expected_out, dtype, "out")
    got = K.nr_recall_backward(grad_out, query, keys, values, input_precision="ieee")
    for name, g, e in zip(("query", "keys", "values"), got, expected_grads):
        assert_kernel_close(g, e, dtype, f"grad {name}")


@pytest.mark.parametrize("max_programs", [1, 3])
def test_nr_recall_backward_deterministic_and_atomic(max_programs, gen):
    """Deterministic mode: bitwise-identical gradients across runs, also with persistent programs
    looping over several pixel tiles; atomic mode agrees within tolerance."""
    b, c, h, w, l = 2, 37, 5, 7, 50
    query = make_map((b, c, h, w), torch.float32, "contiguous", gen, DEVICE)
    keys, values = make_memory(l, c, torch.float32, gen, DEVICE)
    grad_out = make_map((b, c, h, w), torch.float32, "contiguous", gen, DEVICE)
    kw = dict(input_precision="ieee", max_programs=max_programs, **SMALL)
    assert K.get_deterministic() is True  # the documented default
    first = K.nr_recall_backward(grad_out, query, keys, values, **kw)
    second = K.nr_recall_backward(grad_out, query, keys, values, deterministic=True, **kw)
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    atomic = K.nr_recall_backward(grad_out, query, keys, values, deterministic=False, **kw)
    _, expected = nr_expected(query, keys, values, grad_out)
    for name, x, y, e in zip(("query", "keys", "values"), first, atomic, expected):
        assert_kernel_close(x, e, torch.float32, f"deterministic grad {name}")
        assert_kernel_close(y, e, torch.float32, f"atomic grad {name}")
        assert_kernel_close(y, x.double(), torch.float32, f"atomic vs deterministic grad {name}")


def test_nr_recall_zero_vectors(gen):
    """Zero (and below-EPS) query pixels and keys: cosine 0 (uniform weights) and finite gradients,
    as in the reference."""
    b, c, h, w, l = 2, 37, 5, 7, 17
    query = make_map((b, c, h, w), torch.float32, "contiguous", gen, DEVICE)
    query[0, :, 1, 2] = 0
    query[1, :, 4, :] = 0
    query[1, :, 0, 0] *= 1e-10  # 0 < |q| < EPS: the projection term of dQ is dropped
    keys, values = make_memory(l, c, torch.float32, gen, DEVICE)
    keys[3] = 0
    keys[5] *= 1e-10
    grad_out = make_map((b, c, h, w), torch.float32, "contiguous", gen, DEVICE)
    q, k, v = query.double().cpu(), keys.double().cpu(), values.double().cpu()
    expected_grads = reference.nr_recall_backward(grad_out.double().cpu(), q, k, v)
    out = K.nr_recall_forward(query, keys, values, input_precision="ieee", **SMALL)
    assert_kernel_close(out, reference.nr_recall(q, k, v), torch.float32, "out")
    got = K.nr_recall_backward(grad_out, query, keys, values, input_precision="ieee", **SMALL)
    for name, g, e in zip(("query", "keys", "values"), got, expected_grads):
        assert torch.isfinite(e).all()
        assert_kernel_close(g, e, torch.float32, f"grad {name}")


def test_nr_recall_fp16_zero_key_gives_finite_query_grad(gen):
    """A zero key in fp16: its 1 / EPS normaliser must not reach an fp16 operand (it overflows to
    inf and inf * 0 makes every dQ NaN). dQ and dV match the reference; dK at the zero key scales
    with 1 / EPS, beyond fp16's range in the reference too, so only the other keys' dK are compared."""
    b, c, h, w, l = 2, 37, 5, 7, 17
    query = make_map((b, c, h, w), torch.float16, "contiguous", gen, DEVICE)
    keys, values = make_memory(l, c, torch.float16, gen, DEVICE)
    keys[3] = 0
    grad_out = make_map((b, c, h, w), torch.float16, "contiguous", gen, DEVICE)
    _, (eq, ek, ev) = nr_expected(query, keys, values, grad_out)
    dq, dk, dv = K.nr_recall_backward(grad_out, query, keys, values, **SMALL)
    assert_kernel_close(dq, eq, torch.float16, "grad query")
    assert_kernel_close(dv, ev, torch.float16, "grad values")
    others = [i for i in range(l) if i != 3]
    assert_kernel_close(dk[others], ek[others], torch.float16, "grad keys (non-zero keys)")


def test_nr_recall_many_memory_items(monkeypatch, gen):
    """L = 2500: one key block would need 262 KB (fp16) of shared memory, over any GPU's 227 KB. No
    kernel may be launched with a key block beyond the largest tile the launch tables were sized
    for; forward and backward still match the reference (fp32 and fp16, channels_last query)."""
    import memkd.kernels.nr_recall as nr

    largest_tile = max(block_l for _, block_l in nr._FWD_TILES)
    launched = []
    for name in ("_nr_recall_fwd_kernel", "_nr_recall_bwd_kernel"):
        kernel = getattr(nr, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel):
                def launch(*args, **kwargs):
                    launched.append(kwargs["BLOCK_L"])
                    return kernel[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(nr, name, Spy())
    b, c, h, w, l = 1, 8, 2, 3, 2500
    for dtype in (torch.float32, torch.float16):
        query = make_map((b, c, h, w), dtype, "channels_last", gen, DEVICE)
        keys, values = make_memory(l, c, dtype, gen, DEVICE)
        grad_out = make_map((b, c, h, w), dtype, "contiguous", gen, DEVICE)
        expected_out, expected = nr_expected(query, keys, values, grad_out)
        out = K.nr_recall_forward(query, keys, values, input_precision="ieee")
        assert_kernel_close(out, expected_out, dtype, "out")
        assert out.is_contiguous(memory_format=torch.channels_last)
        got = K.nr_recall_backward(grad_out, query, keys, values, input_precision="ieee")
        for name, g, e in zip(("query", "keys", "values"), got, expected):
            assert_kernel_close(g, e, dtype, f"grad {name}")
    assert all(block_l <= largest_tile for block_l in launched), launched


def test_nr_recall_broadcast_grad(gen):
    """grad_out of out.sum() is a stride-0 broadcast: read in place, never densified wrongly."""
    query = make_map((2, 20, 3, 5), torch.float32, "contiguous", gen, DEVICE)
    keys, values = make_memory(17, 20, torch.float32, gen, DEVICE)
    grad_out = torch.ones((), device=DEVICE).expand(query.shape)
    _, expected = nr_expected(query, keys, values, grad_out.contiguous())
    got = K.nr_recall_backward(grad_out, query, keys, values, input_precision="ieee", **SMALL)
    for g, e in zip(got, expected):
        assert_kernel_close(g, e, torch.float32, "grad")


def test_settings_and_configs():
    assert K.get_input_precision() == "tf32x3"
    with pytest.raises(ValueError, match="input_precision"):
        K.set_input_precision("fp64")
    K.set_input_precision("tf32")
    assert K.get_input_precision() == "tf32"
    assert _common.resolve_precision(None, torch.float32) == "tf32"
    assert _common.resolve_precision("ieee", torch.float16) == "tf32"  # only fp32 dots care
    cfg = forward_config(2048, 50, torch.float16)
    assert (cfg["BLOCK_L"], cfg["BLOCK_P"], cfg["BLOCK_C"]) == (64, 64, 64)
    assert forward_config(37, 1, torch.float32)["BLOCK_L"] == 16
    assert forward_config(20, 1, torch.float32)["BLOCK_C"] == 32  # C = 20 -> one 32-channel chunk
    for l in (1, 17, 50, 100, 128):
        for dtype in DTYPES:
            for cfg in (forward_config(512, l, dtype), backward_config(512, l, dtype)):
                assert cfg["BLOCK_L"] >= max(16, l) and min(cfg["BLOCK_P"], cfg["BLOCK_C"]) >= 16
    for config in (forward_config, backward_config):  # larger memories are served by the reference
        with pytest.raises(ValueError, match="at most 128 memory items, got L = 129"):
            config(512, 129, torch.float32)
    # The layouts that are addressed in place, and the ones that are copied.
    x = torch.empty(2, 8, 3, 5)
    assert _common.pixel_strides(x) == (120, 15, 1)
    assert _common.pixel_strides(x.contiguous(memory_format=torch.channels_last)) == (120, 1, 8)
    assert _common.pixel_strides(torch.empty(2, 12, 3, 5)[:, 2:10]) == (180, 15, 1)
    assert _common.pixel_strides(torch.empty(2, 8, 3, 10)[..., ::2]) == (240, 30, 2)  # every other column
    assert _common.pixel_strides(torch.empty(2, 8, 3, 10)[..., 1:6]) is None  # a crop: copied


# ---- cosine distance map -------------------------------------------------------------------------

CD_CASES = [(torch.float32, layout) for layout in KERNEL_LAYOUTS] + [
    (dtype, layout) for dtype in (torch.float16, torch.bfloat16) for layout in ("contiguous", "channels_last")
]


@pytest.mark.parametrize("dtype,layout", CD_CASES, ids=[f"{str(d)[6:]}-{lay}" for d, lay in CD_CASES])
@pytest.mark.parametrize("shape", [(1, 37, 5, 7), (2, 20, 3, 5)], ids=["1x37x5x7", "2x20x3x5"])
def test_cosine_distance_map(shape, dtype, layout, gen):
    fs = make_map(shape, dtype, layout, gen, DEVICE)
    ft = make_map(shape, dtype, "contiguous", gen, DEVICE)
    if dtype == torch.float32:  # (their gradients, ~1/EPS, would overflow fp16)
        fs[0, :, 1, 1] = 0  # a zero vector: cosine 0, no NaN
        ft[0, :, 2, 3] *= 1e-10  # |ft| < EPS: the projection term is dropped
    grad_out = torch.randn(shape[0], *shape[2:], generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    a, t = as_float64(fs), as_float64(ft)
    expected = reference.cosine_distance_map(a, t)
    ea, et = torch.autograd.grad(expected, (a, t), grad_out.double().cpu())
    assert_kernel_close(K.cosine_distance_map_forward(fs, ft, **SMALL), expected.detach(), dtype, "distance")
    da, dt = K.cosine_distance_map_backward(grad_out, fs, ft, **SMALL)
    assert_kernel_close(da, ea, dtype, "grad fs")
    assert_kernel_close(dt, et, dtype, "grad ft")
    if layout == "channels_last":
        assert da.is_contiguous(memory_format=torch.channels_last) and dt.is_contiguous()


def test_cosine_distance_map_default_tiles_broadcast_grad(gen):
    """The GPU tiles, a zero vector, and the stride-0 grad_out of out.sum(), read in place."""
    fs = make_map((2, 37, 5, 7), torch.float32, "channels_last", gen, DEVICE)
    ft = make_map((2, 37, 5, 7), torch.float32, "contiguous", gen, DEVICE)
    ft[1, :, 4, 6] = 0
    grad_out = torch.ones((), device=DEVICE).expand(2, 5, 7)
    got = K.cosine_distance_map_backward(grad_out, fs, ft)
    a, t = as_float64(fs), as_float64(ft)
    expected = torch.autograd.grad(reference.cosine_distance_map(a, t).sum(), (a, t))
    for g, e in zip(got, expected):
        assert_kernel_close(g, e, torch.float32, "grad")


# ---- anomaly map ---------------------------------------------------------------------------------

# Three stages of different sizes and channel counts, as a backbone's pyramid (odd sizes).
STAGES = [(16, 9, 11), (24, 5, 6), (37, 2, 3)]
AM_CASES = [
    ((13, 17), 4.0, torch.float32),  # radius 16 > map size: reflections wrap several times
    ((3, 5), 4.0, torch.float32),  # out_size smaller than the blur radius
    ((13, 17), 0.0, torch.float32),  # no blur
    ((9, 11), 1.5, torch.float32),  # out_size equal to stage 0 (scale 1)
    ((1, 4), 1.0, torch.float32),  # a one-pixel-high output (scale 0)
    ((13, 17), 4.0, torch.float16),
    ((13, 17), 4.0, torch.bfloat16),
]


@pytest.mark.parametrize(
    "out_size,sigma,dtype", AM_CASES, ids=[f"{h}x{w}-s{s}-{str(d)[6:]}" for (h, w), s, d in AM_CASES]
)
def test_anomaly_map(out_size, sigma, dtype, gen):
    b = 2
    student = [make_map((b, c, h, w), dtype, "contiguous", gen, DEVICE) for c, h, w in STAGES]
    teacher = [make_map((b, c, h, w), dtype, "channels_last", gen, DEVICE) for c, h, w in STAGES]
    teacher[1][1, :, 2, 3] = 0
    maps, scores = K.anomaly_map_forward(student, teacher, out_size, sigma, block=128)  # 2 blocks per map
    expected_maps, expected_scores = reference.anomaly_map(
        [s.double().cpu() for s in student], [t.double().cpu() for t in teacher], out_size, sigma
    )
    assert_kernel_close(maps, expected_maps, dtype, "maps")
    assert_kernel_close(scores, expected_scores, dtype, "scores")


def test_anomaly_map_default_block_single_stage(gen):
    student = [make_map((1, 37, 5, 7), torch.float32, "cropped", gen, DEVICE)]
    teacher = [make_map((1, 37, 5, 7), torch.float32, "channel_slice", gen, DEVICE)]
    maps, scores = K.anomaly_map_forward(student, teacher, (11, 8), 4.0)
    expected_maps, expected_scores = reference.anomaly_map(
        [student[0].double().cpu()], [teacher[0].double().cpu()], (11, 8), 4.0
    )
    assert_kernel_close(maps, expected_maps, torch.float32, "maps")
    assert_kernel_close(scores, expected_scores, torch.float32, "scores")


def test_anomaly_map_more_stages_than_one_launch_takes(gen):
    """Six stages: two upsample-and-sum launches, the second adding to the first's sum."""
    stages = [(5 + i, 3 + i % 3, 4) for i in range(6)]
    student = [make_map((2, c, h, w), torch.float32, "contiguous", gen, DEVICE) for c, h, w in stages]
    teacher = [make_map((2, c, h, w), torch.float32, "channels_last", gen, DEVICE) for c, h, w in stages]
    for sigma in (0.0, 1.0):
        maps, scores = K.anomaly_map_forward(student, teacher, (7, 9), sigma, block=32)
        expected_maps, expected_scores = reference.anomaly_map(
            [s.double().cpu() for s in student], [t.double().cpu() for t in teacher], (7, 9), sigma
        )
        assert_kernel_close(maps, expected_maps, torch.float32, f"maps sigma {sigma}")
        assert_kernel_close(scores, expected_scores, torch.float32, f"scores sigma {sigma}")


def test_anomaly_map_makes_no_host_to_device_copy(monkeypatch, gen):
    """Per call the launcher builds no tensor from host data (torch.tensor, torch.as_tensor,
    torch.from_numpy) and moves none with .to(device): every parameter is a kernel argument. Such
    copies add a synchronous transfer per call and break CUDA-graph capture; the interpreter runs on
    the CPU, so the calls are counted rather than the transfers."""
    import memkd.kernels.anomaly_map as am
    import memkd.kernels.cosine_distance_map as cd

    launcher_files = {am.__file__, cd.__file__}
    calls = []

    def spy(name, original, moves=lambda args, kwargs: True):
        def wrapper(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename in launcher_files and moves(args, kwargs):
                calls.append(name)
            return original(*args, **kwargs)
        return wrapper

    def to_device(args, kwargs):  # .to(device), .to("cuda"), .to(device=...), .to(other_tensor)
        return "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])

    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, spy(f"torch.{name}", getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "to", spy("Tensor.to(device)", torch.Tensor.to, to_device))
    student = [make_map((2, c, h, w), torch.float32, "contiguous", gen, DEVICE) for c, h, w in STAGES]
    teacher = [make_map((2, c, h, w), torch.float32, "contiguous", gen, DEVICE) for c, h, w in STAGES]
    for sigma in (4.0, 0.0):
        K.anomaly_map_forward(student, teacher, (13, 17), sigma, block=128)
    assert calls == []


@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_anomaly_map_nan_propagates_into_the_score(sigma, gen):
    """NaN features give NaN map pixels and a NaN image score, as in the reference (a max that
    skips NaN would give a finite score, or -inf when every pixel is NaN); other images stay finite."""
    student = [make_map((3, c, h, w), torch.float32, "contiguous", gen, DEVICE) for c, h, w in STAGES]
    teacher = [make_map((3, c, h, w), torch.float32, "contiguous", gen, DEVICE) for c, h, w in STAGES]
    student[1][0, :, 2, 3] = float("nan")  # some NaN pixels in image 0
    student[0][1] = float("nan")  # every pixel of image 1
    maps, scores = K.anomaly_map_forward(student, teacher, (13, 17), sigma, block=128)
    expected_maps, expected_scores = reference.anomaly_map(
        [s.double().cpu() for s in student], [t.double().cpu() for t in teacher], (13, 17), sigma
    )
    assert torch.equal(maps.isnan().cpu(), expected_maps.isnan())
    assert scores[:2].isnan().all() and expected_scores[:2].isnan().all()
    assert_kernel_close(scores[2:], expected_scores[2:], torch.float32, "score of the finite image")


# ---- the memkd.ops backend -----------------------------------------------------------------------


def test_backend_kernels_match_reference_signatures(gen):
    """Each op's Triton kernels are called like its reference kernels (memkd/ops/<op>.py)."""
    from memkd.ops._registry import OPS

    assert set(OPS) == {"nr_recall", "cosine_distance_map", "anomaly_map"}
    for op in OPS.values():
        kernels = op.triton()
        assert set(kernels) == set(op.schemas) == set(op.reference), op.name
        for name, fn in kernels.items():
            ref_params = inspect.signature(op.reference[name]).parameters
            params = inspect.signature(fn).parameters
            assert [(p.name, p.default) for p in params.values()] == [
                (p.name, p.default) for p in ref_params.values()
            ], name
    # float64 is served by the reference; the backward ops return tuples.
    fs = make_map((1, 5, 2, 3), torch.float64, "contiguous", gen, DEVICE)
    grad_out = torch.ones(1, 2, 3, dtype=torch.float64, device=DEVICE)
    grads = OPS["cosine_distance_map"].triton()["cosine_distance_map_backward"](grad_out, fs, fs)
    assert isinstance(grads, tuple) and len(grads) == 2


def check_nr_recall_op(gen):
    """memkd.ops.nr_recall and its gradients (fp32, channels_last query) against the reference."""
    import memkd.ops as ops

    query = make_map((2, 37, 5, 7), torch.float32, "channels_last", gen, DEVICE).requires_grad_(True)
    keys, values = (x.requires_grad_(True) for x in make_memory(50, 37, torch.float32, gen, DEVICE))
    grad_out = make_map((2, 37, 5, 7), torch.float32, "contiguous", gen, DEVICE)
    out = ops.nr_recall(query, keys, values)
    got = torch.autograd.grad(out, (query, keys, values), grad_out)
    expected_out, expected = nr_expected(query, keys, values, grad_out)
    assert_kernel_close(out, expected_out, torch.float32, "out")
    for g, e in zip(got, expected):
        assert_kernel_close(g, e, torch.float32, "grad")


def check_anomaly_map_op(out_size, sigma, gen):
    """memkd.ops.anomaly_map (fp32, the STAGES features) against the reference."""
    import memkd.ops as ops

    student = [make_map((2, c, h, w), torch.float32, "contiguous", gen, DEVICE) for c, h, w in STAGES]
    teacher = [make_map((2, c, h, w), torch.float32, "contiguous", gen, DEVICE) for c, h, w in STAGES]
    maps, scores = ops.anomaly_map(student, teacher, out_size, sigma)
    expected_maps, expected_scores = reference.anomaly_map(
        [s.double().cpu() for s in student], [t.double().cpu() for t in teacher], out_size, sigma
    )
    assert_kernel_close(maps, expected_maps, torch.float32, "maps")
    assert_kernel_close(scores, expected_scores, torch.float32, "scores")


@pytest.mark.skipif(CUDA, reason="on a GPU test_ops_triton_backend_on_cuda covers this")
def test_backend_through_the_dispatcher_on_cpu(gen):
    """KERNELS as the memkd:: ops' CPU kernels (interpreter) for the length of the test: the
    dispatcher, the registered autograd formulas and the Triton kernels together."""
    import memkd.ops as ops
    from memkd.ops._registry import OPS

    K.set_input_precision("ieee")
    lib = torch.library.Library("memkd", "IMPL")  # noqa: TOR901
    try:
        for op in OPS.values():
            for name, fn in op.triton().items():
                lib.impl(name, fn, "CPU", allow_override=True)
        check_nr_recall_op(gen)
        fs, ft = (make_map((2, 20, 3, 5), torch.float32, "contiguous", gen, DEVICE).requires_grad_(True) for _ in "st")
        got = torch.autograd.grad(ops.cosine_distance_map(fs, ft).sum(), (fs, ft))
        a, t = as_float64(fs), as_float64(ft)
        expected = torch.autograd.grad(reference.cosine_distance_map(a, t).sum(), (a, t))
        for g, e in zip(got, expected):
            assert_kernel_close(g, e, torch.float32, "grad")
        check_anomaly_map_op((7, 9), 2.0, gen)
    finally:
        lib._destroy()


@pytest.mark.skipif(not CUDA, reason="the Triton backend of memkd.ops serves CUDA tensors")
def test_ops_triton_backend_on_cuda(gen):
    import memkd.ops as ops

    ops.set_backend("cuda", "triton")
    try:
        assert ops.backend("cuda", "nr_recall") == "triton"
        K.set_input_precision("ieee")
        check_nr_recall_op(gen)
        check_anomaly_map_op((13, 17), 4.0, gen)
    finally:
        ops.set_backend("cuda", "default")


# ---- GPU code generation without a GPU ------------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import torch, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import memkd.kernels.anomaly_map as am
    import memkd.kernels.nr_recall as nr

    def compile_for(fn, ptrs, consts, cfg, arch, floats=()):
        sig = {n: "constexpr" if n in consts else "*" + ptrs[n] if n in ptrs else "fp32" if n in floats else "i32"
               for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)

    for dtype, arch in ((torch.bfloat16, 90), (torch.float16, 80)):
        s = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        common = dict(EPS=1e-8, DOT_DTYPE={"bf16": tl.bfloat16, "fp16": tl.float16}[s], PRECISION="tf32")
        cfg = nr.forward_config(2048, 50, dtype)
        tiles = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
        ptrs = dict(q_ptr=s, k_ptr=s, v_ptr=s, o_ptr=s)
        compile_for(nr._nr_recall_fwd_kernel, ptrs, dict(common, **tiles), cfg, arch)
        cfg = nr.backward_config(2048, 50, dtype)
        tiles = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
        ptrs = dict(q_ptr=s, k_ptr=s, v_ptr=s, do_ptr=s, dq_ptr=s, dkh_ptr="fp32", dv_ptr="fp32")
        consts = dict(common, DETERMINISTIC=dtype == torch.bfloat16, **tiles)
        compile_for(nr._nr_recall_bwd_kernel, ptrs, consts, cfg, arch)
        cfg = dict(am.config(256 * 256), num_stages=1)
        block = dict(BLOCK=cfg.pop("BLOCK"))
        fp32_ptrs = dict(d0="fp32", d1="fp32", d2="fp32", d3="fp32", sum_ptr="fp32", out_ptr=s, max_ptr="fp32")
        scales = [f"s{a}{k}" for a in "hw" for k in range(4)]
        for final in (False, True):
            compile_for(am._upsample_sum_kernel, fp32_ptrs, dict(NUM_STAGES=3, ACCUMULATE=final, FINAL=final, **block),
                        cfg, arch, floats=scales)
            compile_for(am._blur_kernel, dict(src_ptr="fp32", out_ptr=s, max_ptr="fp32"),
                        dict(ALONG_W=not final, FINAL=final, **block), cfg, arch, floats=("sigma", "inv_total"))
    print("compiled")
    """
)


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="with a GPU the kernels are compiled and run by the tests above")
def test_kernels_compile_for_gpus(tmp_path):
    """The interpreter never runs Triton's GPU code generation (dot layouts, shared memory, bf16 MMA):
    compile the NR-recall and anomaly-map kernels with their GPU launch parameters for sm_90 (bf16)
    and sm_80 (fp16) — no GPU needed, ptxas ships with triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)  # outside the checkout: import the installed memkd
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("triton's ptxas is missing")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
