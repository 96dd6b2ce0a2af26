"""One self-contained ``report.html``: tables from the metrics and every PNG inline as a base64
data URI, so the file opens offline and can be mailed on its own."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from eexit.routing.features import FEATURE_NAMES
from eexit.types import ExitLevel

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.4em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:0.4em 0}
.note{color:#666;font-size:0.9em}h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:1.6em}
"""


def image_tag(path: Path, alt: str) -> str:
    """``<img>`` with the PNG inline as ``data:image/png;base64,...``."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(value, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"
    return html.escape(str(value))


def table(header: Sequence[str], rows: Sequence[Sequence], digits: int = 4) -> str:
    """A plain HTML table (values escaped)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v, digits)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


@dataclass
class MetricTable:
    """One table of the report (and of W&B): a title, column names, rows and a note."""

    title: str
    header: list[str]
    rows: list[list]
    note: str = ""

    @property
    def slug(self) -> str:
        """The title as a short key, e.g. ``"fixed_exits"``."""
        return re.sub(r"[^a-z0-9]+", "_", self.title.lower().split("(")[0].split(":")[0]).strip("_")

    def to_html(self) -> str:
        note = f'<p class="note">{html.escape(self.note)}</p>' if self.note else ""
        return table(self.header, self.rows) + note


def metric_tables(metrics: Mapping) -> list[MetricTable]:
    """Every table of the report, built from the metrics (missing sections are left out)."""
    m = metrics
    early = list(ExitLevel)[:-1]
    out = []
    with_baseline = "baseline/test/acc/heavy" in m  # a second checkpoint: its accuracy side by side
    rows = [
        [
            lv.name,
            _pct(m[f"test/acc/{lv.key}"]),
            *([_pct(m[f"baseline/test/acc/{lv.key}"])] if with_baseline else []),
            m[f"test/mflops/{lv.key}"],
            m[f"test/flops_ratio/{lv.key}"],
            m[f"test/latency_ms/{lv.key}"],
        ]
        for lv in ExitLevel
    ]
    header = ["exit", "accuracy", *(["baseline accuracy"] if with_baseline else []), "MFLOPs", "FLOPs / HEAVY"]
    out.append(MetricTable("Fixed exits", [*header, "ms / image"], rows))
    rows = [["always HEAVY", _pct(m["heavy/accuracy"]), m["heavy/mflops"], 1.0, m["heavy/latency_ms"], "-", "-"]]
    rows.append(
        [
            "oracle",
            _pct(m["oracle/accuracy"]),
            m["oracle/mflops"],
            m["oracle/flops_ratio"],
            m["oracle/latency_ms"],
            "-",
            1.0,
        ]
    )
    for kind in ("gate", "staged", "cascade"):
        p = f"routed/{kind}"
        if f"{p}/accuracy" in m:
            rows.append(
                [
                    kind,
                    _pct(m[f"{p}/accuracy"]),
                    m[f"{p}/mflops"],
                    m[f"{p}/flops_ratio"],
                    m[f"{p}/latency_ms"],
                    m[f"{p}/knob"],
                    m[f"{p}/oracle_saving_fraction"],
                ]
            )
    out.append(
        MetricTable(
            "Routed inference",
            ["", "accuracy", "MFLOPs", "FLOPs / HEAVY", "ms / image", "knob", "oracle saving"],
            rows,
            "Routers at the knob fitted on the calibration split; MFLOPs and ms per tier include the router; "
            "latency: see the latency line above. Last column: share of the oracle's FLOPs saving achieved.",
        )
    )
    rows = [[name] + [_pct(f) for f in frac] for name, frac in m["routing/tier_distribution"].items()]
    for k in ("gate", "staged"):
        if f"routing/{k}/tier_accuracy" in m:
            rows.append([f"{k}: agreement with the oracle tier", _pct(m[f"routing/{k}/tier_accuracy"]), "", "", ""])
    out.append(MetricTable("Tier distribution", ["", *[lv.name for lv in ExitLevel]], rows))
    ranges = m.get("routing/tier_feature_ranges", {})
    if ranges:  # none without calibrated routers
        rows = [
            [f]
            + [
                ("-" if t not in ranges else f"{ranges[t][f][0]:.3g} .. {ranges[t][f][1]:.3g}")
                for t in (lv.key for lv in ExitLevel)
            ]
            for f in FEATURE_NAMES
        ]
        out.append(
            MetricTable(
                "Typical TINY features per routed tier (10th-90th percentile, one-shot gate)",
                ["feature", *[lv.name for lv in ExitLevel]],
                rows,
            )
        )
    for prefix, label in (("consistency", "this model"), ("baseline/consistency", "baseline (second checkpoint)")):
        if f"{prefix}/kl/tiny" not in m:
            continue
        # the IoU key names the top fraction used (eval.top_fraction): iou_top20 by default
        iou = next((k.split("/")[-2] for k in m if k.startswith(f"{prefix}/iou_top") and k.endswith("/tiny")), None)
        rows = [
            [lv.name, m[f"{prefix}/kl/{lv.key}"], m[f"{prefix}/cosine/{lv.key}"]]
            + ([m[f"{prefix}/{iou}/{lv.key}"]] if iou else [])
            for lv in early
        ]
        iou_header = [f"IoU top-{iou.removeprefix('iou_top')}%"] if iou else []
        out.append(
            MetricTable(
                f"Attention consistency with HEAVY: {label}",
                ["exit", "KL (lower better)", "cosine", *iou_header],
                rows,
            )
        )
    for prefix, label in (("", ""), ("baseline/", ": baseline (second checkpoint)")):
        if f"{prefix}faithfulness/deletion_auc/tiny" not in m:
            continue
        rows = [
            [lv.name]
            + [
                m[f"{prefix}faithfulness/{k}/{lv.key}"]
                for k in ("deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random")
            ]
            for lv in ExitLevel
        ]
        out.append(
            MetricTable(
                f"Explanation faithfulness (Grad-CAM of each exit's prediction){label}",
                ["exit", "deletion AUC", "deletion, random map", "insertion AUC", "insertion, random map"],
                rows,
                "Deletion: lower is better; insertion: higher is better; random maps for reference.",
            )
        )
    rows = [
        [
            k,
            m[f"gate_explanation/{k}/infidelity"],
            m[f"gate_explanation/{k}/sensitivity_max"],
            m[f"gate_explanation/{k}/completeness_delta_max"],
        ]
        for k in ("gate", "staged")
        if f"gate_explanation/{k}/infidelity" in m
    ]
    if rows:
        out.append(
            MetricTable(
                "Gate explanations (Captum metrics)",
                ["router", "infidelity", "max-sensitivity", "max completeness gap"],
                rows,
                "Infidelity: features set to the baseline in random subsets; max-sensitivity: features moved "
                f"within {m.get('gate_explanation/perturb_radius', 0.1):g} standard deviations. Lower is better for both.",
            )
        )
    out += localisation_tables(m)
    return out


