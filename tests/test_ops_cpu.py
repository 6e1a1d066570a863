"""The ops on CPU tensors (fused C++ kernels when memkd._C is built) against the reference.

Ground truth is memkd.ops.reference evaluated in float64 on the very same (already rounded) inputs,
with autograd through it for the gradients, so each dtype's tolerance measures only the kernel's
arithmetic error.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage
import torch
from helpers import check_ops_compile_fullgraph

import memkd.ops as ops
from memkd.ops import _library, _registry, reference

# Tolerances relative to the largest magnitude of the expected tensor.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
DTYPES = list(TOLERANCES)
# (B, C, H, W, L): odd C and H*W, L = 1 and 50 (not a multiple of 16), batch 1.
SHAPES = [(1, 37, 5, 7, 50), (2, 64, 9, 11, 1), (3, 19, 3, 5, 17), (2, 300, 13, 13, 50)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def assert_close(actual, expected, dtype, what):
    tol = TOLERANCES[dtype] * max(1.0, expected.abs().max().item())
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} ({dtype})"


def make_map(shape, dtype, layout, generator):
    b, c, h, w = shape
    if layout == "strided":  # every other column of a wider map: neither NCHW nor NHWC dense
        x = torch.randn(b, c, h, 2 * w, generator=generator, dtype=torch.float64)[..., ::2]
    else:
        x = torch.randn(b, c, h, w, generator=generator, dtype=torch.float64)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def leaf(x):
    return x.detach().requires_grad_(True)


def as_float64(x):
    return x.detach().double().requires_grad_(True)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def test_extension_serves_cpu():
    assert _library.EXTENSION.loaded, _library.EXTENSION.reason
    for op in ("nr_recall", "nr_recall_backward", "cosine_distance_map", "anomaly_map"):
        assert _library.has_kernel(op, "CPU")
    assert all(v["cpu"].startswith("cpp") for v in ops.backends().values())


def test_schemas_match_the_compiled_ones():
    """memkd/ops/<op>.py holds each schema; the copy in csrc/ops/<op>.cpp must define the same."""
    schemas = _registry.schemas()
    assert set(schemas) == {"nr_recall", "nr_recall_backward", "cosine_distance_map", "cosine_distance_map_backward",
                            "anomaly_map"}
    for name, schema in schemas.items():
        expected = torch._C.parse_schema(f"memkd::{schema}")
        assert str(getattr(torch.ops.memkd, name).default._schema) == str(expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_nr_recall_forward_and_gradients(shape, layout, dtype, gen):
    b, c, h, w, items = shape
    query = leaf(make_map((b, c, h, w), dtype, layout, gen))
    keys = leaf(torch.randn(items, c, generator=gen, dtype=torch.float64).to(dtype))
    values = leaf(torch.randn(items, c, generator=gen, dtype=torch.float64).to(dtype))
    out = ops.nr_recall(query, keys, values)
    assert out.dtype == dtype and out.shape == query.shape
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, (query, keys, values), grad_out)

    ref_inputs = [as_float64(t) for t in (query, keys, values)]
    expected = reference.nr_recall(*ref_inputs)
    expected_grads = torch.autograd.grad(expected, ref_inputs, grad_out.double())
    assert_close(out, expected, dtype, "output")
    for name, got, want in zip(("query", "keys", "values"), grads, expected_grads):
        assert got.dtype == dtype
        assert_close(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [s[:4] for s in SHAPES])
def test_cosine_distance_map_forward_and_gradients(shape, layout, dtype, gen):
    fs = leaf(make_map(shape, dtype, layout, gen))
    ft = leaf(make_map(shape, dtype, "contiguous", gen))
    out = ops.cosine_distance_map(fs, ft)
    assert out.shape == (shape[0], shape[2], shape[3]) and out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, (fs, ft), grad_out)
    ref_inputs = [as_float64(fs), as_float64(ft)]
    expected = reference.cosine_distance_map(*ref_inputs)
    expected_grads = torch.autograd.grad(expected, ref_inputs, grad_out.double())
    assert_close(out, expected, dtype, "output")
    for name, got, want in zip(("fs", "ft"), grads, expected_grads):
        assert_close(got, want, dtype, f"grad {name}")


def test_closed_form_reference_backward_matches_autograd(gen):
    q = as_float64(torch.randn(2, 11, 4, 3, generator=gen))
    k, v = as_float64(torch.randn(7, 11, generator=gen)), as_float64(torch.randn(7, 11, generator=gen))
    out = reference.nr_recall(q, k, v)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(reference.nr_recall_backward(g, q, k, v), torch.autograd.grad(out, (q, k, v), g)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    fs, ft = as_float64(torch.randn(2, 5, 3, 4, generator=gen)), as_float64(torch.randn(2, 5, 3, 4, generator=gen))
    d = reference.cosine_distance_map(fs, ft)
    g = torch.randn(d.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(reference.cosine_distance_map_backward(g, fs, ft), torch.autograd.grad(d, (fs, ft), g)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64(gen):
    q = as_float64(torch.randn(1, 6, 3, 5, generator=gen))
    k, v = as_float64(torch.randn(5, 6, generator=gen)), as_float64(torch.randn(5, 6, generator=gen))
    assert torch.autograd.gradcheck(ops.nr_recall, (q, k, v))
    fs, ft = as_float64(torch.randn(2, 4, 3, 3, generator=gen)), as_float64(torch.randn(2, 4, 3, 3, generator=gen))
    assert torch.autograd.gradcheck(ops.cosine_distance_map, (fs, ft))


def test_opcheck_every_op(gen):
    q = torch.randn(2, 9, 5, 3, generator=gen, requires_grad=True)
    k = torch.randn(6, 9, generator=gen, requires_grad=True)
    v = torch.randn(6, 9, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.memkd.nr_recall, (q, k, v))
    g = torch.randn(2, 9, 5, 3, generator=gen)
    torch.library.opcheck(torch.ops.memkd.nr_recall_backward, (g, q.detach(), k.detach(), v.detach()))
    fs = torch.randn(2, 9, 5, 3, generator=gen, requires_grad=True)
    ft = torch.randn(2, 9, 5, 3, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.memkd.cosine_distance_map, (fs, ft))
    torch.library.opcheck(
        torch.ops.memkd.cosine_distance_map_backward, (torch.randn(2, 5, 3, generator=gen), fs.detach(), ft.detach())
    )
    stages_s = [torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 6, 4, 4, generator=gen)]
    stages_t = [torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 6, 4, 4, generator=gen)]
    torch.library.opcheck(torch.ops.memkd.anomaly_map, (stages_s, stages_t, [16, 16], 2.0))


def test_torch_compile_fullgraph(gen):
    q = torch.randn(2, 12, 4, 4, generator=gen, requires_grad=True)
    k = torch.randn(5, 12, generator=gen, requires_grad=True)
    v = torch.randn(5, 12, generator=gen, requires_grad=True)
    fs = [torch.randn(2, 12, 4, 4, generator=gen)]
    ft = [torch.randn(2, 12, 4, 4, generator=gen)]
    check_ops_compile_fullgraph(q, k, v, fs, ft, "aot_eager")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_anomaly_map_matches_reference(layout, dtype, gen):
    stage_shapes = [(2, 13, 16, 16), (2, 26, 8, 8), (2, 51, 4, 4)]
    student = [make_map(s, dtype, layout, gen) for s in stage_shapes]
    teacher = [make_map(s, dtype, "contiguous", gen) for s in stage_shapes]
    for out_size, sigma in [((64, 64), 4.0), ((37, 50), 2.5), ((9, 11), 4.0), ((20, 20), 0.0)]:
        maps, scores = ops.anomaly_map(student, teacher, out_size, sigma)
        assert maps.shape == (2, *out_size) and scores.shape == (2,) and maps.dtype == dtype
        exp_maps, exp_scores = reference.anomaly_map([x.double() for x in student], [x.double() for x in teacher], out_size, sigma)
        assert_close(maps, exp_maps, dtype, f"maps {out_size} sigma {sigma}")
        assert_close(scores, exp_scores, dtype, f"scores {out_size} sigma {sigma}")


def test_anomaly_map_follows_scipy_semantics(gen):
    student = [torch.randn(1, 8, 8, 8, generator=gen, dtype=torch.float64)]
    teacher = [torch.randn(1, 8, 8, 8, generator=gen, dtype=torch.float64)]
    maps, scores = ops.anomaly_map(student, teacher, (40, 24), 4.0)
    unblurred = torch.nn.functional.interpolate(
        reference.cosine_distance_map(student[0], teacher[0]).unsqueeze(1), size=(40, 24), mode="bilinear", align_corners=True
    )[0, 0].numpy()
    expected = scipy.ndimage.gaussian_filter(unblurred, sigma=4.0, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(maps[0].numpy(), expected, rtol=1e-10, atol=1e-12)
    assert scores[0].item() == pytest.approx(expected.max(), abs=1e-12)
    assert len(reference.gaussian_taps(4.0)) == 33


def test_zero_vectors_give_zero_cosine_not_nan():
    q = torch.zeros(1, 8, 2, 2, requires_grad=True)
    k = torch.zeros(3, 8, requires_grad=True)
    v = torch.randn(3, 8, requires_grad=True)
    out = ops.nr_recall(q, k, v)
    torch.testing.assert_close(out[0, :, 0, 0], v.mean(0))  # all scores 0 -> uniform weights
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    d = ops.cosine_distance_map(torch.zeros(1, 4, 2, 2), torch.randn(1, 4, 2, 2))
    torch.testing.assert_close(d, torch.ones(1, 2, 2))
    maps, scores = ops.anomaly_map([torch.zeros(1, 4, 2, 2)], [torch.zeros(1, 4, 2, 2)], (4, 4))
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_anomaly_map_nan_propagates_into_the_score(sigma, dtype, gen):
    """NaN features give NaN map pixels and a NaN image score, as in the reference (a max that skips
    NaN gives a finite score, or -inf when every pixel is NaN); the other images stay finite."""
    stage_shapes = [(3, 13, 9, 11), (3, 26, 5, 6)]
    student = [make_map(s, dtype, "contiguous", gen) for s in stage_shapes]
    teacher = [make_map(s, dtype, "contiguous", gen) for s in stage_shapes]
    student[1][0, :, 2, 3] = float("nan")  # some NaN pixels in image 0
    student[0][1] = float("nan")  # every pixel of image 1
    maps, scores = ops.anomaly_map(student, teacher, (13, 17), sigma)
    exp_maps, exp_scores = reference.anomaly_map([x.double() for x in student], [x.double() for x in teacher],
                                                 (13, 17), sigma)
    assert torch.equal(maps.isnan(), exp_maps.isnan())
    assert scores[:2].isnan().all() and exp_scores[:2].isnan().all()
    assert_close(scores[2:], exp_scores[2:], dtype, "score of the finite image")


@pytest.mark.parametrize("batch", [1, 4])
def test_backward_is_deterministic_across_thread_counts(gen, batch):
    q = torch.randn(batch, 96, 24, 24, generator=gen, requires_grad=True)
    k = torch.randn(50, 96, generator=gen, requires_grad=True)
    v = torch.randn(50, 96, generator=gen, requires_grad=True)
    g = torch.randn(batch, 96, 24, 24, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(torch.autograd.grad(ops.nr_recall(q, k, v), (q, k, v), g))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


BAD_INPUTS = [
    ("query: expected a 4-D", lambda: ops.nr_recall(torch.randn(2, 4, 4), torch.randn(3, 2), torch.randn(3, 2))),
    ("keys: expected C = 4", lambda: ops.nr_recall(torch.randn(1, 4, 2, 2), torch.randn(3, 5), torch.randn(3, 5))),
    ("values: expected the shape of keys", lambda: ops.nr_recall(torch.randn(1, 4, 2, 2), torch.randn(3, 4), torch.randn(2, 4))),
    ("L >= 1", lambda: ops.nr_recall(torch.randn(1, 4, 2, 2), torch.randn(0, 4), torch.randn(0, 4))),
    ("query: expected a floating dtype", lambda: ops.nr_recall(torch.ones(1, 4, 2, 2, dtype=torch.int64), torch.randn(3, 4), torch.randn(3, 4))),
    ("keys: expected dtype", lambda: ops.nr_recall(torch.randn(1, 4, 2, 2), torch.randn(3, 4).double(), torch.randn(3, 4))),
    ("keys: expected a tensor on", lambda: ops.nr_recall(torch.randn(1, 4, 2, 2), torch.randn(3, 4, device="meta"), torch.randn(3, 4))),
    ("query: expected a non-empty batch", lambda: ops.nr_recall(torch.randn(0, 4, 2, 2), torch.randn(3, 4), torch.randn(3, 4))),
    ("ft: expected the shape of fs", lambda: ops.cosine_distance_map(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 3))),
    ("teacher_features: expected 2 stages", lambda: ops.anomaly_map([torch.randn(1, 4, 2, 2)] * 2, [torch.randn(1, 4, 2, 2)], (8, 8))),
    ("student_features: expected at least one stage", lambda: ops.anomaly_map([], [], (8, 8))),
    ("out_size: expected two positive", lambda: ops.anomaly_map([torch.randn(1, 4, 2, 2)], [torch.randn(1, 4, 2, 2)], (0, 8))),
    ("sigma: expected a value >= 0", lambda: ops.anomaly_map([torch.randn(1, 4, 2, 2)], [torch.randn(1, 4, 2, 2)], (8, 8), -1.0)),
    ("student_features[1]: expected batch 1", lambda: ops.anomaly_map(
        [torch.randn(1, 4, 2, 2), torch.randn(2, 4, 2, 2)], [torch.randn(1, 4, 2, 2), torch.randn(2, 4, 2, 2)], (8, 8))),
]


@pytest.mark.parametrize("message,call", BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
def test_bad_input_names_the_argument(message, call):
    with pytest.raises((ValueError, TypeError), match=message.replace("[", r"\[")):
        call()


def test_compiled_kernels_check_arguments_too():
    """Direct torch.ops calls skip the Python checks; the C++ kernels still refuse bad input."""
    with pytest.raises(RuntimeError, match="keys: expected C = 4"):
        torch.ops.memkd.nr_recall(torch.randn(1, 4, 2, 2), torch.randn(3, 5), torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="ft: expected the shape of fs"):
        torch.ops.memkd.cosine_distance_map(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 3, 2))


def test_reference_fallback_when_extension_is_absent(tmp_path):
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import memkd.ops as ops\n"
        "msgs = [str(w.message) for w in caught if 'memkd' in str(w.message)]\n"
        "assert len(msgs) == 1 and 'MEMKD_NO_EXTENSION' in msgs[0], msgs\n"
        "assert ops.backends()['nr_recall']['cpu'].startswith('reference'), ops.backends()\n"
        "q = torch.randn(1, 5, 3, 3, requires_grad=True); k = torch.randn(4, 5); v = torch.randn(4, 5)\n"
        "out = ops.nr_recall(q, k, v); out.sum().backward()\n"
        "torch.testing.assert_close(out, ops.reference.nr_recall(q, k, v))\n"
        "assert q.grad is not None and torch.isfinite(q.grad).all()\n"
        "m, s = ops.anomaly_map([q.detach()], [q.detach() + 1], (6, 6))\n"
        "assert m.shape == (1, 6, 6)\n"
        "print('fallback ok')\n"
    )
    env = {**os.environ, "MEMKD_NO_EXTENSION": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)  # outside the checkout: import the installed memkd
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_extension_is_compiled_with_openmp():
    """at::parallel_for is header code: without -fopenmp its pragmas vanish and every CPU kernel runs
    on one thread (this happened). An OpenMP build imports libgomp's GOMP_parallel."""
    import importlib.util

    if not _library.EXTENSION.loaded:
        pytest.skip("the compiled extension is not loaded")
    path = importlib.util.find_spec(f"memkd._cpu_{_library.EXTENSION.cpu_variant}").origin
    with open(path, "rb") as f:
        assert b"GOMP_parallel" in f.read(), f"{path} was built without OpenMP"


def test_extension_built_for_another_torch_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\x7fELF...MEMKD_BUILD_INFO{torch=1.0.0,cuda=0}...")
    assert _library.read_build_info(fake) == {"torch": "1.0.0", "cuda": "0"}
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    status = _library._load_extension()
    assert not status.loaded and "built against torch" in status.reason and "9.9.9" in status.reason
