"""Transfer analysis with plots: AP by IoU threshold and its gain over a baseline (the paper's Fig. 6), and the
spread of object scales of COCO-format datasets (Fig. 5: std 188.4 on COCO, 56.7 on ImageNet)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mcl.detection.coco import read_annotation_file
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
    return ap_by_iou_seeds_figure({name: [curve] for name, curve in runs.items()}, baseline)


def ap_by_iou_seeds_figure(runs: Mapping[str, Sequence[Mapping[float, float]]], baseline: str) -> Figure:
    """:func:`ap_by_iou_figure` with seed spread: ``runs`` maps a name to one curve per fine-tuning seed.

    Left: mean AP against the IoU threshold with a band of ± one standard deviation over seeds. Right: the gain of
    each run's mean over the baseline's, with error bars of twice the combined standard error of the two means.
    With one curve per run there is no spread to draw, and the panels are the plain curves and gains.
    """
    if baseline not in runs:
        raise KeyError(f"baseline {baseline!r} is not among the runs {list(runs)}")
    seeds = any(len(curves) > 1 for curves in runs.values())
    means, spread = {}, {}
    for name, curves in runs.items():
        thresholds = sorted(curves[0])
        values = np.array([[curve[t] for t in thresholds] for curve in curves])
        means[name] = dict(zip(thresholds, values.mean(axis=0), strict=True))
        spread[name] = (values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(thresholds)), len(values))
    figure = Figure(figsize=(10, 4), layout="tight")
    left, right = figure.subplots(1, 2)
    for name, curve in means.items():
        mean, (std, n) = np.array(list(curve.values())), spread[name]
        left.plot(list(curve), mean, marker="o", label=f"{name} ({n} seeds)" if seeds else name)
        if seeds:
            left.fill_between(list(curve), mean - std, mean + std, alpha=0.2)
    gains = ap_gain(means, baseline)
    base_std, base_n = spread[baseline]
    width = 0.04 / max(1, len(gains))  # the bars of all runs share the 0.05 gap between thresholds
    for index, (name, curve) in enumerate(gains.items()):
        offset = (index - (len(gains) - 1) / 2) * width
        std, n = spread[name]
        error = 2 * np.sqrt(std**2 / n + base_std**2 / base_n) if seeds else None
        right.bar(np.array(list(curve)) + offset, list(curve.values()), width=width, yerr=error, capsize=2, label=name)
    spread_title = " (mean ± std over seeds)" if seeds else ""
    left.set(xlabel="IoU threshold", ylabel="box AP", title=f"AP by IoU threshold{spread_title}")
    gain_title = "gain ± 2 combined standard errors" if seeds else "gain by IoU threshold"
    right.set(xlabel="IoU threshold", ylabel=f"AP gain over {baseline}", title=gain_title)
    right.axhline(0, color="black", linewidth=0.8)
    for axis in (left, right):
        axis.legend(fontsize=8)
    return figure


def plot_ap_by_iou_seeds(
    runs: Mapping[str, Sequence[Mapping[float, float]]], baseline: str, output: str | Path
) -> Path:
    """:func:`ap_by_iou_seeds_figure` saved to ``output``."""
    ap_by_iou_seeds_figure(runs, baseline).savefig(output, dpi=120)
    return Path(output)


def seed_figure(values: Mapping[str, Sequence[float]], metric: str = "AP") -> Figure:
    """One column of dots per row (one dot per fine-tuning seed), with the mean and ± twice its standard error."""
    figure = Figure(figsize=(1.6 + 1.3 * len(values), 4), layout="tight")
    axis = figure.subplots()
    for index, row in enumerate(values.values()):
        seeds = np.asarray(row, dtype=float)
        offsets = np.linspace(-0.12, 0.12, len(seeds)) if len(seeds) > 1 else np.zeros(1)
        axis.scatter(index + offsets, seeds, s=18, alpha=0.7)
        error = 2 * seeds.std(ddof=1) / np.sqrt(len(seeds)) if len(seeds) > 1 else 0.0
        axis.errorbar(index + 0.3, seeds.mean(), yerr=error, fmt="_", color="black", capsize=4, markersize=12)
    axis.set_xticks(range(len(values)), list(values), rotation=20, ha="right")
    axis.set(ylabel=metric, title=f"{metric} per fine-tuning seed (bar: mean ± 2 SE)")
    return figure


def scale_spread_figure(annotation_files: Mapping[str, str | Path]) -> Figure:
    """Histogram of object scales (``sqrt(area)``) per dataset, with each dataset's standard deviation."""
    figure = Figure(figsize=(6, 4), layout="tight")
    axis = figure.subplots()
    for name, path in annotation_files.items():
        scales = np.sqrt([a["area"] for a in read_annotation_file(path, ("annotations",))["annotations"]])
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
