"""``memkd train``: plan the runs (one category, every category, or resuming stored ones with the
options given checked against the stored settings), check every image, then train and evaluate
each (``memkd.pipeline.train_category``)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Optional

from memkd.cli.common import report_evaluation, say
from memkd.devices import resolve_device
from memkd.errors import CommandError


# `memkd train` options by what they set: MemKDConfig fields, TrainConfig fields, and the data.
MODEL_OPTIONS = ("method", "backbone", "weights", "image_size", "memory_items", "exemplars", "tile_stride", "tile_blend")
TRAIN_OPTIONS = (
    "epochs", "batch_size", "lr", "seed", "save_every", "workers", "device", "amp", "channels_last", "compile",
    "cache_exemplar_features",
)


def _option(dest: str) -> str:
    """The command-line spelling of the ``memkd train`` option that sets ``dest``."""
    return {"cache_exemplar_features": "--no-exemplar-cache"}.get(dest, "--" + dest.replace("_", "-"))


def _train_config(args: argparse.Namespace, device: str):
    from memkd.train import TrainConfig

    settings = {dest: getattr(args, dest) for dest in TRAIN_OPTIONS}
    return TrainConfig(**{**settings, "device": device}, progress=args.progress)


def _model_config(args: argparse.Namespace):
    from memkd.models import MemKDConfig

    if "tile_blend" in args.explicit and args.tile_stride is None:
        raise CommandError("--tile-blend: only with --tile-stride (tiling is off without a stride)")
    if args.tile_stride is not None and args.tile_stride > args.image_size:
        raise CommandError(
            f"--tile-stride {args.tile_stride}: expected at most the tile, --image-size {args.image_size} (a larger "
            "stride leaves gaps between tiles)"
        )
    return MemKDConfig(**{dest: getattr(args, dest) for dest in MODEL_OPTIONS})


@dataclasses.dataclass
class _Run:
    """One category of ``memkd train``: where it trains, with what, and whether it resumes."""

    category: Optional[str]
    run_dir: Path
    model_config: Any
    train_config: Any
    resume: bool


def _stored_settings(args: argparse.Namespace, run_dir: Path):
    """(model config, train config, notes) of the checkpoint in ``run_dir`` with the options given
    on the command line applied: a changed model option, or a train option that a resumed run may
    not change, is an error; the notes list the changes made."""
    from memkd.models import MemKDConfig
    from memkd.train import RESUME_CHANGEABLE, TrainConfig, read_header, resume_changes

    header = read_header(run_dir)
    stored_model = MemKDConfig.from_dict(header["config"])
    for dest in (d for d in MODEL_OPTIONS if d in args.explicit):
        value = getattr(args, dest)
        try:
            same = dataclasses.replace(stored_model, **{dest: value}) == stored_model
        except ValueError:
            same = False
        if not same:
            raise CommandError(
                f"{_option(dest)} {value}: the run in {run_dir} was trained with {dest} {getattr(stored_model, dest)}, and "
                "a resumed run keeps its model; train into a new --out for another"
            )
    if not header.get("training"):
        raise CommandError(f"--resume: {run_dir} holds a checkpoint without training settings, not a training run")
    stored = TrainConfig.from_dict(header["training"])
    notes = []
    overrides = {dest: getattr(args, dest) for dest in TRAIN_OPTIONS if dest in args.explicit and dest != "device"}
    if "device" in args.explicit:
        overrides["device"] = resolve_device(args.device)
    elif stored.device is not None:
        try:
            resolve_device(stored.device)
        except CommandError as unavailable:
            overrides["device"] = resolve_device("auto")
            notes.append(f"device {overrides['device']} ({unavailable})")
    for dest, value in overrides.items():
        if dest not in RESUME_CHANGEABLE and value != getattr(stored, dest):
            changeable = ", ".join(_option(d) for d in TRAIN_OPTIONS if d in RESUME_CHANGEABLE)
            raise CommandError(
                f"{_option(dest)} {value}: the run in {run_dir} was trained with {getattr(stored, dest)}, and a resumed "
                f"run keeps it to continue the same training (it may change {changeable}); train into a new --out to "
                "change it"
            )
    requested = dataclasses.replace(stored, **overrides, progress=args.progress)
    changes = resume_changes(stored, requested, header.get("epoch") or 0)
    notes += [f"{_option(d)} {old} -> {new}" for d, (old, new) in changes.items() if d in TRAIN_OPTIONS and d in args.explicit]
    epoch = header.get("epoch") or 0
    where = f"at epoch {epoch} of {requested.epochs}" if epoch < requested.epochs else f"(all {epoch} epochs trained)"
    notes.insert(0, f"resuming {run_dir} {where} with its stored settings")
    return stored_model, requested, notes


def _stored_data(args: argparse.Namespace, run_dir: Path) -> tuple[str, Optional[Path], Optional[str]]:
    """(dataset, data root, category) of a resumed run: those stored in its checkpoint, unless
    given; another dataset or category than stored is an error."""
    from memkd.train import read_header

    extra = read_header(run_dir)["extra"]
    dataset, category = extra.get("dataset"), extra.get("category")
    for dest, stored in (("dataset", dataset), ("category", category)):
        if dest in args.explicit and "dataset" in extra and getattr(args, dest) != stored:
            raise CommandError(
                f"{_option(dest)} {getattr(args, dest)}: the run in {run_dir} trains on {dest} {stored}; "
                "train into a new --out for another"
            )
    data_root = args.data_root if args.data_root is not None else (Path(extra["data_root"]) if extra.get("data_root") else None)
    if data_root is None:
        raise CommandError(f"--data-root: the checkpoint in {run_dir} does not say where its data is; pass --data-root")
    return dataset if "dataset" in extra else args.dataset, data_root, category if "dataset" in extra else args.category


def _plan_runs(args: argparse.Namespace) -> tuple[str, Path, list[_Run]]:
    """(dataset, data root, runs) of ``memkd train``."""
    from memkd.data import discover_categories
    from memkd.train import has_checkpoint

    if not args.resume or args.category == "all":
        if args.data_root is None:
            raise CommandError("--data-root: required (it may be left out only with --resume of one run, which reads it from the checkpoint)")
        model_config, train_config = _model_config(args), _train_config(args, resolve_device(args.device))
        if args.category == "all":
            categories = discover_categories(args.dataset, args.data_root)
            if not categories:
                raise CommandError(f"no {args.dataset} categories found under {args.data_root}")
        else:
            categories = [args.category]
        runs = [_Run(c, args.out / c if args.category == "all" else args.out, model_config, train_config, False) for c in categories]
        if not args.resume:
            return args.dataset, args.data_root, runs
        # --category all --resume: continue each category that has a checkpoint; a category that
        # has none yet starts with the settings of the first one that does
        started = [run for run in runs if has_checkpoint(run.run_dir)]
        if not started:
            raise CommandError(f"--resume: no checkpoint under {args.out} to resume; train without --resume to start")
        template = None
        for run in started:
            run.model_config, run.train_config, notes = _stored_settings(args, run.run_dir)
            run.resume = True
            say("; ".join(notes))
            template = template or run
        for run in runs:
            if not run.resume:
                run.model_config, run.train_config = template.model_config, template.train_config
                say(f"{run.run_dir}: no checkpoint yet; training it from the start with the settings of {template.run_dir}")
        return args.dataset, args.data_root, runs
    if not has_checkpoint(args.out):
        raise CommandError(
            f"--resume: {args.out} holds no checkpoint to resume (a run stopped before its first checkpoint saves "
            "none); train without --resume to start it"
        )
    dataset, data_root, category = _stored_data(args, args.out)
    model_config, train_config, notes = _stored_settings(args, args.out)
    say("; ".join(notes))
    return dataset, data_root, [_Run(category, args.out, model_config, train_config, True)]


def cmd_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from memkd.evaluation import build_test_dataset
    from memkd.pipeline import build_train_dataset, train_category
    from memkd.reports import write_summary

    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out: {args.out} is a file, not a run directory")
    dataset, data_root, runs = _plan_runs(args)
    # Check every layout, and decode every image, before hours of training.
    for run in runs:
        for split in (
            build_train_dataset(dataset, data_root, run.category, run.model_config, run.train_config.seed),
            build_test_dataset(dataset, data_root, run.category, run.model_config, args.eval_size),
        ):
            split.check_files(run.train_config.workers, args.progress)
    results = {}
    for index, run in enumerate(runs):
        if len(runs) > 1:
            say(f"[{index + 1}/{len(runs)}] {dataset}/{run.category} -> {run.run_dir}")
        evaluation = train_category(
            dataset,
            data_root,
            run.category,
            run.run_dir,
            None if run.resume else run.model_config,
            run.train_config,
            resume=run.resume,
            eval_size=args.eval_size,
            threshold_mode=args.threshold_mode,
            figures=args.figures,
            progress=args.progress,
        )
        if evaluation is None:  # a non-main process of a distributed run
            continue
        results[run.category or Path(data_root).name] = evaluation.report
        report_evaluation(evaluation.report, run.run_dir)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return 0
    if len(runs) > 1:
        method = runs[0].model_config.method
        md, js = write_summary(args.out, results, f"memkd train: {dataset}, method {method}")
        say("\n" + md.read_text())
        say(f"results: {md} and {js}")
    return 0