def localisation_tables(m: Mapping) -> list[MetricTable]:
    """The cluttered-scene tables (this model, and the baseline when evaluated): one IoU column
    per configured top fraction (``eval.cluttered.fractions``), dice / precision / recall at 20%
    (or the middle fraction when 20% is not configured)."""
    out: list[MetricTable] = []
    kept = sorted({int(hit.group(1)) for key in m if (hit := re.fullmatch(r"cluttered/iou@(\d+)/tiny", key))})
    one = 20 if 20 in kept else (kept[len(kept) // 2] if kept else 20)  # dice, precision, recall at one k
    cols = [
        "acc",
        "pointing_game",
        "energy",
        *(f"iou@{k}" for k in kept),
        *(f"{name}@{one}" for name in ("dice", "precision", "recall")),
    ]
    for prefix, label in (("", ""), ("baseline/", ": baseline (second checkpoint)")):
        if f"{prefix}cluttered/acc/tiny" not in m:
            continue
        rows = [[lv.name] + [m.get(f"{prefix}cluttered/{c}/{lv.key}", "-") for c in cols] for lv in ExitLevel]
        out.append(
            MetricTable(
                f"Localisation on cluttered scenes{label}",
                ["exit", *cols],
                rows,
                "The cluttered layout is synthetic: real test objects pasted on larger canvases with distractors, "
                "texture and reduced contrast. Maps explain the target's class; @k = top k% of pixels kept. "
                f"Targets cover {m.get('cluttered/mask_fraction', float('nan')):.1%} of the canvas on average: "
                "the pointing game and energy a random map would score. acc: classification of the scenes, "
                "which a network trained on centred single objects is not expected to manage.",
            )
        )
    return out


def write_report(
    path: Path, metrics: Mapping, figures: Mapping[str, Path], title: str, meta: Mapping[str, str]
) -> Path:
    """Write the report.

    Args:
        path: the HTML file to write.
        metrics: the evaluation metrics.
        figures: ``{caption: png path}`` in display order.
        title: page title.
        meta: facts shown at the top (checkpoint, data, images evaluated, ...).
    """
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>")
    parts.append(table(["", ""], [[k, v] for k, v in meta.items()]))
    for t in metric_tables(metrics):
        parts.append(f"<h2>{html.escape(t.title)}</h2>{t.to_html()}")
    parts.append("<h2>Figures</h2>")
    for caption, png in figures.items():
        parts.append(f"<h3>{html.escape(caption)}</h3>{image_tag(png, caption)}")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
