"""Pictures of a run (mcl.pictures): the first batch's views and montages, the kNN bank's feature map, their grid
sizes, the loggers that get them, and that training is the same with and without them."""

import io
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict
from PIL import Image

from mcl.pictures import (
    CELL_BORDER,
    FEATURE_MAP_PIXELS,
    PADDING,
    RunPictures,
    feature_map_picture,
    project_2d,
)
from mcl.train import train
from mcl.validation import ConfigError, check_config

from .conftest import SMALL_MCL, TINY, compose_train, small_mcl, small_supervised

# One training step, nothing validated (so no best checkpoint to choose either).
SHORT = ["validate_at_init=false", "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=0"]
SHORT += ["~callbacks.checkpoint"]


def size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size  # (width, height)


def grid_size(columns: int, rows: int, width: int, height: int) -> tuple[int, int]:
    """make_grid's picture of ``rows x columns`` pictures of ``width x height`` with PADDING around each (a single
    picture make_grid returns as it is)."""
    if columns * rows == 1:
        return width, height
    return columns * (width + PADDING) + PADDING, rows * (height + PADDING) + PADDING


def framed(image_size: int, level: int) -> int:
    """A montage's side with its cells framed: the 2**level cells through make_grid with CELL_BORDER padding (one
    cell alone, level 0, is returned by make_grid as it is)."""
    grid = 2**level
    return image_size if grid == 1 else image_size + (grid + 1) * CELL_BORDER


def run(tmp_path: Path, name: str, *overrides: str) -> Path:
    small = [] if "method=supervised" in overrides else SMALL_MCL
    cfg = compose_train([*TINY, *small, *overrides], output_dir=tmp_path / name)
    train(cfg)
    return Path(cfg.output_dir)


# ------------------------------------------------------------------ the first batch
@pytest.mark.slow
@pytest.mark.parametrize("method", ["mcl", "supervised"])
def test_the_first_batch_gives_views_and_montages_of_every_level_at_their_grid_sizes(tmp_path, method):
    """... and with ``logger=tensorboard`` (the MCL run) the loss and the same pictures land in its event files."""
    extra = ["method=supervised", "method.num_classes=4"] if method == "supervised" else []
    extra += ["logger=tensorboard", "trainer.log_every_n_steps=1"] if method == "mcl" else []
    limits = ["callbacks.pictures.max_images=3", "callbacks.pictures.max_montages=2"]
    folder = run(tmp_path, method, *SHORT, *extra, *limits)
    pictures = folder / "pictures"
    sides = 2 if method == "mcl" else 1
    # batch_size=16, image_size=64, levels=3: a row per image (3 of 16) with its 3 levels per side.
    assert size(pictures / "views.png") == grid_size(3 * sides, 3, 64, 64)
    # Montages per level (paper rule, B=16): 16, 4, 1, of which at most 2 are shown; a row per side.
    for level, shown in enumerate([2, 2, 1]):
        side = framed(64, level)
        assert size(pictures / f"montages_level{level}.png") == grid_size(shown, sides, side, side)
    names = ["montages_level0", "montages_level1", "montages_level2", "views"]
    assert sorted(p.name for p in pictures.iterdir()) == [f"{name}.png" for name in names]
    if method == "mcl":
        assert_tensorboard_holds_the_loss_and_the_pictures(folder, names)


def first_batch(model, views):
    """A rank-0 trainer without loggers or datamodule, and a batch of ``views``."""
    trainer = SimpleNamespace(is_global_zero=True, datamodule=None, loggers=[], global_step=0)
    return trainer, (views, torch.zeros(len(views), dtype=torch.long))


