"""Installing into the user's torch, the reuse of unchanged builds, and the CPU kernel builds.

setup.py is imported as a module (it runs setup() only as a script), so its build-backend rules
are tested directly; the CPU kernel builds are each loaded in a subprocess of their own, since a
process registers exactly one of them.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from memkd.ops import _library

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module_():
    spec = importlib.util.spec_from_file_location("memkd_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("installed", "resolved", "expected"),
    [(None, "2.14.1", ["torch==2.14.1"]), (None, "2.12.0+cu126", ["torch==2.12.0+cu126"]), (None, None, ["torch>=2.10"]),
     ("2.9.1", "2.14.1", ["torch==2.14.1"]), ("2.10.0", "2.14.1", []), ("2.11.0+cu130", None, []), ("2.14.1", None, [])],
)
def test_torch_is_a_build_requirement_only_without_a_usable_installed_torch(setup_module_, monkeypatch, installed,
                                                                            resolved, expected):
    """Without a usable torch in the target, the build gets exactly the torch pip installs there."""
    monkeypatch.setattr(setup_module_, "installed_torch_version", lambda: installed)
    monkeypatch.setattr(setup_module_, "resolved_torch_version", lambda: resolved)
    assert setup_module_.torch_requirements() == expected
    assert set(expected) <= set(setup_module_.get_requires_for_build_wheel())
    editable = [r for r in setup_module_.get_requires_for_build_editable() if r.startswith("torch")]
    assert editable == expected


def test_torch_resolution_asks_the_target_pip_outside_the_build_environment(setup_module_, monkeypatch):
    """The dry run uses the target's interpreter without the variables of pip's isolated build."""
    calls = []

    def fake_run(command, env, **kwargs):
        calls.append((command, env))
        report = Path(command[command.index("--report") + 1])
        report.write_text('{"install": [{"metadata": {"name": "torchvision", "version": "0.27.0"}},'
                          ' {"metadata": {"name": "torch", "version": "2.12.0"}}]}')
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setenv("PYTHONPATH", "/tmp/pip-build-env/site")
    monkeypatch.setenv("PYTHONNOUSERSITE", "1")
    monkeypatch.setenv("PIP_BUILD_TRACKER", "/tmp/pip-build-tracker")
    monkeypatch.setenv("PIP_INDEX_URL", "https://example.invalid/simple")
    monkeypatch.setattr(setup_module_.subprocess, "run", fake_run)
    assert setup_module_.resolved_torch_version() == "2.12.0"
    (command, env), = calls
    assert command[:5] == [sys.executable, "-m", "pip", "install", "--dry-run"]
    assert command[-2:] == ["torch>=2.10", "torchvision>=0.25"]  # pyproject.toml's, in its order
    assert not {"PYTHONPATH", "PYTHONNOUSERSITE", "PIP_BUILD_TRACKER"} & set(env)
    assert env["PIP_INDEX_URL"] == "https://example.invalid/simple"  # the user's pip settings apply


@pytest.mark.parametrize("outcome", ["fails", "no torch in report", "no report"])
def test_torch_resolution_gives_none_when_pip_cannot_answer(setup_module_, monkeypatch, outcome):
    def fake_run(command, env, **kwargs):
        if outcome == "fails":
            raise subprocess.CalledProcessError(1, command)
        if outcome == "no torch in report":
            Path(command[command.index("--report") + 1]).write_text('{"install": []}')
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(setup_module_.subprocess, "run", fake_run)
    assert setup_module_.resolved_torch_version() is None


def test_build_inputs_change_with_sources_torch_and_switches(setup_module_, monkeypatch, tmp_path):
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "CMakeLists.txt").write_text("project(x)\n")
    (tmp_path / "csrc" / "cpu" / "k.cpp").write_text("int k;\n")
    monkeypatch.setattr(setup_module_, "ROOT", tmp_path)
    torch_info = {"version": "2.14.1", "git": "abc", "cuda": "13.0", "cxx11_abi": 1}
    first = setup_module_.build_inputs(torch_info, None)
    assert setup_module_.build_inputs(dict(torch_info), None) == first
    (tmp_path / "csrc" / "cpu" / "k.cpp").write_text("int k = 1;\n")
    second = setup_module_.build_inputs(torch_info, None)
    assert second != first
    assert setup_module_.build_inputs({**torch_info, "version": "2.11.0"}, None) != second
    assert setup_module_.build_inputs({**torch_info, "git": "def"}, None) != second
    monkeypatch.setenv("MEMKD_CUDA", "OFF")
    assert setup_module_.build_inputs(torch_info, None) != second


def test_setup_and_cmake_agree_on_the_cpu_builds(setup_module_, monkeypatch):
    cmake = (ROOT / "CMakeLists.txt").read_text()
    monkeypatch.delenv("MEMKD_CPU_ARCH_FLAGS", raising=False)
    variants = setup_module_.cpu_variants()
    assert f"set(MEMKD_CPU_VARIANTS {' '.join(variants)})" in cmake
    monkeypatch.setenv("MEMKD_CPU_ARCH_FLAGS", "-march=native")
    assert setup_module_.cpu_variants() == ["custom"] and "set(MEMKD_CPU_VARIANTS custom)" in cmake
    assert set(_library.CPU_VARIANTS) >= {*variants, "custom"}


def test_cpu_variant_choice(monkeypatch):
    built = ["avx512", "avx2", "baseline"]
    monkeypatch.delenv("MEMKD_CPU_VARIANT", raising=False)
    assert _library.choose_cpu_variant(built, ("avx2", "baseline"))[0] == "avx2"
    assert _library.choose_cpu_variant(built, ("avx512", "avx2", "baseline"))[0] == "avx512"
    assert _library.choose_cpu_variant(["baseline"], ("avx512", "avx2", "baseline"))[0] == "baseline"
    assert _library.choose_cpu_variant(["custom"], ("baseline",))[0] == "custom"
    assert _library.choose_cpu_variant(["avx512"], ("baseline",))[0] is None
    monkeypatch.setenv("MEMKD_CPU_VARIANT", "baseline")
    assert _library.choose_cpu_variant(built, ("avx512", "avx2", "baseline")) == ("baseline", "chosen with MEMKD_CPU_VARIANT")
    monkeypatch.setenv("MEMKD_CPU_VARIANT", "avx512")
    with pytest.warns(RuntimeWarning, match="MEMKD_CPU_VARIANT='avx512' ignored: expected one of"):
        assert _library.choose_cpu_variant(built, ("avx2", "baseline"))[0] == "avx2"


def run_python(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter; cwd outside the checkout, so that the installed memkd is
    imported (the checkout's memkd/ has no compiled modules unless installed editable)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=cwd)


CHECK_OPS = """
    import torch
    import memkd.ops as ops
    from memkd.ops import _library, reference
    assert _library.EXTENSION.loaded and _library.EXTENSION.cpu_variant == {variant!r}, _library.EXTENSION
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 37, 5, 7, generator=g, requires_grad=True)
    k = torch.randn(13, 37, generator=g, requires_grad=True)
    v = torch.randn(13, 37, generator=g, requires_grad=True)
    out = ops.nr_recall(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference.nr_recall(qd, kd, vd)
    ref_grads = torch.autograd.grad(ref.square().sum(), (qd, kd, vd))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    fs, ft = torch.randn(2, 37, 9, 6, generator=g), torch.randn(2, 37, 9, 6, generator=g)
    torch.testing.assert_close(ops.cosine_distance_map(fs, ft).double(),
                               reference.cosine_distance_map(fs.double(), ft.double()), rtol=1e-5, atol=1e-5)
    maps, scores = ops.anomaly_map([fs], [ft], (19, 23), 2.0)
    ref_maps, ref_scores = reference.anomaly_map([fs.double()], [ft.double()], (19, 23), 2.0)
    torch.testing.assert_close(maps.double(), ref_maps, rtol=1e-5, atol=1e-5)
    print("variant ok", {variant!r})
"""


@pytest.mark.parametrize("variant", list(_library.CPU_VARIANTS))
def test_every_cpu_build_this_processor_runs_matches_the_reference(variant, tmp_path):
    """Each x86-64 level's build is loaded alone (MEMKD_CPU_VARIANT) and checked against the
    reference: the portable builds are the ones an older machine will load."""
    if not _library.EXTENSION.loaded:
        pytest.skip(f"the compiled modules are not loaded: {_library.EXTENSION.reason}")
    import memkd._C

    built = _library.EXTENSION.build_info.get("cpu", "").split("+")
    if variant not in built:
        pytest.skip(f"the {variant} build is not made by this build (built: {built})")
    if variant != "custom" and variant not in memkd._C.runnable_cpu_variants():
        pytest.skip(f"this processor cannot run the {variant} build")
    result = run_python(CHECK_OPS.format(variant=variant), env={"MEMKD_CPU_VARIANT": variant}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"variant ok {variant}" in result.stdout


def test_modules_built_for_another_torch_warn_once_and_fall_back(tmp_path):
    """The stamp says which torch the modules were built against; under any other torch they are
    not loaded: one warning saying what to run, the reference serves, and `memkd info` says why."""
    if not _library.EXTENSION.loaded:
        pytest.skip(f"the compiled modules are not loaded: {_library.EXTENSION.reason}")
    code = """
        import warnings, torch
        torch.__version__ = "2.99.0"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import memkd.ops as ops
            from memkd.cli import info_lines
        msgs = [str(w.message) for w in caught if "memkd" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "built against torch" in msgs[0] and "2.99.0" in msgs[0] and "pip install --no-deps" in msgs[0], msgs
        assert ops.backends()["nr_recall"]["cpu"].startswith("reference (memkd._C was built against torch"), ops.backends()
        info = "\\n".join(info_lines())
        assert "built against torch" in info and "pip install --no-deps" in info, info
        q = torch.randn(1, 5, 3, 3, requires_grad=True); k = torch.randn(4, 5); v = torch.randn(4, 5)
        out = ops.nr_recall(q, k, v); out.sum().backward()
        torch.testing.assert_close(out, ops.reference.nr_recall(q, k, v))
        print("fallback ok")
    """
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
