"""mcl.data.device: the views made on the accelerator follow the CPU pipeline's distributions (crop boxes, colour
jitter, grayscale, blur, solarize), checked on the CPU with two-sample Kolmogorov-Smirnov distances."""

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mcl.data import SyntheticDataModule
from mcl.data.augment import byol_view
from mcl.data.datamodules import BLUR_P, SOLARIZE_P
from mcl.data.device import (
    DeviceViews,
    ShrinkToFit,
    SourceBatch,
    collate_sources,
    resized_crops,
    sample_crops,
)

# Two-sample KS distance that samples of these sizes from one distribution stay under (critical value at
# alpha = 0.001 for 4000 vs 4000 is 0.044; for 1500 vs 1500, 0.071); the draws are seeded, so the tests repeat.
KS_LIMIT_4000 = 0.044
KS_LIMIT_1500 = 0.071


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def smooth_image(height: int, width: int) -> torch.Tensor:
    y = torch.linspace(0, 1, height).view(-1, 1)
    x = torch.linspace(0, 1, width).view(1, -1)
    channels = [0.5 + 0.4 * torch.sin(3 * x + 2 * y), 0.5 + 0.4 * torch.cos(2 * x - y), (x + y) / 2]
    return torch.stack(channels).mul(255).round().to(torch.uint8)


def test_collate_pads_to_the_largest_image_with_one_replicated_edge():
    big = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    small = torch.randint(0, 256, (3, 3, 4), dtype=torch.uint8)
    batch = collate_sources([(big, 2), (small, 5)])
    assert batch.images.shape == (2, 3, 5, 7) and batch.images.dtype == torch.uint8
    assert batch.sizes.tolist() == [[5, 7], [3, 4]] and batch.labels.tolist() == [2, 5]
    assert torch.equal(batch.images[0], big)
    padded = batch.images[1]
    assert torch.equal(padded[:, :3, :4], small)
    assert torch.equal(padded[:, :3, 4], small[:, :, 3])  # replicated last column
    assert torch.equal(padded[:, 3, :4], small[:, 2, :])  # replicated last row
    assert int(padded[:, 3, 4].sum()) == int(small[:, 2, 3].sum())  # and the corner
    assert padded[:, :, 5:].sum() == 0 and padded[:, 4:, :].sum() == 0


def test_shrink_to_fit_keeps_the_aspect_and_leaves_small_images():
    shrink = ShrinkToFit(512)
    assert shrink(torch.zeros(3, 600, 300, dtype=torch.uint8)).shape == (3, 512, 256)
    small = torch.zeros(3, 100, 80, dtype=torch.uint8)
    assert shrink(small) is small
    assert ShrinkToFit(None)(torch.zeros(3, 2000, 10, dtype=torch.uint8)).shape == (3, 2000, 10)
    with pytest.raises(ValueError, match="source_max_side=0"):
        ShrinkToFit(0)


