import math

import pytest
import torch

from mcl.targets import TARGET_ASSIGNMENTS, build_target_assignment, per_image_targets


def test_compared_levels_per_assignment():
    assert [build_target_assignment("top", 3).compared(level) for level in range(3)] == [[0], [0], [0]]
    assert [build_target_assignment("same-level", 3).compared(level) for level in range(3)] == [[0], [1], [2]]
    assert build_target_assignment("all-levels", 3).compared(1) == [0, 1, 2]
    assert [build_target_assignment(name, 3).target_levels for name in TARGET_ASSIGNMENTS] == [1, 3, 3]


def test_an_unknown_assignment_is_named_with_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"target_assignment='bottom' is invalid: use one of \('top', 'same-level', 'all-levels'\)"
    ):
        build_target_assignment("bottom", 3)


def test_per_image_targets_average_an_images_cells():
    cells = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 5.0], [1.0, 1.0]])
    sources = torch.tensor([2, 0, 2, 0])
    targets, present = per_image_targets(cells, sources, batch=4)
    assert present.tolist() == [True, False, True, False]
    root = 1 / math.sqrt(2)
    # image 0: unit (0, 1) + unit (1, 1) = (r, 1 + r); image 2: (1, 0) + (0, 1).
    expected0 = torch.tensor([root, 1 + root]) / math.hypot(root, 1 + root)
    torch.testing.assert_close(targets[0], expected0)
    torch.testing.assert_close(targets[2], torch.tensor([root, root]))
    assert targets[1].abs().sum() == 0 and targets[3].abs().sum() == 0


def example(batch=3, levels=2):
    """Views ``(B, 2, levels, 1, 4, 4)`` and per side the montages of levels 0..levels-1 with their sources."""
    views = torch.randn(batch, 2, levels, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sources = [torch.tensor([[[0]], [[1]], [[2]]]), torch.tensor([[[2, 0], [0, 2]]])]
    montages = [
        [(torch.full((len(s), 1, 4, 4), 10.0 * side + level), s) for level, s in enumerate(sources)] for side in (0, 1)
    ]
    return views, montages


class RecordingEmbed:
    """A stand-in target network: one row per cell, every feature the image's first pixel; records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, embedded_levels):
        self.calls.append(([[tuple(i.shape) for i in side] for side in images], embedded_levels))
        return {
            (side, level): level_images[:, 0, 0, :1].repeat_interleave(4**level, 0).repeat(1, 2)
            for side, side_images in enumerate(images)
            for level, level_images in enumerate(side_images[:embedded_levels])
        }


@pytest.mark.parametrize("montages_in_batch", [True, False])
def test_top_embeds_the_plain_views_and_keeps_level_zero(montages_in_batch):
    views, montages = example()
    embed = RecordingEmbed()
    targets, present = build_target_assignment("top", 2).targets(embed, views, montages, montages_in_batch)
    assert present is None and set(targets) == {(0, 0), (1, 0)}
    shapes, embedded_levels = embed.calls[0]
    assert embedded_levels == 1
    assert shapes == [[(3, 1, 4, 4), (1, 1, 4, 4)] if montages_in_batch else [(3, 1, 4, 4)] for _ in (0, 1)]
    for side in (0, 1):
        torch.testing.assert_close(targets[side, 0][:, 0], views[:, side, 0, 0, 0, 0])


@pytest.mark.parametrize("name", ["same-level", "all-levels"])
def test_montage_assignments_average_each_images_cells_per_level(name):
    views, montages = example()
    embed = RecordingEmbed()
    targets, present = build_target_assignment(name, 2).targets(embed, views, montages, montages_in_batch=False)
    assert embed.calls[0][1] is None
    assert set(targets) == set(present) == {(side, level) for side in (0, 1) for level in (0, 1)}
    assert present[0, 0].tolist() == [True, True, True] and present[1, 1].tolist() == [True, False, True]
    root = 1 / math.sqrt(2)
    torch.testing.assert_close(targets[1, 1], torch.tensor([[root, root], [0.0, 0.0], [root, root]]))
