"""Builds memkd's compiled modules with CMake (see CMakeLists.txt) and packages memkd with its
Triton kernels. This file is also the project's PEP 517 build backend (pyproject.toml names it):
setuptools' backend, except that torch is a build requirement only when the environment being
installed into has no torch >= 2.10, so that a user's own torch (a CUDA build, say) is the one
memkd is compiled against and is never replaced.

Environment switches: MEMKD_CUDA=AUTO|ON|OFF (build the CUDA kernels; AUTO builds them when a CUDA
toolkit and a CUDA-enabled torch are present), MEMKD_CUDA_ARCHS (default "80;90"),
MEMKD_CPU_ARCH_FLAGS (default empty: one CPU kernel build per x86-64 level, chosen at load time;
set e.g. "-march=native" for a single build tied to this machine), MAX_JOBS (parallel compile jobs).

The CMake build lives in build/cmake-<environment> of the source tree and is never started afresh: a rebuild
recompiles only what changed, and a build whose inputs (sources, torch build, Python, compiler,
switches) equal those of the last one reuses its modules without running CMake at all.
"""
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import Extension, build_meta, find_packages, setup
from setuptools.build_meta import *  # noqa: F401,F403  (the rest of the PEP 517 backend)
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
TORCH_REQUIREMENT = "torch>=2.10"  # keep equal to the runtime bound in pyproject.toml
SWITCHES = ("MEMKD_CUDA", "MEMKD_CUDA_ARCHS", "MEMKD_CPU_ARCH_FLAGS", "CUDA_HOME", "CUDA_PATH", "CXX", "CUDACXX")

# Prints what CMake needs to know of a torch; run in a fresh interpreter with the target
# environment's site-packages appended to sys.path, since pip's isolated build hides them.
TORCH_QUERY = """
import json, sys
sys.path.extend(sys.argv[1:])
import torch, torch.utils
print(json.dumps({"version": torch.__version__, "git": torch.version.git_version,
                  "cuda": torch.version.cuda or "", "cxx11_abi": int(torch._C._GLIBCXX_USE_CXX11_ABI),
                  "cmake_prefix": torch.utils.cmake_prefix_path}))
"""


def target_site_packages() -> list[str]:
    """The site-packages of the environment pip installs into (the interpreter running the build)."""
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


def installed_torch_version() -> str | None:
    """The version of the torch installed in the target environment, if any."""
    from importlib.metadata import distributions

    for dist in distributions(path=target_site_packages()):
        if (dist.metadata["Name"] or "").lower() == "torch":
            return dist.version
    return None


# What pip sets while it runs a build hook: a nested pip given them would resolve inside the
# isolated build environment (or share the outer pip's build tracker) instead of for the target.
PIP_HOOK_VARIABLES = ("PYTHONPATH", "PYTHONNOUSERSITE", "PIP_BUILD_TRACKER", "PIP_REQ_TRACKER",
                      "_PIP_IN_BUILD_IGNORE_CONSTRAINTS")


def torch_deciding_requirements() -> list[str]:
    """The runtime requirements (pyproject.toml) that decide which torch pip installs with memkd."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from setuptools.compat.py310 import tomllib
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [r for r in dependencies if re.match(r"[A-Za-z0-9._-]+", r).group().lower() in ("torch", "torchvision")]


def resolved_torch_version() -> str | None:
    """The torch that pip will install into the target environment beside memkd, found by a dry
    run of the target's own pip with its configuration (indexes, constraint files), or None.

    Since pip 26.2 the configured constraints no longer apply to build environments, so an
    unpinned build requirement can get a newer torch than the one the same pip installs at run
    time, and modules compiled against it would not load."""
    environment = {k: v for k, v in os.environ.items() if k not in PIP_HOOK_VARIABLES}
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                   *torch_deciding_requirements()]
        try:
            subprocess.run(command, env=environment, capture_output=True, check=True, timeout=900)
            installs = json.loads(report.read_text())["install"]
        except (OSError, ValueError, KeyError, subprocess.SubprocessError):
            return None
    for item in installs:
        if item.get("metadata", {}).get("name", "").lower() == "torch":
            return item["metadata"]["version"]
    return None


def torch_requirements() -> list[str]:
    version = installed_torch_version()
    if version is not None:
        major_minor = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
        if major_minor >= (2, 10):
            return []  # build against it, from the target environment
    resolved = resolved_torch_version()
    if resolved is None:
        print(f"memkd: could not find which torch pip installs here; building against the newest {TORCH_REQUIREMENT}. "
              "If pip then installs another torch, the kernels will not load: install torch first, then memkd.",
              file=sys.stderr)
        return [TORCH_REQUIREMENT]
    print(f"memkd: building against torch {resolved}, the torch pip installs into this environment", file=sys.stderr)
    return [f"torch=={resolved}"]


def get_requires_for_build_wheel(config_settings=None):
    return build_meta.get_requires_for_build_wheel(config_settings) + torch_requirements()


def get_requires_for_build_editable(config_settings=None):
    return build_meta.get_requires_for_build_editable(config_settings) + torch_requirements()


def cuda_compiler() -> str | None:
    """nvcc from CUDA_HOME, the usual toolkit location, or PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def tool_version(*command: str) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def build_inputs(torch_info: dict, nvcc: str | None) -> str:
    """A digest of everything the compiled modules depend on."""
    digest = hashlib.sha256()
    for path in sorted([ROOT / "CMakeLists.txt", *(ROOT / "csrc").rglob("*")]):
        if path.is_file():
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    facts = {
        "torch": {k: torch_info[k] for k in ("version", "git", "cuda", "cxx11_abi")},
        "python": sys.version,
        "soabi": sysconfig.get_config_var("EXT_SUFFIX"),
        "cxx": tool_version(os.environ.get("CXX", "c++"), "--version"),
        "nvcc": [nvcc, tool_version(nvcc, "--version") if nvcc else ""],
        "switches": {var: os.environ.get(var) for var in SWITCHES},
    }
    digest.update(json.dumps(facts, sort_keys=True).encode())
    return digest.hexdigest()