def cpu_crop_boxes(height: int, width: int, draws: int) -> torch.Tensor:
    """Boxes from the crop step of the CPU pipeline itself (the first transform of a BYOL side)."""
    crop = byol_view(32, 1.0, 0.0).transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    params = [crop.make_params([image]) for _ in range(draws)]
    return torch.tensor([[p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"]] for p in params])


def box_statistics(boxes: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    box_w, box_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return {
        "area": box_w * box_h / (height * width),
        "log_ratio": (box_w / box_h).log(),
        "top": boxes[:, 1] / height,
        "left": boxes[:, 0] / width,
    }


# (64, 480): wider than 4:3 at most areas, so many draws fall back to the centre crop.
@pytest.mark.parametrize("size", [(300, 200), (28, 28), (64, 480)])
def test_crop_boxes_follow_the_cpu_pipelines_distribution(size):
    height, width = size
    torch.manual_seed(0)
    cpu = box_statistics(cpu_crop_boxes(height, width, 4000).float(), height, width)
    device = box_statistics(sample_crops(torch.tensor([[height, width]] * 4000), (0.2, 1.0)), height, width)
    for name in cpu:
        assert ks_distance(cpu[name], device[name]) < KS_LIMIT_4000, name
    assert device["area"].min() > 0 and device["area"].max() <= 1


def test_crop_falls_back_to_the_centre_crop_like_torchvision():
    # A 1000 x 60 strip: no crop of ratio 3/4..4/3 with 20-100% of the area fits, so every draw is the fallback.
    torch.manual_seed(0)
    cpu = cpu_crop_boxes(1000, 60, 50)
    device = sample_crops(torch.tensor([[1000, 60]] * 50), (0.2, 1.0))
    assert torch.equal(cpu.unique(dim=0), torch.tensor([[0, 460, 60, 540]]))
    assert torch.equal(device.unique(dim=0), cpu.unique(dim=0).float())


def test_resized_crops_match_torchvision_on_a_smooth_image():
    image = smooth_image(120, 90)
    batch = collate_sources([(image, 0), (torch.zeros(3, 200, 200, dtype=torch.uint8), 1)])
    cases = [((10, 20, 42, 52), 32), ((0, 0, 30, 45), 64), ((5, 0, 90, 120), 32), ((0, 60, 90, 120), 24)]
    for (left, top, right, bottom), size in cases:
        got = resized_crops(batch.images, torch.tensor([[[left, top, right, bottom]]]).float(), size)[0]
        want = TF.resized_crop(image.float() / 255, top, left, bottom - top, right - left, [size, size], antialias=True)
        assert got.shape == (1, 3, size, size)
        tolerance = 1e-6 if right - left == size and bottom - top == size else 0.02
        assert (got[0] - want).abs().max() < tolerance, (left, top, right, bottom, size)


def device_and_cpu_views(image: torch.Tensor, draws: int, **augment) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` views of ``image`` per BYOL side from both pipelines, ``(2, draws, C, H, W)`` each, as the uint8
    levels (0..255, float64) that the CPU pipeline's views take; the device's are rounded to them. Statistics of
    equal images are then equal to the last bit (float noise would split the ties the uint8 grid makes)."""
    size = image.shape[-1]
    sides = list(zip(BLUR_P, SOLARIZE_P, strict=True))
    norm = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    cpu_sides = [byol_view(size, blur, solarize, **augment, **norm) for blur, solarize in sides]
    torch.manual_seed(1)
    cpu = torch.stack([torch.stack([side(image) for _ in range(draws)]) for side in cpu_sides])
    device_views = DeviceViews(size, 1, sides, **augment, **norm)
    batch = collate_sources([(image, 0)] * draws)
    torch.manual_seed(2)
    device = device_views(batch)[:, :, 0].transpose(0, 1)
    return cpu.double().mul(255).round(), device.double().mul(255).round()


def test_colour_steps_follow_the_cpu_pipelines_distribution():
    # A constant colour: crop, flip and blur leave it, so each view's colour is a draw of jitter (brightness,
    # contrast, saturation, hue, their order), grayscale and solarize.
    image = torch.tensor([200, 90, 40], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8).contiguous()
    cpu, device = device_and_cpu_views(image, 1500, min_scale=0.2)
    for side in range(2):
        # Colours on the uint8 grid (the CPU pipeline's), as integers: equal levels must compare equal.
        cpu_colour, device_colour = cpu[side].mean((-1, -2)), device[side].mean((-1, -2))
        for channel in range(3):
            distance = ks_distance(cpu_colour[:, channel], device_colour[:, channel])
            assert distance < KS_LIMIT_1500, (side, channel, distance)
        gray_cpu = (cpu_colour.max(1).values - cpu_colour.min(1).values < 2).float().mean()
        gray_device = (device_colour.max(1).values - device_colour.min(1).values < 2).float().mean()
        assert abs(gray_cpu - 0.2) < 0.04 and abs(gray_device - 0.2) < 0.04  # grayscale_p = 0.2
    # Solarize (side B, p = 0.2) and grayscale (0.2) turn the red channel (200) dark: their shares show in it.
    dark_red = [(views[1, :, 0].mean((-1, -2)) < 128).float().mean() for views in (cpu, device)]
    assert abs(dark_red[0] - dark_red[1]) < 0.05 and 0.25 < dark_red[1] < 0.45


def test_blur_follows_the_cpu_pipelines_distribution():
    # A checkerboard of 2 px squares, the whole image as the crop (min_scale 1), no jitter or grayscale: what is
    # left of its contrast measures each view's blur (side A always blurs, side B with p = 0.1 and solarizes).
    board = ((torch.arange(32) // 2).view(-1, 1) + (torch.arange(32) // 2).view(1, -1)) % 2
    image = (board * 255).to(torch.uint8).expand(3, 32, 32).contiguous()
    cpu, device = device_and_cpu_views(image, 1500, min_scale=1.0, jitter_p=0.0, grayscale_p=0.0)
    for side in range(2):
        contrast = [
            (views[side] - views[side].mean((-1, -2), keepdim=True)).abs().mean((1, 2, 3)) for views in (cpu, device)
        ]
        assert ks_distance(*contrast) < KS_LIMIT_1500, side
        sharp = [(c > 0.45 * 255).float().mean() for c in contrast]  # views left unblurred (or blurred with sigma ~0.1)
        assert abs(sharp[0] - sharp[1]) < 0.05
    # Side B keeps the board sharp unless it blurs (p = 0.1) or solarizes (p = 0.2: white turns black): ~0.72.
    assert 0.65 < float((contrast[1] > 0.45 * 255).float().mean()) < 0.8


@pytest.mark.parametrize("view_mode", ["byol", "supervised"])
def test_datamodule_makes_the_views_after_the_transfer(view_mode):
    dm = SyntheticDataModule(
        image_size=32, batch_size=8, views_per_side=3, view_mode=view_mode, augment_on="device", bank_size=None
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, SourceBatch) and batch.images.dtype == torch.uint8
    assert batch.images.shape == (8, 3, 32, 32)
    views, labels = dm.on_after_batch_transfer(batch, 0)
    assert torch.equal(labels, batch.labels)
    assert views.shape == ((8, 2, 3, 3, 32, 32) if view_mode == "byol" else (8, 3, 3, 32, 32))
    assert views.dtype == torch.float32 and torch.isfinite(views).all()
    # Validation batches are made on the CPU and pass through unchanged.
    images, _ = next(iter(dm.val_dataloader()[0]))
    assert dm.on_after_batch_transfer((images, labels), 0)[0] is images


def test_device_augmentation_refuses_zoom_out():
    with pytest.raises(ValueError, match="zoom_out=2.0 is not available with data.augment_on=device"):
        SyntheticDataModule(augment_on="device", zoom_out=2.0)
    with pytest.raises(ValueError, match="augment_on='gpu'"):
        SyntheticDataModule(augment_on="gpu")


def test_each_rank_and_epoch_draws_its_own_views_and_leaves_the_global_streams_alone(monkeypatch):
    from mcl import distributed

    def views_of(rank: int) -> torch.Tensor:
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        dm = SyntheticDataModule(image_size=32, batch_size=8, views_per_side=2, augment_on="device", bank_size=None)
        dm.setup()
        batch = collate_sources([dm.train_set.dataset[i] for i in range(8)])
        torch.manual_seed(123)  # the process's stream, seeded alike on every rank
        before = torch.get_rng_state()
        first, _ = dm.on_after_batch_transfer(batch, 0)
        second, _ = dm.on_after_batch_transfer(batch, 0)
        assert torch.equal(torch.get_rng_state(), before)  # the global stream did not move
        assert not torch.equal(first, second)  # the view stream continues from batch to batch
        return first

    assert torch.equal(views_of(0), views_of(0))  # reproducible from (seed, epoch, rank)
    assert not torch.equal(views_of(0), views_of(1))
