"""Montage pictures: display scaling, the figure's grid of montages with their cell labels, and cell counts."""

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from mcl.montage import assemble_levels
from mcl.visualize import cell_counts, montage_figure, to_display


def test_to_display_stretches_each_image_to_0_1_channels_last():
    images = torch.stack([torch.arange(12.0).view(3, 2, 2), torch.full((3, 2, 2), 5.0)])
    shown = to_display(images)
    assert shown.shape == (2, 2, 2, 3)
    assert shown[0, 0, 0].tolist() == pytest.approx([0.0, 4 / 11, 8 / 11])  # pixel (0, 0) of the channels: 0, 4, 8
    assert shown[0, 1, 1, 2].item() == 1.0
    assert torch.equal(shown[1], torch.zeros(2, 2, 3))  # a constant image is black, not NaN


def per_level_example():
    """Level 0: 4 one-channel 8x8 images; level 1: one 2x2 montage; level 2: one 4x4 montage."""
    views = torch.arange(4 * 8 * 8, dtype=torch.float32).view(4, 1, 8, 8)
    return assemble_levels(views, 3, "paper", generator=torch.Generator().manual_seed(0))


def test_the_figure_shows_each_levels_montages_in_order_with_their_sources():
    per_level = per_level_example()
    figure = montage_figure(per_level, montages_per_level=2)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    assert np.asarray(canvas.buffer_rgba()).shape == (round(3 * 2.4 * figure.dpi), round(2 * 2.4 * figure.dpi), 4)
    axes = np.array(figure.axes).reshape(3, 2)  # one row per level, two columns
    for level, (montages, sources) in enumerate(per_level):
        for column in range(2):
            axis = axes[level, column]
            if column >= len(montages):  # levels 1 and 2 have one montage: their second panel stays empty
                assert not axis.get_visible()
                continue
            assert np.array_equal(axis.get_images()[0].get_array(), to_display(montages)[column, ..., 0].numpy())
            grid = 2**level
            assert axis.get_title() == f"level {level}, montage {column} ({grid}x{grid})"
            # The cell labels, row-major, are the source indices of the cells.
            assert [text.get_text() for text in axis.texts] == [str(s) for s in sources[column].flatten().tolist()]


def test_cell_labels_can_be_left_out():
    figure = montage_figure(per_level_example(), label_cells=False)
    assert all(not axis.texts for axis in figure.axes)


@pytest.mark.parametrize("montages_per_level", [1, 3])
def test_columns_follow_the_most_montages_of_any_level(montages_per_level):
    figure = montage_figure(per_level_example(), montages_per_level=montages_per_level)
    # Level 0 has 4 montages (its plain views), so the figure has as many columns as asked.
    assert len(figure.axes) == 3 * montages_per_level
    assert tuple(figure.get_size_inches()) == pytest.approx((2.4 * montages_per_level, 2.4 * 3))


def test_cell_counts_count_each_images_cells_per_level():
    per_level = [
        (torch.zeros(2, 3, 8, 8), torch.tensor([0, 2]).view(2, 1, 1)),
        (torch.zeros(1, 3, 8, 8), torch.tensor([[3, 3], [0, 2]]).view(1, 2, 2)),
    ]
    assert cell_counts(per_level, batch_size=4).tolist() == [[1, 0, 1, 0], [1, 0, 1, 2]]
