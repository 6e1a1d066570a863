"""The ops on CPU tensors (fused C++ kernels when memkd._C is built) against the reference.

The cases shared with the CUDA backends come from op_cases.py (run here with device "cpu" and the
"cpp" backend); the ones below are about the CPU kernels and the extension only. Ground truth and
tolerances: op_testing.py.
"""
import os
import subprocess
import sys

import pytest
import torch
from op_cases import *  # noqa: F401,F403  (the shared cases, collected here for the CPU)
from op_testing import as_float64

import memkd.ops as ops
from memkd.ops import _library, _registry, reference


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def device():
    return "cpu"


@pytest.fixture(params=["cpp"])
def backend(request):
    ops.set_backend("cpu", request.param)
    try:
        yield request.param
    finally:
        ops.set_backend("cpu", "default")


@pytest.fixture(params=["aot_eager"])
def compile_backend(request):
    return request.param


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


def test_set_backend_switches_the_cpu_kernels(gen):
    """set_backend("cpu", "reference") has the reference serve the ops (its ATen ops run inside the
    memkd:: op, forward and backward), "default" brings the fused kernels back; bad names are refused."""
    q = torch.randn(1, 6, 3, 3, generator=gen, requires_grad=True)
    k, v = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)

    def softmaxes_run():  # the reference's forward and backward each run one softmax; the fused kernels none
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ops.nr_recall(q, k, v).sum().backward()
        return sum(event.name == "aten::_softmax" for event in prof.events())

    assert ops.backend("cpu", "nr_recall") == "cpp"
    assert softmaxes_run() == 0
    ops.set_backend("cpu", "reference", ["nr_recall"])
    try:
        assert ops.backend("cpu", "nr_recall") == "reference" and ops.backend("cpu", "anomaly_map") == "cpp"
        assert ops.backends()["nr_recall"]["cpu"].startswith("reference (selected with set_backend")
        assert softmaxes_run() == 2
    finally:
        ops.set_backend("cpu", "default")
    assert ops.backend("cpu", "nr_recall") == "cpp"
    assert softmaxes_run() == 0
    with pytest.raises(ValueError, match="name: expected 'default' or one of"):
        ops.set_backend("cpu", "triton")
    with pytest.raises(ValueError, match="device: expected one of"):
        ops.set_backend("tpu", "reference")
    with pytest.raises(ValueError, match="ops: unknown op"):
        ops.set_backend("cpu", "reference", ["nr_recal"])


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
    ("sigma: expected a finite value >= 0", lambda: ops.anomaly_map([torch.randn(1, 4, 2, 2)], [torch.randn(1, 4, 2, 2)], (8, 8), -1.0)),
    ("sigma: expected a finite value >= 0", lambda: ops.anomaly_map([torch.randn(1, 4, 2, 2)], [torch.randn(1, 4, 2, 2)], (8, 8), float("inf"))),
    ("sigma: expected a finite value >= 0", lambda: ops.anomaly_map([torch.randn(1, 4, 2, 2)], [torch.randn(1, 4, 2, 2)], (8, 8), float("nan"))),
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
    q, k = torch.randn(1, 4, 2, 2), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="grad_out: expected the shape of query"):
        torch.ops.memkd.nr_recall_backward(torch.randn(1, 4, 2, 3), q, k, k)
    with pytest.raises(RuntimeError, match="grad_out: expected dtype"):
        torch.ops.memkd.nr_recall_backward(q.double(), q, k, k)
    with pytest.raises(RuntimeError, match=r"grad_out: expected shape \[B, H, W\] = \[1, 2, 2\]"):
        torch.ops.memkd.cosine_distance_map_backward(torch.randn(1, 2, 3), q, q)


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
