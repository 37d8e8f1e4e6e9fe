"""Checkpoint files: last.ckpt is the newest state, writes are atomic, reads never run code."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.demos.boring_classes import BoringModel

from mcl.backbones import Backbone
from mcl.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    CheckpointKindError,
    LastCheckpoint,
    RetiredCheckpointError,
    atomic_save,
    check_checkpoint_kind,
    check_current_layout,
    checkpoint_kind,
    load_checkpoint,
    newest_loadable,
)
from mcl.detection.finetune import DetectionModule
from mcl.detection.models import build_detector
from mcl.detection.pretrained import load_pretrained
from mcl.export import export
from mcl.linear import LinearProbe, frozen_backbone
from mcl.loss import MultiLevelBYOL, MultiLevelCrossEntropy, MultiLevelInfoNCE
from mcl.methods import MCL, SupervisedMultiLevel
from mcl.train import resume_path

from .conftest import small_trunk


class StepsAtEpochEnd(pl.Callback):
    """Records the global step stored in last.ckpt after each epoch (after every other callback of that epoch)."""

    def __init__(self, path: Path):
        self.path, self.steps = path, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.steps.append(load_checkpoint(self.path)["global_step"])


class WorseEachEpoch(BoringModel):
    """A model whose monitored metric only gets worse, so a best-checkpoint callback saves once."""

    def on_validation_epoch_end(self):
        self.log("score", float(-self.current_epoch))


def boring_trainer(tmp_path, *callbacks, **kwargs):
    return pl.Trainer(
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=4,
        limit_val_batches=1,
        **kwargs,
    )


def test_last_checkpoint_holds_the_newest_state_after_every_epoch(tmp_path):
    """Lightning's save_last on a monitored ModelCheckpoint only writes last.ckpt beside a new best; ours always."""
    last = LastCheckpoint(tmp_path / "checkpoints")
    probe = StepsAtEpochEnd(last.path)
    best = ModelCheckpoint(tmp_path / "checkpoints", monitor="score", mode="max", save_last=False)
    boring_trainer(tmp_path, best, last, probe, max_epochs=3).fit(WorseEachEpoch())
    assert probe.steps == [4, 8, 12]
    assert load_checkpoint(last.path)["global_step"] == 12
    assert len(list((tmp_path / "checkpoints").glob("epoch=0*.ckpt"))) == 1  # the best stayed at epoch 0


def test_last_checkpoint_every_n_steps_and_at_a_mid_epoch_stop(tmp_path):
    last = LastCheckpoint(tmp_path / "checkpoints", every_n_train_steps=3)
    saved = []
    original = last.save

    def record(trainer):
        original(trainer)
        saved.append(last.saved_step)

    last.save = record
    boring_trainer(tmp_path, last, max_epochs=5, max_steps=7).fit(BoringModel())
    assert sorted(set(saved)) == [3, 4, 6, 7]  # every 3 steps, after epoch 1 (step 4), and the final step 7
    assert load_checkpoint(last.path)["global_step"] == 7


def test_bad_interval_is_rejected():
    with pytest.raises(ValueError, match="every_n_train_steps=0"):
        LastCheckpoint("x", every_n_train_steps=0)


KILLED_WRITER = """
import os, sys, torch
from mcl.checkpoints import atomic_save
real_save = torch.save
def half_then_die(obj, path):
    with open(path, "wb") as file:
        file.write(b"PK\\x03\\x04 half a checkpoint")
    os._exit(9)  # killed mid-write
torch.save = half_then_die
atomic_save({"state_dict": {"w": torch.zeros(3)}}, sys.argv[1])
"""


