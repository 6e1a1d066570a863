"""The commands that take a checkpoint: ``memkd test`` (evaluate it, store its threshold),
``memkd predict`` (score image files with it or with an export) and ``memkd export``."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from memkd.cli.common import EXIT_ERROR, report_evaluation, say
from memkd.devices import resolve_device
from memkd.errors import CommandError


def find_checkpoints(path: Path) -> list[tuple[Optional[str], Path]]:
    """[(None, dir)] for a checkpoint (directory or a file in it); [(name, dir), ...] for a run
    directory of ``--category all`` holding one checkpoint per sub-folder."""
    from memkd.train.checkpoint import CONFIG_FILE, MODEL_FILE, STATE_FILE

    if not path.exists():
        raise FileNotFoundError(f"checkpoint: no such file or directory: {path}")
    if path.is_file():
        if path.name not in (CONFIG_FILE, MODEL_FILE, STATE_FILE):
            raise CommandError(
                f"checkpoint: {path} is not a memkd checkpoint (expected its directory, or its {CONFIG_FILE} or {MODEL_FILE})"
            )
        return [(None, path.parent)]
    if (path / CONFIG_FILE).is_file():
        return [(None, path)]
    runs = sorted(d for d in path.iterdir() if d.is_dir() and (d / CONFIG_FILE).is_file())
    if not runs:
        raise CommandError(f"checkpoint: no memkd checkpoint in {path} (no {CONFIG_FILE} there or in its sub-folders)")
    return [(d.name, d) for d in runs]


def _load(directory: Path, device: str):
    from memkd.train import load_checkpoint

    return load_checkpoint(directory, device=resolve_device(device))


def _cached_predictor(checkpoint, args: argparse.Namespace):
    """The cached compiled predictor for ``memkd test``/``predict`` on the CPU (memkd.compiled_cache), or None."""
    from memkd.compiled_cache import predictor_for

    if checkpoint.config.tiled:  # the cached package takes whole image_size inputs with the blur inside
        tiling = f"{checkpoint.config.image_size[0]}x{checkpoint.config.image_size[1]} tiles at stride {list(checkpoint.config.tile_stride)}"
        say(f"inference: tiled ({tiling}, {checkpoint.config.tile_blend} blend), "
            f"{'torch.compile' if args.compile else 'eager'} on the tiles")
        return None
    predictor = predictor_for(checkpoint, resolve_device(args.device), args.batch_size, compile=args.compile, eager=args.eager)
    if predictor is not None:
        say(f"inference: {predictor.description}")
    return predictor


def cmd_test(args: argparse.Namespace) -> int:
    from memkd.evaluation import build_test_dataset, evaluate_model
    from memkd.pipeline import store_tested_threshold
    from memkd.reports import write_summary

    found = find_checkpoints(args.checkpoint)
    multi = found[0][0] is not None
    if multi and args.category is not None:
        found = [(name, d) for name, d in found if name == args.category]
        if not found:
            raise CommandError(f"category {args.category!r}: no run for it in {args.checkpoint}")
    results = {}
    for name, directory in found:
        checkpoint = _load(directory, args.device)
        extra = checkpoint.extra
        dataset = args.dataset or extra.get("dataset")
        category = args.category if args.category is not None else extra.get("category")
        data_root = args.data_root or (Path(extra["data_root"]) if extra.get("data_root") else None)
        if dataset is None:
            raise CommandError(f"{directory}: the checkpoint does not say which dataset it was trained on; pass --dataset")
        if data_root is None:
            raise CommandError(f"{directory}: the checkpoint does not say where its data is; pass --data-root")
        test_set = build_test_dataset(dataset, data_root, category, checkpoint.config, args.eval_size)
        out_dir = directory if args.out is None else (args.out / name if multi else args.out)
        evaluation = evaluate_model(
            checkpoint.model,
            test_set,
            out_dir,
            dataset=dataset,
            category=category or "",
            eval_size=args.eval_size,
            threshold_mode=args.threshold_mode,
            figures=args.figures,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=args.progress,
            info={"checkpoint": str(directory.resolve()), "data_root": str(Path(data_root).resolve())},
            compile=args.compile,
            predictor=_cached_predictor(checkpoint, args),
        )
        results[category or name or Path(data_root).name] = evaluation.report
        report_evaluation(evaluation.report, out_dir)
        outcome = store_tested_threshold(directory, extra, dataset, category, evaluation.report)
        if outcome:
            say(outcome)
    if multi:
        out = args.out or args.checkpoint
        md, js = write_summary(out, results, f"memkd test: {args.checkpoint}")
        say("\n" + md.read_text())
        say(f"results: {md} and {js}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from memkd.deploy import is_export_dir
    from memkd.pipeline import collect_images, predict_images

    if (args.out / "predictions.csv").is_file():
        say(f"{args.out} holds the predictions.csv of an earlier run: it is replaced by this run's")
    if is_export_dir(args.checkpoint):
        return _predict_with_export(args)
    found = find_checkpoints(args.checkpoint)
    if found[0][0] is not None:
        raise CommandError(
            f"{args.checkpoint} holds one checkpoint per category ({', '.join(n for n, _ in found)}); pass one of them"
        )
    collect_images(args.images)  # fail on a missing path before loading the model
    directory = found[0][1]
    checkpoint = _load(directory, args.device)
    threshold = args.threshold if args.threshold is not None else checkpoint.extra.get("threshold")
    if threshold is None:
        raise CommandError(
            f"{directory}: the checkpoint has no decision threshold; run `memkd test {directory} --data-root DIR` "
            "to choose one, or pass --threshold"
        )
    csv_path, rows = predict_images(
        checkpoint.model,
        args.images,
        args.out,
        float(threshold),
        checkpoint.extra.get("heatmap_range"),
        batch_size=args.batch_size,
        workers=args.workers,
        progress=args.progress,
        compile=args.compile,
        predictor=_cached_predictor(checkpoint, args),
    )
    return _report_predictions(args, csv_path, rows, float(threshold), "the checkpoint")


def _predict_with_export(args: argparse.Namespace) -> int:
    """``memkd predict EXPORT_DIR``: the export's runtime scores the images (memkd.deploy)."""
    from memkd.export import predict_with_export
    from memkd.files import folder_lock

    with folder_lock(args.out):  # as predict_images does: one writer per output folder
        csv_path, rows, threshold = predict_with_export(
            args.checkpoint, args.images, args.out, args.threshold, batch_size=args.batch_size, progress=args.progress
        )
    return _report_predictions(args, csv_path, rows, threshold, "the export")


def _report_predictions(args: argparse.Namespace, csv_path: Path, rows: list, threshold: float, stored_in: str) -> int:
    anomalous = sum(r["decision"] == "anomalous" for r in rows)
    errors = [r for r in rows if r["decision"] == "error"]
    source = "--threshold" if args.threshold is not None else stored_in
    say(f"{len(rows)} image(s): {anomalous} anomalous, {len(rows) - anomalous - len(errors)} normal (threshold {threshold:.6g} from {source})")
    for row in errors:
        say(f"could not read {row['path']}: {row['error']}")
    say(f"wrote {csv_path} and {len(rows) - len(errors)} heatmap(s) in {args.out}")
    return 0 if not errors else EXIT_ERROR


def cmd_export(args: argparse.Namespace) -> int:
    from memkd.export import export_run

    out = export_run(args.run_dir, args.format, args.out, input_kind=args.input)
    say(f"wrote the {args.format} export to {out} (input: {args.input}; see {out / 'memkd_export.json'})")
    return 0
