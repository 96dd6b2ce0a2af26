"""Grad-CAM speed: our four cams from one forward pass vs Captum's LayerGradCam exit by exit.

Prints one JSON object on its last line:
    speedup_vs_captum  Captum (4 exits, one attribute call each) time / our time
    cam_overhead       (our forward with four cams - plain forward with four logits) / plain
    max_abs_diff       largest difference of the per-image normalised maps, all exits
Same model, batch and process; timings by torch.utils.benchmark (median).
"""

from __future__ import annotations

import argparse

import torch
from _common import emit, machine
from captum.attr import LayerGradCam
from torch.utils import benchmark

from eexit.explain.gradcam import normalize_per_image
from eexit.models import create_model
from eexit.types import ExitLevel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet_narrow")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--chans", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=2.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    # the default CPU model (as conf/model/narrow.yaml builds it), random weights, eval mode
    net = create_model(
        args.model,
        num_classes=10,
        in_chans=args.chans,
        stem_stride=2,
        strides=(1, 2, 2, 1),
        head="mlp",
        head_conv=(96, 0, 0, 0),
        head_conv_stride=2,
    ).eval()
    x = torch.randn(args.batch, args.chans, args.size, args.size)

    with torch.no_grad():
        ours = net(x, with_cams=True)
    targets = [ours.logits[k].argmax(1) for k in ExitLevel]
    captum = [LayerGradCam(lambda inp, k=k: net(inp).logits[k], net.cam_layer(k)) for k in ExitLevel]

    def run_captum() -> list[torch.Tensor]:
        return [
            c.attribute(x, target=t, relu_attributions=True).squeeze(1) for c, t in zip(captum, targets, strict=True)
        ]

    ref = run_captum()
    max_abs_diff = max(
        float((normalize_per_image(a) - normalize_per_image(b)).abs().max())
        for a, b in zip(ours.cams, ref, strict=True)
    )

    def timed(stmt: str) -> float:
        # with torch's own thread count (Timer runs one thread unless told), as machine() reports
        t = benchmark.Timer(
            stmt=stmt,
            globals={"net": net, "x": x, "torch": torch, "run_captum": run_captum},
            num_threads=torch.get_num_threads(),
        )
        return t.blocked_autorange(min_run_time=args.min_run_time).median

    t_plain = timed("with torch.no_grad(): net(x)")
    t_ours = timed("with torch.no_grad(): net(x, with_cams=True)")
    t_captum = timed("run_captum()")
    emit(
        {
            "speedup_vs_captum": t_captum / t_ours,
            "cam_overhead": (t_ours - t_plain) / t_plain,
            "max_abs_diff": max_abs_diff,
            "ms_plain_forward": 1e3 * t_plain,
            "ms_ours_four_cams": 1e3 * t_ours,
            "ms_captum_four_cams": 1e3 * t_captum,
            "batch": args.batch,
            "model": args.model,
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
