"""Pictures of a pretraining run, as a Lightning callback: the first batch's views and the montages of every level,
and optionally a 2-D map of the kNN bank's features at each validation.

Files go under ``dirpath`` (``<run>/pictures/``) as PNG; a W&B or TensorBoard logger gets the same images. A picture
that cannot be written or logged gives a warning, never a failed run. Drawing the montages uses a generator of its
own (seeded from the run's seed) on the views' device: neither the model's montage stream nor torch's global
generators are drawn from, so a run trains the same with and without pictures.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torchvision.utils import make_grid

from mcl.knn_monitor import KNNMonitor
from mcl.methods.base import MultiLevelModule
from mcl.montage import LEVEL_AXIS, assemble_levels, montage_counts
from mcl.runs import replaced_atomically

log = logging.getLogger(__name__)

KEY = "callbacks.pictures"
# Pixels between the pictures of a grid (make_grid's padding) and its grey; cells of a montage are framed by
# CELL_BORDER white pixels (the montage's cells through make_grid, nrow = the level's grid side).
PADDING, PAD_VALUE = 2, 0.5
CELL_BORDER, CELL_BORDER_VALUE = 1, 1.0
SIDE_NAMES = ("a", "b")
# The feature map: a FEATURE_MAP_INCHES-inch square figure at FEATURE_MAP_DPI, so FEATURE_MAP_PIXELS on a side.
FEATURE_MAP_INCHES, FEATURE_MAP_DPI = 6, 100
FEATURE_MAP_PIXELS = FEATURE_MAP_INCHES * FEATURE_MAP_DPI
LEGEND_MAX_CLASSES = 20


def _positive_int(value: Any, key: str, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{KEY}.{key}={value!r} is invalid: {meaning} must be an integer >= 1")
    return value


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{KEY}.{key}={value!r} is invalid: use true or false")
    return value


def denormalize(images: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """Normalised ``(..., C, H, W)`` images back to ``[0, 1]`` with the data's ``mean`` and ``std``; without them
    each image is stretched to its own range."""
    images = images.detach().float()
    if mean is not None and std is not None:
        shape = (len(mean), 1, 1)
        mean_t = torch.tensor(list(mean), dtype=images.dtype, device=images.device).view(shape)
        std_t = torch.tensor(list(std), dtype=images.dtype, device=images.device).view(shape)
        return (images * std_t + mean_t).clamp_(0, 1)
    flat = images.flatten(-3)
    low, high = flat.min(-1).values[..., None, None, None], flat.max(-1).values[..., None, None, None]
    return (images - low) / (high - low).clamp_min(1e-8)


def to_uint8(grid: torch.Tensor) -> np.ndarray:
    """A ``(C, H, W)`` picture in ``[0, 1]`` -> ``(H, W, 3)`` uint8, as torchvision's ``save_image`` rounds it."""
    grid = grid.expand(3, -1, -1) if grid.shape[0] == 1 else grid
    return grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def views_grid(views: torch.Tensor, level_axis: int) -> torch.Tensor:
    """Images of a batch, one row each: every view of the image (side a's levels, then side b's for two-sided
    views), framed by :data:`PADDING`. ``views`` in ``[0, 1]``."""
    per_row = int(np.prod(views.shape[1 : level_axis + 1]))
    return make_grid(views.reshape(-1, *views.shape[-3:]), nrow=per_row, padding=PADDING, pad_value=PAD_VALUE)


def framed_cells(montage: torch.Tensor, grid: int) -> torch.Tensor:
    """One ``(C, H, W)`` montage with its ``grid x grid`` cells framed: the cells through ``make_grid``, so the
    picture is ``H + (grid + 1) * CELL_BORDER`` pixels high."""
    channels, height, width = montage.shape
    cell_h, cell_w = height // grid, width // grid
    cells = montage.view(channels, grid, cell_h, grid, cell_w).permute(1, 3, 0, 2, 4)
    cells = cells.reshape(-1, channels, cell_h, cell_w)
    return make_grid(cells, nrow=grid, padding=CELL_BORDER, pad_value=CELL_BORDER_VALUE)


