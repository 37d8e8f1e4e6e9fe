import pytest
import torch

from mcl.montage import assemble_levels, assemble_montage, check_levels, downscale, montage_counts


def numbered_images(batch: int, size: int = 32) -> torch.Tensor:
    """Images whose pixels are distinct: image b, channel c, pixel (y, x) holds a unique value."""
    return torch.arange(batch * 3 * size * size, dtype=torch.float32).view(batch, 3, size, size)


@pytest.mark.parametrize("mode", ["nearest", "area", "bilinear"])
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_each_cell_is_its_downscaled_source(level, mode):
    images = numbered_images(8)
    grid, cell = 2**level, 32 // 2**level
    montages, sources = assemble_montage(images, level, num_montages=3, mode=mode)
    assert montages.shape == (3, 3, 32, 32)
    assert sources.shape == (3, grid, grid)
    small = downscale(images, grid, mode)
    for m in range(3):
        for row in range(grid):
            for col in range(grid):
                patch = montages[m, :, row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
                assert torch.equal(patch, small[sources[m, row, col]])


def test_nearest_and_area_downscaling_reference_values():
    image = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    assert downscale(image, 2, "nearest").flatten().tolist() == [0.0, 2.0, 8.0, 10.0]
    assert downscale(image, 2, "area").flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    # Antialiased bilinear keeps a constant image constant and, unlike nearest, blends neighbouring pixels.
    assert torch.allclose(downscale(torch.full((1, 1, 8, 8), 7.0), 4, "bilinear"), torch.full((1, 1, 2, 2), 7.0))
    assert downscale(image, 2, "bilinear")[0, 0, 0, 0] > 0


def test_cells_use_every_image_evenly_and_deterministically():
    images = numbered_images(6)
    generator = torch.Generator().manual_seed(3)
    _, sources = assemble_montage(images, 2, num_montages=2, generator=generator)
    counts = torch.bincount(sources.flatten(), minlength=6)
    assert counts.sum() == 32
    assert set(counts.tolist()) <= {5, 6}
    again = assemble_montage(images, 2, 2, generator=torch.Generator().manual_seed(3))[1]
    assert torch.equal(sources, again)
    other = assemble_montage(images, 2, 2, generator=torch.Generator().manual_seed(4))[1]
    assert not torch.equal(sources, other)


@pytest.mark.parametrize("batch", [8, 64])
def test_repeats_land_in_independent_cells(batch):
    """The official counts at level 3 give ``B/32`` montages of 64 cells: ``2B`` slots, each image twice. No two
    montages may be copies of each other, and each image's two cells must not sit at the same position."""
    level, num_montages = 3, montage_counts("official", batch, 4)[3]
    _, sources = assemble_montage(numbered_images(batch, 64), level, num_montages, generator=torch.Generator())
    slots = sources.flatten()
    assert len(slots) >= 2 * batch
    assert set(torch.bincount(slots, minlength=batch).tolist()) <= {len(slots) // batch, -(-len(slots) // batch)}
    cells = sources.view(num_montages, -1)
    assert all(not torch.equal(cells[a], cells[b]) for a in range(num_montages) for b in range(a))
    # Repeated permutations would put image b at the same offset in every block of B slots; independent draws don't.
    blocks = slots[: len(slots) // batch * batch].view(-1, batch)
    assert not all(torch.equal(blocks[0], block) for block in blocks[1:])


def test_fewer_slots_than_images_pick_random_images():
    images = numbered_images(16)
    seen = set()
    for seed in range(20):
        _, sources = assemble_montage(images, 1, 1, generator=torch.Generator().manual_seed(seed))
        assert len(set(sources.flatten().tolist())) == 4  # 4 slots, 4 distinct images
        seen.update(sources.flatten().tolist())
    assert len(seen) > 8  # not always the same low indices


def test_paper_rule_places_each_image_once_per_level():
    images = numbered_images(16)
    for level in range(3):
        count = montage_counts("paper", 16, 3)[level]
        _, sources = assemble_montage(images, level, count, generator=torch.Generator().manual_seed(0))
        assert sorted(sources.flatten().tolist()) == list(range(16))


def test_montage_count_rules():
    assert montage_counts("paper", 128, 3) == [128, 32, 8]
    assert montage_counts("paper", 128, 4) == [128, 32, 8, 2]
    assert montage_counts("official", 128, 4) == [128, 32, 8, 4]
    assert montage_counts("paper", 8, 4) == [8, 2, 1, 1]
    assert montage_counts([4, 2], 8, 2) == [4, 2]


@pytest.mark.parametrize("levels", [0, 5, -1, 2.5, True])
def test_levels_outside_range_are_rejected(levels):
    with pytest.raises(ValueError, match=r"levels=.* must be an integer in 1\.\.4"):
        check_levels(levels)


def test_official_counts_refuse_more_levels_than_they_have(monkeypatch):
    """Were MAX_LEVELS raised, the released code's 4 counts give an error for a 5th level, not 4 counts for 5."""
    monkeypatch.setattr("mcl.montage.MAX_LEVELS", 5)
    assert montage_counts("paper", 256, 5) == [256, 64, 16, 4, 1]
    with pytest.raises(ValueError, match=r"montage_counts=official has counts for 4 levels .*, not levels=5"):
        montage_counts("official", 256, 5)


@pytest.mark.parametrize("rule", [[4, 2], [4, 2, 0], "tiles", [4, 2, 1.5]])
def test_bad_montage_counts_name_the_key(rule):
    with pytest.raises(ValueError, match="montage_counts="):
        montage_counts(rule, 16, 3)


def test_bad_montage_arguments():
    with pytest.raises(ValueError, match="downscale_mode"):
        assemble_montage(numbered_images(2), 1, 1, mode="cubic")
    with pytest.raises(ValueError, match="not divisible"):
        assemble_montage(torch.zeros(2, 3, 30, 30), 2, 1)
    with pytest.raises(ValueError, match="level=4"):
        assemble_montage(numbered_images(2), 4, 1)


@pytest.mark.parametrize("one_view_per_level", [True, False])
def test_assemble_levels_draws_level_after_level_from_one_generator(one_view_per_level):
    """Level i of ``assemble_levels`` is ``assemble_montage`` of level i's views with the generator as the earlier
    levels left it; ``(B, C, H, W)`` views serve every level."""
    views = torch.randn(8, 3, 3, 32, 32) if one_view_per_level else numbered_images(8)
    per_level = assemble_levels(views, 3, "paper", "area", torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    for level, ((montages, sources), count) in enumerate(zip(per_level, [8, 2, 1], strict=True)):
        level_views = views[:, level] if one_view_per_level else views
        expected_montages, expected_sources = assemble_montage(level_views, level, count, "area", generator)
        assert montages.shape == (count, 3, 32, 32) and sources.shape == (count, 2**level, 2**level)
        assert torch.equal(sources, expected_sources) and torch.equal(montages, expected_montages)


def test_assemble_levels_follows_the_count_rule_and_checks_the_view_count():
    per_level = assemble_levels(numbered_images(16), 4, [3, 2, 2, 1])
    assert [len(montages) for montages, _ in per_level] == [3, 2, 2, 1]
    with pytest.raises(ValueError, match=r"hold 2 views per image but levels=3"):
        assemble_levels(torch.zeros(4, 2, 3, 32, 32), 3)
    with pytest.raises(ValueError, match=r"views must be \(B, levels, C, H, W\) or \(B, C, H, W\)"):
        assemble_levels(torch.zeros(3, 32, 32), 1)
