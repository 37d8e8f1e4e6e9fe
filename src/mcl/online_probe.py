"""The online linear probe of pretraining (``method.online_probe``): a linear classifier on the online backbone's
detached pooled C5, trained on the labelled pretraining batches by an optimiser of its own while the model trains.

It reads features the training step computes anyway: the C5 of the level-0 images (each view once, whole) that the
online backbone embeds among the montages of its pass (:func:`mcl.cells.level_cells`, :func:`mcl.cells.all_map_cells`,
or the supervised ``pooled_c5`` classifier's input), pooled and detached there, with the labels put in the order of
the level-0 montages' sources. No extra backbone pass runs, so no BatchNorm statistic changes, and nothing of the
probe reaches the model's gradients. Validation scores the pooled features ``validation_step`` returns for the
validation split.

The probe is a module of the LightningModule (its weights are in the state dict, under ``online_probe.``) but not of
the model's optimiser: its own SGD steps inside ``training_step`` (Lightning's automatic optimisation of the model
is untouched), its state goes in checkpoints under :data:`OPTIMIZER_STATE`. Under DDP its parameters are left out
of DDP's gradient reduction (they get no gradient from the model's loss) and their gradients are averaged over the
ranks by one ``all_reduce`` per step, so every rank holds the same probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mcl.distributed import average_over_ranks

# The probe's attribute in the LightningModule, hence the prefix of its state-dict keys.
PROBE_NAME = "online_probe"
PREFIX = f"{PROBE_NAME}."
# The checkpoint key of the probe's optimiser state.
OPTIMIZER_STATE = "online_probe_optimizer"
# The validation loader the probe is scored on (the methods' VAL_LOADER: the labelled validation split).
VAL_LOADER = 1


def probe_settings(on: bool, lr: float, momentum: float, weight_decay: float) -> dict[str, float] | None:
    """The probe's SGD settings, or ``None`` for no probe (``method.online_probe=false``)."""
    return {"lr": lr, "momentum": momentum, "weight_decay": weight_decay} if on else None


def probe_classes(datamodule: Any) -> int:
    """The number of classes of the training data (the datamodule's ``num_classes``); data without labels
    (``data=folder``, whose images are labelled -1) is refused, naming ``method.online_probe``."""
    classes = getattr(datamodule, "num_classes", None)
    if classes is None:
        raise ValueError(
            f"method.online_probe=true trains a linear classifier on the labels of the pretraining batches, but "
            f"{type(datamodule).__name__} has no labels (data=folder images are unlabelled): set "
            "method.online_probe=false, or pretrain on labelled data (data=imagefolder, fashion_mnist, synthetic)"
        )
    return int(classes)


@dataclass
class LevelZeroFeatures:
    """What a training step's online pass hands the probe: the detached pooled C5 of the level-0 images, in the order
    the pass embedded them (:attr:`pooled`, filled by the trunk), and the batch index of each (:attr:`sources`)."""

    pooled: list[torch.Tensor] = field(default_factory=list)
    sources: list[torch.Tensor] = field(default_factory=list)

    def batch(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (N, C5), labels (N,))``: the features and the labels of their images."""
        return torch.cat(self.pooled), labels[torch.cat(self.sources)]


class OnlineProbe(nn.Module):
    """A linear classifier on pooled C5 features, zero-initialised (the same on every rank, and no draw from the
    global random generators), with its own SGD (built at the first step, on the parameters' device) and top-1
    metrics (torchmetrics, micro: the fraction of images classified right; logged in %).

    Args:
        in_features: the backbone's C5 channels.
        num_classes: classes of the training data (:func:`probe_classes`).
        lr, momentum, weight_decay: the probe's SGD (a constant lr).
    """

    def __init__(self, in_features: int, num_classes: int, lr: float = 0.1, momentum: float = 0.9, weight_decay=0.0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"method.online_probe needs at least 2 classes, the training data has {num_classes}")
        self.classifier = nn.Linear(in_features, num_classes)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.settings = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        # validate_args=False: the checks of the labels' range would read them on the host at every step.
        self.train_top1 = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_top1 = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.optimizer: torch.optim.Optimizer | None = None
        self.held_state: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits of ``features`` ``(N, C5)``, in float32 whatever autocast the caller runs under."""
        with torch.autocast(features.device.type, enabled=False):
            return self.classifier(features.detach().float())

    def build_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = torch.optim.SGD(self.classifier.parameters(), **self.settings)
            if self.held_state is not None:  # a checkpoint's, now that the parameters are on their device
                self.optimizer.load_state_dict(self.held_state)
                self.held_state = None
        return self.optimizer

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the probe's optimiser on ``features`` ``(N, C5)`` (detached here) and ``labels`` ``(N,)``;
        returns the loss and the batch's top-1 (in %), both detached. The gradients are averaged over the ranks, and
        set to ``None`` after the step (no other part of training sees them)."""
        optimizer = self.build_optimizer()
        with torch.enable_grad():
            logits = self.logits(features)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        average_over_ranks([p.grad for p in self.classifier.parameters()])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        top1 = self.train_top1(logits.detach(), labels) * 100.0
        return loss.detach(), top1

    def optimizer_state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps of the optimiser (``None`` before its first step, unless one was loaded)."""
        return self.optimizer.state_dict() if self.optimizer is not None else self.held_state

    def hold_optimizer_state(self, state: dict[str, Any] | None) -> None:
        """A checkpoint's optimiser state, loaded into the optimiser when it is next built (or now, if it is)."""
        if state is None:
            return
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state)
        else:
            self.held_state = state


