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

A checkpoint is one atomic unit. Its files live in a version directory
``<dir>/.checkpoint-e<epoch>-s<step>-<token>/``, written completely and fsynced before the symlink
``<dir>/checkpoint`` is switched to it with one rename; ``<dir>/config.json`` and the other names
above are symlinks through ``checkpoint``, so paths into the directory keep working. Whenever a
process is killed, ``checkpoint`` points at the previous complete version or at the new complete
one; a version directory it does not point at is a leftover of an interrupted save, ignored by the
loader and removed by the next save. A directory whose config.json is a plain file (a copy made
without symlinks, or a checkpoint of an older memkd) is read as it is, and turned into the layout
above by its next save. Epoch and step are recorded in each file, so a set mixed up by hand is
detected on load.

The module is over 400 lines because the atomic save protocol and the loader that relies on it
(version directories, link switching, leftovers, torn-checkpoint checks) must agree step by step,
and read best side by side.

Testing hook: ``MEMKD_CHECKPOINT_KILL="<save>.<point>:<signal>"`` makes the process send itself
``<signal>`` (e.g. SIGKILL) at point ``<point>`` (1-based, ``SAVE_POINTS``) of its ``<save>``-th
save, so that tests can interrupt a real run at every point of a save.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
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
FILES = (MODEL_FILE, CONFIG_FILE, STATE_FILE)
CURRENT = "checkpoint"  # the symlink to the current version directory
VERSION_PREFIX = ".checkpoint-"
LINK_PREFIX = ".checkpoint-link-"
KILL_VARIABLE = "MEMKD_CHECKPOINT_KILL"
# The points of a save at which the testing hook can interrupt it, in order.
SAVE_POINTS = (
    "version directory created",
    f"{MODEL_FILE} written",
    f"{CONFIG_FILE} written",
    f"{STATE_FILE} written",
    f"{CURRENT} switched",
    "top-level links made",
    "old versions removed",
)
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
    return path.parent if path.name in FILES else path


def files_directory(path: PathLike) -> Path:
    """Where the files of the checkpoint at ``path`` are: the checkpoint directory itself when its
    ``config.json`` is a plain file (a copy made without symlinks, or an older memkd's checkpoint),
    else the version directory ``checkpoint`` points at, resolved once so that every file is read
    from the same version."""
    directory = checkpoint_directory(path)
    config, current = directory / CONFIG_FILE, directory / CURRENT
    plain = config.is_file() and not config.is_symlink()
    return Path(os.path.realpath(current)) if current.is_dir() and not plain else directory


def has_checkpoint(path: PathLike) -> bool:
    """Whether the directory at ``path`` (or the directory of a file in it) holds a checkpoint."""
    return (files_directory(path) / CONFIG_FILE).is_file()


def teacher_is_named(config: MemKDConfig) -> bool:
    """Whether the teacher's weights can be fetched again by name (so need not be stored)."""
    return config.weights is not None and is_weight_enum_name(config.backbone, config.weights)


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _reached(save: int, point: int) -> None:
    """The testing hook (see the module doc): signal this process at ``point`` of save ``save``."""
    plan = os.environ.get(KILL_VARIABLE)
    if not plan:
        return
    where, _, name = plan.partition(":")
    if where == f"{save}.{point}":
        os.kill(os.getpid(), getattr(signal, name or "SIGKILL"))


_saves = 0  # saves started by this process, for the testing hook


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
    """Write ``model`` to ``directory`` (created if needed) as one atomic unit (see the module doc)
    and return the directory.

    include_teacher: None stores the teacher unless its weights are named torchvision weights.
    training: the training config (a JSON dict) kept for the record; training_state: optimizer and
    RNG states for resuming (``training_state.pt``; the new checkpoint has none when not given).
    """
    global _saves
    _saves += 1
    save = _saves
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
    remove_leftovers(directory)
    token = secrets.token_hex(4)
    version = directory / f"{VERSION_PREFIX}e{epoch}-s{step}-{token}"
    file_mode = 0o666 & ~_umask()
    try:
        version.mkdir()
        _reached(save, 1)
        for name, point in ((MODEL_FILE, 2), (CONFIG_FILE, 3), (STATE_FILE, 4)):
            if name in files:
                path = version / name
                files[name](path)
                os.chmod(path, file_mode)  # safetensors creates its file 0600 whatever the umask
                _fsync(path)
            _reached(save, point)
        _fsync(version)
        _link_files(directory, files, token, before_switch=True)
        _switch_link(directory / CURRENT, version.name, f"{LINK_PREFIX}{token}")
    except BaseException:
        if os.path.realpath(directory / CURRENT) != os.path.realpath(version):
            shutil.rmtree(version, ignore_errors=True)  # nothing refers to it
        raise
    _fsync(directory)
    _reached(save, 5)
    _link_files(directory, files, token, before_switch=False)
    _fsync(directory)
    _reached(save, 6)
    remove_leftovers(directory)
    _reached(save, 7)
    return directory


def _link_files(directory: Path, files: Mapping[str, Any], token: str, before_switch: bool) -> None:
    """Make ``<directory>/<name>`` a symlink to ``checkpoint/<name>`` for each file of the new
    checkpoint, and remove the name of a file it lacks. Before the switch only what cannot break
    the current checkpoint is done (new links); plain files are replaced, and links to a file the
    new checkpoint lacks removed, after it, config.json first: while it is a plain file the loader
    reads the plain files (``files_directory``), all of the previous checkpoint."""
    for name in (CONFIG_FILE, MODEL_FILE, STATE_FILE):
        entry = directory / name
        is_link = entry.is_symlink()
        if name in files:
            if is_link and os.readlink(entry) == f"{CURRENT}/{name}":
                continue
            if before_switch and (is_link or entry.exists()):
                continue
            _switch_link(entry, f"{CURRENT}/{name}", f"{LINK_PREFIX}{token}-{name}")
        elif not before_switch and (is_link or entry.exists()):
            entry.unlink()


def _switch_link(path: Path, target: str, temporary_name: str) -> None:
    """Make ``path`` a symlink to ``target`` with one rename. A real directory at ``path`` (a copy
    of a checkpoint made without symlinks) is first moved aside as an old version; while it is, the
    plain files beside it still hold that same checkpoint."""
    temporary = path.with_name(temporary_name)
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    if path.is_dir() and not path.is_symlink():
        os.rename(path, path.with_name(f"{VERSION_PREFIX}copied-{secrets.token_hex(4)}"))
    os.replace(temporary, path)


def remove_leftovers(directory: PathLike) -> None:
    """Remove what interrupted saves leave in a checkpoint directory: version directories that
    ``checkpoint`` does not point at, temporary links, and temporaries of older memkd versions."""
    directory = Path(directory)
    current = os.path.realpath(directory / CURRENT) if (directory / CURRENT).is_symlink() else None
    for entry in directory.iterdir() if directory.is_dir() else ():
        if entry.name.startswith(LINK_PREFIX):
            entry.unlink(missing_ok=True)
        elif entry.name.startswith(VERSION_PREFIX) and entry.is_dir() and not entry.is_symlink():
            if os.path.realpath(entry) != current:
                shutil.rmtree(entry, ignore_errors=True)
        elif any(entry.name.startswith(f".{name}.tmp-") for name in FILES):
            entry.unlink(missing_ok=True)


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
    path = files_directory(directory) / CONFIG_FILE
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
    files = files_directory(directory)
    header = read_header(files)
    config_path, model_path = files / CONFIG_FILE, files / MODEL_FILE
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
    directory = files_directory(path)  # the current version's config.json, replaced on its own
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
    file = files_directory(path) / STATE_FILE
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
