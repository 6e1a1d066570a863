"""The ``memkd`` argument parser: every command, its options and its help.

Usage errors are one line (``memkd: error: ... (see --help)``, status 2); each parsed namespace
says which options the command line gave (``explicit``), so that ``--resume`` can tell a value
given equal to its default from the default.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable, Optional

from memkd.cli.checkpoints import cmd_export, cmd_predict, cmd_test
from memkd.cli.common import EXIT_USAGE
from memkd.cli.demo import DESCRIPTION as DEMO_DESCRIPTION
from memkd.cli.demo import cmd_demo
from memkd.cli.info import cmd_info
from memkd.cli.train import cmd_train


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
    train.add_argument(
        "--tile-stride",
        type=_positive_int,
        default=None,
        help="tile high-resolution images instead of resizing them: --image-size is the tile, cut from the "
        "full-resolution images (training: one seeded random tile per image per epoch; test/predict: every tile at "
        "this stride, stitched into a map at the image's own size). At most --image-size; 224 for 256 overlaps by "
        "1/8 of a tile. Stored in the checkpoint (test/predict need no option). Default: untiled",
    )
    train.add_argument(
        "--tile-blend",
        choices=("mean", "max"),
        default="mean",
        help="how overlapping tiles' maps combine (with --tile-stride): mean (averaged, no seams) or max (most sensitive)",
    )
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
    demo = _add_command(
        commands,
        "demo",
        cmd_demo,
        summary="train and compare MemKD and RD on texture photographs with synthetic defects",
        description=DEMO_DESCRIPTION,
    )
    demo.add_argument("--out", type=Path, default=Path("memkd-demo"), help="output folder (new, empty, or an earlier demo's)")
    demo.add_argument("--quick", action="store_true", help="tiny smoke version (one texture, 64x64, one epoch; about 10 s)")
    demo.add_argument(
        "--weights", default="auto", help="teacher weights: auto (ImageNet when cached or downloadable, else random), imagenet, none, or a file"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (data and training)")
    demo.add_argument("--download-timeout", type=float, default=20.0, help="seconds to wait for the ImageNet download")
    _add_common(demo)
    demo.set_defaults(workers=0)  # tiny images: loader processes would only compete for the cores
    return parser

