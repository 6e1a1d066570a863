"""A compiled CPU predictor cached beside its checkpoint, so that compiling is paid for once.

``memkd predict --compile`` and ``memkd test --compile`` on the CPU build a compiled package of the
model's inference path (normalised input, no threshold, so a new threshold does not invalidate it)
and keep it in ``<checkpoint>/compiled/``. Later runs load it in seconds instead of compiling again,
and without ``--compile`` they use it too (unless ``--eager``). The package is the fastest exact
path available (benchmarks/test_export.py), in this order:

``openvino``  the OpenVINO export (``memkd.export``, fp32; needs the export extra), dynamic batch;
``aoti``      an AOTInductor package (``memkd.export.write_aoti``: frozen weights, oneDNN-packed
              convolutions, the fused memkd kernels) at a fixed batch size, smaller batches padded.

Both give ``MemKD.predict``'s maps and scores to 1e-4 relative (tests/test_export.py). A package is
keyed by everything that invalidates it (``package_key``): the backend, the torch and memkd versions
(and OpenVINO's), the CPU kernels serving the memkd ops, the device, the batch size (AOTI), and the
checkpoint's model file (size, modification time, epoch and step), so a retrained or replaced
checkpoint is never served by an old package.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

import memkd
from memkd.models import MemKD
from memkd.models.memkd import check_images

CACHE_DIR = "compiled"
INPUT_KIND = "normalized"  # what MemKD.predict takes
BACKENDS = ("openvino", "aoti")  # fastest first (benchmarks/test_export.py)
SIGMA = 4.0


def default_backend() -> str:
    """The fastest backend whose packages are installed: OpenVINO with the export extra, else AOTI."""
    if all(importlib.util.find_spec(name) is not None for name in ("openvino", "onnx", "onnxscript")):
        return "openvino"
    return "aoti"


def package_key(checkpoint_dir: Path, epoch: Optional[int], step: Optional[int], batch_size: int, device: str,
                backend: str) -> dict[str, Any]:
    """What a cached package depends on; a package whose key differs is not used."""
    from memkd.ops import backends
    from memkd.train.checkpoint import MODEL_FILE

    model_file = (Path(checkpoint_dir) / MODEL_FILE).stat()
    key = {
        "backend": backend,
        "torch": torch.__version__,
        "memkd": memkd.__version__,
        "kernels": {op: per_device["cpu"] for op, per_device in sorted(backends().items())},
        "device": str(torch.device(device)),
        "batch_size": int(batch_size) if backend == "aoti" else None,  # OpenVINO's batch is dynamic
        "model_file": {"size": model_file.st_size, "mtime_ns": model_file.st_mtime_ns, "epoch": epoch, "step": step},
    }
    if backend == "openvino":
        import openvino

        key["openvino"] = openvino.__version__
    return key


def package_path(checkpoint_dir: Path, key: dict[str, Any]) -> Path:
    """The package file (AOTI .pt2) or export directory (OpenVINO) of ``key``; its key is stored
    beside it with the suffix .json."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    batch = f"-b{key['batch_size']}" if key["batch_size"] else ""
    suffix = ".pt2" if key["backend"] == "aoti" else ""
    return Path(checkpoint_dir) / CACHE_DIR / f"{key['backend']}{batch}-{digest}{suffix}"


@dataclass
class CachedPackage:
    """Where a package is, whether this call built it, and how long building or loading took."""

    path: Path
    backend: str
    built: bool
    seconds: float


class CachedPredictor:
    """``MemKD.predict`` through a cached package: maps [B, H, W] and scores [B] (CPU tensors).

    An AOTI package runs a fixed batch size: a smaller batch is padded to it and a larger one runs
    in chunks of it (as ``CompiledPredictor`` does).
    """

    def __init__(self, package: CachedPackage, batch_size: Optional[int], image_size: tuple[int, int]):
        self.package = package
        self.batch_size = batch_size
        self.image_size = tuple(image_size)
        started = time.perf_counter()
        if package.backend == "aoti":
            import memkd.ops  # noqa: F401  the package calls the memkd ops

            self._run = torch._inductor.aoti_load_package(str(package.path))
        else:
            from memkd.deploy import Inferencer

            self._inferencer = Inferencer(package.path, threads=torch.get_num_threads())
        if not package.built:
            package.seconds = time.perf_counter() - started

    @property
    def description(self) -> str:
        how = f"built in {self.package.seconds:.0f} s" if self.package.built else f"loaded in {self.package.seconds:.1f} s"
        batch = f", batch {self.batch_size}" if self.batch_size else ""
        return f"{self.package.backend} package {self.package.path} (cached compiled path{batch}, {how})"

    def __call__(self, images: torch.Tensor, sigma: float = SIGMA) -> tuple[torch.Tensor, torch.Tensor]:
        check_images(images)
        if sigma != SIGMA:
            raise ValueError(f"sigma: the cached package was compiled with sigma {SIGMA}, got {sigma}")
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"images: the package takes {self.image_size[0]}x{self.image_size[1]} images, got {tuple(images.shape)}")
        images = images.float().cpu()
        if self.package.backend == "openvino":
            result = self._inferencer.predict(images.numpy())
            return torch.from_numpy(result.maps), torch.from_numpy(result.scores)
        maps, scores = [], []
        with torch.inference_mode():
            for chunk in images.split(self.batch_size):
                count = chunk.shape[0]
                if count < self.batch_size:
                    chunk = torch.cat([chunk, chunk.new_zeros(self.batch_size - count, *chunk.shape[1:])])
                chunk_maps, chunk_scores = self._run(chunk.contiguous())
                maps.append(chunk_maps[:count])
                scores.append(chunk_scores[:count])
        return torch.cat(maps), torch.cat(scores)