def cpu_variants() -> list[str]:
    """The CPU kernel builds CMakeLists.txt makes (memkd._cpu_<variant>); keep the two in step."""
    if os.environ.get("MEMKD_CPU_ARCH_FLAGS"):
        return ["custom"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["avx512", "avx2", "baseline"]
    return ["baseline"]


def build_directory(torch_info: dict) -> Path:
    """build/cmake-<environment>: one CMake build per environment and torch, so that installing
    into a second environment does not make the first one's next rebuild start over."""
    key = hashlib.sha256(f"{sys.prefix}\0{torch_info['version']}".encode()).hexdigest()[:10]
    return ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}-{key}"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """One CMake build makes every module; each extension then copies its own file."""

    built_in: Path | None = None

    def build_extension(self, ext: CMakeExtension) -> None:
        if CMakeBuild.built_in is None:
            CMakeBuild.built_in = self.build_all()
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        (module,) = CMakeBuild.built_in.glob(ext.name.rsplit(".", 1)[1] + ".*.so")
        shutil.copy2(module, target)

    def build_all(self) -> Path:
        mode = os.environ.get("MEMKD_CUDA", "AUTO").upper()
        if mode not in ("AUTO", "ON", "OFF"):
            raise ValueError(f"MEMKD_CUDA must be AUTO, ON or OFF, got {mode!r}")
        site = target_site_packages()
        query = subprocess.run([sys.executable, "-c", TORCH_QUERY, *site], capture_output=True, text=True)
        if query.returncode != 0:
            raise RuntimeError(f"memkd: cannot import torch to build against: {query.stderr.strip()}")
        torch_info = json.loads(query.stdout)
        nvcc = cuda_compiler() if mode != "OFF" else None
        build_dir = build_directory(torch_info)
        build_dir.mkdir(parents=True, exist_ok=True)
        lib_dir = build_dir / "lib"
        stamp = build_dir / "memkd-build-inputs.txt"
        # Two builds into one environment (a developer's and a test's) must not run CMake at once.
        with open(build_dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            inputs = build_inputs(torch_info, nvcc)
            if stamp.exists() and stamp.read_text() == inputs and any(lib_dir.glob("*.so")):
                print(f"memkd: the modules in {lib_dir} were built from the same inputs; reusing them")
            else:
                stamp.unlink(missing_ok=True)
                self.run_cmake(build_dir, site, nvcc, mode, lib_dir)
                stamp.write_text(inputs)
            # Copy out under the lock, so another build cannot replace them half-way.
            staged = Path(self.build_temp).resolve() / "memkd-modules"
            if staged.exists():
                shutil.rmtree(staged)
            shutil.copytree(lib_dir, staged)
        return staged

    def run_cmake(self, build_dir: Path, site: list[str], nvcc: str | None, mode: str, lib_dir: Path) -> None:
        if lib_dir.exists():
            shutil.rmtree(lib_dir)  # modules of variants no longer built must not be copied
        ninja = shutil.which("ninja")
        args = [
            f"-S{ROOT}",
            f"-B{build_dir}",
            "-GNinja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DMEMKD_TORCH_SEARCH_PATH={os.pathsep.join(site)}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={lib_dir}",
            f"-DMEMKD_CUDA={mode}",
            "-DCMAKE_BUILD_TYPE=Release",
            # An earlier isolated build ran cmake and ninja from its own, since deleted,
            # environment: name the current ones so the cached configuration follows.
            *([f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []),
        ]
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        for var in ("MEMKD_CUDA_ARCHS", "MEMKD_CPU_ARCH_FLAGS"):
            args.append(f"-D{var}={os.environ.get(var, '')}" if var in os.environ else f"-U{var}")
        subprocess.run(["cmake", *args], check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


if __name__ == "__main__":  # run by setuptools' backend (and by `python setup.py ...`)
    setup(
        packages=[*find_packages(include=["memkd", "memkd.*"]), "memkd.kernels"],
        package_dir={"memkd.kernels": "kernels"},
        ext_modules=[CMakeExtension(f"memkd.{name}") for name in ["_C", *(f"_cpu_{v}" for v in cpu_variants())]],
        cmdclass={"build_ext": CMakeBuild},
    )
