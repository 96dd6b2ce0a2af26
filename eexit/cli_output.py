"""Rich terminal output shared by the command-line entry points."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from eexit.types import ExitLevel


def print_exit_table(
    metrics: dict[str, float], title: str = "per-exit accuracy", console: Console | None = None
) -> None:
    """Print val/test accuracy and attention KL of every exit as a table."""
    table = Table(title=title)
    table.add_column("exit")
    splits = [s for s in ("val", "test") if any(k.startswith(f"{s}/acc/") for k in metrics)]
    for s in splits:
        table.add_column(f"{s} acc", justify="right")
        table.add_column(f"{s} attn KL", justify="right")
    for lv in ExitLevel:
        row = [lv.name]
        for s in splits:
            acc = metrics.get(f"{s}/acc/{lv.key}")
            kl = metrics.get(f"{s}/attn_kl/{lv.key}")
            row += [f"{100 * acc:.2f}%" if acc is not None else "-", f"{kl:.4f}" if kl is not None else "-"]
        table.add_row(*row)
    (console or Console()).print(table)
