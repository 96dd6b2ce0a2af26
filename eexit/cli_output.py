"""Rich terminal output shared by the command-line entry points."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.table import Table

from eexit.types import ExitLevel


@contextmanager
def config_errors_exit() -> Iterator[None]:
    """In an entry point: a ``ConfigError`` (a bad key, named in the message), a mandatory key left
    unset (``???`` in the config), a missing file
    (a data folder, a checkpoint: the message names the path) or an unreadable image of an image
    folder (``bad_files=fail``: the message names it) ends the program with that one
    line on stderr and exit status 2, instead of a traceback under Hydra's
    "Error executing job" banner. In a multirun (``-m``) the error is left to Hydra, which
    reports it for that job and goes on with the others."""
    from omegaconf.errors import MissingMandatoryValue

    from eexit.config import ConfigError
    from eexit.data.image_folder import CorruptImageError

    try:
        yield
    except MissingMandatoryValue as err:  # a ??? in the config that the command line did not set
        if _in_multirun():
            raise
        key = err.full_key or "?"
        print_error(f"config key '{key}': has no value; set it on the command line ({key}=...)")
        raise SystemExit(2) from None
    # a bad key, a file a key names is missing, or a data file that cannot be read (its message
    # names the file and the reason)
    except (ConfigError, FileNotFoundError, CorruptImageError) as err:
        if _in_multirun():
            raise
        print_error(_own_message(err))
        raise SystemExit(2) from None


def _own_message(err: BaseException) -> str:
    """The exception's message; for one re-raised from a DataLoader worker (whose message is
    the worker's whole traceback), the message it had in the worker."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, the message as it is (see ``print_plain``)."""
    console = Console(stderr=True, soft_wrap=True)
    console.print("[red]error:[/red] ", end="")
    print_plain(message, console)


def print_plain(text: str, console: Console | None = None) -> None:
    """One line as it is: no rich markup (a path may hold [brackets]), no highlighting, no
    wrapping (a path stays on one line whatever the terminal width)."""
    (console or Console(soft_wrap=True)).print(text, markup=False, highlight=False)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


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


def print_router_table(summary: dict[str, dict], console: Console | None = None) -> None:
    """Print each calibrated router's knob, accuracy and FLOPs ratio (calibration split)."""
    table = Table(title="routers (knob fitted on the calibration split)")
    for col in ("router", "knob", "routed acc", "HEAVY acc", "FLOPs / HEAVY", "tiers T/L/M/H"):
        table.add_column(col, justify="right" if col != "router" else "left")
    for kind, s in summary.items():
        tiers = "/".join(f"{100 * f:.0f}%" for f in s["tier_fractions"])
        table.add_row(
            kind,
            f"{s['knob']:.3f}",
            f"{100 * s['accuracy']:.2f}%",
            f"{100 * s['accuracy_heavy']:.2f}%",
            f"{s['flops_ratio']:.3f}",
            tiers,
        )
    (console or Console()).print(table)


def print_eval_summary(metrics: dict, console: Console | None = None) -> None:
    """Print the headline evaluation figures: per exit, then per router (test split)."""
    console = console or Console()
    table = Table(title="exits (test split)")
    with_baseline = "baseline/test/acc/heavy" in metrics
    cols = ("exit", "acc", *(["baseline acc"] if with_baseline else []), "MFLOPs", "ms/img", "attn KL")
    for col in (*cols, "deletion AUC", "insertion AUC", "pointing (clutter)"):
        table.add_column(col, justify="left" if col == "exit" else "right")
    for lv in ExitLevel:
        k = lv.key

        def get(key: str, fmt: str = "{:.3f}") -> str:
            value = metrics.get(key)
            return "-" if value is None else fmt.format(value)

        table.add_row(
            lv.name,
            get(f"test/acc/{k}", "{:.2%}"),
            *([get(f"baseline/test/acc/{k}", "{:.2%}")] if with_baseline else []),
            get(f"test/mflops/{k}", "{:.2f}"),
            get(f"test/latency_ms/{k}", "{:.3f}"),
            get(f"consistency/kl/{k}"),
            get(f"faithfulness/deletion_auc/{k}"),
            get(f"faithfulness/insertion_auc/{k}"),
            get(f"cluttered/pointing_game/{k}", "{:.2%}"),
        )
    console.print(table)
    routed = any(f"routed/{kind}/accuracy" in metrics for kind in ("gate", "staged", "cascade"))
    table = Table(
        title="routing (knobs fitted on the calibration split)" if routed else "routing: no calibrated routers"
    )
    for col in ("", "acc", "FLOPs / HEAVY", "ms/img", "oracle saving", "tiers T/L/M/H"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row(
        "always HEAVY", f"{metrics['heavy/accuracy']:.2%}", "1.000", f"{metrics['heavy/latency_ms']:.3f}", "-", "-"
    )
    tiers = metrics["routing/tier_distribution"]
    for name in ("oracle", "gate", "staged", "cascade"):
        p = "oracle" if name == "oracle" else f"routed/{name}"
        if f"{p}/accuracy" not in metrics:
            continue
        saving = metrics.get(f"{p}/oracle_saving_fraction", 1.0)
        table.add_row(
            name,
            f"{metrics[f'{p}/accuracy']:.2%}",
            f"{metrics[f'{p}/flops_ratio']:.3f}",
            f"{metrics[f'{p}/latency_ms']:.3f}",
            f"{saving:.2f}",
            "/".join(f"{100 * f:.0f}%" for f in tiers[name]),
        )
    console.print(table)
