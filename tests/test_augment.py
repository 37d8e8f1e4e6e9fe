"""View augmentations: the zoom-out that shows objects small."""

import pytest
import torch
from torchvision.transforms import v2

from mcl.data import SyntheticDataModule
from mcl.data.augment import byol_view, supervised_view

from .conftest import compose_train

WHITE = torch.full((3, 28, 28), 255, dtype=torch.uint8)


def object_fraction(view: torch.Tensor) -> float:
    """The fraction of a normalised view (mean 0, std 1) covered by the white object (black is the fill)."""
    return (view[0] > 0).float().mean().item()


def test_without_zoom_out_the_object_fills_every_view():
    torch.manual_seed(0)
    view = supervised_view(32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert all(object_fraction(view(WHITE)) == 1.0 for _ in range(20))


@pytest.mark.parametrize(
    "make", [supervised_view, lambda *a, **k: byol_view(*a, blur_p=0, solarize_p=0, jitter_p=0, **k)]
)
def test_zoom_out_shrinks_the_object_to_between_a_quarter_and_all_of_the_side(make):
    torch.manual_seed(0)
    view = make(32, mean=(0.5,) * 3, std=(0.5,) * 3, zoom_out=4.0, zoom_out_p=1.0)
    fractions = torch.tensor([object_fraction(view(WHITE)) for _ in range(300)])
    assert view(WHITE).shape == (3, 32, 32)
    # The side ratio r is uniform on [1, 4]: the area fraction 1/r² lies in [1/16, 1] and averages 1/4.
    assert fractions.min() >= 1 / 16 - 0.02 and fractions.max() <= 1.0
    assert fractions.mean() == pytest.approx(0.25, abs=0.04)
    assert (fractions < 0.5).float().mean() > 0.5


def test_zoom_out_probability_leaves_the_rest_of_the_views_filled():
    torch.manual_seed(0)
    view = supervised_view(32, mean=(0.5,) * 3, std=(0.5,) * 3, zoom_out=4.0, zoom_out_p=0.5)
    filled = sum(object_fraction(view(WHITE)) == 1.0 for _ in range(400)) / 400
    # Unzoomed half, plus zooms with r so close to 1 that no border pixel survives the resize.
    assert 0.45 < filled < 0.6


@pytest.mark.parametrize(("zoom_out", "zoom_out_p"), [(0.5, 0.5), (2.0, 1.5)])
def test_bad_zoom_out_values_name_the_keys(zoom_out, zoom_out_p):
    with pytest.raises(ValueError, match="data.zoom_out="):
        SyntheticDataModule(image_size=32, zoom_out=zoom_out, zoom_out_p=zoom_out_p)


@pytest.mark.parametrize("data", ["synthetic", "fashion_mnist", "imagefolder"])
def test_every_data_config_passes_zoom_out_to_the_views(data):
    cfg = compose_train([f"data={data}", "data.zoom_out=3", "data.zoom_out_p=0.25"])
    kwargs = {k: cfg.data[k] for k in ("image_size", "zoom_out", "zoom_out_p")}
    module = SyntheticDataModule(**kwargs)
    (side,) = module.train_transform().sides[:1]
    zoom = next(t for t in side.transforms if isinstance(t, v2.RandomZoomOut))
    assert (zoom.side_range, zoom.p) == ((1.0, 3.0), 0.25)
