"""Checkpoints: a directory that rebuilds a model on its own.

``<dir>/model.safetensors``  the student (bottleneck, decoder or trunk, memories) as ``student.*``,
                             and the teacher as ``teacher.*`` unless it comes from a named source
                             (torchvision weights such as "imagenet"), which is fetched again on
                             load; a random-init or local-file teacher is always stored, so the
                             checkpoint reproduces the same model without that file.
``<dir>/config.json``        format, memkd version, the model config (method, backbone, image size,
                             normalisation, memory layout, ...), epoch and step, the training
                             config, and ``extra``: free-form JSON for callers (e.g. a threshold).
``<dir>/training_state.pt``  training checkpoints only: optimizer, RNG states, epoch and step.

Every file is written to a temporary name and moved into place with os.replace, all of them only
after all were written; epoch and step are recorded in each file so that a set torn by a crash is
detected on load.
"""
from __future__ import annotations

import json
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import memkd
from memkd.models import MemKD, MemKDConfig, Teacher
from memkd.models.backbones import is_weight_enum_name

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "training_state.pt"
FORMAT = "memkd-checkpoint"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file is missing parts, corrupt, truncated or does not match its config."""


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns."""

    model: MemKD
    directory: Path
    extra: dict[str, Any] = field(default_factory=dict)
    epoch: Optional[int] = None
    step: Optional[int] = None
    memkd_version: str = ""
    training: Optional[dict[str, Any]] = None  # the TrainConfig it was trained with, as a dict

    @property
    def config(self) -> MemKDConfig:
        return self.model.config


def checkpoint_directory(path: PathLike) -> Path:
    """The checkpoint directory for ``path``: the directory itself or any file in it."""
    path = Path(path)
    return path.parent if path.name in (MODEL_FILE, CONFIG_FILE, STATE_FILE) else path


def teacher_is_named(config: MemKDConfig) -> bool:
    """Whether the teacher's weights can be fetched again by name (so need not be stored)."""
    return config.weights is not None and is_weight_enum_name(config.backbone, config.weights)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_checkpoint(
    model: MemKD,
    directory: PathLike,
    *,
    extra: Optional[Mapping[str, Any]] = None,
    epoch: Optional[int] = None,
    step: Optional[int] = None,
    include_teacher: Optional[bool] = None,
    training: Optional[Mapping[str, Any]] = None,
    training_state: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``model`` to ``directory`` (created if needed) and return the directory.

    include_teacher: None stores the teacher unless its weights are named torchvision weights.
    training: the training config (a JSON dict) kept for the record; training_state: optimizer and
    RNG states for resuming (``training_state.pt``; a stale one is removed when not given).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    include_teacher = not teacher_is_named(config) if include_teacher is None else include_teacher
    parts = {"student": model.student} | ({"teacher": model.teacher} if include_teacher else {})
    tensors = {
        f"{prefix}.{name}": tensor.detach().to("cpu", memory_format=torch.contiguous_format).contiguous()
        for prefix, module in parts.items()
        for name, tensor in module.state_dict().items()
    }
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "memkd_version": memkd.__version__,
        "config": config.to_dict(),
        "epoch": epoch,
        "step": step,
        "teacher_stored": include_teacher,
        "training": dict(training) if training is not None else None,
        "extra": dict(extra or {}),
    }
    json.dumps(header)  # fail before writing anything if extra is not JSON
    stamp = {"format": FORMAT, "epoch": str(epoch), "step": str(step)}
    files = {
        MODEL_FILE: lambda p: save_file(tensors, str(p), metadata=stamp),
        CONFIG_FILE: lambda p: _write_json(p, header),
    }
    if training_state is not None:
        files[STATE_FILE] = lambda p: torch.save({**training_state, "format": FORMAT, "epoch": epoch, "step": step}, p)
    with _temporaries([directory / name for name in files]) as temps:
        for (name, write), tmp in zip(files.items(), temps):
            write(tmp)
            _fsync(tmp)
        for name, tmp in zip(files, temps):
            os.replace(tmp, directory / name)
    if training_state is None:
        (directory / STATE_FILE).unlink(missing_ok=True)
    return directory


@contextmanager
def _temporaries(paths: list[Path]) -> Iterator[list[Path]]:
    temps = [path.with_name(f".{path.name}.tmp-{os.getpid()}") for path in paths]
    try:
        yield temps
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)  # only left over when writing failed


