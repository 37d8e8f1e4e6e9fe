"""Transfer analysis: AP-by-IoU gains and scale-spread plots."""

import json

import pytest
from matplotlib.collections import PathCollection
from PIL import Image

from mcl.detection.analysis import (
    ap_by_iou_seeds_figure,
    ap_gain,
    plot_ap_by_iou,
    plot_ap_by_iou_seeds,
    plot_scale_spread,
    read_ap_by_iou,
    seed_figure,
)


def test_ap_gain_by_threshold_and_plot(tmp_path):
    thresholds = [0.5 + 0.05 * i for i in range(10)]
    runs = {
        "scratch": {t: 40.0 - 30 * (t - 0.5) for t in thresholds},
        "mcl": {t: 42.0 - 25 * (t - 0.5) for t in thresholds},
    }
    gain = ap_gain(runs, "scratch")
    assert list(gain) == ["mcl"]
    assert gain["mcl"][0.5] == pytest.approx(2.0) and gain["mcl"][0.95] == pytest.approx(2.0 + 5 * 0.45)
    with pytest.raises(KeyError, match="baseline 'moco'"):
        ap_gain(runs, "moco")
    image = Image.open(plot_ap_by_iou(runs, "scratch", tmp_path / "ap.png"))
    assert image.size[0] > 600


def test_read_ap_by_iou_and_scale_plot(tmp_path):
    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(json.dumps({"bbox": {"ap_by_iou": {"0.50": 30.0, "0.55": 25.0}}}))
    assert read_ap_by_iou(evaluation) == {0.5: 30.0, 0.55: 25.0}
    annotations = tmp_path / "a.json"
    annotations.write_text(json.dumps({"annotations": [{"area": 16}, {"area": 400}, {"area": 10000}]}))
    assert plot_scale_spread({"tiny": annotations}, tmp_path / "spread.png").is_file()


def test_seed_plots_draw_every_seed_and_the_gain_with_its_error(tmp_path):
    thresholds = [0.5 + 0.05 * i for i in range(10)]
    runs = {
        "random init": [{t: 10.0 + seed for t in thresholds} for seed in range(3)],
        "supervised": [{t: 20.0 + seed - 10 * t for t in thresholds} for seed in range(3)],
    }
    figure = ap_by_iou_seeds_figure(runs, "random init")
    left, right = figure.axes
    (mean_line,) = left.get_lines()[:1]
    assert list(mean_line.get_ydata()) == pytest.approx([11.0] * 10)
    bars = right.patches
    assert [bar.get_height() for bar in bars] == pytest.approx([10.0 - 10 * t for t in thresholds])
    with pytest.raises(KeyError, match="baseline 'moco'"):
        ap_by_iou_seeds_figure(runs, "moco")
    assert plot_ap_by_iou_seeds(runs, "random init", tmp_path / "seeds.png").stat().st_size > 10_000
    dots = seed_figure({"a": [1.0, 2.0, 3.0], "b": [4.0]}).axes[0]
    scatters = [c for c in dots.collections if isinstance(c, PathCollection)]
    assert [len(c.get_offsets()) for c in scatters] == [3, 1]
