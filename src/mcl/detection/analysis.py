"""Transfer analysis with plots: AP by IoU threshold and its gain over a baseline (the paper's Fig. 6), and the
spread of object scales of COCO-format datasets (Fig. 5: std 188.4 on COCO, 56.7 on ImageNet)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mcl.detection.fashion_canvas import object_scale_spread


def read_ap_by_iou(evaluation_file: str | Path) -> dict[float, float]:
    """``{IoU threshold: AP}`` from the ``evaluation.json`` that ``mcl-finetune`` writes."""
    evaluation = json.loads(Path(evaluation_file).read_text())
    return {float(t): ap for t, ap in evaluation["bbox"]["ap_by_iou"].items()}


def ap_gain(runs: Mapping[str, Mapping[float, float]], baseline: str) -> dict[str, dict[float, float]]:
    """Per run, AP minus the baseline's AP at each IoU threshold."""
    if baseline not in runs:
        raise KeyError(f"baseline {baseline!r} is not among the runs {list(runs)}")
    reference = runs[baseline]
    return {name: {t: ap - reference[t] for t, ap in curve.items()} for name, curve in runs.items() if name != baseline}


def ap_by_iou_figure(runs: Mapping[str, Mapping[float, float]], baseline: str) -> Figure:
    """Two panels: AP against the IoU threshold for every run, and each run's gain over ``baseline``.

    A plain :class:`~matplotlib.figure.Figure` (no pyplot state): a notebook shows it, scripts save it.
    """
    figure = Figure(figsize=(10, 4), layout="tight")
    left, right = figure.subplots(1, 2)
    for name, curve in runs.items():
        left.plot(list(curve), list(curve.values()), marker="o", label=name)
    gains = ap_gain(runs, baseline)
    width = 0.04 / max(1, len(gains))  # the bars of all runs share the 0.05 gap between thresholds
    for index, (name, curve) in enumerate(gains.items()):
        offset = (index - (len(gains) - 1) / 2) * width
        right.bar([t + offset for t in curve], list(curve.values()), width=width, label=name)
    left.set(xlabel="IoU threshold", ylabel="box AP", title="AP by IoU threshold")
    right.set(xlabel="IoU threshold", ylabel=f"AP gain over {baseline}", title="gain by IoU threshold")
    right.axhline(0, color="black", linewidth=0.8)
    for axis in (left, right):
        axis.legend()
    return figure


def scale_spread_figure(annotation_files: Mapping[str, str | Path]) -> Figure:
    """Histogram of object scales (``sqrt(area)``) per dataset, with each dataset's standard deviation."""
    figure = Figure(figsize=(6, 4), layout="tight")
    axis = figure.subplots()
    for name, path in annotation_files.items():
        scales = np.sqrt([a["area"] for a in json.loads(Path(path).read_text())["annotations"]])
        spread = object_scale_spread(path)
        axis.hist(scales, bins=30, alpha=0.6, label=f"{name} (std {spread['std']:.1f} px)")
    axis.set(xlabel="object scale sqrt(area) (px)", ylabel="objects", title="object scale spread")
    axis.legend()
    return figure


def plot_ap_by_iou(runs: Mapping[str, Mapping[float, float]], baseline: str, output: str | Path) -> Path:
    """:func:`ap_by_iou_figure` saved to ``output``."""
    ap_by_iou_figure(runs, baseline).savefig(output, dpi=120)
    return Path(output)


def plot_scale_spread(annotation_files: Mapping[str, str | Path], output: str | Path) -> Path:
    """:func:`scale_spread_figure` saved to ``output``."""
    scale_spread_figure(annotation_files).savefig(output, dpi=120)
    return Path(output)