def test_a_kill_while_saving_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save({"global_step": 5, "state_dict": {"w": torch.ones(3)}}, path)
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], capture_output=True, timeout=120)
    assert result.returncode == 9
    assert load_checkpoint(path)["global_step"] == 5  # the old file, whole
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert all(name.startswith(".last.ckpt.") for name in leftovers)  # only the abandoned temp file


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_pickle_that_carries_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode()}, path)
    with pytest.raises(CheckpointError, match="can run code"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned.txt").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (os.urandom(4096), "not a PyTorch checkpoint|not a readable checkpoint"),
        (b"epoch,loss\n0,1.5\n", "not a PyTorch checkpoint|not a readable checkpoint"),
        (None, "not a readable checkpoint"),  # a real checkpoint cut in half
    ],
)
def test_files_that_are_not_checkpoints_are_named(tmp_path, content, message):
    path = tmp_path / "file.ckpt"
    if content is None:
        atomic_save({"state_dict": {"w": torch.randn(1000)}}, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_resume_falls_back_to_the_newest_loadable_checkpoint(tmp_path, caplog):
    older, newer = tmp_path / "epoch=000.ckpt", tmp_path / "epoch=001.ckpt"
    atomic_save({"global_step": 4}, older)
    atomic_save({"global_step": 8}, newer)
    os.utime(older, (1, 1))
    (tmp_path / "last.ckpt").write_bytes(b"truncated")
    assert newest_loadable(tmp_path) == newer
    assert "last.ckpt cannot be read; resuming from" in caplog.text and str(newer) in caplog.text
    newer.write_bytes(b"")
    assert newest_loadable(tmp_path) == older
    older.unlink()
    assert newest_loadable(tmp_path) is None


def save_method(model, path, hyper_parameters=None):
    """A checkpoint as Lightning writes it, as far as loading a model reads it."""
    hparams = dict(model.hparams) if hyper_parameters is None else hyper_parameters
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, path)
    return path


def retired_hyperparameters(model):
    """The model's hyper-parameters as mcl 0.2 or earlier saved them when the method held the loss and schedule
    settings."""
    hparams = {key: value for key, value in model.hparams.items() if key != "loss"}
    hparams.update(warmup_epochs=10.0, min_lr=1e-4, schedule_shape="official", warmup_ratio=1e-4)
    settings = {key: value for key, value in model.loss.settings().items() if key != "levels"}
    if isinstance(model.loss, MultiLevelCrossEntropy):
        return {**hparams, **settings}
    name = "byol" if isinstance(model.loss, MultiLevelBYOL) else "infonce"
    return {"temperature": 1.0, **hparams, **settings, "loss": name}


LOSSES = [
    (MCL, MultiLevelInfoNCE(2, [0.6, 0.4], temperature=0.5, target_assignment="same-level")),
    (MCL, MultiLevelBYOL(2, "official", target_assignment="all-levels")),
    (SupervisedMultiLevel, MultiLevelCrossEntropy(2, "official", label_smoothing=0.1)),
]


@pytest.mark.parametrize(("method", "loss"), LOSSES)
def test_models_load_from_checkpoints_with_their_loss(tmp_path, method, loss):
    """A checkpoint's model comes back with the same weights and the same loss."""
    model = method(**small_trunk(2, loss=loss))
    path = save_method(model, tmp_path / "model.ckpt")
    assert all(not isinstance(value, torch.nn.Module) for value in load_checkpoint(path)["hyper_parameters"].values())
    loaded = method.load_from_checkpoint(path)
    assert type(loaded.loss) is type(loss) and loaded.loss.settings() == loss.settings()
    assert loaded.hparams["loss"] == loss.config()
    state = model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in loaded.state_dict().items())


@pytest.mark.parametrize(("method", "loss"), LOSSES)
def test_a_checkpoint_of_a_retired_layout_is_refused_naming_the_version_and_the_update(tmp_path, method, loss):
    """mcl 0.2 or earlier saved the loss and schedule settings among the method's hyper-parameters: such a file is
    refused with the version that wrote it and what to change, not read with today's defaults."""
    model = method(**small_trunk(2, loss=loss))
    path = save_method(model, tmp_path / "model.ckpt", retired_hyperparameters(model))
    with pytest.raises(RetiredCheckpointError) as refused:
        method.load_from_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path} was written by mcl 0.2 or earlier in a layout this version does not read")
    assert "replace them by hyper_parameters['loss'], the loss's config" in message
    assert "the schedule settings ['warmup_epochs', 'min_lr', 'schedule_shape', 'warmup_ratio']" in message
    assert "torch.load(path, weights_only=True) and torch.save" in message


