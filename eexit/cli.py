"""The ``eexit`` command: small utilities around trained models."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _models(args: argparse.Namespace) -> int:
    from eexit.models import create_model, list_models

    table = Table(title="registered models")
    for col in ("name", "params (10 classes, RGB)", "stage widths"):
        table.add_column(col)
    for name in list_models():
        net = create_model(name, num_classes=10, in_chans=3)
        widths = ", ".join(str(f["num_chs"]) for f in net.backbone.feature_info)
        table.add_row(name, f"{sum(p.numel() for p in net.parameters()):,}", widths)
    Console().print(table)
    return 0


def _info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from eexit.checkpoint import load_checkpoint

    if Path(args.checkpoint).is_dir():  # a bundle: verified (weights' hash, spec) as predict loads it
        from eexit.bundle import load_bundle

        bundle = load_bundle(args.checkpoint)
        Console().print(bundle.manifest)
        Console(stderr=True).print(f"bundle verified: weights sha256 {bundle.manifest['weights']['sha256'][:12]}")
        return 0
    loaded = load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    Console().print({"spec": loaded.net.spec, "data": loaded.data, **loaded.extra})
    return 0


def _export(args: argparse.Namespace) -> int:
    from eexit.bundle import export_bundle

    if args.onnx:  # before anything is written: a bundle without its asked-for pieces is half a result
        from eexit.serve.onnx import require_onnx

        require_onnx()
    out = export_bundle(args.checkpoint, args.out_dir, serve=args.router, trust=args.trust_checkpoint)
    Console(stderr=True).print(f"bundle written to [bold]{escape(str(out))}[/bold]")
    if args.onnx:
        from eexit.serve.onnx import export_onnx

        Console(stderr=True).print(f"ONNX pieces written to [bold]{escape(str(export_onnx(out)))}[/bold]")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import json
    import warnings

    import torch
    from PIL import Image
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from eexit.bundle import load_bundle
    from eexit.serve.images import expand_inputs
    from eexit.serve.predict import predict_rows, serving_device

    # the image loader logs a warning that names the file instead (Pillow's does not)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    device = serving_device(args.device)
    bundle = load_bundle(args.bundle, map_location=device)
    paths = expand_inputs(args.inputs)
    err = Console(stderr=True)
    costs = bundle.calibration.tier_costs.get(args.router or bundle.serve_router, [])
    timed_on = {torch.device(c.device).type for c in costs}
    if timed_on and timed_on != {device.type}:
        err.print(
            f"[yellow]note: the rows' latency_ms were measured on {', '.join(sorted(timed_on))} at calibration; "
            f"this run uses {device}[/yellow]"
        )
    # no bar where the rows themselves go to a terminal (they show the progress, and would be
    # interleaved with the bar's redraws); with --explain, whose figures take a while, from 2 inputs
    many = len(paths) > (1 if args.explain else args.batch_size)
    show = not args.no_progress and many and not sys.stdout.isatty()
    failed = 0
    progress = Progress(
        TextColumn("predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not show,
        # the rows are written to stdout itself: by default rich's live display takes sys.stdout
        # over and prints what is written to it on its own console (stderr here), so on a
        # terminal every row went to stderr and `> rows.jsonl` stayed empty
        redirect_stdout=False,
        redirect_stderr=False,
    )
    with progress:
        task = progress.add_task("predict", total=len(paths))
        rows = predict_rows(
            bundle,
            paths,
            router=args.router,
            batch_size=args.batch_size,
            force_tier=args.tier,
            explain_dir=args.explain,
            attributions=not args.no_attributions,
            on_batch=lambda n: progress.advance(task, n),
        )
        encoder = json.JSONEncoder(allow_nan=False)  # one encoder: json.dumps builds one per call
        for row in rows:
            failed += "error" in row or "explanation_error" in row
            sys.stdout.write(encoder.encode(row) + "\n")
    sys.stdout.flush()
    if failed:
        err.print(
            f"[yellow]{failed} of {len(paths)} inputs could not be used or explained "
            "(see their 'error' / 'explanation_error' fields)[/yellow]"
        )
    return 1 if failed else 0


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _exit_name(text: str) -> str:
    """argparse type: an exit name (any case) or index -> its lower-case key."""
    from eexit.types import ExitLevel

    try:
        # ASCII digits only: str.isdigit() also takes "²" (which int() refuses) and "３"
        return ExitLevel.parse(int(text) if text.isascii() and text.isdigit() else text).key
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


TRUST_HELP = (
    "unpickle any object the checkpoint holds (by default only tensors, optimizer settings and "
    "random states are: a crafted checkpoint can run code); only for files from a trusted source"
)


def build_parser() -> argparse.ArgumentParser:
    from eexit.types import ROUTER_KINDS

    parser = argparse.ArgumentParser(prog="eexit", description="Explainable early-exit image classification")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the registered networks").set_defaults(func=_models)
    info = sub.add_parser("info", help="show what a checkpoint or a bundle holds (spec, data, calibration)")
    info.add_argument("checkpoint", help="a checkpoint file or a bundle directory")
    info.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    info.set_defaults(func=_info)
    export = sub.add_parser(
        "export", help="write a serving bundle (safetensors + bundle.json) of a calibrated checkpoint"
    )
    export.add_argument("checkpoint")
    export.add_argument("out_dir")
    export.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    export.add_argument("--router", default="gate", choices=sorted(ROUTER_KINDS), help="router served by default")
    export.add_argument("--onnx", action="store_true", help="also write ONNX pieces to OUT_DIR/onnx (the onnx extra)")
    export.set_defaults(func=_export)
    predict = sub.add_parser("predict", help="route images through a bundle; one JSON line per input on stdout")
    predict.add_argument("--bundle", required=True, help="bundle directory (from `eexit export` or train.py)")
    predict.add_argument("inputs", nargs="+", help="image files, folders (recursive) or globs")
    predict.add_argument(
        "--router", default=None, choices=sorted(ROUTER_KINDS), help="router kind (default: the bundle's served router)"
    )
    predict.add_argument(
        "--tier", default=None, type=_exit_name, help="force every image to this exit (tiny, light, medium, heavy)"
    )
    predict.add_argument(
        "--explain", default=None, metavar="OUT", help="write cam overlay, radar and attribution charts here"
    )
    predict.add_argument("--device", default="cpu", help="where the network runs: cpu (default), cuda, cuda:N or mps")
    predict.add_argument("--batch-size", type=_positive_int, default=256, help="images per routed batch")
    predict.add_argument("--no-attributions", action="store_true", help="skip the Captum attributions")
    predict.add_argument("--no-progress", action="store_true", help="never show the progress bar")
    predict.set_defaults(func=_predict)
    return parser


class _Terminated(BaseException):
    """SIGTERM arrived (``kill``, a job scheduler, ``timeout``). A ``BaseException``, as
    ``KeyboardInterrupt`` is: the per-image ``except Exception`` that keeps the other inputs'
    results would otherwise catch it as one image's error and go on."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM's default action ends the process at once, losing the rows still in stdout's buffer
    # (up to 8 KB when it is a file or a pipe) and possibly cutting a line; raised here, the
    # rows written so far are flushed whole, as for Ctrl-C
    # (only where nobody else handles SIGTERM, and only from the main thread, as Python requires)
    ours = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if ours else None
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: the rows written so far stand; no traceback
        sys.stderr.write("interrupted\n")
        return 130
    except _Terminated:
        sys.stderr.write("terminated\n")
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # the reader went away (`eexit predict ... | head`): stop quietly
        # Python's recipe: point stdout at devnull so that the interpreter's final flush is silent
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OSError, ValueError, ImportError) as err:  # a missing or unusable file, a bad value
        from eexit.cli_output import print_error  # rich and eexit.types only: no torch, no Hydra

        print_error(str(err))  # a path may hold [brackets]: printed as it is
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
