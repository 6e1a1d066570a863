"""Builds memkd._C with CMake (see CMakeLists.txt) and packages memkd with its Triton kernels.

Environment switches: MEMKD_CUDA=AUTO|ON|OFF (build the CUDA kernels; AUTO builds them when a CUDA
toolkit and a CUDA-enabled torch are present), MEMKD_CUDA_ARCHS (default "80;90"),
MEMKD_CPU_ARCH_FLAGS (default "-march=native"), MAX_JOBS (parallel compile jobs).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def cuda_compiler() -> str | None:
    """nvcc from CUDA_HOME, the usual toolkit location, or PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("MEMKD_CUDA", "AUTO").upper()
        if mode not in ("AUTO", "ON", "OFF"):
            raise ValueError(f"MEMKD_CUDA must be AUTO, ON or OFF, got {mode!r}")
        args = [
            # Every isolated pip build has a new, later deleted build environment: a configuration
            # cached by an earlier `pip install .` points at its cmake and ninja, so start afresh.
            "--fresh",
            f"-S{ROOT}",
            f"-B{build_dir}",
            "-GNinja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DMEMKD_CUDA={mode}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        nvcc = cuda_compiler()
        if nvcc and mode != "OFF":
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        for var in ("MEMKD_CUDA_ARCHS", "MEMKD_CPU_ARCH_FLAGS"):
            if var in os.environ:
                args.append(f"-D{var}={os.environ[var]}")
        subprocess.run(["cmake", *args], check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)



setup(
    packages=[*find_packages(include=["memkd", "memkd.*"]), "memkd.kernels"],
    package_dir={"memkd.kernels": "kernels"},
    ext_modules=[CMakeExtension("memkd._C")],
    cmdclass={"build_ext": CMakeBuild},
)