def test_an_interp_neck_without_stage_is_refused_with_the_stage_to_add():
    hparams = {"neck": {"name": "interp", "out_channels": 32}, "levels": 3, "loss": {"_target_": "x"}}
    with pytest.raises(RetiredCheckpointError, match=r"old.ckpt was written by mcl 0.2 or earlier .* add 'stage': 5"):
        check_current_layout(hparams, "old.ckpt")
    check_current_layout({**hparams, "neck": {"name": "interp", "out_channels": 32, "stage": 5}}, "new.ckpt")


# The top-level keys Lightning writes beside the weights (as in checkpoints of mcl-train, mcl-linear, mcl-finetune).
LIGHTNING_KEYS = {
    "epoch": 0,
    "global_step": 1,
    "pytorch-lightning_version": "2.5.0",
    "loops": {"fit_loop": {}},
    "callbacks": {},
    "optimizer_states": [],
    "lr_schedulers": [],
}


def lightning_checkpoint(module: pl.LightningModule, weights: bool = True, **extra) -> dict:
    """What Lightning's checkpoint of ``module`` holds: its state dict (with ``weights=False``, its keys with scalar
    zeros: the kind is told by the keys), its saved hyper-parameters if it has any, and the ``extra`` keys its
    ``on_save_checkpoint`` adds."""
    state = module.state_dict() if weights else dict.fromkeys(module.state_dict(), torch.zeros(()))
    checkpoint = {**LIGHTNING_KEYS, "state_dict": state, **extra}
    if module.hparams:
        checkpoint.update(hparams_name=None, hyper_parameters=dict(module.hparams))
    return checkpoint


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """One file of each kind, by name: the path and the kind it is. Pretraining (MCL and supervised), linear probe
    and detector checkpoints hold the state dict keys of the real modules (the MCL one its weights too); exports are
    written by mcl-export from the MCL one, in each of its two file types (a torch state dict, a detectron2 pickle)."""
    folder = tmp_path_factory.mktemp("kinds")
    generator = {"montage_generator_states": torch.zeros(1, 5056, dtype=torch.uint8), "initial_weight_norm": 1.0}
    mcl = folder / "mcl.ckpt"
    torch.save(lightning_checkpoint(MCL(**small_trunk(2)), **generator), mcl)
    files = {"mcl.ckpt": (mcl, "pretraining")}
    with torch.device("meta"):  # the keys without the time random initialisation takes
        others = {
            "supervised.ckpt": (SupervisedMultiLevel(**small_trunk(2), num_classes=4), "pretraining"),
            # Plain supervised: backbone and classifier weights only, as a linear probe's.
            "supervised_pooled.ckpt": (
                SupervisedMultiLevel(**small_trunk(1), num_classes=4, classifier_input="pooled_c5"),
                "pretraining",
            ),
            "linear.ckpt": (LinearProbe(Backbone("resnet18"), num_classes=4, optimizer=None), "linear probe"),
            "detector.ckpt": (DetectionModule(build_detector("fasterrcnn_v2", "resnet18", 3), None, [0.5]), "detector"),
        }
    for name, (module, kind) in others.items():
        extra = generator if kind == "pretraining" else {}
        torch.save(lightning_checkpoint(module, weights=False, **extra), folder / name)
        files[name] = (folder / name, kind)
    for output in ("fasterrcnn_v2.pth", "detectron2.pkl"):
        files[output] = (export(mcl, output.split(".")[0], folder / output), "export")
    torch.save({"model": torch.zeros(2), "step": 3}, folder / "foreign.pt")
    files["foreign.pt"] = (folder / "foreign.pt", "unknown")
    headless = {**LIGHTNING_KEYS, "state_dict": {"backbone.model.conv1.weight": torch.zeros(1)}}  # no hparams
    torch.save(headless, folder / "headless.ckpt")
    files["headless.ckpt"] = (folder / "headless.ckpt", "unknown")
    return files


def read_any(path: Path) -> dict:
    """A checkpoint as train's resume reads it (metadata only); detectron2's pickles (numpy values, which
    load_checkpoint refuses) with pickle."""
    if path.suffix == ".pkl":
        return pickle.loads(path.read_bytes())
    return load_checkpoint(path, map_location="meta")