def read_header(directory: PathLike) -> dict[str, Any]:
    """The parsed and checked ``config.json`` of a checkpoint directory."""
    path = checkpoint_directory(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no {CONFIG_FILE} at {path}")
    try:
        header = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint: {path} is not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint: {path} is not a memkd checkpoint config (no \"format\": \"{FORMAT}\")")
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint: {path} has format version {header['format_version']}, newer than this memkd "
            f"({memkd.__version__}) reads ({FORMAT_VERSION}); upgrade memkd"
        )
    missing = [k for k in ("config", "teacher_stored", "extra") if k not in header]
    if missing:
        raise CheckpointError(f"checkpoint: {path} lacks {missing}")
    return header


def _read_tensors(path: Path, device: Union[str, torch.device]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no {MODEL_FILE} at {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: cannot read {path}; is it corrupt or truncated? ({exc})") from exc


def _check_part(
    path: Path, prefix: str, expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The tensors of ``prefix`` (student or teacher) in the file, checked against the model's own."""
    found = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint: {path} does not match its config ({prefix}): missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in found.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise CheckpointError(
                f"checkpoint: {path} does not match its config: {prefix}.{name} is {tensor.dtype} "
                f"{tuple(tensor.shape)}, the model needs {expected[name].dtype} {tuple(expected[name].shape)}"
            )
    return found


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu") -> Checkpoint:
    """Rebuild the model saved at ``path`` (the directory or a file in it) on ``device``.

    A teacher that was not stored is rebuilt from its named weights (torchvision's cache). Raises
    FileNotFoundError for a missing file and CheckpointError (a ValueError) naming the file for a
    corrupt, truncated or mismatched one.
    """
    directory = checkpoint_directory(path)
    header = read_header(directory)
    config_path, model_path = directory / CONFIG_FILE, directory / MODEL_FILE
    try:
        config = MemKDConfig.from_dict(header["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: {config_path} holds an invalid model config: {exc}") from exc
    tensors, stamp = _read_tensors(model_path, device)
    for key in ("epoch", "step"):
        if stamp.get(key) != str(header.get(key)):
            raise CheckpointError(
                f"checkpoint: {model_path} is from {key} {stamp.get(key)} but {config_path} from {key} "
                f"{header.get(key)}; the checkpoint was torn (a crash while saving?)"
            )
    stray = sorted(k for k in tensors if not k.startswith(("student.", "teacher.")))
    if stray:
        raise CheckpointError(f"checkpoint: {model_path} holds tensors of no memkd model part: {stray[:5]}")
    with torch.device("meta"):  # structure only; every tensor comes from the file (or the named teacher)
        model = MemKD(config, load_teacher_weights=False)
    parts = {"student": model.student} | ({"teacher": model.teacher} if header["teacher_stored"] else {})
    for prefix, module in parts.items():
        module.load_state_dict(_check_part(model_path, prefix, module.state_dict(), tensors), assign=True)
    if not header["teacher_stored"]:
        model.teacher = Teacher(config.backbone, config.weights).to(device)
    return Checkpoint(
        model=model,
        directory=directory,
        extra=dict(header["extra"]),
        epoch=header.get("epoch"),
        step=header.get("step"),
        memkd_version=header.get("memkd_version", ""),
        training=header.get("training"),
    )


def update_checkpoint_extra(path: PathLike, updates: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into the checkpoint's ``extra`` (config.json rewritten atomically); returns it."""
    directory = checkpoint_directory(path)
    header = read_header(directory)
    header["extra"] = {**header["extra"], **updates}
    json.dumps(header)  # not JSON: fail before touching the file
    target = directory / CONFIG_FILE
    with _temporaries([target]) as (tmp,):
        _write_json(tmp, header)
        _fsync(tmp)
        os.replace(tmp, target)
    return header["extra"]


def load_training_state(path: PathLike, epoch: Optional[int], step: Optional[int]) -> dict[str, Any]:
    """The training state of a checkpoint, checked to belong to the same ``epoch`` and ``step``."""
    file = checkpoint_directory(path) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint: no {STATE_FILE} at {file}; it is not a training checkpoint")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike mean "unreadable"
        raise CheckpointError(f"checkpoint: cannot read {file}; is it corrupt or truncated? ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint: {file} is not a memkd training state")
    if (state.get("epoch"), state.get("step")) != (epoch, step):
        raise CheckpointError(
            f"checkpoint: {file} is from epoch {state.get('epoch')} step {state.get('step')} but the model from "
            f"epoch {epoch} step {step}; the checkpoint was torn (a crash while saving?)"
        )
    return state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states (all plain tensors and numbers)."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