def find_package(checkpoint_dir: Path, key: dict[str, Any], any_batch_size: bool = False) -> Optional[tuple[Path, Optional[int]]]:
    """The cached package for ``key`` and its batch size; ``any_batch_size``: else one that differs
    from ``key`` in the batch size only (the largest batch). None when there is none."""
    exact = package_path(checkpoint_dir, key)
    if exact.exists():
        return exact, key["batch_size"]
    if not any_batch_size or key["batch_size"] is None:
        return None
    found = []
    for meta in (Path(checkpoint_dir) / CACHE_DIR).glob(f"{key['backend']}-*.json"):
        try:
            stored = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        package = meta.with_suffix(".pt2")
        if isinstance(stored, dict) and {**stored, "batch_size": key["batch_size"]} == key and package.is_file():
            found.append((stored["batch_size"], package))
    if not found:
        return None
    batch, path = max(found)
    return path, batch


def build_package(model: MemKD, checkpoint_dir: Path, key: dict[str, Any]) -> CachedPackage:
    """Compile the package for ``key`` into the cache (written under a temporary name, then moved
    into place; its key file last, so a package is used only once complete)."""
    from memkd.export import export_model, write_aoti

    path = package_path(checkpoint_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if key["backend"] == "aoti":
        descriptor, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".pt2", dir=path.parent)
        os.close(descriptor)
        try:
            write_aoti(model, Path(tmp), INPUT_KIND, None, batch_size=key["batch_size"])
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        if path.exists():  # a stale directory without its key file (an interrupted build)
            shutil.rmtree(path)
        export_model(model, path, key["backend"], input_kind=INPUT_KIND)
    key_file = path.with_name(path.name + ".json") if key["backend"] == "openvino" else path.with_suffix(".json")
    key_file.write_text(json.dumps(key, indent=2) + "\n")
    return CachedPackage(path, key["backend"], True, time.perf_counter() - started)


def cached_predictor(model: MemKD, checkpoint_dir: Path, epoch: Optional[int], step: Optional[int], batch_size: int,
                     device: str, build: bool, backend: Optional[str] = None) -> Optional[CachedPredictor]:
    """The cached compiled predictor of a checkpoint on the CPU (``backend`` None: the default):
    its package for ``batch_size`` (or, when ``build`` is False, an AOTI one of another batch
    size); built now when missing and ``build``. None on other devices, or when no package exists
    and ``build`` is False."""
    if torch.device(device).type != "cpu":
        return None
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    key = package_key(checkpoint_dir, epoch, step, batch_size, device, backend)
    found = find_package(checkpoint_dir, key, any_batch_size=not build)
    if found is None and not build:
        return None
    if found is None:
        package, batch = build_package(model, checkpoint_dir, key), key["batch_size"]
    else:
        path, batch = found
        package = CachedPackage(path, backend, False, 0.0)
    return CachedPredictor(package, batch, model.config.image_size)


def predictor_for(checkpoint, device: str, batch_size: int, *, compile: bool, eager: bool) -> Optional[CachedPredictor]:
    """The predictor ``memkd test`` and ``memkd predict`` use for a loaded checkpoint on ``device``:
    the cached package (built now with ``compile``), None for ``model.predict`` (``eager``, no
    package, or not the CPU, where ``compile`` means ``CompiledPredictor``)."""
    if compile and eager:
        raise ValueError("--compile, --eager: pass one of them (--eager skips the compiled package, --compile builds it)")
    if eager:
        return None
    return cached_predictor(checkpoint.model, checkpoint.directory, checkpoint.epoch, checkpoint.step, batch_size, device, build=compile)
