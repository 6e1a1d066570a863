"""A compiled CPU predictor cached beside its checkpoint, so that ``torch.compile``'s cost is paid once.

``memkd predict --compile`` and ``memkd test --compile`` on the CPU build an AOTInductor package of
the model's inference path (``memkd.export.write_aoti`` with the normalised input, frozen weights
and the fused memkd kernels; no threshold, so a new threshold does not invalidate it) at a fixed
batch size and keep it in ``<checkpoint>/compiled/``. Later runs load it in about a second instead
of compiling again, and without ``--compile`` they use it too (unless ``--eager``).

A package is keyed by everything that invalidates it (``package_key``): the torch and memkd
versions, the CPU kernels serving the memkd ops, the device, the batch size, and the checkpoint's
model file (size, modification time, epoch and step), so a retrained or replaced checkpoint is never
served by an old package.
"""
from __future__ import annotations

import hashlib
import json
import os
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


def package_key(checkpoint_dir: Path, epoch: Optional[int], step: Optional[int], batch_size: int, device: str) -> dict[str, Any]:
    """What a cached package depends on; a package whose key differs is not used."""
    from memkd.ops import backends
    from memkd.train.checkpoint import MODEL_FILE

    model_file = (Path(checkpoint_dir) / MODEL_FILE).stat()
    return {
        "torch": torch.__version__,
        "memkd": memkd.__version__,
        "kernels": {op: per_device["cpu"] for op, per_device in sorted(backends().items())},
        "device": str(torch.device(device)),
        "batch_size": int(batch_size),
        "model_file": {"size": model_file.st_size, "mtime_ns": model_file.st_mtime_ns, "epoch": epoch, "step": step},
    }


def package_path(checkpoint_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(checkpoint_dir) / CACHE_DIR / f"aoti-b{key['batch_size']}-{digest}.pt2"


@dataclass
class CachedPackage:
    """Where a package is, whether this call built it, and how long building or loading took."""

    path: Path
    built: bool
    seconds: float


class AotiPredictor:
    """``MemKD.predict`` through a cached AOTInductor package: maps [B, H, W] and scores [B].

    The package runs a fixed batch size: a smaller batch is padded to it and a larger one runs in
    chunks of it (as ``CompiledPredictor`` does).
    """

    def __init__(self, package: CachedPackage, batch_size: int, image_size: tuple[int, int]):
        import memkd.ops  # noqa: F401  the package calls the memkd ops

        self.package = package
        self.batch_size = batch_size
        self.image_size = tuple(image_size)
        self._run = torch._inductor.aoti_load_package(str(package.path))

    @property
    def description(self) -> str:
        how = f"built in {self.package.seconds:.0f} s" if self.package.built else f"loaded in {self.package.seconds:.1f} s"
        return f"AOTInductor package {self.package.path} (batch {self.batch_size}, {how})"

    def __call__(self, images: torch.Tensor, sigma: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
        check_images(images)
        if sigma != 4.0:
            raise ValueError(f"sigma: the cached package was compiled with sigma 4.0, got {sigma}")
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"images: the package takes {self.image_size[0]}x{self.image_size[1]} images, got {tuple(images.shape)}")
        maps, scores = [], []
        with torch.inference_mode():
            for chunk in images.float().cpu().split(self.batch_size):
                count = chunk.shape[0]
                if count < self.batch_size:
                    chunk = torch.cat([chunk, chunk.new_zeros(self.batch_size - count, *chunk.shape[1:])])
                chunk_maps, chunk_scores = self._run(chunk.contiguous())
                maps.append(chunk_maps[:count])
                scores.append(chunk_scores[:count])
        return torch.cat(maps), torch.cat(scores)


def find_package(checkpoint_dir: Path, key: dict[str, Any], any_batch_size: bool = False) -> Optional[tuple[Path, int]]:
    """The cached package for ``key`` and its batch size; ``any_batch_size``: else one that differs
    from ``key`` in the batch size only (the largest batch). None when there is none."""
    exact = package_path(checkpoint_dir, key)
    if exact.is_file():
        return exact, key["batch_size"]
    if not any_batch_size:
        return None
    found = []
    for meta in (Path(checkpoint_dir) / CACHE_DIR).glob("aoti-*.json"):
        try:
            stored = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if {**stored, "batch_size": key["batch_size"]} == key and meta.with_suffix(".pt2").is_file():
            found.append((stored["batch_size"], meta.with_suffix(".pt2")))
    if not found:
        return None
    batch, path = max(found)
    return path, batch


def build_package(model: MemKD, checkpoint_dir: Path, key: dict[str, Any]) -> CachedPackage:
    """Compile the package for ``key`` into the cache (temporary name, then moved into place)."""
    from memkd.export import write_aoti

    path = package_path(checkpoint_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    descriptor, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".pt2", dir=path.parent)
    os.close(descriptor)
    try:
        write_aoti(model, Path(tmp), INPUT_KIND, None, batch_size=key["batch_size"])
        path.with_suffix(".json").write_text(json.dumps(key, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return CachedPackage(path, True, time.perf_counter() - started)


def cached_predictor(model: MemKD, checkpoint_dir: Path, epoch: Optional[int], step: Optional[int], batch_size: int,
                     device: str, build: bool) -> Optional[AotiPredictor]:
    """The cached compiled predictor of a checkpoint on the CPU: the package for ``batch_size`` (or,
    when ``build`` is False, one of another batch size); built now when missing and ``build``.
    None on other devices, or when no package exists and ``build`` is False."""
    if torch.device(device).type != "cpu":
        return None
    key = package_key(checkpoint_dir, epoch, step, batch_size, device)
    found = find_package(checkpoint_dir, key, any_batch_size=not build)
    if found is None and not build:
        return None
    if found is None:
        package = build_package(model, checkpoint_dir, key)
        batch = batch_size
    else:
        path, batch = found
        package = CachedPackage(path, False, 0.0)
    started = time.perf_counter()
    predictor = AotiPredictor(package, batch, model.config.image_size)
    if not package.built:
        package.seconds = time.perf_counter() - started
    return predictor


def predictor_for(checkpoint, device: str, batch_size: int, *, compile: bool, eager: bool) -> Optional[AotiPredictor]:
    """The predictor ``memkd test`` and ``memkd predict`` use for a loaded checkpoint on ``device``:
    the cached package (built now with ``compile``), None for ``model.predict`` (``eager``, no
    package, or not the CPU, where ``compile`` means ``CompiledPredictor``)."""
    if compile and eager:
        raise ValueError("--compile, --eager: pass one of them (--eager skips the compiled package, --compile builds it)")
    if eager:
        return None
    return cached_predictor(checkpoint.model, checkpoint.directory, checkpoint.epoch, checkpoint.step, batch_size, device, build=compile)
