"""The ``memkd`` command line: train, test, predict, info and demo.

Every command prints ``memkd: error: <one line>`` and exits with status 1 on bad input (missing
paths, unknown categories, corrupt checkpoints, dataset layout errors, invalid settings); ``--debug``
shows the traceback instead. Usage errors exit with status 2, an interrupt with 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A failure whose message is meant for the user as it is."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: ``memkd: error: ... (see --help)``, and
    whose namespace says which options the command line gave: ``explicit``, the set of their dests
    (so that a value given equal to its default is told apart from the default)."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(EXIT_USAGE, f"memkd: error: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        defaults = [(action, action.default) for action in self._actions]
        saved_defaults = self._defaults
        try:  # parse again with no defaults: what is left was given
            for action, _ in defaults:
                action.default = argparse.SUPPRESS
            self._defaults = {}
            given, _ = super().parse_known_args(args, None)
        finally:
            for action, default in defaults:
                action.default = default
            self._defaults = saved_defaults
        own = {action.dest for action in self._actions if hasattr(given, action.dest)}
        parsed.explicit = own | getattr(given, "explicit", set())  # and those of the sub-command
        return parsed, extras


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for required options and those whose default None the help explains."""

    def _get_help_string(self, action):
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


# ---- argument helpers ---------------------------------------------------------------------------


def _number_type(convert: Callable[[str], Any], is_valid: Callable[[Any], bool], what: str,
                 what_valid: Optional[str] = None) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert(text)`` where ``is_valid`` accepts it; the errors say
    "expected <what>" (text not convertible) or "expected <what_valid>" (default: ``what``)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not is_valid(value):
            raise argparse.ArgumentTypeError(f"expected {what_valid or what}, got {text!r}")
        return value

    return parse


_positive_int = _number_type(int, lambda value: value > 0, "a positive integer")
_non_negative_int = _number_type(int, lambda value: value >= 0, "an integer >= 0")
_finite_float = _number_type(float, math.isfinite, "a number", "a finite number")


def _eval_size(text: str):
    from memkd.evaluation import parse_eval_size

    try:
        return parse_eval_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'input', 'native' or a positive integer, got {text!r}") from None


def _weights(text: str) -> Optional[str]:
    return None if text.lower() in ("none", "random") else text


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when available else "cpu"; other names are checked."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CommandError(f"device: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CommandError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise CommandError(f"device {name}: expected auto, cpu, cuda or cuda:N")
    return name


def _add_common(parser: argparse.ArgumentParser, device: bool = True, workers: bool = True) -> None:
    if device:
        parser.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    if workers:
        from memkd.data import default_workers

        parser.add_argument(
            "--workers", type=_non_negative_int, default=default_workers(), help="data loading processes (0: load in the main process)"
        )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eval-size",
        type=_eval_size,
        default="input",
        help="resolution of the pixel metrics: 'input' = the model's input size (256x256 by default; masks resized "
        "to it), 'native' = each mask's own resolution, or N for NxN",
    )
    parser.add_argument(
        "--threshold-mode",
        choices=("image", "pixel"),
        default="image",
        help="decision threshold stored with the checkpoint: F1-max over the test images' scores ('image') or over "
        "all test pixels ('pixel'); an image is anomalous when its score > threshold",
    )
    parser.add_argument("--figures", type=_non_negative_int, default=8, help="test images to draw as heatmap figures")


def _add_command(commands, name: str, handler, summary: str, description: str) -> argparse.ArgumentParser:
    """The sub-parser of ``memkd NAME``, which runs ``handler(args)``."""
    command = commands.add_parser(name, formatter_class=_Formatter, help=summary, description=description)
    command.set_defaults(handler=handler)
    return command


COMPILE_HELP = (
    "compiled inference, faster per image (benchmarks/README.md). On the CPU: a package compiled once (OpenVINO fp32 "
    "with the export extra installed, else AOTInductor at this batch size; under a minute for WideResNet50) and "
    "cached in CHECKPOINT/compiled/; later runs load it in seconds and use it even without --compile. On GPUs: "
    "torch.compile with frozen weights in this process"
)
EAGER_HELP = "plain PyTorch inference (MemKD.predict), not the cached compiled package that is otherwise used on the CPU"