def test_drawing_leaves_the_montage_stream_and_global_generators_alone(tmp_path):
    """The montages come from a generator of the callback's own: the model's stream and torch's global generator
    are where they were, and the pictures are the same each time."""
    model = small_mcl(levels=3)
    views = torch.randn(8, 2, 3, 3, 64, 64)
    stream, global_state = model.generator.get_state(), torch.get_rng_state()
    pictures = RunPictures(tmp_path / "pictures", max_images=2, max_montages=3)
    trainer, batch = first_batch(model, views)
    pictures.on_train_batch_start(trainer, model, batch, 0)
    assert torch.equal(model.generator.get_state(), stream) and torch.equal(torch.get_rng_state(), global_state)
    first = {p.name: np.asarray(Image.open(p)) for p in sorted((tmp_path / "pictures").iterdir())}
    assert list(first) == ["montages_level0.png", "montages_level1.png", "montages_level2.png", "views.png"]
    # 8 images: 8, 2 and 1 montage(s) per level (paper rule), at most 3 shown, both sides.
    width, height = grid_size(2, 2, framed(64, 1), framed(64, 1))
    assert first["montages_level1.png"].shape == (height, width, 3)
    pictures.on_train_batch_start(trainer, model, batch, 1)  # once per fit: the second batch draws nothing
    again = RunPictures(tmp_path / "again", max_images=2, max_montages=3)
    again.on_train_batch_start(trainer, model, batch, 0)
    for name, pixels in first.items():
        assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / name)), pixels), name


def test_views_are_denormalised_with_the_datamodules_mean_and_std(tmp_path):
    """A view that is the normalised form of a flat grey comes back as that grey (0.6 -> 153)."""
    model = small_supervised(levels=1)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    pixel = torch.tensor([(0.6 - m) / s for m, s in zip(mean, std, strict=True)])
    views = pixel.view(1, 1, 3, 1, 1).expand(4, 1, 3, 64, 64).clone()
    trainer = SimpleNamespace(
        is_global_zero=True, datamodule=SimpleNamespace(mean=mean, std=std), loggers=[], global_step=0
    )
    RunPictures(tmp_path, max_images=2).on_train_batch_start(trainer, model, (views, torch.zeros(4)), 0)
    pixels = np.asarray(Image.open(tmp_path / "views.png"))
    assert pixels.shape[1::-1] == grid_size(1, 2, 64, 64)  # a row per image, one view (one level)
    assert (pixels[PADDING : PADDING + 64, PADDING:-PADDING] == 153).all()
    assert (pixels[0] == 128).all()  # the grid's grey padding


