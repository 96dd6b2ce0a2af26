"""The ``eexit`` command: small utilities around trained models."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
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
    from eexit.checkpoint import load_checkpoint

    loaded = load_checkpoint(args.checkpoint)
    Console().print({"spec": loaded.net.spec, "data": loaded.data, **loaded.extra})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eexit", description="Explainable early-exit image classification")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the registered networks").set_defaults(func=_models)
    info = sub.add_parser("info", help="show what a checkpoint holds (spec, data, calibration)")
    info.add_argument("checkpoint")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