def test_checkpoint_kind_tells_which_program_wrote_a_file(kinds):
    assert len(kinds) == 9
    assert {name: checkpoint_kind(read_any(path)) for name, (path, _) in kinds.items()} == {
        name: kind for name, (_, kind) in kinds.items()
    }
    with pytest.raises(CheckpointError, match=r"detectron2.pkl is a pickle, not a PyTorch checkpoint: mcl-export's"):
        load_checkpoint(kinds["detectron2.pkl"][0])  # why these are read with pickle above


def test_a_checkpoint_of_the_wrong_kind_is_refused_with_what_to_pass(kinds):
    path = kinds["linear.ckpt"][0]
    with pytest.raises(CheckpointKindError) as refused:
        check_checkpoint_kind(read_any(path), path, expected="pretraining", entry_point="mcl-train")
    assert str(refused.value) == (
        f"{path} is a linear probe checkpoint (written by mcl-linear), not a pretraining checkpoint: mcl-train "
        "ckpt_path=... resumes pretraining from its own checkpoints (checkpoints/last.ckpt of a pretraining run); a "
        "linear probe holds a frozen backbone and a classifier: to fine-tune or evaluate, pass the pretraining "
        "checkpoint it was trained from (the checkpoint=... in its run's .hydra/config.yaml)"
    )
    pretraining = kinds["mcl.ckpt"][0]
    assert check_checkpoint_kind(read_any(pretraining), pretraining, "pretraining", "mcl-train") == "pretraining"
    with pytest.raises(
        CheckpointKindError,
        match=rf"not a detector checkpoint: mcl-finetune ckpt_path=.*; to resume "
        rf"its pretraining use mcl-train ckpt_path={pretraining}, .*mcl-finetune model.pretrained=",
    ):
        check_checkpoint_kind(read_any(pretraining), pretraining, "detector", "mcl-finetune")
    exported = kinds["fasterrcnn_v2.pth"][0]
    with pytest.raises(CheckpointKindError, match=r"v2.pth is a bare weight file .* has no training state"):
        check_checkpoint_kind(read_any(exported), exported, "pretraining", "mcl-train")
    foreign = kinds["foreign.pt"][0]
    with pytest.raises(
        CheckpointKindError,
        match=r"is not a checkpoint of this library \(its top-level keys: model, "
        r"step\), not a pretraining checkpoint or a bare weight file: mcl-finetune model.pretrained",
    ):
        check_checkpoint_kind(read_any(foreign), foreign, ("pretraining", "export"), "mcl-finetune model.pretrained")
    with pytest.raises(ValueError, match=r"expected=\['probe'\] names no checkpoint kind"):
        check_checkpoint_kind({}, "x.ckpt", "probe", "mcl-train")


def test_linear_finetune_and_export_name_the_kind_they_were_given(kinds, tmp_path):
    detector, linear, pretraining = (kinds[name][0] for name in ("detector.ckpt", "linear.ckpt", "mcl.ckpt"))
    with pytest.raises(CheckpointKindError, match=r"is a detector checkpoint .*: mcl-linear checkpoint=\.\.\. trains"):
        frozen_backbone(str(detector))
    with pytest.raises(CheckpointKindError, match=r"is a linear probe checkpoint .*: mcl-export exports"):
        export(linear, "timm", tmp_path / "out.pth")
    with pytest.raises(CheckpointKindError, match=r"linear probe checkpoint .*: mcl-train ckpt_path=\.\.\. resumes"):
        resume_path(OmegaConf.create({"ckpt_path": str(linear)}))  # mcl-train's resume, before the folder changes
    target = build_detector("fasterrcnn_v2", "resnet18", 3, fpn_channels=16)  # small_trunk's pyramid width
    with pytest.raises(CheckpointKindError, match=r"is a linear probe .*: mcl-finetune model.pretrained=\.\.\. starts"):
        load_pretrained(target, "fasterrcnn_v2", linear)
    # What model.pretrained takes still loads: a pretraining checkpoint and the export for the architecture.
    assert not any(key.startswith("backbone.body.") for key in load_pretrained(target, "fasterrcnn_v2", pretraining))
    assert load_pretrained(target, "fasterrcnn_v2", kinds["fasterrcnn_v2.pth"][0])
