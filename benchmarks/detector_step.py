"""What a detector's training step and evaluation batch cost (``python -m benchmarks.detector_step``).

The C4 R-CNNs run res5 on every sampled RoI, so on small images their head, not the trunk, sets the cost. This
times one training step (forward, backward, SGD) and one evaluation batch of each detector the transfer benchmark
can fine-tune, on its canvas size and batch, with the C4 head at detectron2's 14x14 RoIs and at the benchmark's CPU
sizing (``model.roi_pool_size=7``, 16 RoIs per image). Every row is timed in the same run, so the ratios to the
first row hold on the machine that printed them. Writes ``benchmarks/results/detector_step.md``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.cost import add_device_option, check_device, clock
from mcl.detection.models import build_detector

# name -> build_detector options beyond the shared ones (R18, 96 px, 10 classes, the benchmark's proposals).
VARIANTS = {
    "fasterrcnn_v2, backbone frozen, 32 RoIs": dict(arch="fasterrcnn_v2", frozen_stages=5, rois_per_image=32),
    "fasterrcnn_c4, res5 trained, 32 RoIs of 14x14": dict(arch="fasterrcnn_c4", frozen_stages=4, rois_per_image=32),
    "fasterrcnn_c4, res5 trained, 32 RoIs of 7x7": dict(
        arch="fasterrcnn_c4", frozen_stages=4, rois_per_image=32, roi_pool_size=7
    ),
    "fasterrcnn_c4, res5 trained, 16 RoIs of 7x7": dict(
        arch="fasterrcnn_c4", frozen_stages=4, rois_per_image=16, roi_pool_size=7
    ),
    "maskrcnn_c4, res5 trained, 32 RoIs of 14x14": dict(arch="maskrcnn_c4", frozen_stages=4, rois_per_image=32),
    "maskrcnn_c4, res5 trained, 16 RoIs of 7x7": dict(
        arch="maskrcnn_c4", frozen_stages=4, rois_per_image=16, roi_pool_size=7
    ),
}


def batch(size: int, canvas: int, device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``size`` random canvases, each with two boxed and masked objects (a quarter and a ninth of the canvas)."""
    images, targets = [], []
    for _ in range(size):
        boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.8, 0.5]]) * canvas
        masks = torch.zeros(2, canvas, canvas, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
            mask[y0:y1, x0:x1] = 1
        images.append(torch.rand(3, canvas, canvas, device=device))
        targets.append(
            {"boxes": boxes.to(device), "labels": torch.tensor([1, 2], device=device), "masks": masks.to(device)}
        )
    return images, targets


def time_variant(options: dict, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """Median seconds of a training step and of an evaluation batch (after ``args.warmup`` untimed steps)."""
    torch.manual_seed(0)
    detector = build_detector(
        backbone="resnet18", num_classes=11, min_size=args.canvas, max_size=args.canvas, anchor_base_size=16,
        proposals_train=200, proposals_test=50, fpn_channels=64, image_mean=[0.286] * 3, image_std=[0.353] * 3,
        **options,
    ).to(device)  # fmt: skip
    images, targets = batch(args.batch_size, args.canvas, device)
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    steps = []
    detector.train()
    for step in range(args.warmup + args.repeats):
        started = clock(device)
        loss = sum(detector(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= args.warmup:
            steps.append(clock(device) - started)
    evaluations = []
    detector.eval()
    with torch.no_grad():
        for step in range(1 + args.repeats):
            started = clock(device)
            detector(images)
            if step:
                evaluations.append(clock(device) - started)
    return statistics.median(steps), statistics.median(evaluations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_option(parser, "timing device")
    parser.add_argument("--canvas", type=int, default=96, help="canvas side in pixels (the transfer benchmark's 96)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step (the transfer benchmark's 4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per detector (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "detector_step.md")
    args = parser.parse_args()
    check_device(parser, args)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    rows = {name: time_variant(options, args, device) for name, options in VARIANTS.items()}
    first_step, first_eval = next(iter(rows.values()))
    command = shlex.join(["python", "-m", "benchmarks.detector_step", *sys.argv[1:]])
    lines = [
        "# Detector step cost",
        "",
        f"Produced by `{command}` on {where}: ResNet-18, batch "
        f"{args.batch_size} of {args.canvas} px canvases with 2 objects each, 200/50 RPN proposals (train/test), "
        f"median of {args.repeats} steps after {args.warmup} untimed ones; ratios to the first row, same run.",
        "",
        "| detector | train step s | vs first | eval batch s | vs first |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, (step, evaluation) in rows.items():
        lines.append(
            f"| {name} | {step:.2f} | {step / first_step:.1f}x | {evaluation:.2f} | {evaluation / first_eval:.1f}x |"
        )
    table = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