# ------------------------------------------------------------------ feature map
def test_the_feature_map_leaves_the_global_generator_alone_and_is_reproducible():
    features = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    points, method = project_2d(features, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert points.shape == (50, 2) and method in ("PCA", "UMAP")
    assert np.array_equal(project_2d(features, seed=3)[0], points)
    picture = feature_map_picture(features, torch.arange(50) % 4, "epoch 1", seed=3)
    assert picture.shape == (FEATURE_MAP_PIXELS, FEATURE_MAP_PIXELS, 3) and picture.dtype == np.uint8


@pytest.mark.slow
def test_pictures_on_or_off_train_the_same_weights_and_maps_follow_each_validation(tmp_path):
    """Pictures drawn on the first batch and a feature map at every validation (before training and after each
    epoch) change nothing that is trained: the final weights, the EMA target included, are bit-identical."""
    base = ["+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "trainer.max_epochs=1"]
    base += ["~callbacks.checkpoint", "batch_size=8", "levels=2", "image_size=32"]
    on = run(tmp_path, "on", *base, "callbacks.pictures.feature_map=true")
    off = run(tmp_path, "off", *base, "~callbacks.pictures")
    names = sorted(p.name for p in (on / "pictures").iterdir())
    assert [n for n in names if n.startswith("features")] == [f"features_epoch00{i}.png" for i in range(2)]
    assert all(size(on / "pictures" / n) == (FEATURE_MAP_PIXELS, FEATURE_MAP_PIXELS) for n in names[:2])
    assert not (off / "pictures").exists()
    weights_on = torch.load(on / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    weights_off = torch.load(off / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert weights_on.keys() == weights_off.keys()
    assert all(torch.equal(weights_on[key], weights_off[key]) for key in weights_on), "pictures changed training"


@pytest.mark.slow
def test_a_run_without_a_knn_bank_writes_no_feature_map(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for index in range(8):
        pixels = np.random.default_rng(index).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{index}.png")
    overrides = ["data=folder", f"data.root={root}", "data.num_workers=0", "batch_size=8", "image_size=32"]
    folder = run(tmp_path, "folder", *overrides, "callbacks.pictures.feature_map=true", "levels=2")
    assert sorted(p.name for p in (folder / "pictures").iterdir()) == [
        "montages_level0.png",
        "montages_level1.png",
        "views.png",
    ]


# ------------------------------------------------------------------ loggers
class RecordingWandb(pl.loggers.WandbLogger):
    def __init__(self, fail: bool):
        self.fail, self.calls = fail, []

    def log_image(self, key, images, step=None, **kwargs):
        if self.fail:
            raise RuntimeError("W&B is down")
        self.calls.append((key, images, step))


def test_loggers_get_the_pictures_and_a_failing_one_only_warns(tmp_path):
    working, failing = RecordingWandb(fail=False), RecordingWandb(fail=True)
    trainer = SimpleNamespace(loggers=[failing, working], global_step=7)
    picture = np.full((5, 6, 3), 9, dtype=np.uint8)
    with pytest.warns(UserWarning, match="could not log the picture pictures/views to RecordingWandb: W&B is down"):
        path = RunPictures(tmp_path).save(trainer, "views", picture)
    assert path == tmp_path / "views.png" and np.array_equal(np.asarray(Image.open(path)), picture)
    [(key, images, step)] = working.calls
    assert key == "pictures/views" and step == 7 and np.array_equal(images[0], picture)


def test_an_unwritable_picture_folder_only_warns(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    trainer = SimpleNamespace(loggers=[], global_step=0)
    with pytest.warns(UserWarning, match="could not write the picture .*file/views.png"):
        assert RunPictures(tmp_path / "file").save(trainer, "views", np.zeros((2, 2, 3), np.uint8)) is None


def events(folder: Path) -> list:
    """Every event of the TensorBoard files under ``folder``, read with tensorboardX's protobuf (TFRecord: length,
    its CRC, the record, its CRC)."""
    from tensorboardX.proto import event_pb2

    found = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[offset + 12 : offset + 12 + length])
            found.append(event)
            offset += 12 + length + 4
    return found


def assert_tensorboard_holds_the_loss_and_the_pictures(folder: Path, pictures: list[str]) -> None:
    """One ``train/loss`` in the run's TensorBoard events, and each picture there pixel-equal to its PNG."""
    values = [(event.step, value) for event in events(folder / "tb") for value in event.summary.value]
    losses = [value.simple_value for _, value in values if value.tag == "train/loss"]
    assert len(losses) == 1 and np.isfinite(losses[0])
    images = {value.tag: value.image for _, value in values if value.HasField("image")}
    assert sorted(images) == [f"pictures/{name}" for name in pictures]
    for tag, image in images.items():
        logged = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
        saved = np.asarray(Image.open(folder / "pictures" / f"{tag.split('/')[1]}.png"))
        assert (image.width, image.height) == size(folder / "pictures" / f"{tag.split('/')[1]}.png")
        assert np.array_equal(logged, saved), tag


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("key", ["max_images", "max_montages", "feature_points"])
def test_bad_counts_name_the_key(tmp_path, key):
    cfg = compose_train([f"callbacks.pictures.{key}=0"], tmp_path)
    with pytest.raises(ConfigError, match=rf"callbacks\.pictures\.{key}=0 is out of range"):
        check_config(cfg)
    with pytest.raises(ValueError, match=rf"callbacks\.pictures\.{key}=0 is invalid"):
        RunPictures(tmp_path, **{key: 0})


def test_switches_take_booleans_and_the_callback_can_be_removed(tmp_path):
    with pytest.raises(ValueError, match=r"callbacks\.pictures\.views='yes' is invalid: use true or false"):
        RunPictures(tmp_path, views="yes")
    cfg = compose_train(["~callbacks.pictures"], tmp_path)
    assert "pictures" not in cfg.callbacks
    cfg = compose_train([], tmp_path)
    with open_dict(cfg):
        assert cfg.callbacks.pictures.dirpath == str(tmp_path / "pictures")
        assert cfg.callbacks.pictures.views is True and cfg.callbacks.pictures.feature_map is False
