"""Transfer analysis: AP-by-IoU gains and scale-spread plots."""

import json

import pytest
from PIL import Image

from mcl.detection.analysis import ap_gain, plot_ap_by_iou, plot_scale_spread, read_ap_by_iou


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