def montages_grid(per_side: Sequence[torch.Tensor], grid: int) -> torch.Tensor:
    """One level's montages, ``(M, C, H, W)`` in ``[0, 1]`` per side: a row per side, each montage's cells framed."""
    framed = [framed_cells(montage, grid) for montages in per_side for montage in montages]
    return make_grid(torch.stack(framed), nrow=len(per_side[0]), padding=PADDING, pad_value=PAD_VALUE)


def project_2d(features: torch.Tensor, seed: int) -> tuple[np.ndarray, str]:
    """``(N, D)`` features -> ``(N, 2)`` points and the method's name: UMAP when ``umap-learn`` is installed (the
    ``umap`` extra), else the first two principal components (``torch.pca_lowrank``, its random draws from a
    forked, seeded CPU generator: torch's global generators are left as they were)."""
    features = features.detach().float().cpu()
    if importlib.util.find_spec("umap") is not None and len(features) > 3:
        import umap

        neighbours = min(15, len(features) - 1)
        reducer = umap.UMAP(n_components=2, n_neighbors=neighbours, random_state=seed)
        return np.asarray(reducer.fit_transform(features.numpy())), "UMAP"
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        q = min(6, *features.shape)
        _, _, basis = torch.pca_lowrank(features, q=q, center=True)
    points = (features - features.mean(0)) @ basis[:, :2]
    if points.shape[1] < 2:  # a single feature dimension or a single point
        points = torch.cat([points, torch.zeros(len(points), 2 - points.shape[1])], 1)
    return points.numpy(), "PCA"