def build_parser() -> argparse.ArgumentParser:
    from memkd.data import DATASET_NAMES
    from memkd.models import BACKBONES, METHODS

    parser = _Parser(
        prog="memkd",
        formatter_class=_Formatter,
        description="MemKD (memory-guided knowledge distillation, ICCV 2023) for unsupervised anomaly detection.",
        epilog="Run `memkd demo` for a CPU tour on texture photographs (a few minutes: see `memkd demo --help`); "
        "`memkd COMMAND --help` for details.",
    )
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks on errors")
    from memkd import __version__

    parser.add_argument("--version", action="version", version=f"memkd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    # train
    train = _add_command(
        commands,
        "train",
        cmd_train,
        summary="train a model on one category (or all), then evaluate it",
        description="Train on the normal training images of a category, save the checkpoint in --out, evaluate on the "
        "test split (metrics.json, metrics.md, figures/) and store the decision threshold in the checkpoint. With "
        "--category all, every category found under --data-root is trained into OUT/<category> and one results "
        "table (results.md, results.json, with the mean) is written to OUT. Defaults are the paper's recipe.",
    )
    train.add_argument("--dataset", choices=DATASET_NAMES, default="mvtec", help="dataset layout")
    train.add_argument(
        "--data-root", type=Path, default=None, help="the dataset's root folder (required, except with --resume of one run: the stored one)"
    )
    train.add_argument(
        "--category", default=None, help="category to train, or 'all' for every category under --data-root (folder datasets: none = the root itself)"
    )
    train.add_argument("--method", choices=sorted(METHODS), default="memkd", help="memkd (the paper), rd (RD4AD baseline), or an ablation")
    train.add_argument("--backbone", choices=sorted(BACKBONES), default="wide_resnet50_2", help="teacher network")
    train.add_argument(
        "--weights", type=_weights, default="imagenet", help="teacher weights: imagenet, another torchvision weight name, none (random init) or a .pth/.pt/.safetensors path"
    )
    train.add_argument("--image-size", type=_positive_int, default=256, help="input size (square, a multiple of 32)")
    train.add_argument("--memory-items", type=_positive_int, default=50, help="key-value pairs L per memory")
    train.add_argument("--exemplars", type=_positive_int, default=16, help="exemplar set size N per step (NEL)")
    train.add_argument("--epochs", type=_positive_int, default=100, help="training epochs")
    train.add_argument("--batch-size", type=_positive_int, default=16, help="batch size (training and evaluation)")
    train.add_argument("--lr", type=_finite_float, default=0.005, help="Adam learning rate")
    train.add_argument("--seed", type=_non_negative_int, default=0, help="random seed")
    train.add_argument("--save-every", type=_positive_int, default=10, help="checkpoint every this many epochs")
    train.add_argument("--amp", action="store_true", help="bf16 autocast")
    train.add_argument("--channels-last", action="store_true", help="NHWC convolutions (GPUs)")
    train.add_argument("--compile", action="store_true", help="torch.compile the training step and the test-set inference")
    train.add_argument(
        "--no-exemplar-cache",
        dest="cache_exemplar_features",
        action="store_false",
        help="re-encode every exemplar set with the teacher instead of keeping each image's features (3.7 MB per image with WideResNet50)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the checkpoint(s) in --out with the settings stored there; of the options, only --epochs, "
        "--save-every, --workers, --device, --channels-last, --compile and --no-exemplar-cache may change (the change "
        "is printed), a different model, data or other setting is an error",
    )
    train.add_argument("--out", type=Path, required=True, help="run directory (checkpoint and results)")
    _add_eval_options(train)
    _add_common(train)

    # test
    test = _add_command(
        commands,
        "test",
        cmd_test,
        summary="evaluate a checkpoint on a test split and store its decision threshold",
        description="Evaluate a checkpoint (a run directory, a file in it, or a `--category all` run directory) on "
        "the test split: metrics.json, metrics.md (table with the mean) and heatmap figures (image, ground truth, "
        "overlay) in the run directory or --out. The decision threshold is F1-max on the test images' scores by "
        "default (--threshold-mode pixel: pixel-level F1-max); it is stored in the checkpoint when the checkpoint "
        "was trained on the tested category. Dataset, category and data root default to those stored at training.",
    )
    test.add_argument("checkpoint", type=Path, help="run directory or checkpoint file")
    test.add_argument("--data-root", type=Path, default=None, help="dataset root (default: the one stored at training)")
    test.add_argument("--dataset", choices=DATASET_NAMES, default=None, help="dataset layout (default: stored)")
    test.add_argument("--category", default=None, help="category (default: stored)")
    test.add_argument("--batch-size", type=_positive_int, default=16, help="images per batch")
    test.add_argument("--out", type=Path, default=None, help="where to write the results (default: the run directory)")
    test.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    test.add_argument("--eager", action="store_true", help=EAGER_HELP)
    _add_eval_options(test)
    _add_common(test)

    # predict
    predict = _add_command(
        commands,
        "predict",
        cmd_predict,
        summary="score images with a checkpoint: heatmap overlays and a CSV of decisions",
        description="Score images (files, or folders searched recursively) in batches with one model load. Writes "
        "<name>_heatmap.png per image and predictions.csv (path, score, decision, threshold, heatmap) to --out. "
        "An image is anomalous when its score > threshold; the threshold comes from the checkpoint (stored by "
        "`memkd train` / `memkd test`) unless --threshold is given.",
    )
    predict.add_argument("checkpoint", type=Path, help="run directory, checkpoint file, or export directory (`memkd export`)")
    predict.add_argument("images", type=Path, nargs="+", help="image files or folders")
    predict.add_argument("--out", type=Path, required=True, help="output folder")
    predict.add_argument("--threshold", type=_finite_float, default=None, help="decision threshold (default: the checkpoint's)")
    predict.add_argument("--batch-size", type=_positive_int, default=16, help="images per batch")
    predict.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    predict.add_argument("--eager", action="store_true", help=EAGER_HELP)
    _add_common(predict)

    # export
    from memkd.deploy import FORMATS, INPUT_KINDS

    export = _add_command(
        commands,
        "export",
        cmd_export,
        summary="export a checkpoint for deployment: ONNX, OpenVINO or an AOTInductor package",
        description="Export the whole inference path (normalisation, teacher, student with memories, anomaly map, "
        "score, and the decision with the checkpoint's stored threshold) to --out, with memkd_export.json beside the "
        "model (input, mean/std, threshold, versions). ONNX and OpenVINO hold standard operators only and run with "
        "memkd.deploy (numpy, Pillow and the runtime; no torch); `memkd predict OUT` scores images with it. Needs "
        'the export extra: pip install "memkd[export]".',
    )
    export.add_argument("run_dir", type=Path, help="run directory (checkpoint) to export")
    export.add_argument("--format", choices=FORMATS, required=True, help="onnx, openvino (IR, fp32) or aoti (AOTInductor .pt2, fused memkd kernels)")
    export.add_argument("--out", type=Path, required=True, help="export directory (written to a temporary folder, then moved into place)")
    export.add_argument(
        "--input",
        choices=INPUT_KINDS,
        default="raw",
        help="what the exported model takes: raw = uint8 RGB [B, H, W, 3] at the input size (normalised inside the "
        "model); normalized = float32 [B, 3, H, W] already normalised with the model's mean/std",
    )
    export.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")

    # info
    info = _add_command(
        commands,
        "info",
        cmd_info,
        summary="versions, devices and the kernel backend of each op",
        description="Print the versions of memkd, torch, torchvision and triton, the devices, and which kernel "
        "backend serves each memkd op on each device and why (memkd.ops.backends()).",
    )
    info.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")

    # demo
    from memkd import demo

    demo_parser = _add_command(
        commands,
        "demo",
        cmd_demo,
        summary="train and compare MemKD and RD on texture photographs with synthetic defects",
        description=demo.DESCRIPTION,
    )
    demo.add_arguments(demo_parser)
    _add_common(demo_parser)
    demo_parser.set_defaults(workers=0)  # tiny images: loader processes would only compete for the cores
    return parser


# ---- commands -----------------------------------------------------------------------------------


def _print(*args: Any) -> None:
    print(*args, flush=True)


# `memkd train` options by what they set: MemKDConfig fields, TrainConfig fields, and the data.
MODEL_OPTIONS = ("method", "backbone", "weights", "image_size", "memory_items", "exemplars")
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
            _print("; ".join(notes))
            template = template or run
        for run in runs:
            if not run.resume:
                run.model_config, run.train_config = template.model_config, template.train_config
                _print(f"{run.run_dir}: no checkpoint yet; training it from the start with the settings of {template.run_dir}")
        return args.dataset, args.data_root, runs
    if not has_checkpoint(args.out):
        raise CommandError(
            f"--resume: {args.out} holds no checkpoint to resume (a run stopped before its first checkpoint saves "
            "none); train without --resume to start it"
        )
    dataset, data_root, category = _stored_data(args, args.out)
    model_config, train_config, notes = _stored_settings(args, args.out)
    _print("; ".join(notes))
    return dataset, data_root, [_Run(category, args.out, model_config, train_config, True)]


def cmd_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from memkd.data import build_dataset
    from memkd.evaluation import build_test_dataset, train_category, write_summary

    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out: {args.out} is a file, not a run directory")
    dataset, data_root, runs = _plan_runs(args)
    # Check every layout, and decode every image, before hours of training.
    for run in runs:
        for split in (
            build_dataset(dataset, data_root, run.category, "train", image_size=run.model_config.image_size),
            build_test_dataset(dataset, data_root, run.category, run.model_config, args.eval_size),
        ):
            split.check_files(run.train_config.workers, args.progress)
    results = {}
    for index, run in enumerate(runs):
        if len(runs) > 1:
            _print(f"[{index + 1}/{len(runs)}] {dataset}/{run.category} -> {run.run_dir}")
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
        _report_one(evaluation.report, run.run_dir)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return 0
    if len(runs) > 1:
        method = runs[0].model_config.method
        md, js = write_summary(args.out, results, f"memkd train: {dataset}, method {method}")
        _print("\n" + md.read_text())
        _print(f"results: {md} and {js}")
    return 0


def _report_one(report: dict, out_dir: Path) -> None:
    from memkd import reports

    _print(reports.metrics_table([(report["category"] or "test", report["metrics"])]).rstrip())
    threshold = report["threshold"]
    if threshold is not None:
        _print(f"decision threshold {threshold['value']:.6g} ({threshold['mode']} F1-max; {threshold['rule']})")
    _print(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'metrics.md'} and {len(report['figures'])} figure(s) in {out_dir / 'figures'}")


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

    predictor = predictor_for(checkpoint, resolve_device(args.device), args.batch_size, compile=args.compile, eager=args.eager)
    if predictor is not None:
        _print(f"inference: {predictor.description}")
    return predictor


def cmd_test(args: argparse.Namespace) -> int:
    from memkd.evaluation import build_test_dataset, evaluate_model, store_threshold, write_summary

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
        _report_one(evaluation.report, out_dir)
        trained_on = (extra.get("dataset"), extra.get("category"))
        if trained_on == (None, None) or trained_on == (dataset, category):
            if evaluation.report["threshold"] is not None:
                store_threshold(directory, evaluation.report)
                _print(f"stored the threshold in {directory / 'config.json'}")
        else:
            _print(
                f"not storing the threshold: the checkpoint was trained on {trained_on[0]}/{trained_on[1]}, "
                f"tested on {dataset}/{category}"
            )
    if multi:
        out = args.out or args.checkpoint
        md, js = write_summary(out, results, f"memkd test: {args.checkpoint}")
        _print("\n" + md.read_text())
        _print(f"results: {md} and {js}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from memkd.deploy import is_export_dir
    from memkd.evaluation import collect_images, predict_images

    if (args.out / "predictions.csv").is_file():
        _print(f"{args.out} holds the predictions.csv of an earlier run: it is replaced by this run's")
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
    from memkd.reports import folder_lock

    with folder_lock(args.out):  # as predict_images does: one writer per output folder
        csv_path, rows, threshold = predict_with_export(
            args.checkpoint, args.images, args.out, args.threshold, batch_size=args.batch_size, progress=args.progress
        )
    return _report_predictions(args, csv_path, rows, threshold, "the export")


def _report_predictions(args: argparse.Namespace, csv_path: Path, rows: list, threshold: float, stored_in: str) -> int:
    anomalous = sum(r["decision"] == "anomalous" for r in rows)
    errors = [r for r in rows if r["decision"] == "error"]
    source = "--threshold" if args.threshold is not None else stored_in
    _print(f"{len(rows)} image(s): {anomalous} anomalous, {len(rows) - anomalous - len(errors)} normal (threshold {threshold:.6g} from {source})")
    for row in errors:
        _print(f"could not read {row['path']}: {row['error']}")
    _print(f"wrote {csv_path} and {len(rows) - len(errors)} heatmap(s) in {args.out}")
    return 0 if not errors else EXIT_ERROR


def cmd_export(args: argparse.Namespace) -> int:
    from memkd.export import export_run

    out = export_run(args.run_dir, args.format, args.out, input_kind=args.input)
    _print(f"wrote the {args.format} export to {out} (input: {args.input}; see {out / 'memkd_export.json'})")
    return 0


def info_lines() -> list[str]:
    import platform

    import numpy
    import torch
    import torchvision

    import memkd
    from memkd.ops import backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"memkd        {memkd.__version__} ({Path(memkd.__file__).parent})",
        f"python       {platform.python_version()}",
        f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'} build)",
        f"torchvision  {torchvision.__version__}",
        f"triton       {triton_version}",
        f"numpy        {numpy.__version__}",
        "devices:",
        f"  cpu: {os.cpu_count()} core(s), torch uses {torch.get_num_threads()} thread(s)",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(
                f"  cuda:{index}: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB)"
            )
    else:
        lines.append("  cuda: not available")
    lines.append("kernel backends (memkd.ops.backends()):")
    for op, per_device in backends().items():
        lines.append(f"  {op}:")
        for device, why in per_device.items():
            lines.append(f"    {device + ':':6s}{why}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    _print("\n".join(info_lines()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from memkd import demo

    demo.run_from_args(args)
    return 0


# ---- entry point --------------------------------------------------------------------------------


def one_line(exc: BaseException) -> str:
    """The user-facing message of an exception, on one line. An error re-raised by a DataLoader
    worker carries the worker's traceback; its last line is the original error."""
    text = str(exc).strip()
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        prefix, _, rest = last.partition(": ")
        text = rest if rest and all(part.isidentifier() for part in prefix.split(".")) else last
    if isinstance(exc, KeyError) and text.startswith("'"):
        text = f"missing {text}"
    text = " ".join(text.split())
    if not text:
        text = type(exc).__name__
    elif not isinstance(exc, (CommandError, ValueError, OSError)):
        text = f"{type(exc).__name__}: {text}"
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (``memkd`` console script and ``python -m memkd``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help, --version and usage errors
            return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_USAGE)
        debug = bool(getattr(args, "debug", False))
        if hasattr(args, "no_progress"):
            args.progress = not args.no_progress
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("memkd: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:  # every failure ends in one line unless --debug
        if debug:
            traceback.print_exc()
        else:
            print(f"memkd: error: {one_line(exc)}", file=sys.stderr, flush=True)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