def attach_probe(model: pl.LightningModule, settings: dict[str, float], num_classes: int) -> OnlineProbe:
    """Give ``model`` an online probe (``model.online_probe``) for ``num_classes`` classes, on its device. DDP leaves
    the probe's parameters out (they get no gradient from the loss; :meth:`OnlineProbe.step` averages theirs)."""
    probe = OnlineProbe(model.backbone.channels[-1], num_classes, **settings)
    model.online_probe = probe.to(model.device)
    names = [f"{PREFIX}{name}" for name, _ in probe.named_parameters()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return probe


def level_zero_features(model: pl.LightningModule) -> LevelZeroFeatures | None:
    """What a training step's online pass fills for ``model``'s probe; ``None`` without one (nothing is taken)."""
    return LevelZeroFeatures() if getattr(model, PROBE_NAME, None) is not None else None


def train_probe(model: pl.LightningModule, level_zero: LevelZeroFeatures | None, labels: torch.Tensor) -> None:
    """One step of ``model``'s probe on the step's level-0 features and their labels; logs ``train/online_loss`` and
    ``train/online_top1`` (%, the batch's)."""
    probe = getattr(model, PROBE_NAME, None)
    if level_zero is None or probe is None:
        return
    loss, top1 = probe.step(*level_zero.batch(labels))
    model.log("train/online_loss", loss)
    model.log("train/online_top1", top1)


def match_checkpoint(model: pl.LightningModule, settings: dict[str, float] | None, checkpoint: dict[str, Any]) -> None:
    """Match a checkpoint's online probe to ``model``'s before its state dict is loaded (the model's
    ``on_load_checkpoint``): a probe the model does not have (``settings`` ``None``) is left out; a model with a probe
    the checkpoint lacks keeps its own fresh one (so the probe can be turned on or off on resume); a model loaded
    outside ``fit`` builds its probe from the checkpoint's weights. The probe's optimiser state is held for its next
    step."""
    state = checkpoint.get("state_dict")
    if state is None:
        return
    saved = {key: value for key, value in state.items() if key.startswith(PREFIX)}
    if settings is None:
        for key in saved:
            del state[key]
        return
    weight = saved.get(f"{PREFIX}classifier.weight")
    probe = getattr(model, PROBE_NAME, None)
    if probe is None and weight is not None:
        probe = attach_probe(model, settings, weight.shape[0])
    if probe is None:
        return
    if weight is None:
        state.update({f"{PREFIX}{key}": value for key, value in probe.state_dict().items()})
        return
    if weight.shape[0] != probe.num_classes:
        raise ValueError(
            f"the checkpoint's online probe has {weight.shape[0]} classes, the training data {probe.num_classes}: "
            "resume on the same data, or with method.online_probe=false"
        )
    probe.hold_optimizer_state(checkpoint.get(OPTIMIZER_STATE))


class OnlineProbeCallback(pl.Callback):
    """The probe's part of a fit, joining the Trainer through the method's ``configure_callbacks``: builds the probe
    for the datamodule's classes at ``setup("fit")`` (before DDP wraps the model), scores the pooled features that
    ``validation_step`` returns for the validation split, logs ``val/online_top1`` (%; the metric's states summed
    over the ranks) and keeps the probe's optimiser state in checkpoints."""

    def __init__(self, settings: dict[str, float]):
        self.settings = settings

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and getattr(pl_module, PROBE_NAME, None) is None:
            attach_probe(pl_module, self.settings, probe_classes(trainer.datamodule))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.online_probe is not None:
            pl_module.online_probe.val_top1.reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        probe = pl_module.online_probe
        if probe is not None and dataloader_idx == VAL_LOADER and outputs is not None:
            probe.val_top1.update(probe.logits(outputs), batch[1])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probe = pl_module.online_probe
        if probe is not None and probe.val_top1.update_called:
            pl_module.log("val/online_top1", probe.val_top1.compute() * 100.0, sync_dist=True)
            probe.val_top1.reset()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if pl_module.online_probe is not None:
            checkpoint[OPTIMIZER_STATE] = pl_module.online_probe.optimizer_state()