def feature_map_picture(features: torch.Tensor, labels: torch.Tensor, title: str, seed: int) -> np.ndarray:
    """A scatter plot of the features' 2-D map coloured by class, ``(FEATURE_MAP_PIXELS, FEATURE_MAP_PIXELS, 3)``
    uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points, method = project_2d(features, seed)
    labels = labels.detach().cpu().numpy()
    classes = np.unique(labels)
    figure = Figure(figsize=(FEATURE_MAP_INCHES, FEATURE_MAP_INCHES), dpi=FEATURE_MAP_DPI, layout="tight")
    canvas = FigureCanvasAgg(figure)
    axis = figure.subplots()
    colours = "tab10" if len(classes) <= 10 else "tab20"
    scatter = axis.scatter(points[:, 0], points[:, 1], c=labels, cmap=colours, s=6, alpha=0.8, linewidths=0)
    if len(classes) <= LEGEND_MAX_CLASSES:
        handles, names = scatter.legend_elements(num=None)
        axis.legend(handles, names, title="class", fontsize=7, title_fontsize=8, loc="best", markerscale=0.8)
    axis.set_title(f"{title}: {method} of {len(points)} kNN bank features", fontsize=9)
    axis.set_xticks([])
    axis.set_yticks([])
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class RunPictures(pl.Callback):
    """Pictures of a pretraining run (the ``callbacks.pictures`` config).

    Args:
        dirpath: the folder of the PNG files (``<run>/pictures``).
        views: on the first training batch of a ``fit``: ``views.png`` (its first ``max_images`` images, one row
            each with every view) and ``montages_level{i}.png`` per level (the first ``max_montages`` montages, a row
            per side, every cell framed). Rank 0 only.
        max_images: batch images in ``views.png``.
        max_montages: montages per side in ``montages_level{i}.png``.
        feature_map: at each validation whose kNN monitor had a labelled bank, ``features_epoch{N:03d}.png``: the
            bank's pooled features (those the monitor collected; rank 0's share under DDP) in 2-D, coloured by
            class. ``N`` is the number of finished training epochs (000: the validation before training).
        feature_points: the most bank features in the map (the first ones).
    """

    def __init__(
        self,
        dirpath: str | Path,
        views: bool = True,
        max_images: int = 8,
        max_montages: int = 8,
        feature_map: bool = False,
        feature_points: int = 5000,
    ):
        self.dirpath = Path(dirpath)
        self.views = _flag(views, "views")
        self.max_images = _positive_int(max_images, "max_images", "the batch images in views.png")
        self.max_montages = _positive_int(max_montages, "max_montages", "the montages per side of a level")
        self.feature_map = _flag(feature_map, "feature_map")
        self.feature_points = _positive_int(feature_points, "feature_points", "the bank features in the map")
        self._drawn = False

    # ----------------------------------------------------------------- output
    def save(self, trainer: pl.Trainer, name: str, picture: np.ndarray) -> Path | None:
        """Write ``picture`` as ``<dirpath>/<name>.png`` and log it to the trainer's W&B and TensorBoard loggers;
        whatever fails gives a warning."""
        path = self.dirpath / f"{name}.png"
        try:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            with replaced_atomically(path) as temporary:
                Image.fromarray(picture).save(temporary, format="PNG")
        except Exception as error:  # a picture never stops a run
            warnings.warn(f"could not write the picture {path}: {error}", stacklevel=2)
            path = None
        self.log_picture(trainer, f"pictures/{name.split('_epoch')[0]}", picture)
        return path

    @staticmethod
    def log_picture(trainer: Any, tag: str, picture: np.ndarray) -> None:
        """``picture`` to every W&B (``log_image``) and TensorBoard (``experiment.add_image``) logger of the trainer
        at its global step; a logger that fails gives a warning."""
        step = int(trainer.global_step)
        for logger in trainer.loggers:
            try:
                if isinstance(logger, pl.loggers.WandbLogger):
                    logger.log_image(key=tag, images=[picture], step=step)
                elif isinstance(logger, pl.loggers.TensorBoardLogger):
                    logger.experiment.add_image(tag, picture, step, dataformats="HWC")
            except Exception as error:  # a picture never stops a run
                warnings.warn(f"could not log the picture {tag} to {type(logger).__name__}: {error}", stacklevel=2)

    # ------------------------------------------------------------ first batch
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drawn = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if self._drawn or not self.views or not trainer.is_global_zero:
            return
        self._drawn = True
        if not isinstance(pl_module, MultiLevelModule):
            return
        self.draw_batch(trainer, pl_module, batch[0])

    @torch.no_grad()
    def draw_batch(self, trainer: pl.Trainer, model: MultiLevelModule, views: torch.Tensor) -> list[Path | None]:
        """``views.png`` and ``montages_level{i}.png`` of a training batch's ``views`` (on the model's device)."""
        datamodule = getattr(trainer, "datamodule", None)
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        level_axis = LEVEL_AXIS[model.view_mode]
        sides = views.unbind(1) if level_axis == 2 else [views]
        shown_views = denormalize(views[: self.max_images], mean, std).cpu()
        paths = [self.save(trainer, "views", to_uint8(views_grid(shown_views, level_axis)))]
        counts = montage_counts(model.montage_rule, len(views), model.levels)
        shown = [min(self.max_montages, count) for count in counts]
        generator = torch.Generator(device=views.device).manual_seed(int(model.seed))  # not the model's stream
        per_side = [assemble_levels(side, model.levels, shown, model.downscale_mode, generator) for side in sides]
        for level in range(model.levels):
            montages = [denormalize(side[level][0], mean, std).cpu() for side in per_side]
            picture = montages_grid(montages, 2**level)
            paths.append(self.save(trainer, f"montages_level{level}", to_uint8(picture)))
        return paths

    # ------------------------------------------------------------ feature map
    def monitors(self, trainer: pl.Trainer) -> list[KNNMonitor]:
        return [callback for callback in trainer.callbacks if isinstance(callback, KNNMonitor)]

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        keep = self.feature_map and trainer.is_global_zero and not trainer.sanity_checking
        for monitor in self.monitors(trainer):
            monitor.keep_bank = keep

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for monitor in self.monitors(trainer):
            bank, monitor.kept_bank, monitor.keep_bank = monitor.kept_bank, None, False
            if bank is None or not self.feature_map or not trainer.is_global_zero or trainer.sanity_checking:
                continue
            features, labels = (tensor[: self.feature_points].cpu() for tensor in bank)
            fitting = trainer.state.fn == pl.trainer.states.TrainerFn.FITTING
            epoch = trainer.current_epoch + 1 if fitting else trainer.current_epoch
            title = f"epoch {epoch}" if epoch else "before training"
            seed = int(getattr(pl_module, "seed", 0))
            self.save(trainer, f"features_epoch{epoch:03d}", feature_map_picture(features, labels, title, seed))
